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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MIAS_ARCHIVE = ROOT.parent / "shared" / "data" / "mias" / "all-mias.tar.gz"
MAMMOFLOW = Path(sys.executable).parent / "mammoflow"
LABEL = "weights: none, 224 px — a demo, not transfer learning"


def test_study_command_on_real_mias_with_weights_none(tmp_path: Path) -> None:
    if not MIAS_ARCHIVE.is_file():
        pytest.skip(f"real MIAS archive not found at {MIAS_ARCHIVE}")
    project = tmp_path / "project"
    project.mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["datasets"]["mias"]["source"] = str(MIAS_ARCHIVE)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
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
