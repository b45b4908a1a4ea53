"""The train stage on the real MIAS films at native size (224 px), where it used to crash.

The uncached path (``train.feature_cache: false`` / ``train.augment: true``) runs the full VGG16
every step; its BatchNorm recalibration once ran all 232 training images through the model in one
call and died with a segmentation fault. Now everything goes batch by batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from mammoflow.config import Config, load_config
from mammoflow.data.acquire import acquire_stage
from mammoflow.data.convert import convert_stage
from mammoflow.data.ingest import ingest_stage
from mammoflow.data.split import split_stage
from mammoflow.paths import Layout

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MIAS_ARCHIVE = ROOT.parent / "shared" / "data" / "mias" / "all-mias.tar.gz"


@pytest.fixture(scope="module")
def mias_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config]]:
    """A project on the real MIAS archive, converted and split (patient-grouped, 5 folds)."""
    if not MIAS_ARCHIVE.is_file():
        pytest.skip(f"real MIAS archive not found at {MIAS_ARCHIVE}")
    root = tmp_path_factory.mktemp("mias-study")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["pipeline"]["datasets"] = ["mias"]
    raw["datasets"]["mias"]["source"] = str(MIAS_ARCHIVE)
    raw["convert"]["size"] = 256
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    cfg = load_config(root / "params.yaml")
    old = Path.cwd()
    os.chdir(root)
    try:
        for stage in (acquire_stage, ingest_stage):
            stage(cfg, "mias", Layout())
        convert_stage(cfg, "mias", Layout(), progress=False)
        split_stage(cfg, "mias", Layout())
        yield root, cfg
    finally:
        os.chdir(old)


def test_uncached_path_at_224_px_on_real_mias(mias_project: tuple[Path, Config]) -> None:
    """Full VGG16 at 224 px on the 232 training films of a fold: no crash, exact BN statistics."""
    import keras

    from mammoflow.models.features import ImageSet, extract_features
    from mammoflow.training.fit import FoldTrainer, fold_rows, recalibrate_batchnorm
    from mammoflow.training.inputs import load_features, load_inputs

    root, cfg = mias_project
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"input_size": 224, "weights": "none"}),
            "train": cfg.train.model_copy(update={"feature_cache": False, "epochs": 1}),
        }
    )
    inp = load_inputs(cfg, "mias", "vgg16", Layout(root))
    bb, images = load_features(inp, Layout(root))
    assert isinstance(images, ImageSet) and images.images.shape[1:] == (224, 224, 1)
    rows = fold_rows(inp.splits, 1)
    assert len(rows.train) > 200  # the size that crashed in one call
    trainer = FoldTrainer(images, bb, model_cfg=cfg.model, train_cfg=cfg.train, n_classes=3)
    res = trainer.fit(rows)
    assert res.val_prob.shape == (len(rows.val), 3) and np.isfinite(res.val_prob).all()
    np.testing.assert_allclose(res.val_prob.sum(axis=1), 1.0, atol=1e-3)
    assert res.test_prob.shape == (len(rows.test), 3)

    # the statistics the uncached path set equal those computed from extracted features
    train_ids = list(rows.train["image_id"])
    feats = extract_features(bb, images.rows(train_ids), batch_size=16)
    check = keras.Model.from_config(trainer.tail_head.get_config())
    check.set_weights(trainer.tail_head.get_weights())
    recalibrate_batchnorm(check, lambda: (feats[i : i + 16] for i in range(0, len(feats), 16)))
    got, want = trainer.tail_head.get_layer("head_bn"), check.get_layer("head_bn")
    np.testing.assert_allclose(
        got.moving_mean.numpy(), want.moving_mean.numpy(), rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(
        got.moving_variance.numpy(), want.moving_variance.numpy(), rtol=1e-2, atol=1e-3
    )
