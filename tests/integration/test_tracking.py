"""MLflow tracking end to end on a real local store (and once against a real `mlflow server`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mammoflow.config import Config
from mammoflow.data.sample import FAKE_PHI
from mammoflow.paths import Layout
from mammoflow.reporting.report import report_stage
from mammoflow.training.train import train_stage
from tests.helpers import (
    free_port,
    mlflow_client,
    stop_process_tree,
    tiny_params,
    trained_project,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "sample_cmmd"  # DICOM with planted fake PHI in its headers
BACKBONES = ["vgg16", "resnet50"]


def _params(**train: object) -> dict[str, Any]:
    return tiny_params(
        [DATASET],
        BACKBONES,
        sample={"cmmd_patients": 18},
        split={"k_folds": 3, "test_size": 0.2},
        train=train,
        bootstrap=50,
        log_models="all",
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config]]:
    root = tmp_path_factory.mktemp("tracking")
    with trained_project(root, _params(), DATASET) as cfg:
        yield root, cfg


def _runs(root: Path) -> list:  # type: ignore[type-arg]
    client = mlflow_client(root)
    exp = client.get_experiment_by_name(f"mammoflow-{DATASET}")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_layout_parents_folds_and_test(project: tuple[Path, Config]) -> None:
    root, _ = project
    runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("mammoflow.role") == "parent"]
    assert sorted(r.info.run_name for r in parents) == sorted(BACKBONES)
    for parent in parents:
        assert parent.info.status == "FINISHED"
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(k.info.run_name for k in kids) == ["fold-1", "fold-2", "fold-3", "test"]
        assert all(k.info.status == "FINISHED" for k in kids)
        folds = [k for k in kids if k.info.run_name.startswith("fold-")]
        for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
            values = [k.data.metrics[f"val_{key}"] for k in folds]
            assert parent.data.metrics[f"{key}_mean"] == pytest.approx(np.mean(values))
            assert parent.data.metrics[f"{key}_std"] == pytest.approx(np.std(values, ddof=1))
        assert "test_f1_macro" in parent.data.metrics
        assert "test_f1_macro_ci_low" in parent.data.metrics
        tags = parent.data.tags
        for tag in (
            "git_commit",
            "git_dirty",
            "dvc_data_hash",
            "split_hash",
            "weights_source",
            "weights_sha256",
            "tensorflow_version",
            "keras_version",
            "device",
            "precision",
            "seed",
        ):
            assert tag in tags, tag
        fold = folds[0]
        assert fold.data.params["train.learning_rate"] == "0.0001"
        assert "epoch_loss" in fold.data.metrics
        history = mlflow_client(root).get_metric_history(fold.info.run_id, "epoch_loss")
        assert len(history) == 1  # one epoch
        # the figures train.py draws and hands to tracking, under their names
        evaluation = {"classification_report.txt", "confusion_matrix.png", "roc_curve.png"}
        for kid, extra in ((fold, {"training_curves.png"}), (_test_run(kids), set())):
            listed = {a.path for a in mlflow_client(root).list_artifacts(kid.info.run_id)}
            assert evaluation | extra | {"predictions.json"} <= listed, kid.info.run_name


def _test_run(kids: list[Any]) -> Any:
    return next(k for k in kids if k.info.run_name == "test")


def test_fold_model_predicts_on_raw_grey_image(project: tuple[Path, Config]) -> None:
    import mlflow

    root, _ = project
    fold = next(r for r in _runs(root) if r.info.run_name == "fold-1")
    uri = fold.data.tags["mammoflow.model_uri"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(uri)
    raw = np.random.default_rng(0).uniform(0, 255, (1, 77, 53, 1)).astype(np.float32)
    prob = np.asarray(model.predict(raw))
    assert prob.shape == (1, 2)
    assert prob.sum() == pytest.approx(1.0, abs=1e-3)


def test_registry_champion_alias(project: tuple[Path, Config]) -> None:
    root, _ = project
    champion = json.loads((root / "metrics/champion" / f"{DATASET}.json").read_text())
    version = mlflow_client(root).get_model_version_by_alias(f"mammoflow-{DATASET}", "champion")
    assert version.version == champion["registry"]["version"]
    assert champion["best"] in BACKBONES


def test_dvc_metrics_match_mlflow(project: tuple[Path, Config]) -> None:
    root, _ = project
    for backbone in BACKBONES:
        summary = json.loads((root / "metrics" / DATASET / f"{backbone}.json").read_text())
        parent = mlflow_client(root).get_run(summary["mlflow_parent_run_id"])
        assert parent.data.metrics["f1_macro_mean"] == pytest.approx(summary["cv"]["f1_macro_mean"])
        assert parent.data.metrics["test_accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_rerun_skips_finished_folds(project: tuple[Path, Config]) -> None:
    root, cfg = project
    n_before = len(_runs(root))
    history = Layout(root).models(DATASET, "vgg16") / "history.json"
    trained = json.loads(history.read_text())
    res = train_stage(cfg, DATASET, "vgg16", Layout(root))
    assert res["resumed_folds"] == [1, 2, 3]
    assert res["trained_folds"] == []
    assert len(_runs(root)) == n_before
    # the learning curves of resumed folds are read back from MLflow, not lost
    resumed = json.loads(history.read_text())
    assert set(resumed) == {"1", "2", "3"} and set(trained) >= set(resumed)
    assert all(resumed[f] == trained[f] for f in resumed)


def _wait_for_running_fold(root: Path, proc: subprocess.Popen, timeout: float = 240) -> None:  # type: ignore[type-arg]
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        runs = [r for r in _runs(root) if r.data.tags.get("mammoflow.role") == "fold"]
        if any(
            r.info.status == "RUNNING" and r.data.params.get("train.epochs") == "40" for r in runs
        ):
            return
        time.sleep(0.5)
    raise AssertionError("no fold run started")


def test_killed_run_ends_failed(project: tuple[Path, Config]) -> None:
    root, _ = project
    params = root / "params-long.yaml"
    params.write_text(yaml.safe_dump(_params(epochs=40)))
    cmd = [
        sys.executable,
        "-m",
        "mammoflow.cli",
        "train",
        "--dataset",
        DATASET,
        "--backbone",
        "vgg16",
        "--params",
        str(params),
    ]
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_running_fold(root, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    long_runs = [r for r in _runs(root) if r.data.params.get("train.epochs") == "40"]
    assert long_runs, "the long configuration logged no runs"
    folds = [r for r in long_runs if r.data.tags.get("mammoflow.role") == "fold"]
    assert [r.info.status for r in folds] == ["FAILED"]
    parent = next(
        r
        for r in _runs(root)
        if r.data.tags.get("mammoflow.role") == "parent"
        and r.data.params.get("train.epochs") == "40"
    )
    assert parent.info.status == "FAILED"

    # SIGKILL cannot be caught: the next run of the configuration marks the orphan FAILED
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_running_fold(root, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    running = [
        r
        for r in _runs(root)
        if r.info.status == "RUNNING" and r.data.tags.get("mammoflow.role") == "fold"
    ]
    assert len(running) == 1
    from mammoflow.tracking import Tracker

    tracker = Tracker(root=root)
    parent_id = running[0].data.tags["mlflow.parentRunId"]
    exp_id = running[0].info.experiment_id
    assert tracker.fail_stale_children(exp_id, parent_id) == [running[0].info.run_name]
    assert mlflow_client(root).get_run(running[0].info.run_id).info.status == "FAILED"


def test_no_phi_in_params_tags_or_artifacts(project: tuple[Path, Config]) -> None:
    root, _ = project
    secrets = [*FAKE_PHI.values(), "07-18-2010"]
    haystack: list[str] = []
    for run in _runs(root):
        haystack += [f"{k}={v}" for k, v in run.data.params.items()]
        haystack += [f"{k}={v}" for k, v in run.data.tags.items()]
    for path in (root / "mlartifacts").rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            haystack.append(path.read_bytes().decode("latin-1"))
    for path in [*(root / "metrics").rglob("*.json"), *(root / "data/interim").rglob("*.json")]:
        haystack.append(path.read_text())
    text = "\n".join(haystack)
    assert len(text) > 10_000  # the scan really read something
    for secret in secrets:
        assert secret not in text, secret


def test_http_tracking_server(project: tuple[Path, Config], tmp_path: Path) -> None:
    """The same stage against a real `mlflow server` over HTTP (artifacts served by it)."""
    root, cfg = project
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        lean = cfg.model_copy(
            update={"tracking": cfg.tracking.model_copy(update={"log_models": "final"})}
        )
        res = train_stage(lean, DATASET, "vgg16", Layout(root))
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(res["parent_run_id"])
        assert run.info.status == "FINISHED"
        assert "f1_macro_mean" in run.data.metrics
        assert any((tmp_path / "artifacts").rglob("MLmodel"))
        client.delete_experiment(run.info.experiment_id)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        stop_process_tree(server, grace=30)


def test_compare_reads_mlflow_and_writes_only_when_asked(project: tuple[Path, Config]) -> None:
    root, cfg = project
    res = report_stage(cfg, [DATASET], Layout(root), write=False)
    assert [row[0] for row in res["tables"][DATASET][1:]] == BACKBONES
    assert not (root / "reports" / "comparison.md").exists()
    report_stage(cfg, [DATASET], Layout(root), write=True)
    assert f"## {DATASET}" in (root / "reports" / "comparison.md").read_text()
    assert "data:image/png;base64," in (root / "reports" / "comparison.html").read_text()


def test_a_fold_trained_again_for_the_served_model_says_so(project: tuple[Path, Config]) -> None:
    """Reused folds whose cached weights are gone are trained again for the ensemble: a
    visible warning and a parent-run tag say so and whether the retrained member matches."""
    from mammoflow.training.train import TAG_RETRAINED, RetrainedFoldWarning

    root, cfg = project
    client = mlflow_client(root)
    test_runs = [
        r
        for r in _runs(root)
        if r.data.tags.get("mammoflow.role") == "test"
        and r.data.tags.get("mammoflow.backbone") == "vgg16"
    ]
    for run in test_runs:  # the test model is made again from the folds' weights …
        client.delete_run(run.info.run_id)
    for cached in (root / ".cache" / "folds").glob("vgg16-*-fold-2.npz"):
        cached.unlink()  # … and fold 2's are gone
    with pytest.warns(RetrainedFoldWarning, match=r"fold 2's weights .* match the logged run's"):
        res = train_stage(cfg, DATASET, "vgg16", Layout(root))
    assert res["resumed_folds"] == [1, 2, 3]
    parent = client.get_run(test_runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags[f"{TAG_RETRAINED}2"].startswith("its validation predictions match")
    assert f"{TAG_RETRAINED}1" not in parent.data.tags
