"""models/features.py: precision choice, PNG loading, the feature cache."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammoflow.files import sha256_file
from mammoflow.models import build
from mammoflow.models.features import (
    FeatureError,
    FeatureSet,
    ImageSet,
    cached_features,
    cpu_supports_bf16,
    extract_features,
    load_images,
    prepare_inputs,
    resolve_precision,
)
from mammoflow.models.weights import WeightsInfo


def write_pngs(
    root: Path, labels: list[int], size: int = 40, seed: int = 0, patients: list[str] | None = None
) -> pd.DataFrame:
    """Learnable grey PNGs: class c has mean intensity ~ 40 + 80c with a class-specific stripe."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, lab in enumerate(labels):
        img = rng.normal(40 + 80 * lab, 15, (size, size))
        img[:, (lab * size) // 3 : ((lab + 1) * size) // 3] += 60
        arr = np.clip(img, 0, 255).astype(np.uint8)
        path = root / f"img{i:03d}.png"
        Image.fromarray(arr).save(path)
        rows.append(
            {
                "image_id": f"img{i:03d}",
                "patient_id": patients[i] if patients else f"P{i // 2:03d}",
                "label_index": lab,
                "converted_path": str(path),
                "converted_sha256": sha256_file(path),
            }
        )
    return pd.DataFrame(rows)


def test_precision_resolution() -> None:
    assert cpu_supports_bf16("flags\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_supports_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_supports_bf16("flags : fpu sse avx2\n")
    assert (
        resolve_precision("auto", cpuinfo="flags : avx512_bf16", gpu_bf16=None) == "mixed_bfloat16"
    )
    assert resolve_precision("auto", cpuinfo="flags : avx2", gpu_bf16=None) == "float32"
    assert resolve_precision("auto", cpuinfo="flags : avx2", gpu_bf16=True) == "mixed_bfloat16"
    assert resolve_precision("auto", cpuinfo="flags : avx512_bf16", gpu_bf16=False) == "float32"
    assert resolve_precision("mixed_float16") == "mixed_float16"
    with pytest.raises(FeatureError, match="'bf17'"):
        resolve_precision("bf17")


def test_png_loading_8_and_16_bit(tmp_path: Path) -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "a8.png")
    Image.fromarray(arr.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    imgs = load_images([tmp_path / "a8.png", tmp_path / "a16.png"], 16)
    assert imgs.shape == (2, 16, 16, 1) and imgs.dtype == np.float32
    np.testing.assert_allclose(imgs[0, ..., 0], arr, atol=1e-4)
    np.testing.assert_allclose(imgs[1], imgs[0], atol=1e-4)
    with pytest.raises(FeatureError, match="not found"):
        load_images([tmp_path / "missing.png"], 16)


def test_cache_hit_miss_and_invalidation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frame = write_pngs(tmp_path / "png", [0, 1, 2, 0, 1, 2])
    cache = tmp_path / "cache"
    bb = build.load_backbone("vgg16", trainable_layers=3, input_size=32)
    caplog.set_level(logging.INFO, logger="mammoflow.models.features")

    first = cached_features(frame, bb, dataset="t", cache_dir=cache, batch_size=4)
    assert not first.hit and first.features.shape == (6, *bb.feature_shape)
    assert "feature cache miss" in caplog.text
    direct = extract_features(bb, load_images(list(frame["converted_path"]), 32), batch_size=4)
    np.testing.assert_allclose(first.features, direct, rtol=1e-5, atol=1e-5)

    second = cached_features(frame.sample(frac=1, random_state=0), bb, dataset="t", cache_dir=cache)
    assert second.hit and second.key == first.key
    np.testing.assert_array_equal(second.features, first.features)
    assert len(list(cache.glob("*.npy"))) == 1

    # images change → miss
    changed = frame.copy()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(changed.loc[0, "converted_path"])
    changed.loc[0, "converted_sha256"] = sha256_file(Path(changed.loc[0, "converted_path"]))
    assert not cached_features(changed, bb, dataset="t", cache_dir=cache).hit
    # N changes → miss (different cut)
    bb2 = build.load_backbone("vgg16", trainable_layers=1, input_size=32)
    assert not cached_features(changed, bb2, dataset="t", cache_dir=cache).hit
    # weights change → miss
    bb.weights = WeightsInfo(source="file", path="/x.h5", sha256="f" * 64)
    assert not cached_features(changed, bb, dataset="t", cache_dir=cache).hit
    assert len(list(cache.glob("*.npy"))) == 4
    # a corrupt entry is recomputed, not trusted
    npy = next(iter(cache.glob("*.npy")))
    npy.write_bytes(b"garbage")
    for f in (frame, changed):
        cached_features(f, bb, dataset="t", cache_dir=cache)
    assert not list(cache.glob(".*.tmp"))


def test_augmentation_turns_cache_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frame = write_pngs(tmp_path / "png", [0, 1])
    bb = build.load_backbone("vgg16", trainable_layers=3, input_size=32)
    caplog.set_level(logging.INFO, logger="mammoflow.models.features")
    got = prepare_inputs(frame, bb, dataset="t", augment=True, cache_dir=tmp_path / "c")
    assert isinstance(got, ImageSet) and got.images.shape == (2, 32, 32, 1)
    assert "feature cache disabled: train.augment is on" in caplog.text
    assert not (tmp_path / "c").exists()
    fs = prepare_inputs(frame, bb, dataset="t", cache_dir=tmp_path / "c")
    assert isinstance(fs, FeatureSet)
    with pytest.raises(FeatureError, match="'nope'"):
        fs.rows(["nope"])


def test_float16_cache_is_mapped_and_keyed_apart(tmp_path: Path) -> None:
    """float16 and float32 caches are two keys; the float16 one is the float32 values rounded,
    memory-mapped read-only, with its sha256 in the sidecar."""
    import json

    frame = write_pngs(tmp_path / "png", [0, 1, 2, 0])
    bb = build.load_backbone("vgg16", trainable_layers=3, input_size=32)
    cache = tmp_path / "cache"
    f32 = cached_features(frame, bb, dataset="t", cache_dir=cache, dtype="float32")
    f16 = cached_features(frame, bb, dataset="t", cache_dir=cache, dtype="float16")
    assert f16.key != f32.key and f16.key is not None and f16.key.dtype == "float16"
    assert isinstance(f16.features, np.memmap) and not f16.features.flags.writeable
    np.testing.assert_array_equal(f16.features, np.asarray(f32.features).astype(np.float16))
    np.testing.assert_array_equal(f16.rows(["img001"]), f16.features[[1]].astype(np.float32))
    npy = cache / f"{f16.key.stem()}.npy"
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(npy) and meta["dtype"] == "float16"
    with pytest.raises(FeatureError, match=r"train\.feature_dtype='bfloat16'"):
        cached_features(frame, bb, dataset="t", cache_dir=cache, dtype="bfloat16")


def test_cache_write_full_disk_and_overflow_leave_nothing(tmp_path: Path) -> None:
    """ENOSPC in the middle of a cache write, or values float16 cannot hold: a clear error and
    no file (final or temp) that a later run could read."""
    import errno

    from mammoflow.models.features import write_cache

    def full_disk() -> Iterator[np.ndarray]:
        yield np.ones((2, 3), np.float32)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "c" / "x.npy"
    with pytest.raises(OSError, match=r"no space left on the device while writing .*x\.npy"):
        write_cache(target, full_disk(), (4, 3), "float16")
    with pytest.raises(FeatureError, match=r"float16's range.*train\.feature_dtype: float32"):
        write_cache(target, iter([np.full((4, 3), 1e6, np.float32)]), (4, 3), "float16")
    with pytest.raises(FeatureError, match="gave 2 rows for 4"):
        write_cache(target, iter([np.ones((2, 3), np.float32)]), (4, 3), "float32")
    assert list((tmp_path / "c").iterdir()) == []
    sha = write_cache(target, iter([np.ones((4, 3), np.float32)]), (4, 3), "float16")
    assert sha == sha256_file(target) and np.load(target).dtype == np.float16


def test_memory_budget_setting() -> None:
    from mammoflow.models.features import memory_budget_bytes

    assert memory_budget_bytes("") == 2048 << 20
    assert memory_budget_bytes("512") == 512 << 20
    with pytest.raises(FeatureError, match="MAMMOFLOW_MEMORY_BUDGET_MB='2GB'"):
        memory_budget_bytes("2GB")


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_training_and_serving_feed_the_model_the_same_pixels(
    tmp_path: Path, bit_depth: int
) -> None:
    """Parity: the feature loader reading the convert stage's PNG (training) and
    data.prepare.model_input on the decoded image (serving) give the same float32 array."""
    from mammoflow.config import ConvertConfig
    from mammoflow.data.convert import encode_png, prepare_image
    from mammoflow.data.prepare import model_input

    rng = np.random.default_rng(bit_depth)
    img = rng.random((90, 70)).astype(np.float32)  # a decoded film in [0, 1]
    conv = ConvertConfig(size=64, bit_depth=bit_depth, crop_to_breast=False)
    png = tmp_path / "film.png"
    png.write_bytes(encode_png(prepare_image(img, conv.size, bit_depth, False)))
    trained_on = load_images([png], conv.size)[0, ..., 0]
    served = model_input(img, conv)
    assert served.dtype == trained_on.dtype == np.float32
    assert served.min() >= 0.0 and served.max() <= 255.0 and served.max() > 200.0
    np.testing.assert_array_equal(served, trained_on)
