"""A damaged feature cache is detected by its recorded sha256, recomputed, never trained on.

Real extraction (VGG16 prefix, TensorFlow) on learnable PNGs; the damage is done to the file on
disk as a failing disk or an interrupted copy would: truncation, and one flipped bit with the
file's size and mtime kept.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.data.split import make_splits
from mammoflow.files import sha256_file
from mammoflow.models import build, features
from mammoflow.models.features import FeatureSet, cached_features
from mammoflow.training.fit import FoldTrainer, fold_rows
from tests.unit.test_features import write_pngs

pytestmark = pytest.mark.integration


def test_truncated_or_bit_flipped_cache_is_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = [0, 1, 2] * 4
    frame = write_pngs(tmp_path / "png", labels, size=48, patients=[f"P{i}" for i in range(12)])
    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="mammoflow.models.features")
    fresh = cached_features(frame, bb, dataset="t", cache_dir=cache, dtype="float16")
    assert fresh.key is not None
    reference = np.array(fresh.features)  # a copy: the damage below hits the mapped file
    ids, npy = fresh.image_ids, cache / f"{fresh.key.stem()}.npy"
    del fresh
    recorded = json.loads(npy.with_suffix(".json").read_text())["sha256"]

    # truncated (an interrupted copy): size and content differ from the recorded file
    with npy.open("r+b") as fh:
        fh.truncate(npy.stat().st_size - 1000)
    caplog.clear()
    again = cached_features(frame, bb, dataset="t", cache_dir=cache, dtype="float16")
    assert not again.hit and "fails its recorded sha256" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.features), reference)
    assert sha256_file(npy) == recorded

    # one bit flipped in the data, size and mtime kept (silent corruption); a new process
    # (the verified-files memo cleared) must check the file again
    stat = npy.stat()
    offset = stat.st_size - 7  # a float16's high byte: its sign/exponent change the value
    with npy.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x40]))
    os.utime(npy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert npy.stat().st_size == stat.st_size and sha256_file(npy) != recorded
    features._VERIFIED.clear()
    caplog.clear()
    healed = cached_features(frame, bb, dataset="t", cache_dir=cache, dtype="float16")
    assert not healed.hit and "fails its recorded sha256" in caplog.text
    np.testing.assert_array_equal(np.asarray(healed.features), reference)

    # trained on: the recomputed features — the same fold as on the fresh extraction's values
    splits = make_splits(frame, test_size=0.0, k_folds=2, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=0.02, precision="float32", seed=3)
    model = ModelConfig(trainable_layers=2, head_units=8, dropout=0.0)
    results = [
        FoldTrainer(fs, bb, model_cfg=model, train_cfg=cfg, n_classes=3).fit(fold_rows(splits, 1))
        for fs in (FeatureSet(ids, reference), healed)
    ]
    np.testing.assert_array_equal(results[0].val_prob, results[1].val_prob)
