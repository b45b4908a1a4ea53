"""Scoring end to end on a tiny sample_mias study: predict, explain-check, a served champion."""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mammoflow.cli import app
from mammoflow.config import Config
from mammoflow.explain.explain_check import explain_check
from mammoflow.paths import Layout
from tests.helpers import (
    mlflow_client,
    tiny_params,
    trained_project,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MIAS = ROOT.parent / "shared" / "data" / "mias" / "all-mias.tar.gz"
DATASET = "sample_mias"
BACKBONE = "vgg16"


def _params() -> dict[str, Any]:
    return tiny_params(
        [DATASET],
        [BACKBONE],
        sample={"mias_patients": 20},
        split={"k_folds": 2, "test_size": 0.3},
        bootstrap=50,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config]]:
    root = tmp_path_factory.mktemp("scoring")
    with trained_project(root, _params(), DATASET) as cfg:
        yield root, cfg


def _sample_pgms(root: Path) -> list[Path]:
    return sorted((root / "data" / "raw" / DATASET).rglob("*.pgm"))


def test_predict_cli_on_real_mias_with_explanations(
    project: tuple[Path, Config], tmp_path: Path
) -> None:
    if not MIAS.is_file():
        pytest.skip(f"{MIAS} not present")
    with tarfile.open(MIAS) as tar:
        for name in ("mdb001.pgm", "mdb028.pgm", "mdb148.pgm"):
            tar.extract(name, tmp_path / "in", filter="data")
    (tmp_path / "in" / "notes.png").write_bytes(b"not a png")
    out, explain = tmp_path / "scores.csv", tmp_path / "explain"
    args = ["predict", str(tmp_path / "in"), "--dataset", DATASET, "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--explain", str(explain)])
    assert result.exit_code == 1, result.output  # notes.png failed, the rest were scored
    assert "notes.png" in result.output and "images/s" in result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in ("normal", "benign", "malignant")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["model_name"] == f"mammoflow-{DATASET}" and row["model_version"] == "1"
        assert Image.open(explain / f"{row['image_id']}.png").size == (1024, 1024)
        assert np.isfinite(np.load(explain / f"{row['image_id']}.npy")).all()


def test_explain_check_logs_the_pointing_game(project: tuple[Path, Config]) -> None:
    root, cfg = project
    res = explain_check(cfg, DATASET, Layout())
    rate = res["backbones"][BACKBONE]
    assert 0.0 <= rate["low"] <= rate["hit_rate"] <= rate["high"] <= 1.0 and rate["n"] >= 2
    assert 0.0 < rate["chance"] < 0.5 and 0.0 <= rate["outside_breast"] <= 1.0
    on_disk = json.loads((root / "metrics" / "explain" / f"{DATASET}.json").read_text())
    assert on_disk["backbones"][BACKBONE]["hit_rate"] == rate["hit_rate"]
    client = mlflow_client(root)
    test_run = client.get_run(rate["mlflow_test_run_id"])
    parent = client.get_run(test_run.data.tags["mlflow.parentRunId"])
    for run in (test_run, parent):
        assert run.data.metrics["pointing_game_hit_rate"] == pytest.approx(rate["hit_rate"])
        assert "pointing_game_hit_rate_ci_low" in run.data.metrics
        assert run.data.metrics["pointing_game_chance"] == pytest.approx(rate["chance"])
        assert "pointing_game_outside_breast" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(test_run.info.run_id)}
    assert "pointing_game.json" in artifacts


def test_pointing_game_hits_a_planted_lesion_and_misses_a_wrong_geometry(
    project: tuple[Path, Config],
) -> None:
    """Through the whole chain (read, convert, Grad-CAM, back to the original geometry, MIAS's
    bottom-left origin): a lesion planted at each map's peak is hit, the same circle with the
    y axis not flipped (the classic MIAS mistake) is missed."""
    import dataclasses

    from mammoflow.explain.explain_check import annotated_test_images, pointing_game
    from mammoflow.tracking import Tracker

    root, cfg = project
    cfg = cfg.for_dataset(DATASET)
    items = annotated_test_images(cfg, DATASET, Layout())
    summary = json.loads((root / "metrics" / DATASET / f"{BACKBONE}.json").read_text())
    tracker = Tracker(root=root)
    model = tracker.load_serving_model(tracker.model_uri_of(summary["mlflow_test_run_id"])).model
    rows = pointing_game(model, items, cfg, DATASET, None)
    heights = {
        a.image_id: Image.open(a.raw).size[1] for a in items
    }  # PGM: the original film's height
    planted, mirrored = [], []
    r = 2.0
    for a, row in zip(items, rows, strict=True):
        if row["peak"] is None:  # a flat map (random 32 px model) points nowhere: no plant
            continue
        y, x = row["peak"]
        h = heights[a.image_id]
        circle = {"x": float(x), "y": float(h - 1 - y), "radius": r}  # MIAS: y from the bottom
        planted.append(dataclasses.replace(a, lesions=(circle,)))
        if abs((h - 1 - y) - y) > 2 * r:  # the unflipped circle lies elsewhere
            mirrored.append(dataclasses.replace(a, lesions=({**circle, "y": float(y)},)))
    assert planted, "no test image's map has a peak"
    hits = [r["hit"] for r in pointing_game(model, planted, cfg, DATASET, None)]
    assert hits == [True] * len(planted)
    assert mirrored, "every peak sat on the middle row: no wrong geometry to test"
    assert not any(r["hit"] for r in pointing_game(model, mirrored, cfg, DATASET, None))


def test_external_validation_on_another_vendors_films(project: tuple[Path, Config]) -> None:
    """`mammoflow external`: the sample_mias champion on the second embedded sample (12-bit,
    another detector curve and noise, other women): evidence, run, link, card and page."""
    from mammoflow.evaluation.external import ExternalError, run_external

    root, cfg = project
    uri = f"models:/mammoflow-{DATASET}@champion"
    ext = "sample_mias_vendor_b"
    result = CliRunner().invoke(app, ["external", "--model", uri, "--dataset", ext])
    assert result.exit_code == 0, result.output
    ev = json.loads((root / "reports" / ext / "external.json").read_text())
    assert ev["n_images"] == 40 and ev["n_patients"] == 20 and ev["source_dataset"] == DATASET
    assert set(ev["shift"]) == {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc"}
    f1 = ev["shift"]["f1_macro"]
    assert f1["delta"] == pytest.approx(f1["external"] - f1["own"])
    assert f1["low"] <= f1["delta"] <= f1["high"]
    assert ev["own_test_grouping"] == "patient bootstrap"
    assert {"raw", "calibrated", "raw_ci", "calibrated_ci"} <= set(ev["calibration"])
    assert ev["temperature"] > 0 and ev["subgroups"] and len(ev["confusion"]) == 40
    client = mlflow_client(root)
    run = client.get_run(ev["mlflow_run_id"])
    assert run.data.tags["mammoflow.role"] == "external"
    assert run.data.tags["mammoflow.external_dataset"] == ext
    assert run.data.metrics["external_f1_macro"] == pytest.approx(ev["metrics"]["f1_macro"])
    assert "shift_f1_macro_ci_low" in run.data.metrics
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == f"mammoflow-{DATASET}"  # the model's own experiment
    champion = client.get_model_version_by_alias(f"mammoflow-{DATASET}", "champion")
    assert champion.tags[f"mammoflow.external.{ext}"] == run.info.run_id
    assert "## External validation" in champion.description and f"`{ext}`" in champion.description
    page = (root / "reports" / ext / "report.html").read_text()
    assert "Shift from the model's own test" in page and "External validation" in page
    with pytest.raises(ExternalError, match=r"label spaces differ: model .* predicts \['normal'"):
        run_external(cfg, uri, "sample_cmmd", Layout())
    with pytest.raises(ExternalError, match="was trained on sample_mias"):
        run_external(cfg, uri, DATASET, Layout())


def test_score_flow_writes_results_and_names_bad_files(project: tuple[Path, Config]) -> None:
    from flows.pipeline import score, score_flow

    from mammoflow.serving.predict import PredictError

    root, _ = project
    params = str(root / "params.yaml")
    assert score_flow.fn("not/there", DATASET, params_path=params)["scored"] == 0
    incoming = root / "incoming"
    incoming.mkdir()
    for pgm in _sample_pgms(root)[:3]:
        (incoming / pgm.name).write_bytes(pgm.read_bytes())
    done = score.fn(params, str(incoming), DATASET, "reports/scores/night.csv")
    assert done["scored"] == 3
    assert len(list(csv.DictReader((root / "reports/scores/night.csv").open()))) == 3
    (incoming / "broken.dcm").write_bytes(b"nope")
    with pytest.raises(PredictError, match=r"broken\.dcm"):
        score.fn(params, str(incoming), DATASET, "reports/scores/night.csv")
    assert len(list(csv.DictReader((root / "reports/scores/night.csv").open()))) == 3
