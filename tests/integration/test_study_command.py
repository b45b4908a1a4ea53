"""`mammoflow study` on the real MIAS archive: weights none on purpose, 1 epoch, 2 folds, VGG16.

The real-study command runs acquire → … → compare with the dataset's own settings: at each
backbone's native size (224 px for VGG16, not the demo's 80), and the comparison says what was
used ("weights: none, 224 px — a demo, not transfer learning").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import GIT_ID, dvc_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MIAS_ARCHIVE = ROOT.parent / "shared" / "data" / "mias" / "all-mias.tar.gz"
MAMMOFLOW = Path(sys.executable).parent / "mammoflow"
LABEL = "weights: none, 224 px — a demo, not transfer learning"


def test_study_command_on_real_mias_with_weights_none(tmp_path: Path) -> None:
    if not MIAS_ARCHIVE.is_file():
        pytest.skip(f"real MIAS archive not found at {MIAS_ARCHIVE}")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["datasets"]["mias"]["source"] = str(MIAS_ARCHIVE)
    project = dvc_project(tmp_path / "project", raw).parent
    cheap = [  # the paper's settings otherwise; these only make the test affordable on 2 cores
        "train.epochs=1",
        "split.k_folds=2",
        "convert.size=256",
        "model.trainable_layers=1",
        "tracking.log_models=none",
        "evaluate.bootstrap=100",
    ]
    cmd = [str(MAMMOFLOW), "study", "--dataset", "mias", "--weights", "none"]
    cmd += ["--backbone", "vgg16", *(a for s in cheap for a in ("--set", s))]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["COLUMNS"] = "200"
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=3000)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]

    # the comparison table, in the terminal and in the report, says what was used
    assert LABEL in " ".join(res.stdout.split())
    md = (project / "reports" / "study-mias.md").read_text(encoding="utf-8")
    assert "## mias" in md and f"Settings used: {LABEL}" in md
    assert "epochs 1, batch 16, lr 0.0001, folds 2." in md and "| vgg16 |" in md
    assert not (project / "reports" / "comparison.md").exists()  # the pipeline's stays its own
    assert "DVC experiment: " in res.stderr

    # it trained at VGG16's native size: the frozen-prefix features were extracted at 224 px
    sidecars = list((project / ".cache" / "features").glob("mias-vgg16-*.json"))
    assert len(sidecars) == 1
    key = json.loads(sidecars[0].read_text(encoding="utf-8"))["key"]
    assert key["input_size"] == 224 and key["weights_sha256"] == "none"

    # and MLflow recorded it
    from mlflow.tracking import MlflowClient

    from mammoflow.tracking import experiment_name

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment_name("mias"))
    assert exp is not None
    parents = client.search_runs([exp.experiment_id], "tags.`mammoflow.role` = 'parent'")
    assert len(parents) == 1
    params, tags = parents[0].data.params, parents[0].data.tags
    assert params["model.weights"] == "none" and params["model.input_size"] == "None"
    assert params["train.epochs"] == "1" and params["split.k_folds"] == "2"
    assert tags["weights_source"] == "none"
    assert json.loads((project / "metrics" / "mias" / "vgg16.json").read_text())["folds"] == 2


def test_study_runs_as_a_dvc_experiment_and_leaves_the_workspace_pipeline_alone(
    tmp_path: Path,
) -> None:
    """`mammoflow study` of a dataset outside pipeline.datasets: its stages run through DVC as
    an experiment (in `dvc exp show`, its data in the DVC cache), the command line's options
    reach the stages as params, and the workspace's params.yaml and dvc.lock are unchanged."""
    from tests.helpers import dvc_status, tiny_params

    raw = tiny_params(
        ["sample_cmmd"], sample={"mias_patients": 12}, split={"k_folds": 2, "test_size": 0.2}
    )
    params = dvc_project(tmp_path / "project", raw)
    project = params.parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{MAMMOFLOW.parent}{os.pathsep}{env['PATH']}"  # bin/mammoflow's CLI
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "repro", "-q"], cwd=project, env=env, check=True)  # the sample pipeline
    subprocess.run(["git", *GIT_ID, "commit", "-qam", "sample run"], cwd=project, check=True)
    before = {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.lock")}

    cmd = [str(MAMMOFLOW), "study", "--dataset", "sample_mias", "--weights", "none"]
    cmd += ["--set", "train.epochs=2", "--set", "tracking.log_models=none"]
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    name = res.stderr.split("DVC experiment: ")[1].split()[0]

    assert {n: (project / n).read_bytes() for n in before} == before
    # the sample pipeline's stages are all still up to date (only `report`, whose deps are the
    # whole metrics/ and models/ folders, sees the study's files there)
    assert dvc_status(project, ["evaluate@sample_cmmd"]) == {}
    assert (project / "data" / "processed" / "sample_mias").is_dir()
    shown = subprocess.run(
        [dvc, "exp", "show", "--json"], cwd=project, capture_output=True, text=True, check=True
    ).stdout
    exps = [e for entry in json.loads(shown) for e in entry.get("experiments") or []]
    (exp,) = [e for e in exps if e.get("name") == name]
    exp_params = exp["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert exp_params["pipeline"]["datasets"] == ["sample_mias"]
    assert exp_params["datasets"]["sample_mias"]["train"]["epochs"] == 2
    summary = json.loads((project / "metrics" / "sample_mias" / "vgg16.json").read_text())
    assert summary["folds"] == 2
    assert (project / "reports" / "study-sample_mias.md").is_file()
