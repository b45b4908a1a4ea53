"""The fold loop: train the tail + head per cross-validation fold; no tracking here.

Inputs are either cached prefix features (:class:`~mammoflow.models.features.FeatureSet`, the fast
path: only the tail + head run) or images (:class:`~mammoflow.models.features.ImageSet`: the full
model runs every step, e.g. with augmentation). Each fold starts from the backbone's tail weights
and the same freshly initialised head (seeded with ``train.seed``); shuffling and dropout are
seeded with ``train.seed + fold``. One compiled model serves every fold (reset between folds), so
Keras traces its functions once per backbone, not once per fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.models.build import (
    BackboneModel,
    Pooling,
    compile_model,
    full_model,
    trainable_tail_and_head,
)
from mammoflow.models.features import FeatureSet, ImageSet

SPLIT_COLUMNS = ("image_id", "label_index", "split", "fold")


class TrainError(ValueError):
    """Bad training parameters or inputs; the message names the value and the fix."""


@dataclass(frozen=True)
class TrainEvent:
    """A progress event: ``fold_start``, ``epoch_end`` or ``fold_end``."""

    kind: Literal["fold_start", "epoch_end", "fold_end"]
    fold: int
    n_folds: int
    epoch: int = 0
    epochs: int = 0
    logs: Mapping[str, float] = field(default_factory=dict)


ProgressHook = Callable[[TrainEvent], None]


@dataclass
class FoldResult:
    """What one fold produced (``fold`` 0 is the final model trained on all CV rows).

    Attributes:
        fold: validation fold number (1..k), or 0 for the final model.
        model: the trained tail + head Keras model (input: prefix features).
        history: per-epoch ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``.
        val_ids / val_true / val_prob: validation images, labels, class probabilities.
        test_ids / test_true / test_prob: the same for the held-out test set.
        class_weights: class index → weight used for the loss (None: unweighted).
        timing: seconds for ``build`` (first fold only), ``reset``, ``fit``, ``predict``;
            ``epochs_run``.
        info: provenance to record with the result: backbone, weights (source, path, sha256),
            precision, input size, cut layer, trainable layers, feature-cache key digest and hit.
    """

    fold: int
    model: Any
    history: dict[str, list[float]]
    val_ids: list[str]
    val_true: np.ndarray
    val_prob: np.ndarray
    test_ids: list[str]
    test_true: np.ndarray
    test_prob: np.ndarray
    class_weights: dict[int, float] | None
    timing: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


def provenance(bb: BackboneModel, inputs: FeatureSet | ImageSet) -> dict[str, Any]:
    """What a result was trained from (for tracking): backbone, weights, precision, cut, cache."""
    key = inputs.key if isinstance(inputs, FeatureSet) else None
    hit = inputs.hit if isinstance(inputs, FeatureSet) else False
    return {
        "backbone": bb.name,
        "weights": bb.weights.as_dict(),
        "precision": bb.precision,
        "input_size": bb.input_size,
        "trainable_layers": bb.trainable_layers,
        "cut_layer": bb.plan.cut_layer,
        "trainable": list(bb.plan.trainable),
        "feature_cache": key.digest if key is not None else None,
        "feature_cache_hit": hit,
    }


def balanced_class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """``n / (n_classes_present * count_c)`` per class (sklearn's "balanced"); absent classes → 1.0."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes)
    present = int((counts > 0).sum())
    total = int(counts.sum())
    return {c: (total / (present * int(counts[c])) if counts[c] else 1.0) for c in range(n_classes)}


def check_train_params(cfg: TrainConfig, n_classes: int) -> None:
    """Raise :class:`TrainError` for values the fold loop cannot use."""
    if cfg.batch_size < 1:
        raise TrainError(f"train.batch_size={cfg.batch_size}; use a positive batch size, e.g. 16")
    if cfg.epochs < 1:
        raise TrainError(f"train.epochs={cfg.epochs}; use at least 1 epoch")
    if n_classes < 2:
        raise TrainError(f"n_classes={n_classes}; a classifier needs at least 2 classes")


def _check_splits(splits: pd.DataFrame) -> None:
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise TrainError(
            f"splits lack columns {missing!r}; build them with mammoflow.split.make_splits"
        )


def _one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]


class _EpochHook:
    """Adapter from Keras callbacks to :data:`ProgressHook` (built lazily to keep keras optional)."""

    @staticmethod
    def make(progress: ProgressHook, fold: int, n_folds: int, epochs: int) -> Any:
        import keras

        class Hook(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
                progress(
                    TrainEvent(
                        "epoch_end",
                        fold,
                        n_folds,
                        epoch=epoch + 1,
                        epochs=epochs,
                        logs={k: float(v) for k, v in (logs or {}).items()},
                    )
                )

        return Hook()


class _Runner:
    """One compiled model reused by every fold: traced once, reset to its initial state per fold.

    Rebuilding and recompiling per fold would re-trace the train / test / predict functions
    (about a second each on CPU); resetting the variables gives every fold the same start.
    """

    def __init__(
        self,
        inputs: FeatureSet | ImageSet,
        bb: BackboneModel,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        n_classes: int,
        pooling: Pooling,
    ) -> None:
        import keras

        keras.utils.set_random_seed(train_cfg.seed)
        self.tail_head = trainable_tail_and_head(
            bb,
            n_classes,
            head_units=model_cfg.head_units,
            dropout=model_cfg.dropout,
            pooling=pooling,
        )
        self.model = (
            self.tail_head
            if isinstance(inputs, FeatureSet)
            else full_model(bb, self.tail_head, augment=train_cfg.augment)
        )
        compile_model(self.model, train_cfg.learning_rate, train_cfg.momentum)
        self.model.optimizer.build(self.model.trainable_variables)
        self._start = [v.numpy() for v in self.model.variables]
        self._opt_start = [v.numpy() for v in self.model.optimizer.variables]

    def reset(self) -> None:
        """Restore the initial weights and optimizer state (momentum, iteration count)."""
        for var, value in zip(self.model.variables, self._start, strict=True):
            var.assign(value)
        for var, value in zip(self.model.optimizer.variables, self._opt_start, strict=True):
            var.assign(value)

    def snapshot(self) -> Any:
        """An independent copy of the trained tail + head (for the fold's result)."""
        import keras

        copy = keras.Model.from_config(self.tail_head.get_config())
        copy.set_weights(self.tail_head.get_weights())
        return copy


def recalibrate_batchnorm(model: Any, x: np.ndarray) -> None:
    """Set the moving statistics of the trainable BatchNorm layers to their exact training values.

    With few steps per fold (48 images at batch 16 = 3 steps an epoch) the moving averages are
    still dominated by their initial values (mean 0, variance 1) after training, so inference
    normalises with the wrong statistics and predictions collapse to one class. One full-batch
    pass with momentum 0 replaces them by the training set's own statistics (as SWA's bn_update
    does). Frozen BatchNorm layers of the backbone are untouched (they always run in inference).
    """
    layers = [
        layer
        for layer in _all_layers(model)
        if layer.__class__.__name__ == "BatchNormalization" and layer.trainable
    ]
    if not layers or len(x) == 0:
        return
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(x, training=True)
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum


def _all_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def _fit_one(
    runner: _Runner,
    inputs: FeatureSet | ImageSet,
    *,
    fold: int,
    n_folds: int,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
    train_cfg: TrainConfig,
    n_classes: int,
    progress: ProgressHook | None,
) -> FoldResult:
    import keras

    t0 = time.perf_counter()
    runner.reset()
    keras.utils.set_random_seed(train_cfg.seed + fold)
    model = runner.model
    t_build = time.perf_counter() - t0

    x_tr = inputs.rows(list(train_rows["image_id"]))
    y_tr = train_rows["label_index"].to_numpy(np.int64)
    weights = (
        balanced_class_weights(y_tr, n_classes) if train_cfg.class_weight == "balanced" else None
    )
    has_val = len(val_rows) > 0
    val_ids = list(val_rows["image_id"])
    val_true = val_rows["label_index"].to_numpy(np.int64)
    x_val = inputs.rows(val_ids) if has_val else None
    callbacks: list[Any] = []
    if train_cfg.early_stopping and has_val:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=train_cfg.patience, restore_best_weights=True
            )
        )
    if progress is not None:
        callbacks.append(_EpochHook.make(progress, fold, n_folds, train_cfg.epochs))

    t1 = time.perf_counter()
    hist = model.fit(
        x_tr,
        _one_hot(y_tr, n_classes),
        validation_data=(x_val, _one_hot(val_true, n_classes)) if has_val else None,
        epochs=train_cfg.epochs,
        batch_size=train_cfg.batch_size,
        class_weight=weights,
        callbacks=callbacks,
        shuffle=True,
        verbose=0,
    )
    recalibrate_batchnorm(model, x_tr)
    t_fit = time.perf_counter() - t1

    t2 = time.perf_counter()
    empty = np.zeros((0, n_classes), np.float32)
    val_prob = (
        model.predict(x_val, batch_size=train_cfg.batch_size, verbose=0) if has_val else empty
    )
    test_ids = list(test_rows["image_id"])
    test_prob = (
        model.predict(inputs.rows(test_ids), batch_size=train_cfg.batch_size, verbose=0)
        if test_ids
        else empty
    )
    t_pred = time.perf_counter() - t2
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return FoldResult(
        fold=fold,
        model=runner.snapshot(),
        history=history,
        val_ids=val_ids,
        val_true=val_true,
        val_prob=np.asarray(val_prob, np.float32),
        test_ids=test_ids,
        test_true=test_rows["label_index"].to_numpy(np.int64),
        test_prob=np.asarray(test_prob, np.float32),
        class_weights=weights,
        timing={
            "reset_s": t_build,
            "fit_s": t_fit,
            "predict_s": t_pred,
            "epochs_run": float(len(history.get("loss", []))),
        },
    )


def train_folds(
    inputs: FeatureSet | ImageSet,
    splits: pd.DataFrame,
    bb: BackboneModel,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    n_classes: int,
    folds: Sequence[int] | None = None,
    pooling: Pooling = "avg",
    progress: ProgressHook | None = None,
) -> list[FoldResult]:
    """Train one tail + head per CV fold; fold ``k`` validates on rows with ``fold == k``.

    Args:
        inputs: cached features or images, covering every image in ``splits``.
        splits: output of :func:`mammoflow.split.make_splits`.
        bb: the backbone the inputs came from.
        model_cfg: head settings (head_units, dropout).
        train_cfg: epochs, batch size, optimiser, class weights, early stopping, seed.
        n_classes: number of classes.
        folds: subset of folds to run (default all).
        pooling: head pooling, ``avg`` or ``flatten``.
        progress: receives :class:`TrainEvent` values.

    Raises:
        TrainError: bad parameters, splits without CV rows, or an unknown fold.
    """
    check_train_params(train_cfg, n_classes)
    _check_splits(splits)
    cv = splits[splits["split"] == "cv"]
    test = splits[splits["split"] == "test"]
    available = sorted(int(f) for f in cv["fold"].unique())
    if not available:
        raise TrainError("splits have no 'cv' rows; build them with make_splits(k_folds ≥ 2)")
    chosen = list(folds) if folds is not None else available
    unknown = [f for f in chosen if f not in available]
    if unknown:
        raise TrainError(f"folds {unknown!r} are not in the splits (available: {available!r})")
    t0 = time.perf_counter()
    runner = _Runner(inputs, bb, model_cfg, train_cfg, n_classes, pooling)
    build_s = time.perf_counter() - t0
    results: list[FoldResult] = []
    for fold in chosen:
        if progress is not None:
            progress(TrainEvent("fold_start", fold, len(chosen), epochs=train_cfg.epochs))
        result = _fit_one(
            runner,
            inputs,
            fold=fold,
            n_folds=len(chosen),
            train_rows=cv[cv["fold"] != fold],
            val_rows=cv[cv["fold"] == fold],
            test_rows=test,
            train_cfg=train_cfg,
            n_classes=n_classes,
            progress=progress,
        )
        result.timing["build_s"] = build_s if not results else 0.0
        result.info = provenance(bb, inputs)
        results.append(result)
        if progress is not None:
            progress(TrainEvent("fold_end", fold, len(chosen), epochs=train_cfg.epochs))
    return results


def train_final(
    inputs: FeatureSet | ImageSet,
    splits: pd.DataFrame,
    bb: BackboneModel,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    n_classes: int,
    pooling: Pooling = "avg",
    progress: ProgressHook | None = None,
) -> FoldResult:
    """Train on every CV row (no validation, so no early stopping) and predict the test set.

    Returns a :class:`FoldResult` with ``fold == 0`` and empty validation arrays.
    """
    check_train_params(train_cfg, n_classes)
    _check_splits(splits)
    cv = splits[splits["split"] == "cv"]
    if cv.empty:
        raise TrainError("splits have no 'cv' rows to train the final model on")
    if progress is not None:
        progress(TrainEvent("fold_start", 0, 1, epochs=train_cfg.epochs))
    t0 = time.perf_counter()
    runner = _Runner(inputs, bb, model_cfg, train_cfg, n_classes, pooling)
    build_s = time.perf_counter() - t0
    result = _fit_one(
        runner,
        inputs,
        fold=0,
        n_folds=1,
        train_rows=cv,
        val_rows=cv.iloc[0:0],
        test_rows=splits[splits["split"] == "test"],
        train_cfg=train_cfg,
        n_classes=n_classes,
        progress=progress,
    )
    result.timing["build_s"] = build_s
    result.info = provenance(bb, inputs)
    if progress is not None:
        progress(TrainEvent("fold_end", 0, 1, epochs=train_cfg.epochs))
    return result
