"""predict.py and explain.py on a tiny registered champion in a temporary SQLite store."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mammoflow.config import Config, load_config
from mammoflow.data import prepare
from mammoflow.data.convert import encode_png, prepare_image
from mammoflow.data.readers import load_raw
from mammoflow.data.sample import make_sample
from mammoflow.explain.gradcam import (
    bootstrap_rate,
    flat_model,
    gradcam_batch,
    hit,
    normalise,
    peak,
    target_names,
    to_original,
)
from mammoflow.serving import predict
from tests.helpers import TINY_TEMPERATURE, delete_mlflow_models_and_experiments, tiny_champion

pytestmark = pytest.mark.slow
PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _cfg(**overrides: object) -> Config:
    return load_config(PARAMS).with_overrides({"convert.size": 64, **overrides})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config, str]]:
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        make_sample(root / "sample", seed=3, mias_patients=3, cmmd_patients=2, size=96)
        uri = tiny_champion(root)
        cfg = _cfg()
        try:
            yield root, cfg, uri
        finally:
            delete_mlflow_models_and_experiments(root)


def _pgms(root: Path) -> list[Path]:
    return sorted((root / "sample" / "mias").glob("*.pgm"))


def test_scores_files_and_folders_reporting_bad_ones(
    project: tuple[Path, Config, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cfg, _ = project
    bad = root / "bad.pgm"
    bad.write_bytes(b"P5\n10 10\n255\n" + b"\0" * 7)  # truncated
    png = root / "one.png"
    Image.fromarray(np.full((50, 30), 120, np.uint8)).save(png)
    shapes: list[tuple[int, ...]] = []
    real_forward = predict.forward

    def recording(model: object, batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return real_forward(model, batch)

    monkeypatch.setattr(predict, "forward", recording)
    out = root / "scores.csv"
    res = predict.predict_files(
        [root / "sample" / "mias", png, bad, root / "missing.dcm"],
        cfg,
        "sample_mias",
        out=out,
        batch_size=4,
        progress=False,
    )
    assert len(res.rows) == len(_pgms(root)) + 1
    assert shapes[0] == (4, 64, 64)  # batched on the converted canvas
    assert {f.path for f in res.failures} == {str(bad), str(root / "missing.dcm")}
    assert any("PgmError" in f.reason or "truncated" in f.reason for f in res.failures)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(res.rows)
    for row in rows:
        total = sum(float(row[f"p_{c}"]) for c in ("normal", "benign", "malignant"))
        assert total == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] in ("normal", "benign", "malignant")
        assert row["model_name"] == "mammoflow-sample_mias" and row["model_version"] == "1"
        assert row["model_uri"] == "models:/mammoflow-sample_mias@champion"
        assert row["image_id"].startswith("i") and "mdb" not in row["image_id"]
    assert res.images_per_s > 0


def test_json_output_any_model_uri_and_bad_suffix(project: tuple[Path, Config, str]) -> None:
    root, cfg, uri = project
    out = root / "scores.json"
    res = predict.predict_files(
        _pgms(root)[:2], cfg, "sample_mias", model_uri=uri, out=out, progress=False
    )
    data = json.loads(out.read_text())
    assert [r["path"] for r in data] == [str(p) for p in _pgms(root)[:2]]
    assert data[0]["model_uri"] == uri and data[0]["model_version"] == ""
    assert not res.failures
    with pytest.raises(ValueError, match=r"'x\.txt'"):
        predict.predict_files(_pgms(root)[:1], cfg, "sample_mias", out=Path("x.txt"))
    with pytest.raises(ValueError, match="not 2 class probabilities"):
        predict.predict_files(_pgms(root)[:1], cfg, "sample_cmmd", model_uri=uri, progress=False)
    with pytest.raises(
        ValueError, match="cannot load model 'models:/mammoflow-sample_cmmd@champion'"
    ):
        predict.predict_files(_pgms(root)[:1], cfg, "sample_cmmd", progress=False)


def test_raw_gives_the_uncalibrated_probabilities(project: tuple[Path, Config, str]) -> None:
    from typer.testing import CliRunner

    from mammoflow.cli import app

    root, cfg, _ = project
    files = _pgms(root)[:3]
    calibrated = predict.predict_files(files, cfg, "sample_mias", progress=False).rows
    raw = predict.predict_files(files, cfg, "sample_mias", progress=False, raw=True).rows
    assert calibrated[0]["calibrated"] is True and raw[0]["calibrated"] is False
    assert calibrated[0]["temperature"] == raw[0]["temperature"] == pytest.approx(TINY_TEMPERATURE)

    def probs(rows: list[dict[str, object]]) -> np.ndarray:
        return np.array([[r[f"p_{c}"] for c in ("normal", "benign", "malignant")] for r in rows])

    assert np.abs(probs(calibrated) - probs(raw)).max() > 1e-4  # T = 0.5 sharpens
    np.testing.assert_allclose(probs(raw).sum(axis=1), 1.0, atol=1e-5)
    out = root / "raw.csv"
    params = root / "params.yaml"  # the CLI reads ./params.yaml (the fixture's cwd is root)
    raw_params = yaml.safe_load(PARAMS.read_text())
    raw_params["convert"]["size"] = 64
    params.write_text(yaml.safe_dump(raw_params))
    result = CliRunner().invoke(
        app,
        ["predict", *map(str, files), "--dataset", "sample_mias", "--out", str(out), "--raw"],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["calibrated"] == "False"


def test_inputs_are_the_convert_stage_pixels(project: tuple[Path, Config, str]) -> None:
    root, cfg, _ = project
    path = _pgms(root)[0]
    item = prepare.prepare(path, cfg, prepare.acceptance(cfg, "sample_mias"))
    png = prepare_image(load_raw(path), 64, 8, False)
    decoded = np.asarray(Image.open(__import__("io").BytesIO(encode_png(png))), np.float32)
    np.testing.assert_array_equal(item.pixels, decoded)
    # a converted PNG scores exactly like its raw file
    conv = root / "conv.png"
    conv.write_bytes(encode_png(png))
    again = prepare.prepare(conv, cfg, None)
    np.testing.assert_array_equal(again.pixels, item.pixels)


def test_dicom_acceptance_rules_apply(project: tuple[Path, Config, str]) -> None:
    root, _, _ = project
    dcm = next((root / "sample" / "cmmd").rglob("*.dcm"))
    strict = _cfg(**{"ingest.min_size": 4000})
    own = _cfg(**{"sample.size": 96})  # the sample is checked against its own size
    assert prepare.read_image(dcm, prepare.acceptance(own, "sample_cmmd")).ndim == 2
    with pytest.raises(ValueError, match=r"too small|short side|min_size"):
        prepare.read_image(dcm, prepare.acceptance(strict, "cmmd"))


def test_explanations_in_original_geometry(project: tuple[Path, Config, str]) -> None:
    root, cfg, _ = project
    png = root / "wide.png"
    Image.fromarray(np.linspace(0, 255, 40 * 90).reshape(40, 90).astype(np.uint8)).save(png)
    out = root / "explain"
    res = predict.predict_files(
        [png, *_pgms(root)[:2]], cfg, "sample_mias", explain_dir=out, progress=False
    )
    assert len(res.explained) == 3
    first = res.rows[0]["image_id"]
    assert Image.open(out / f"{first}.png").size == (90, 40)  # width, height of the input
    assert Image.open(out / f"{first}.png").mode == "RGB"
    raw = np.load(out / f"{first}.npy")
    assert raw.ndim == 2 and np.isfinite(raw).all() and 0 <= raw.min() <= raw.max() <= 1


def test_flat_rebuild_matches_and_targets(project: tuple[Path, Config, str]) -> None:
    from mammoflow.tracking import Tracker

    _, _, uri = project
    model = Tracker().load_serving_model(uri).model
    flat = flat_model(model)
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 40, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(flat.model(x)), atol=1e-5)
    assert target_names(flat, None) == ("block5_conv3", "block5_conv3_m1")  # both folds
    assert target_names(flat, "block4_conv3") == ("block4_conv3",)  # the shared prefix
    with pytest.raises(ValueError, match="'nope'"):
        target_names(flat, "nope")
    cams = gradcam_batch(model, x[..., 0], [0, 2], "block4_conv3")
    assert cams.shape == (2, 4, 4) and cams.dtype == np.float32 and np.isfinite(cams).all()


def test_mixed_precision_gradients_are_float32() -> None:
    from mammoflow.models.build import dtype_policy, full_model, load_backbone
    from mammoflow.models.build import trainable_tail_and_head as head

    bb = load_backbone("vgg16", trainable_layers=1, input_size=32, precision="mixed_bfloat16")
    with dtype_policy("mixed_bfloat16"):
        model = full_model(bb, head(bb, 2, head_units=8))
    flat = flat_model(model)
    assert {layer.dtype_policy.name for layer in flat.model.layers} == {"float32"}
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32)).astype(np.float32)
    assert np.isfinite(gradcam_batch(model, x, [0, 1])).all()


def test_zero_map_when_gradients_vanish() -> None:
    cams = normalise(np.array([[[0.0, 0.0]], [[np.nan, -1.0]], [[1.0, 3.0]]], np.float32))
    np.testing.assert_array_equal(cams[0], 0.0)
    np.testing.assert_array_equal(cams[1], 0.0)
    np.testing.assert_allclose(cams[2], [[1 / 3, 1.0]])
    assert peak(cams[0]) is None
    assert peak(np.ones((4, 4), np.float32)) is None  # a flat map (1 x 1 layer) points nowhere
    assert peak(np.eye(3, dtype=np.float32) * [1, 2, 1]) == (1, 1)


def test_to_original_removes_padding_and_restores_aspect() -> None:
    geo = prepare.geometry(np.zeros((40, 80), np.float32), 64, False)
    assert (geo.top, geo.left, geo.fit_h, geo.fit_w) == (16, 0, 32, 64)
    cam = np.zeros((64, 64), np.float32)
    cam[16:48, 48:64] = 1.0  # the right quarter of the image (inside the padding band)
    back = to_original(cam, geo)
    assert back.shape == (40, 80)
    assert back[:, 70:].min() > 0.9 and back[:, :50].max() < 0.1


def test_pointing_game_flips_mias_y_and_bootstraps_patients() -> None:
    lesion = [{"x": 10, "y": 90, "radius": 5}]  # near the top-left on a 100-row image
    assert hit((9, 10), lesion, 100)
    assert not hit((90, 10), lesion, 100)
    assert not hit(None, lesion, 100)
    assert not hit((9, 10), [{"x": None, "y": None, "radius": None}], 100)
    rate = bootstrap_rate([True, False, True, True], ["a", "a", "b", "c"], n=200)
    assert rate["hit_rate"] == 0.75 and rate["n"] == 4
    assert 0 <= rate["low"] <= 0.75 <= rate["high"] <= 1
    with pytest.raises(ValueError):
        bootstrap_rate([], [])


def test_explain_check_skips_a_dataset_without_lesion_circles(tmp_path: Path) -> None:
    from mammoflow.explain.explain_check import explain_check
    from mammoflow.paths import Layout

    res = explain_check(_cfg(), "sample_cmmd", Layout(root=tmp_path))
    assert res["backbones"] == {} and "no abnormal test image" in res["skipped"]
    written = json.loads((tmp_path / "metrics" / "explain" / "sample_cmmd.json").read_text())
    assert written == res
