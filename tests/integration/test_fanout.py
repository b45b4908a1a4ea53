"""The train stage's own fold fan-out on a real 2-worker Dask LocalCluster.

``MAMMOFLOW_DASK_ADDRESS`` is an execution setting: ``mammoflow train`` (the command ``dvc repro``
runs) extracts the features once, sends one task per fold to the cluster and aggregates them —
with the same numbers as the serial stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mammoflow.paths import Layout
from mammoflow.training.train import train_stage
from tests.helpers import prepare_data, project_dir, tiny_params

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_train_stage_fans_folds_out_on_dask_with_serial_numbers(tmp_path: Path) -> None:
    """`mammoflow train` with MAMMOFLOW_DASK_ADDRESS on a 2-worker LocalCluster: the fold tasks
    ran on the workers, the features were extracted once, and every fold metric and validation
    probability equals the serial stage's."""
    from distributed import Client, LocalCluster

    raw = tiny_params(
        ["sample_mias"],
        sample={"mias_patients": 12, "cmmd_patients": 4},
        split={"k_folds": 3, "test_size": 0.2},
        # a learning rate that separates the classes: near-tied probabilities would let the
        # last-bit differences of two thread schedules reorder a ROC curve
        train={"epochs": 3, "precision": "float32", "learning_rate": 0.02},
        log_models="none",
    )
    fanned_root, serial_root = tmp_path / "dask", tmp_path / "serial"
    fanned_root.mkdir()
    with project_dir(fanned_root, raw) as cfg:
        prepare_data(cfg, "sample_mias")
    shutil.copytree(fanned_root, serial_root)

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MAMMOFLOW_DASK_ADDRESS"] = cluster.scheduler_address
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mammoflow",
                "train",
                "--dataset",
                "sample_mias",
                "--backbone",
                "vgg16",
            ],
            cwd=fanned_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with Client(cluster.scheduler_address) as client:
            ran = {k for ts in client.run(_task_keys).values() for k in ts}
    assert {k.split("-")[3] for k in ran if k.startswith("fold-sample_mias-vgg16")} == {
        "1",
        "2",
        "3",
    }, ran
    caches = list((fanned_root / ".cache" / "features").glob("*.npy"))
    assert len(caches) == 1, caches  # extracted once, in the stage; the workers read it

    with project_dir(serial_root, raw) as cfg:
        serial = train_stage(cfg, "sample_mias", "vgg16", layout=Layout())
    fanned = json.loads((fanned_root / "metrics" / "sample_mias" / "vgg16.json").read_text())
    expected = json.loads((serial_root / "metrics" / "sample_mias" / "vgg16.json").read_text())
    assert serial["trained_folds"] == [1, 2, 3]
    for section in ("cv", "test"):
        for name, value in expected[section].items():
            assert fanned[section][name] == pytest.approx(value, abs=1e-6), (section, name)
    preds = [
        json.loads((root / "models" / "sample_mias" / "vgg16" / "predictions.json").read_text())
        for root in (fanned_root, serial_root)
    ]
    for fold in ("1", "2", "3"):
        a, b = (p["folds"][fold] for p in preds)
        assert a["image_id"] == b["image_id"]
        np.testing.assert_allclose(a["prob"], b["prob"], atol=1e-4)


def _task_keys(dask_worker: object) -> list[str]:
    """The keys of the tasks a worker has run (its task-state log)."""
    log = getattr(dask_worker, "state").log  # noqa: B009 - the worker's state machine
    return sorted({str(entry[0]) for entry in log if isinstance(entry[0], str)})
