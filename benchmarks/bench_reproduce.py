"""How long `mammoflow reproduce` takes for a registered sample model, and whether it is identical.

In a temporary copy of the checkout (a fresh git repo, a local-directory DVC remote): `dvc repro`
of one dataset / backbone with the repo's params (the CPU demo: sample_mias, 80 px, random
weights, the params.yaml epochs and folds), `dvc push`, data/ and the DVC cache deleted, then
`mammoflow reproduce models:/mammoflow-<ds>@champion`. Prints one JSON object.

    .venv/bin/python benchmarks/bench_reproduce.py [--dataset sample_mias] [--backbone vgg16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.email=b@b", "-c", "user.name=b"]


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    # the copy's own code (not the editable install's), so edits to the checkout meanwhile
    # change nothing here
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd / "src"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        sys.exit(f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _copy(dest: Path) -> None:
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("metrics/", "plots/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="sample_mias")
    ap.add_argument("--backbone", default="vgg16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mammoflow-bench-reproduce-") as tmp:
        project = Path(tmp) / "project"
        _copy(project)
        raw = yaml.safe_load((project / "params.yaml").read_text())
        raw["pipeline"]["datasets"] = [args.dataset]
        raw["model"]["backbones"] = [args.backbone]
        (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        _run(["git", "init", "-q"], project)
        _run([*GIT, "add", "-A"], project)
        _run([*GIT, "commit", "-qm", "bench"], project)
        _run(
            ["dvc", "remote", "add", "-d", "-f", "--local", "b", str(Path(tmp) / "remote")], project
        )
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        _run(["dvc", "repro", f"evaluate@{args.dataset}"], project)
        t_pipeline = time.perf_counter() - t0
        _run(["dvc", "push"], project)
        shutil.rmtree(project / "data")
        shutil.rmtree(project / ".dvc" / "cache")
        t0 = time.perf_counter()
        uri = f"models:/mammoflow-{args.dataset}@champion"
        res = _run(["mammoflow", "reproduce", uri], project, check=False)
        t_reproduce = time.perf_counter() - t0
        verdict = re.findall(r"^verdict: (.*)$", res.stdout, re.M)
        print(res.stdout[-4000:], file=sys.stderr)
        print(
            json.dumps(
                {
                    "dataset": args.dataset,
                    "backbone": args.backbone,
                    "epochs": raw["train"]["epochs"],
                    "k_folds": raw["split"]["k_folds"],
                    "pipeline_s": round(t_pipeline, 1),
                    "reproduce_s": round(t_reproduce, 1),
                    "exit_code": res.returncode,
                    "verdict": verdict[0] if verdict else None,
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "load_before": round(load, 2),
                    "load_after": round(os.getloadavg()[0], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
