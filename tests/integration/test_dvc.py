"""`dvc repro` end to end in a temporary clone: run, no-op, a param change, push/pull."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_project, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _ran(output: str) -> list[str]:
    """The stages that ran, but the source check, which runs every time (always_changed)."""
    ran = re.findall(r"Running stage '([^']+)'", output)
    return [s for s in ran if not s.startswith("source@")]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tracked project files, as a fresh git repo, with small params."""
    dest = tmp_path_factory.mktemp("clone") / "project"
    copy_project(dest)
    raw = tiny_params(
        ["sample_mias"],
        sample={"mias_patients": 15},
        split={"k_folds": 3},
        base=dest / "params.yaml",
    )
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    remote = dest.parent / "remote"
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    _run(["dvc", "remote", "add", "-d", "-f", "--local", "test", str(remote)], dest)
    return dest


def test_repro_noop_param_change_and_push_pull(clone: Path) -> None:
    output = _run(["dvc", "repro"], clone)
    assert re.findall(r"Running stage '([^']+)'", output)[0] == "source@sample_mias"
    first = _ran(output)
    assert first[:4] == [
        "acquire@sample_mias",
        "ingest@sample_mias",
        "validate@sample_mias",
        "convert@sample_mias",
    ]
    assert first[4:7] == [
        "split@sample_mias",
        "train@sample_mias-vgg16",
        "evaluate@sample_mias",
    ]
    assert sorted(first[7:]) == ["explain_check@sample_mias", "report"]  # both after evaluate
    assert (clone / "reports/comparison.md").is_file()
    page = (clone / "reports/sample_mias/report.html").read_text()  # the study report
    assert "ECE raw" in page and "data:image/png;base64," in page and "98–99 %" in page
    metrics = _run(["dvc", "metrics", "show", "--json"], clone)
    # the summary row is the DVC metric; the detail (f1_macro_mean, …) is a plain out
    assert "metrics/summary/sample_mias/vgg16.json" in metrics and "cv_f1_std" in metrics
    assert "f1_macro_mean" not in metrics

    assert _ran(_run(["dvc", "repro"], clone)) == []  # nothing changed: nothing runs

    raw = yaml.safe_load((clone / "params.yaml").read_text())
    raw["train"]["epochs"] = 2
    (clone / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    again = _ran(_run(["dvc", "repro"], clone))
    assert again[:2] == ["train@sample_mias-vgg16", "evaluate@sample_mias"]
    assert sorted(again[2:]) == ["explain_check@sample_mias", "report"]

    _run(["dvc", "push"], clone)
    processed = clone / "data/processed/sample_mias"
    before = {p.relative_to(processed): p.read_bytes() for p in processed.rglob("*") if p.is_file()}
    shutil.rmtree(clone / "data")
    shutil.rmtree(clone / "models")
    shutil.rmtree(clone / ".dvc/cache")
    _run(["dvc", "pull"], clone)
    after = {p.relative_to(processed): p.read_bytes() for p in processed.rglob("*") if p.is_file()}
    assert after == before
    assert (clone / "models/sample_mias/vgg16/head.keras").is_file()
    assert _ran(_run(["dvc", "repro"], clone)) == []  # pulled outputs are up to date
