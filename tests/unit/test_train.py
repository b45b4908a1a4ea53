"""train.py: smoke runs per backbone, frozen BatchNorm, class weights, errors, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.data.split import make_splits
from mammoflow.models import build
from mammoflow.models.features import cached_features, prepare_inputs
from mammoflow.training.fit import (
    FoldTrainer,
    TrainError,
    TrainEvent,
    balanced_class_weights,
    check_train_params,
    fold_rows,
    recalibrate_batchnorm,
    train_folds,
)
from tests.unit.test_features import write_pngs

SMALL = {"vgg16": 32, "vgg19": 32, "resnet50": 32, "inception_v3": 75}
LABELS = [0, 1, 2] * 8  # 24 images, 12 patients (2 images each)
MODEL = ModelConfig(trainable_layers=2, head_units=16, dropout=0.1)
TRAIN = TrainConfig(epochs=4, batch_size=8, learning_rate=0.02, precision="float32", seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("train")
    patients = [f"P{i % 12:02d}" for i in range(len(LABELS))]
    frame = write_pngs(root / "png", LABELS, size=48, patients=patients)
    frame["label"] = frame["label_index"].map({0: "normal", 1: "benign", 2: "malignant"})
    splits = make_splits(frame, test_size=0.0, k_folds=2, seed=0)
    return root, frame, splits


@pytest.mark.parametrize("name", list(SMALL))
def test_smoke_loss_decreases_and_bn_frozen(name: str, dataset: tuple) -> None:
    import keras

    root, frame, splits = dataset
    bb = build.load_backbone(name, trainable_layers=2, input_size=SMALL[name])
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    tail_bn_before = [w.copy() for w in (bb.tail.get_weights() if bb.tail is not None else [])]
    events: list[TrainEvent] = []
    results = train_folds(
        feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3, progress=events.append
    )
    assert [r.fold for r in results] == [1, 2]
    assert results[0].info["weights"] == {"source": "none", "path": None, "sha256": "none"}
    assert results[0].info["cut_layer"] == bb.plan.cut_layer and results[0].info["feature_cache"]
    for r in results:
        loss = r.history["loss"]
        assert len(loss) == TRAIN.epochs and loss[-1] < loss[0], loss
        assert set(r.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
        assert r.val_prob.shape == (len(r.val_ids), 3) and r.val_prob.dtype == np.float32
        np.testing.assert_allclose(r.val_prob.sum(axis=1), 1.0, atol=1e-4)
        assert r.test_prob.shape == (0, 3)
        tail = r.model.layers[1]
        for layer in tail.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                assert not layer.trainable
                src = bb.base.get_layer(layer.name)
                for a, b in zip(layer.get_weights(), src.get_weights(), strict=True):
                    np.testing.assert_array_equal(a, b)  # moving stats and affine untouched
    # the shared tail of the backbone itself was never trained
    for a, b in zip(
        tail_bn_before, bb.tail.get_weights() if bb.tail is not None else [], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    kinds = [e.kind for e in events]
    assert kinds.count("fold_start") == 2 and kinds.count("epoch_end") == 2 * TRAIN.epochs


def test_class_weights_from_training_fold_only(dataset: tuple) -> None:
    root, frame, splits = dataset
    assert balanced_class_weights(np.array([0, 0, 0, 1]), 3) == {0: 4 / 6, 1: 2.0, 2: 1.0}
    bb = build.load_backbone("vgg16", trainable_layers=1, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    cfg = TRAIN.model_copy(update={"epochs": 1})
    (r,) = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=cfg, n_classes=3, folds=[1])
    train_y = splits[(splits["split"] == "cv") & (splits["fold"] != 1)]["label_index"].to_numpy()
    assert r.class_weights == balanced_class_weights(train_y, 3)
    none = cfg.model_copy(update={"class_weight": "none"})
    (r2,) = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=none, n_classes=3, folds=[2])
    assert r2.class_weights is None


def test_deterministic_and_final_and_image_path(dataset: tuple) -> None:
    root, frame, _ = dataset
    splits = make_splits(frame, test_size=0.25, k_folds=2, seed=1)
    bb = build.load_backbone("vgg16", trainable_layers=1, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    cfg = TRAIN.model_copy(update={"epochs": 2, "early_stopping": True, "patience": 1})
    a = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=cfg, n_classes=3, folds=[1])
    b = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=cfg, n_classes=3, folds=[1])
    np.testing.assert_allclose(a[0].history["loss"], b[0].history["loss"], rtol=1e-4)
    np.testing.assert_allclose(a[0].test_prob, b[0].test_prob, rtol=1e-3, atol=1e-5)
    assert len(a[0].test_ids) == int((splits["split"] == "test").sum())
    (final,) = train_folds(
        feats, splits, bb, model_cfg=MODEL, train_cfg=cfg, n_classes=3, folds=[0]
    )
    assert final.fold == 0 and final.val_prob.shape == (0, 3) and len(final.test_ids) > 0
    # no cache (augmentation): end-to-end training on images with the full model
    images = prepare_inputs(frame, bb, dataset="synthetic", augment=True)
    aug = cfg.model_copy(update={"augment": True, "epochs": 1})
    (r,) = train_folds(images, splits, bb, model_cfg=MODEL, train_cfg=aug, n_classes=3, folds=[2])
    assert r.val_prob.shape == (len(r.val_ids), 3)


def test_bad_params_are_clear(dataset: tuple, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainError, match="batch_size=0"):
        check_train_params(TrainConfig.model_construct(batch_size=0, epochs=1), 3)
    with pytest.raises(ValidationError, match="backbones"):
        ModelConfig(backbones=["alexnet"])  # type: ignore[list-item]
    _, frame, splits = dataset
    bb = build.load_backbone("vgg16", trainable_layers=1, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=tmp_path)
    with pytest.raises(TrainError, match=r"folds \[7\]"):
        train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3, folds=[7])


def _one_shot_stats(model, x: np.ndarray) -> list[np.ndarray]:
    """The old recalibration: the whole set in one training-mode call with momentum 0."""
    import keras

    bns = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    saved = [layer.momentum for layer in bns]
    for layer in bns:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, m in zip(bns, saved, strict=True):
        layer.momentum = m
    return [w for layer in bns for w in (layer.moving_mean.numpy(), layer.moving_variance.numpy())]


def test_batched_recalibration_equals_one_shot(dataset: tuple) -> None:
    """Batch-by-batch statistics equal the one-shot full-set pass (which crashed at real sizes)."""
    root, frame, splits = dataset
    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    (r,) = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3, folds=[1])
    x = feats.rows(list(fold_rows(splits, 1).train["image_id"]))
    one = build.trainable_tail_and_head(bb, 3, head_units=16, dropout=0.1)
    one.set_weights(r.weights)
    expected = _one_shot_stats(one, x)
    batched = build.trainable_tail_and_head(bb, 3, head_units=16, dropout=0.1)
    batched.set_weights(r.weights)
    n = recalibrate_batchnorm(batched, lambda: (x[i : i + 5] for i in range(0, len(x), 5)))
    assert n == 1
    got = batched.get_layer("head_bn")
    np.testing.assert_allclose(got.moving_mean.numpy(), expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.moving_variance.numpy(), expected[1], rtol=1e-3, atol=1e-5)
    # the trained fold's own statistics are these too
    np.testing.assert_allclose(
        r.model.get_layer("head_bn").moving_mean.numpy(), expected[0], rtol=1e-4, atol=1e-5
    )


def test_one_trace_per_trainer_and_epoch_overhead(dataset: tuple) -> None:
    """Every fold reuses the compiled epoch and predict functions (no retracing per fold)."""
    root, frame, splits = dataset
    bb = build.load_backbone("vgg16", trainable_layers=1, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    trainer = FoldTrainer(feats, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3)
    train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3, trainer=trainer)
    train_folds(
        feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3, folds=[0], trainer=trainer
    )
    assert trainer._train_epoch.experimental_get_tracing_count() == 1
    assert trainer._predict.experimental_get_tracing_count() == 1


def test_fold_task_independent_of_trainer_reuse(dataset: tuple) -> None:
    """A fold trained on a fresh trainer (a Dask worker) equals the same fold on a reused one."""
    root, frame, splits = dataset
    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    shared = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3)
    (fresh,) = train_folds(
        feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3, folds=[2]
    )
    np.testing.assert_allclose(shared[1].history["loss"], fresh.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(shared[1].val_prob, fresh.val_prob, rtol=1e-5, atol=1e-6)


def test_ensemble_model_is_the_mean_of_the_fold_models(dataset: tuple, tmp_path: Path) -> None:
    """The registered ensemble: one prefix, K tails + heads, averaged; loads as stock Keras."""
    import keras

    from mammoflow.training.fit import tail_head_from_weights

    root, frame, splits = dataset
    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    feats = cached_features(frame, bb, dataset="synthetic", cache_dir=root / "cache")
    results = train_folds(feats, splits, bb, model_cfg=MODEL, train_cfg=TRAIN, n_classes=3)
    heads = [
        tail_head_from_weights(bb, r.weights, model_cfg=MODEL, n_classes=3, name=f"fold_{r.fold}")
        for r in results
    ]
    ensemble = build.ensemble_model(bb, heads)
    x = np.random.default_rng(0).uniform(0, 255, (3, 40, 50, 1)).astype(np.float32)
    singles = [build.full_model(bb, h).predict(x, verbose=0) for h in heads]
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), np.mean(singles, axis=0), atol=1e-5)
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    loaded = keras.models.load_model(path)  # no custom objects needed
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.mean(singles, axis=0), atol=1e-5)
    # fold models' test predictions averaged = the ensemble's, on cached features
    head = build.ensemble_head(bb, heads)
    test_x = feats.rows(results[0].val_ids)
    np.testing.assert_allclose(
        head.predict(test_x, verbose=0),
        np.mean([h.predict(test_x, verbose=0) for h in heads], axis=0),
        atol=1e-5,
    )


def test_streamed_features_train_as_in_memory(
    dataset: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """Over the memory budget the memory-mapped float16 cache streams in chunks (several per
    epoch and per prediction): the same losses, weights and probabilities as in memory."""
    import logging

    root, frame, splits = dataset
    bb = build.load_backbone("vgg16", trainable_layers=2, input_size=32)
    feats = cached_features(
        frame, bb, dataset="synthetic", cache_dir=root / "cache16", dtype="float16"
    )
    assert isinstance(feats.features, np.memmap) and feats.features.dtype == np.float16
    rows = fold_rows(splits, 1)
    cfg = TRAIN.model_copy(update={"epochs": 3})
    caplog.set_level(logging.INFO, logger="mammoflow.training.fit")
    held = FoldTrainer(feats, bb, model_cfg=MODEL, train_cfg=cfg, n_classes=3)
    assert held.chunk is None and "held in memory" in caplog.text
    row_bytes = feats.nbytes_float32 // len(feats.image_ids)
    streamed = FoldTrainer(
        feats, bb, model_cfg=MODEL, train_cfg=cfg, n_classes=3, memory_budget=4 * 3 * row_bytes
    )
    assert streamed.chunk == 3 and "streamed from" in caplog.text  # 3 rows → one 8-row batch
    a, b = held.fit(rows), streamed.fit(rows)
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
    np.testing.assert_array_equal(a.history["val_loss"], b.history["val_loss"])
    np.testing.assert_array_equal(a.val_prob, b.val_prob)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)
