"""The stage functions (each in its stage's module) on a tiny embedded sample in a scratch layout."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from mammoflow.config import Config, ConfigError, TrackingConfig, parse_config
from mammoflow.data import raw
from mammoflow.data.acquire import acquire_stage
from mammoflow.data.convert import convert_stage
from mammoflow.data.ingest import ingest_stage
from mammoflow.data.manifest import read_manifest
from mammoflow.data.sample import image_shape
from mammoflow.data.split import split_stage
from mammoflow.data.validate import ConvertedImagesInvalid, ValidationFailed, validate_stage
from mammoflow.evaluation.evaluate import evaluate_stage
from mammoflow.models.weights import WeightsError, check_weights
from mammoflow.paths import Layout
from mammoflow.training.train import train_stage

ROOT = Path(__file__).resolve().parents[2]
MIAS, CMMD = "sample_mias", "sample_cmmd"


def _config(**model: Any) -> Config:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sample"].update({"mias_patients": 10, "cmmd_patients": 4, "size": 64})
    raw["convert"].update({"size": 32, "workers": 1})
    raw["split"].update({"k_folds": 2, "test_size": 0.25})
    raw["model"].update({"backbones": ["vgg16", "resnet50"], **model})
    return parse_config(raw)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Layout]:
    """Both sample datasets acquired and ingested into a scratch layout (read-only for tests)."""
    cfg, layout = _config(), Layout(tmp_path_factory.mktemp("project"))
    for dataset in (MIAS, CMMD):
        acquire_stage(cfg, dataset, layout)
        ingest_stage(cfg, dataset, layout)
    return cfg, layout


def _mias(cfg: Config, root: Path) -> Layout:
    """A private MIAS sample, acquired and ingested, for a test that changes it."""
    layout = Layout(root)
    acquire_stage(cfg, MIAS, layout)
    ingest_stage(cfg, MIAS, layout)
    return layout


def test_data_stages_write_their_outputs(ingested: tuple[Config, Layout], tmp_path: Path) -> None:
    cfg, _ = ingested
    layout = _mias(cfg, tmp_path)
    summary = validate_stage(cfg, MIAS, layout)
    assert summary["success"] is True and summary["failed"] == 0 and summary["images"] == 20
    assert json.loads(layout.validation_metrics(MIAS).read_text()) == summary
    assert (layout.validation(MIAS) / "data_docs" / "index.html").is_file()
    converted = convert_stage(cfg, MIAS, layout, progress=False)
    assert (converted["converted"], converted["skipped"]) == (20, 0)
    again = convert_stage(cfg, MIAS, layout, progress=False)
    assert (again["converted"], again["skipped"]) == (0, 20)
    frame = read_manifest(layout.processed(MIAS))
    assert frame["converted_path"].notna().all()
    split = split_stage(cfg, MIAS, layout)
    assert len(split["split_hash"]) == 64
    assert sorted(split["images"]) == ["fold1", "fold2", "test"]
    splits = pd.read_parquet(layout.splits(MIAS))
    assert sorted(splits["image_id"]) == sorted(frame["image_id"])


def test_acquire_and_ingest_summaries(ingested: tuple[Config, Layout]) -> None:
    cfg, layout = ingested
    acquired = acquire_stage(cfg, MIAS, layout)  # idempotent
    assert acquired == {"dataset": MIAS, "raw_dir": str(layout.raw(MIAS)), "files": 21}
    summary = ingest_stage(cfg, CMMD, layout)
    assert summary["dataset"] == CMMD and summary["bad_files"] == 0
    assert summary["images"] == len(read_manifest(layout.interim(CMMD)))
    assert sum(summary["labels"].values()) == summary["images"]


def test_sizes_roots_and_raw_files(ingested: tuple[Config, Layout]) -> None:
    cfg, layout = ingested
    assert raw.min_size(cfg, MIAS) == min(cfg.ingest.min_size, *image_shape("mias", 64))
    assert raw.min_size(cfg, CMMD) == min(cfg.ingest.min_size, *image_shape("cmmd", 64)) < 256
    assert raw.min_size(cfg, "cmmd") == cfg.ingest.min_size  # real data: the rule as set
    assert raw.cmmd_root(CMMD, layout) == layout.raw(CMMD) / "CMMD"
    assert raw.raw_files(cfg, MIAS, layout) is None
    files = raw.raw_files(cfg, CMMD, layout)
    assert files is not None
    frame = read_manifest(layout.interim(CMMD))
    assert set(frame["raw_path"]) <= set(files)
    assert all(path.is_file() for path in files.values())


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    cfg, layout = _config(), Layout(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"raw data missing; run `mammoflow acquire sample_mias`"
    ):
        ingest_stage(cfg, MIAS, layout)
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'; params.yaml defines"):
        convert_stage(cfg, "nope", layout)
    with pytest.raises(FileNotFoundError, match=r"metrics/sample_mias/vgg16.json: missing; run"):
        evaluate_stage(cfg, MIAS, layout)


def test_validate_stage_failure_is_recorded(
    ingested: tuple[Config, Layout], tmp_path: Path
) -> None:
    cfg, _ = ingested
    layout = _mias(cfg, tmp_path)
    frame = read_manifest(layout.interim(MIAS))
    Path(frame.loc[frame["image_id"] == "mdb003", "raw_path"].item()).unlink()
    with pytest.raises(ValidationFailed, match=r"raw file present and readable") as err:
        validate_stage(cfg, MIAS, layout)
    assert "mdb003" in str(err.value)
    assert json.loads(layout.validation_metrics(MIAS).read_text()) == {
        "dataset": MIAS,
        "images": 20,
        "success": False,
        "failed": 1,
    }


def test_convert_stage_checks_every_png(
    ingested: tuple[Config, Layout], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PNG that breaks between conversion and the check (disk, a second writer) stops it."""
    from mammoflow.data import convert

    cfg, _ = ingested
    layout = _mias(cfg, tmp_path)
    real: Callable[..., Any] = convert.convert_dataset

    def then_truncate(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        png = layout.processed(MIAS) / "images" / "mdb002.png"
        png.write_bytes(png.read_bytes()[:40])
        return result

    monkeypatch.setattr(convert, "convert_dataset", then_truncate)
    with pytest.raises(ConvertedImagesInvalid) as err:
        convert_stage(cfg, MIAS, layout, progress=False)
    text = str(err.value)
    assert text.startswith(f"converted images of dataset '{MIAS}' failed")
    assert "converted PNG present and readable" in text and "['mdb002']" in text


def test_model_stages_refuse_an_unlisted_backbone(tmp_path: Path) -> None:
    cfg, layout = _config(), Layout(tmp_path)
    message = r"backbone 'alexnet' is not in model.backbones \['vgg16', 'resnet50'\]; add it there"
    with pytest.raises(ValueError, match=message):
        train_stage(cfg, MIAS, "alexnet", layout)


def _metrics(
    layout: Layout, backbone: str, f1: float | None, run: str, cv: float | None = None
) -> None:
    path = layout.metrics(MIAS, backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"test": {"f1_macro": f1}, "cv": {"f1_macro_mean": cv}, "mlflow_test_run_id": run}
    path.write_text(json.dumps(summary))


def test_evaluate_stage_ranks_by_the_registry_metric(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["backbones"] = ["vgg16", "resnet50", "inception_v3"]
    raw["tracking"]["log_models"] = "none"  # nothing to register: no MLflow store needed
    raw["tracking"]["registry_metric"] = "test_f1_macro"
    cfg, layout = parse_config(raw), Layout(tmp_path)
    _metrics(layout, "vgg16", 0.4, "r1", cv=0.9)
    _metrics(layout, "resnet50", None, "r2")  # a metric that could not be computed ranks last
    _metrics(layout, "inception_v3", 0.6, "r3", cv=0.5)
    out = evaluate_stage(cfg, MIAS, layout)
    assert out["best"] == "inception_v3" and out["metric"] == "test_f1_macro"
    assert out["scores"]["vgg16"] == 0.4 and math.isnan(out["scores"]["resnet50"])
    assert "registry" not in out and out["peeks_at_test"]
    assert "optimistic" in out["warning"]
    written = json.loads(layout.champion(MIAS).read_text())
    assert written["best"] == "inception_v3" and written["scores"]["inception_v3"] == 0.6


def test_the_default_champion_rule_uses_cv_only(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["backbones"] = ["vgg16", "resnet50"]
    raw["tracking"]["log_models"] = "none"
    cfg, layout = parse_config(raw), Layout(tmp_path)
    assert cfg.tracking.registry_metric == "cv_f1_macro_mean"
    assert TrackingConfig().registry_metric == "cv_f1_macro_mean"  # the config's own default
    _metrics(layout, "vgg16", 1.0, "r1", cv=0.6)  # best on the test, worse on CV
    _metrics(layout, "resnet50", 0.5, "r2", cv=0.7)
    out = evaluate_stage(cfg, MIAS, layout)
    assert out["best"] == "resnet50" and out["scores"] == {"vgg16": 0.6, "resnet50": 0.7}
    assert not out["peeks_at_test"] and "warning" not in out
    raw["tracking"]["registry_metric"] = "f1_macro"
    with pytest.raises(ConfigError, match=r"registry_metric.*cv_<metric>_mean"):
        parse_config(raw)


def test_check_weights_names_every_missing_file(tmp_path: Path) -> None:
    assert check_weights(_config(), MIAS) == {"vgg16": "none", "resnet50": "none"}
    cfg = _config(weights=str(tmp_path / "absent.h5"))
    with pytest.raises(WeightsError) as err:
        check_weights(cfg, "mias", hint="or run with --weights none")
    text = str(err.value)
    assert text.startswith("mias: weights missing:\n  - ")
    assert text.count("\n  - ") == 2 and text.endswith("\nor run with --weights none")
