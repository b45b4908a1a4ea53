"""The study's evidence end to end on a tiny sample: calibration (and what builds on it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mammoflow.config import Config
from mammoflow.evaluation.calibration import apply_temperature
from mammoflow.paths import Layout
from mammoflow.reporting.report import report_stage
from mammoflow.tracking import CALIBRATION_FILE, TAG_TEMPERATURE
from mammoflow.training.train import train_stage
from tests.helpers import (
    mlflow_client,
    tiny_params,
    trained_project,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "sample_cmmd"
BACKBONE = "vgg16"


def _params() -> dict[str, Any]:
    return tiny_params(
        [DATASET],
        [BACKBONE],
        sample={"cmmd_patients": 18},
        split={"k_folds": 2, "test_size": 0.3},
        bootstrap=30,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config]]:
    root = tmp_path_factory.mktemp("evidence")
    with trained_project(root, _params(), DATASET) as cfg:
        yield root, cfg


def test_calibration_fitted_on_oof_logged_and_registered(project: tuple[Path, Config]) -> None:
    root, _ = project
    models = root / "models" / DATASET / BACKBONE
    sidecar = json.loads((models / "calibration.json").read_text())
    preds = json.loads((models / "predictions.json").read_text())
    n_oof = sum(len(rec["y_true"]) for rec in preds["folds"].values())
    assert sidecar["n_fit"] == n_oof and sidecar["n_test"] == len(preds["test"]["y_true"])
    t = sidecar["temperature"]
    assert t > 0
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    assert summary["calibration"]["temperature"] == t
    client = mlflow_client(root)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    for key in ("test_ece", "test_calibrated_ece", "test_classwise_ece", "test_ece_ci_high"):
        assert key in parent.data.metrics
    test_run = summary["mlflow_test_run_id"]
    assert client.get_run(test_run).data.tags[TAG_TEMPERATURE] == f"{t:.6g}"
    listed = {a.path for a in client.list_artifacts(test_run)}
    assert CALIBRATION_FILE in listed
    assert "reliability_diagram.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    champion = client.get_model_version_by_alias(f"mammoflow-{DATASET}", "champion")
    assert float(champion.tags[TAG_TEMPERATURE]) == pytest.approx(t, rel=1e-5)
    prob = np.asarray(preds["test"]["prob"])
    scaled = apply_temperature(prob, float(champion.tags[TAG_TEMPERATURE]))
    assert (scaled.argmax(axis=1) == prob.argmax(axis=1)).all()


def test_the_registered_model_serves_the_calibrated_probabilities(
    project: tuple[Path, Config],
) -> None:
    """The champion (pyfunc and Keras) returns calibration.py's calibrated probabilities of the
    test rows — T on each fold model, then the mean — and their ECE is the logged one."""
    import mlflow.pyfunc

    from mammoflow.data.manifest import read_manifest
    from mammoflow.evaluation.calibration import calibrated_probabilities, ece
    from mammoflow.models.build import model_temperature, with_temperature
    from mammoflow.models.features import load_images
    from mammoflow.tracking import Tracker
    from mammoflow.tracking.store import _use_store

    root, _ = project
    preds = json.loads((root / "models" / DATASET / BACKBONE / "predictions.json").read_text())
    test = preds["test"]
    frame = read_manifest(root / "data" / "processed" / DATASET).set_index("image_id")
    x = load_images([frame.loc[i, "converted_path"] for i in test["image_id"]], 64)
    tracker = Tracker(root=root)
    uri = f"models:/mammoflow-{DATASET}@champion"
    keras_model = tracker.load_serving_model(uri).model
    t = model_temperature(keras_model)
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    assert t == pytest.approx(summary["calibration"]["temperature"], rel=1e-6)
    members = [np.asarray(rec["prob"]) for _, rec in sorted(preds["fold_test"].items())]
    expected = calibrated_probabilities(members, t)
    with _use_store(tracker.uri):
        served = np.asarray(mlflow.pyfunc.load_model(uri).predict(x))
    np.testing.assert_allclose(served, expected, atol=1e-6)
    np.testing.assert_allclose(keras_model.predict(x, verbose=0), expected, atol=1e-6)
    # --raw: the same model with T = 1 gives the study's raw ensemble probabilities
    raw = with_temperature(keras_model, 1.0).predict(x, verbose=0)
    np.testing.assert_allclose(raw, np.asarray(test["prob"]), atol=1e-6)
    assert np.abs(served - raw).max() > 1e-4 or t == pytest.approx(1.0, abs=1e-3)
    parent = mlflow_client(root).get_run(summary["mlflow_parent_run_id"])
    logged = parent.data.metrics["test_calibrated_ece"]
    assert ece(np.asarray(test["y_true"]), served) == pytest.approx(logged, abs=1e-6)


def test_subgroups_test_and_oof_written_and_logged(project: tuple[Path, Config]) -> None:
    root, _ = project
    models = root / "models" / DATASET / BACKBONE
    tables = json.loads((models / "subgroups.json").read_text())
    preds = json.loads((models / "predictions.json").read_text())
    assert set(tables) == {"test", "out-of-fold"}
    factors = {r["factor"] for r in tables["test"]}
    assert factors == {"abnormality", "view", "laterality", "age_band"}
    n_oof = sum(len(v["y_true"]) for v in preds["folds"].values())
    for name, n_images in (("test", len(preds["test"]["y_true"])), ("out-of-fold", n_oof)):
        by_factor: dict[str, int] = {}
        for r in tables[name]:
            by_factor[r["factor"]] = by_factor.get(r["factor"], 0) + r["n"]
            assert r["small"] == (r["n"] < 10)
        assert set(by_factor.values()) == {n_images}  # each factor partitions the images
    assert "⚠" in (models / "subgroups.md").read_text() or all(
        not r["small"] for rows in tables.values() for r in rows
    )
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    client = mlflow_client(root)
    listed = {a.path for a in client.list_artifacts(summary["mlflow_parent_run_id"])}
    assert {"subgroups.json", "subgroups.md"} <= listed


def test_registered_version_has_its_model_card(project: tuple[Path, Config]) -> None:
    root, _ = project
    client = mlflow_client(root)
    champion = client.get_model_version_by_alias(f"mammoflow-{DATASET}", "champion")
    text = champion.description
    assert "## Intended use" in text and "Not for diagnosis" in text
    assert champion.tags["run_id"] in text
    assert "model_card.md" in {a.path for a in client.list_artifacts(champion.tags["run_id"])}
    champion_json = json.loads((root / "metrics" / "champion" / f"{DATASET}.json").read_text())
    assert champion_json["model_cards"] == {"champion": str(champion.version)}


def test_compare_writes_the_study_report_and_logs_it(project: tuple[Path, Config]) -> None:
    root, cfg = project
    res = report_stage(cfg, [DATASET], Layout())
    page = (root / "reports" / DATASET / "report.html").read_text()
    assert res["studies"] == {DATASET: f"reports/{DATASET}/report.html"}
    assert "ECE raw" in page and "majority class" in page and "98–99 %" in page
    assert page.count("data:image/png;base64,") >= 5
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    client = mlflow_client(root)
    listed = {a.path for a in client.list_artifacts(summary["mlflow_parent_run_id"])}
    assert "report.html" in listed


def test_audit_prints_the_inflation_and_logs_one_run(project: tuple[Path, Config]) -> None:
    from typer.testing import CliRunner

    from mammoflow.cli import app

    root, cfg = project
    res = CliRunner().invoke(app, ["audit", "--dataset", DATASET])
    assert res.exit_code == 0, res.output
    assert "inflation" in res.output and "split by patient: 0 patients in test and CV" in res.output
    audit = json.loads((root / "reports" / DATASET / "audit.json").read_text())
    assert set(audit["inflation"]) == {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc"}
    assert audit["studies"]["image"]["split_hash"] != audit["studies"]["patient"]["split_hash"]
    assert not (root / "metrics" / DATASET / "audit").exists()  # pipeline outputs untouched
    client = mlflow_client(root)
    run = client.get_run(audit["mlflow_run_id"])
    assert "inflation_accuracy" in run.data.metrics and "image_accuracy" in run.data.metrics
    assert {"audit.json", "audit.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == f"mammoflow-{DATASET}-audit"
    report_stage(cfg, [DATASET], Layout())
    assert "inflation [CI]" in (root / "reports" / DATASET / "report.html").read_text()


def test_mlflow_ui_fields_kind_dataset_source_and_model(project: tuple[Path, Config]) -> None:
    root, _ = project
    client = mlflow_client(root)
    exp = client.get_experiment_by_name(f"mammoflow-{DATASET}")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    parent = client.get_run(summary["mlflow_parent_run_id"])
    inputs = {i.dataset.name: i for i in parent.inputs.dataset_inputs}
    assert sorted(inputs) == [f"{DATASET}-dvc", f"{DATASET}-manifest"]
    inp = inputs[f"{DATASET}-manifest"]
    dvc = inputs[f"{DATASET}-dvc"].dataset  # the data version: DVC hash, where it is fetched from
    assert dvc.digest == parent.data.tags["dvc_data_hash"]
    # a project outside DVC: the run says loudly that its data cannot be fetched again
    assert parent.data.tags["dvc_data_location"] == "unknown"
    assert "NOT REPRODUCIBLE" in parent.data.tags["lineage_warning"]
    assert "local DVC cache only" in dvc.source
    assert inp.dataset.digest == parent.data.tags["dvc_data_hash"][:36]
    context = {t.key: t.value for t in inp.tags}["mlflow.data.context"]
    assert parent.data.tags["split_hash"][:16] in context
    assert parent.data.tags["mlflow.source.name"] == "mammoflow train"
    test_run = client.get_run(summary["mlflow_test_run_id"])
    assert test_run.data.tags["mlflow.source.type"] == "LOCAL"
    model_id = test_run.data.tags["mammoflow.model_uri"].split("/")[1]
    assert model_id in [o.model_id for o in parent.outputs.model_outputs]


def test_the_registered_version_points_at_the_backbones_parent(
    project: tuple[Path, Config],
) -> None:
    root, _ = project
    client = mlflow_client(root)
    champion = client.get_model_version_by_alias(f"mammoflow-{DATASET}", "champion")
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    assert champion.run_id == summary["mlflow_parent_run_id"]  # the runs table's Models column
    assert champion.tags["run_id"] == summary["mlflow_test_run_id"]  # where the model was logged
    assert champion.source.startswith("models:/m-")


def test_refit_test_model(project: tuple[Path, Config]) -> None:
    """evaluate.test_model: refit trains fold 0 on every CV row (its run RUNNING while it trains),
    logs it as the test run's serving model and writes it as head.keras. Runs last: it rewrites
    the backbone's outputs."""
    import keras

    root, cfg = project
    refit = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"test_model": "refit"})}
    )
    out = train_stage(refit, DATASET, BACKBONE, Layout())
    assert out["test_model"] == "refit" and out["trained_folds"] == [1, 2]
    models = root / "models" / DATASET / BACKBONE
    assert "0" in json.loads((models / "history.json").read_text())  # the refit's curves
    head = keras.models.load_model(models / "head.keras")
    assert head.name == f"{BACKBONE}_fold_1"  # one tail + head, not an ensemble
    client = mlflow_client(root)
    test_run = client.get_run(
        json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())[
            "mlflow_test_run_id"
        ]
    )
    assert test_run.info.status == "FINISHED"
    assert test_run.data.tags["mammoflow.test_model"] == "refit"
    assert "mammoflow.model_uri" in test_run.data.tags
