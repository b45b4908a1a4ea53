"""models/: registry, weights resolution, freezing, cut points, preprocessing, full model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mammoflow.models import backbones, build
from mammoflow.models.weights import WeightsError, resolve_weights

SMALL = {"vgg16": 32, "vgg19": 32, "resnet50": 32, "inception_v3": 75, "efficientnet_b0": 32}
EXPECTED_CUT = {
    "vgg16": "block4_pool",
    "vgg19": "block5_conv1",
    "resnet50": "conv5_block2_out",
    "inception_v3": "mixed9",
}


def test_cheap_imports_do_not_load_keras() -> None:
    code = (
        "import sys\n"
        "import mammoflow.models.backbones, mammoflow.models.build, mammoflow.models.weights\n"
        "import mammoflow.models.features, mammoflow.training.fit, mammoflow.data.split, mammoflow.evaluation.metrics\n"
        "heavy = [m for m in ('keras', 'tensorflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(mammoflow.models.backbones.BACKBONE_NAMES)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "inception_v3" in out.stdout


def test_registry_and_errors() -> None:
    assert set(backbones.PAPER_BACKBONES) <= set(backbones.BACKBONE_NAMES)
    assert backbones.get_spec("inception_v3").input_size == 299
    assert [backbones.get_spec(n).input_size for n in ("vgg16", "vgg19", "resnet50")] == [224] * 3
    with pytest.raises(backbones.BackboneError, match="unknown backbone 'vgg17'"):
        backbones.get_spec("vgg17")
    with pytest.raises(backbones.BackboneError, match="at least 75 px"):
        backbones.input_size_for("inception_v3", 64)


@pytest.mark.parametrize("name", list(SMALL))
def test_preprocessing_equals_keras_own(name: str) -> None:
    import keras

    inp = keras.Input(shape=(8, 8, 1))
    model = keras.Model(inp, build.grey_preprocess(name, inp))
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 1)).astype("float32")
    own = backbones.preprocess_function(name)(np.repeat(x, 3, axis=-1).copy())
    got = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(got, own, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(SMALL))
def test_exactly_the_tail_is_trainable(name: str) -> None:
    import keras

    bb = build.load_backbone(name, trainable_layers=3, input_size=SMALL[name])
    if name in EXPECTED_CUT:
        assert bb.plan.cut_layer == EXPECTED_CUT[name]
    assert bb.plan.trainable == tuple(build.weighted_layers(bb.base)[-3:])
    assert all(not layer.trainable for layer in bb.prefix.layers)
    model = build.trainable_tail_and_head(bb, 3, head_units=8)
    tail = model.layers[1]
    trainable = sorted(layer.name for layer in tail.layers if layer.trainable_weights)
    assert trainable == sorted(bb.plan.trainable)
    assert all(
        not layer.trainable
        for layer in tail.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert build.trainable_layer_names(model) == [
        *[layer.name for layer in tail.layers if layer.trainable_weights],
        "head_dense",
        "head_bn",
        "predictions",
    ]
    assert model.output.dtype == "float32"
    with pytest.raises(build.ModelBuildError, match="trainable_layers=999"):
        build.plan_cut(bb.base, 999)


def test_trainable_zero_and_one_for_vgg() -> None:
    bb0 = build.load_backbone("vgg16", trainable_layers=0, input_size=32)
    assert bb0.tail is None and bb0.plan.cut_layer == "block5_pool"
    m = build.trainable_tail_and_head(bb0, 2, head_units=8, pooling="flatten")
    assert build.trainable_layer_names(m) == ["head_dense", "head_bn", "predictions"]
    bb1 = build.load_backbone("vgg16", trainable_layers=1, input_size=32)
    assert bb1.plan.trainable == ("block5_conv3",) and bb1.plan.cut_layer == "block5_conv2"


def test_full_model_matches_feature_path_and_roundtrips(tmp_path: Path) -> None:
    import keras

    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    head = build.trainable_tail_and_head(bb, 3, head_units=8)
    full = build.full_model(bb, head)
    x = np.random.default_rng(1).uniform(0, 255, (3, 48, 48, 1)).astype("float32")
    resized = keras.layers.Resizing(bb.input_size, bb.input_size, dtype="float32")(x)
    via_features = head.predict(build.extraction_model(bb).predict(resized, verbose=0), verbose=0)
    np.testing.assert_allclose(full.predict(x, verbose=0), via_features, rtol=1e-5, atol=1e-6)
    path = tmp_path / "full.keras"
    full.save(path)
    back = keras.models.load_model(path)  # stock layers only: no MammoFlow code needed
    np.testing.assert_allclose(back.predict(x, verbose=0), via_features, rtol=1e-5, atol=1e-6)


def test_offline_imagenet_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras"))
    with pytest.raises(WeightsError) as err:
        resolve_weights("vgg16", "imagenet")  # tries the real download; no network here
    msg = str(err.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "empty_keras" / "models") in msg
    assert "'none'" in msg
    with pytest.raises(WeightsError, match="downloads are disabled"):
        resolve_weights("resnet50", "imagenet", keras_home=tmp_path, allow_download=False)


def test_cached_imagenet_and_local_file_and_none(tmp_path: Path) -> None:
    bb = build.load_backbone("vgg16", trainable_layers=3, input_size=32)
    local = tmp_path / "vgg16_small.weights.h5"
    bb.base.save_weights(local)
    info = resolve_weights("vgg16", str(local))
    assert info.source == "file" and len(info.sha256) == 64
    again = build.load_backbone("vgg16", weights=str(local), trainable_layers=3, input_size=32)
    assert again.weights == info
    for a, b in zip(bb.base.get_weights(), again.base.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # an "imagenet" file already in the Keras cache is used without any download
    cache = tmp_path / "home" / "models"
    cache.mkdir(parents=True)
    (cache / backbones.get_spec("vgg16").weights_file).write_bytes(b"stub")
    cached = resolve_weights(
        "vgg16", "imagenet", keras_home=tmp_path / "home", allow_download=False
    )
    assert cached.source == "imagenet" and cached.path and cached.path.endswith("notop.h5")
    assert resolve_weights("vgg16", "none").sha256 == "none"
    with pytest.raises(WeightsError, match=r"'/nope\.h5' is neither"):
        resolve_weights("vgg16", "/nope.h5")


def test_calibrated_ensemble_applies_t_to_each_member_and_loads_as_stock_keras(
    tmp_path: Path,
) -> None:
    """The served model's temperature layer: calibration.py's numbers, stock Keras, T = 1 raw."""
    import keras

    from mammoflow.evaluation.calibration import calibrated_probabilities

    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    heads = [
        build.trainable_tail_and_head(bb, 3, head_units=16, name=f"fold_{i}", seed=i)
        for i in range(2)
    ]
    x = np.random.default_rng(0).uniform(0, 255, (4, 40, 50, 1)).astype(np.float32)
    singles = [build.full_model(bb, h).predict(x, verbose=0) for h in heads]
    raw = build.ensemble_model(bb, heads)
    calibrated = build.ensemble_model(bb, heads, temperature=0.37)
    got = calibrated.predict(x, verbose=0)
    np.testing.assert_allclose(got, calibrated_probabilities(singles, 0.37), atol=1e-6)
    assert build.model_temperature(calibrated) == pytest.approx(0.37)
    assert build.model_temperature(raw) is None
    np.testing.assert_allclose(
        build.with_temperature(calibrated, 1.0).predict(x, verbose=0),
        raw.predict(x, verbose=0),
        atol=1e-6,
    )
    calibrated.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # no custom objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), got, atol=1e-6)
    with pytest.raises(build.ModelBuildError, match="serves raw probabilities already"):
        build.with_temperature(raw, 1.0)
    with pytest.raises(build.ModelBuildError, match=r"temperature=0\.0"):
        build.ensemble_model(bb, heads, temperature=0.0)
