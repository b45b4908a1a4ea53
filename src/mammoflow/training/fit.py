"""A fold task: train the tail + head on one fold's rows; no tracking here.

Inputs are either cached prefix features (:class:`~mammoflow.models.features.FeatureSet`, the fast
path: only the tail + head run) or images (:class:`~mammoflow.models.features.ImageSet`: the full
model runs every step, e.g. with augmentation).

One :class:`FoldTrainer` per (backbone, settings) serves every fold. When the features fit the
memory budget (``MAMMOFLOW_MEMORY_BUDGET_MB``, default 2048, as float32) it keeps the whole
array on the device once and compiles one ``tf.function`` that runs a *whole epoch* (gather a
batch, forward, backward, SGD update, in a graph loop) and one that predicts a batch of rows,
both with fixed input signatures — so each is traced once and reused by every fold. When they do
not, it streams the memory-mapped cache: the epoch's shuffled rows are read in chunks (a whole
number of batches, the next chunk read while the current one trains) and one compiled call
trains each chunk, carrying the loss sums from chunk to chunk — the same batches, updates and
numbers as the in-memory epoch, with resident memory bounded by the budget whatever the number
of images. Prediction and BatchNorm recalibration read through the same chunks. The choice is
logged; the budget is an execution setting (not in params) because it never changes a number. Between
folds the variables and the optimizer state are restored to their start, so every fold starts
from the backbone's tail weights and the same freshly initialised head (seeded with
``train.seed``); the per-epoch shuffle of fold ``k`` is seeded with ``train.seed + k``.

Nothing runs a whole fold through a model in one call: training, prediction and the BatchNorm
recalibration all go batch by batch, so memory stays bounded at any image size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.models.build import (
    BackboneModel,
    Pooling,
    full_model,
    trainable_tail_and_head,
)
from mammoflow.models.features import (
    FeatureSet,
    ImageSet,
    extractor,
    memory_budget_bytes,
    read_rows,
)
from mammoflow.quiet import load_keras, load_tensorflow

if TYPE_CHECKING:
    from mammoflow.training.inputs import StudyInputs

SPLIT_COLUMNS = ("image_id", "label_index", "split", "fold")
#: Rows per prediction / statistics call on cached features (images use train.batch_size).
FEATURE_EVAL_BATCH = 64
#: Float32 copies of a chunk resident at once when streaming: the chunk training, the next one
#: being read (+ its 16-bit read buffer), and the tensor TensorFlow makes of the first.
STREAM_COPIES = 4

log = logging.getLogger(__name__)


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
    """What one fold task produced (``fold`` 0 is the final model trained on all CV rows).

    Plain data apart from ``model``: :meth:`portable` drops the Keras model so that the result
    can cross processes (Dask); :func:`tail_head_from_weights` rebuilds it from ``weights``.

    Attributes:
        fold: validation fold number (1..k), or 0 for the final model.
        weights: the trained tail + head weights (``model.get_weights()`` order).
        model: the trained tail + head Keras model (input: prefix features), or None.
        history: per-epoch ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``.
        val_ids / val_true / val_prob: validation images, labels, class probabilities.
        test_ids / test_true / test_prob: the same for the held-out test set.
        class_weights: class index → weight used for the loss (None: unweighted).
        timing: seconds for ``build_s`` (first fold of a trainer only), ``reset_s``, ``fit_s``,
            ``predict_s``; ``epochs_run``.
        info: provenance to record with the result: backbone, weights (source, path, sha256),
            precision, input size, cut layer, trainable layers, feature-cache key digest and hit.
    """

    fold: int
    weights: list[np.ndarray]
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
    model: Any | None = None

    def portable(self) -> FoldResult:
        """A copy without the Keras model (picklable; for Dask workers and Prefect results)."""
        return replace(self, model=None)


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


def check_splits(splits: pd.DataFrame) -> list[int]:
    """The CV fold numbers of ``splits``.

    Raises:
        TrainError: missing columns or no ``cv`` rows.
    """
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise TrainError(
            f"splits lack columns {missing!r}; build them with mammoflow.data.split.make_splits"
        )
    folds = sorted(int(f) for f in splits.loc[splits["split"] == "cv", "fold"].unique())
    if not folds:
        raise TrainError("splits have no 'cv' rows; build them with make_splits(k_folds ≥ 2)")
    return folds


@dataclass(frozen=True)
class FoldRows:
    """The rows of one fold task: train on ``train``, validate on ``val``, predict ``test``."""

    fold: int
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def fold_rows(splits: pd.DataFrame, fold: int) -> FoldRows:
    """Rows of fold ``fold`` (1..k), or of the final model (``fold`` 0: every CV row, no val).

    Raises:
        TrainError: an unknown fold.
    """
    available = check_splits(splits)
    cv = splits[splits["split"] == "cv"]
    test = splits[splits["split"] == "test"]
    if fold == 0:
        return FoldRows(0, cv, cv.iloc[0:0], test)
    if fold not in available:
        raise TrainError(f"folds [{fold}] are not in the splits (available: {available!r})")
    return FoldRows(fold, cv[cv["fold"] != fold], cv[cv["fold"] == fold], test)


def _all_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def recalibrate_batchnorm(model: Any, batches: Callable[[], Iterator[Any]]) -> int:
    """Set the moving statistics of ``model``'s trainable BatchNorm layers to their exact values.

    With few steps per fold (48 images at batch 16 = 3 steps an epoch) the moving averages are
    still dominated by their initial values (mean 0, variance 1) after training, so inference
    normalises with the wrong statistics and predictions collapse to one class. This replaces
    them by the training set's own mean and (biased) variance, as SWA's ``bn_update`` and a
    full-batch pass with momentum 0 would — but accumulated batch by batch in float64, so the
    result equals the one-shot statistics without ever holding the whole set in one call.

    Layers are done in graph order, each with the earlier ones already recalibrated and every
    layer in inference mode, which gives the same statistics as the one-shot training pass.
    Frozen BatchNorm layers (the backbone's) are untouched.

    Args:
        model: a functional Keras model whose trainable BatchNorm layers are top-level layers.
        batches: returns a fresh iterator over input batches of ``model`` (called once per layer).

    Returns:
        How many layers were recalibrated.
    """
    keras = load_keras()

    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    for layer in layers:
        probe = keras.Model(model.input, layer.input)
        total, s1, s2 = 0, None, None
        for batch in batches():
            h = np.asarray(probe(batch, training=False), np.float64)
            h = h.reshape(-1, h.shape[-1])
            total += len(h)
            s1 = h.sum(axis=0) if s1 is None else s1 + h.sum(axis=0)
            s2 = (h * h).sum(axis=0) if s2 is None else s2 + (h * h).sum(axis=0)
        if not total or s1 is None or s2 is None:
            return 0
        mean = s1 / total
        var = np.maximum(s2 / total - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))
    return len(layers)


def tail_head_from_weights(
    bb: BackboneModel,
    weights: Sequence[np.ndarray],
    *,
    model_cfg: ModelConfig,
    n_classes: int,
    pooling: Pooling = "avg",
    name: str | None = None,
) -> Any:
    """Rebuild a trained tail + head (e.g. from a :meth:`FoldResult.portable` result)."""
    model = trainable_tail_and_head(
        bb,
        n_classes,
        head_units=model_cfg.head_units,
        dropout=model_cfg.dropout,
        pooling=pooling,
        name=name,
    )
    model.set_weights(list(weights))
    return model


def stream_rows(inputs: FeatureSet | ImageSet, budget: int) -> int | None:
    """Rows per streamed chunk, or None when the inputs are held in memory.

    Cached features whose float32 size fits ``budget`` bytes stay in memory (the fast path);
    larger ones stream in chunks of ``budget / (STREAM_COPIES · row bytes)`` rows. Images (the
    end-to-end path, used with augmentation) are always in memory.
    """
    if not isinstance(inputs, FeatureSet):
        return None
    n = max(len(inputs.image_ids), 1)
    need = inputs.nbytes_float32
    if need <= budget:
        log.info(
            "features: %.0f MB as float32 ≤ memory budget %.0f MB; held in memory",
            need / 2**20,
            budget / 2**20,
        )
        return None
    rows = max(1, budget // (STREAM_COPIES * (need // n)))
    log.info(
        "features: %.0f MB as float32 > memory budget %.0f MB; streamed from %s in chunks of "
        "%d rows",
        need / 2**20,
        budget / 2**20,
        getattr(inputs.features, "filename", "memory"),
        rows,
    )
    return int(rows)


class FoldTrainer:
    """Compiled training of one tail + head, reused by every fold of a (backbone, settings).

    Args:
        inputs: cached features or images of every image the folds will use.
        bb: the backbone the inputs came from.
        model_cfg: head settings (head_units, dropout).
        train_cfg: epochs, batch size, optimiser, class weights, early stopping, seed.
        n_classes: number of classes.
        pooling: head pooling, ``avg`` or ``flatten``.
        memory_budget: bytes the features may take resident (default
            ``$MAMMOFLOW_MEMORY_BUDGET_MB``); over it they are streamed (same numbers).
    """

    def __init__(
        self,
        inputs: FeatureSet | ImageSet,
        bb: BackboneModel,
        *,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        n_classes: int,
        pooling: Pooling = "avg",
        memory_budget: int | None = None,
    ) -> None:
        keras = load_keras()
        tf = load_tensorflow()

        check_train_params(train_cfg, n_classes)
        t0 = time.perf_counter()
        keras.utils.set_random_seed(train_cfg.seed)
        self.bb, self.inputs, self.cfg, self.n_classes = bb, inputs, train_cfg, n_classes
        self.cached = isinstance(inputs, FeatureSet)
        self.tail_head = trainable_tail_and_head(
            bb,
            n_classes,
            head_units=model_cfg.head_units,
            dropout=model_cfg.dropout,
            pooling=pooling,
            seed=train_cfg.seed,
        )
        self.model = (
            self.tail_head
            if self.cached
            else full_model(bb, self.tail_head, augment=train_cfg.augment)
        )
        array = inputs.features if isinstance(inputs, FeatureSet) else inputs.images
        self._index = {k: i for i, k in enumerate(inputs.image_ids)}
        budget = memory_budget if memory_budget is not None else memory_budget_bytes()
        self.chunk = stream_rows(inputs, budget)
        self._source = array
        self._x = None if self.chunk else tf.constant(np.asarray(array, np.float32))
        self.eval_batch = FEATURE_EVAL_BATCH if self.cached else train_cfg.batch_size
        self.optimizer = _optimizer(train_cfg, bb.precision)
        self.optimizer.build(self.model.trainable_variables)
        if self.chunk:
            self._train_chunk, self._predict_x = self._compile_chunk(), self._compile_predict_x()
        else:
            self._train_epoch, self._predict = self._compile_epoch(), self._compile_predict()
        self._start = [v.numpy() for v in self.model.variables]
        self._opt_start = [v.numpy() for v in self.optimizer.variables]
        self.build_s = time.perf_counter() - t0

    # ---- compiled pieces
    def _step(self) -> Callable[[Any, Any, Any, Any, Any], tuple[Any, Any]]:
        """One SGD step on a batch, adding its loss and hits to the running sums (graph code)."""
        keras = load_keras()
        tf = load_tensorflow()

        model, opt = self.model, self.optimizer
        variables = model.trainable_variables
        scaled = isinstance(opt, keras.optimizers.LossScaleOptimizer)

        def step(xb: Any, yb: Any, wb: Any, loss_sum: Any, correct: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                prob = tf.cast(model(xb, training=True), tf.float32)
                loss = tf.reduce_mean(keras.losses.categorical_crossentropy(yb, prob) * wb)
                target = opt.scale_loss(loss) if scaled else loss
            grads = tape.gradient(target, variables)
            opt.apply(grads, variables)
            size = tf.cast(tf.shape(yb)[0], tf.float32)
            loss_sum += loss * size
            hits = tf.equal(tf.argmax(prob, -1), tf.argmax(yb, -1))
            correct += tf.reduce_sum(tf.cast(hits, tf.float32))
            return loss_sum, correct

        return step

    def _compile_epoch(self) -> Any:
        tf = load_tensorflow()

        x_all, batch, step = self._x, self.cfg.batch_size, self._step()
        c = self.n_classes

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, c], tf.float32),
                tf.TensorSpec([None], tf.float32),
            ],
            reduce_retracing=True,
        )
        def train_epoch(rows: Any, y: Any, w: Any) -> Any:
            n = tf.shape(rows)[0]
            loss_sum, correct = tf.constant(0.0), tf.constant(0.0)
            for start in tf.range(0, n, batch):
                stop = tf.minimum(start + batch, n)
                xb = tf.gather(x_all, rows[start:stop])
                loss_sum, correct = step(xb, y[start:stop], w[start:stop], loss_sum, correct)
            total = tf.cast(n, tf.float32)
            return loss_sum / total, correct / total

        return train_epoch

    def _compile_chunk(self) -> Any:
        """Train the batches of one streamed chunk, carrying the epoch's loss and hit sums."""
        tf = load_tensorflow()

        batch, step, c = self.cfg.batch_size, self._step(), self.n_classes
        shape = [None, *self._source.shape[1:]]

        @tf.function(
            input_signature=[
                tf.TensorSpec(shape, tf.float32),
                tf.TensorSpec([None, c], tf.float32),
                tf.TensorSpec([None], tf.float32),
                tf.TensorSpec([], tf.float32),
                tf.TensorSpec([], tf.float32),
            ],
            reduce_retracing=True,
        )
        def train_chunk(x: Any, y: Any, w: Any, loss_sum: Any, correct: Any) -> Any:
            n = tf.shape(x)[0]
            for start in tf.range(0, n, batch):
                stop = tf.minimum(start + batch, n)
                loss_sum, correct = step(
                    x[start:stop], y[start:stop], w[start:stop], loss_sum, correct
                )
            return loss_sum, correct

        return train_chunk

    def _compile_predict_x(self) -> Any:
        tf = load_tensorflow()

        model = self.model
        spec = tf.TensorSpec([None, *self._source.shape[1:]], tf.float32)

        @tf.function(input_signature=[spec], reduce_retracing=True)
        def predict_x(x: Any) -> Any:
            return tf.cast(model(x, training=False), tf.float32)

        return predict_x

    # ---- streaming
    def _chunk_rows(self, multiple: int) -> int:
        """Rows per chunk: the planned chunk rounded down to whole ``multiple``s (at least one)."""
        return max(multiple, (self.chunk or 0) // multiple * multiple)

    def _chunks(self, rows: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, features of rows[start:start+size])`` chunk by chunk, the next one read in a
        background thread while the caller works on the current one (callers drop each chunk
        before asking for the next, so at most two are resident)."""
        starts = list(range(0, len(rows), size))
        if not starts:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="mammoflow-chunks") as pool:
            ahead: Future[np.ndarray] = pool.submit(read_rows, self._source, rows[:size])
            for i, lo in enumerate(starts):
                x = ahead.result()
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    ahead = pool.submit(read_rows, self._source, rows[nxt : nxt + size])
                yield lo, x
                del x

    def _run_epoch(self, rows: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[Any, Any]:
        """One epoch over ``rows`` in this order: one compiled call, or one per streamed chunk."""
        if not self.chunk:
            return self._train_epoch(rows, y, w)
        tf = load_tensorflow()

        loss_sum, correct = tf.constant(0.0), tf.constant(0.0)
        for lo, x in self._chunks(rows, self._chunk_rows(self.cfg.batch_size)):
            hi = lo + len(x)
            loss_sum, correct = self._train_chunk(x, y[lo:hi], w[lo:hi], loss_sum, correct)
            del x
        total = tf.cast(len(rows), tf.float32)
        return loss_sum / total, correct / total

    def _compile_predict(self) -> Any:
        tf = load_tensorflow()

        model, x_all = self.model, self._x

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)], reduce_retracing=True)
        def predict_rows(rows: Any) -> Any:
            return tf.cast(model(tf.gather(x_all, rows), training=False), tf.float32)

        return predict_rows

    # ---- state
    def reset(self) -> None:
        """Restore the initial weights and optimizer state (momentum, iteration count)."""
        for var, value in zip(self.model.variables, self._start, strict=True):
            var.assign(value)
        for var, value in zip(self.optimizer.variables, self._opt_start, strict=True):
            var.assign(value)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids`` in the device array.

        Raises:
            TrainError: an id has no input.
        """
        try:
            return np.asarray([self._index[i] for i in ids], np.int32)
        except KeyError as exc:
            raise TrainError(
                f"no input for image {exc.args[0]!r}; rebuild the feature cache"
            ) from None

    def predict(self, ids: Sequence[str]) -> np.ndarray:
        """Class probabilities for ``ids``, batch by batch (streamed chunk by chunk if planned)."""
        rows, eb = self.rows(ids), self.eval_batch
        out = np.zeros((len(rows), self.n_classes), np.float32)
        if not self.chunk:
            for lo in range(0, len(rows), eb):
                out[lo : lo + eb] = self._predict(rows[lo : lo + eb]).numpy()
            return out
        for lo, x in self._chunks(rows, self._chunk_rows(eb)):
            for b in range(0, len(x), eb):
                out[lo + b : lo + b + eb] = self._predict_x(x[b : b + eb]).numpy()
            del x
        return out

    def _feature_batches(self, ids: Sequence[str]) -> Callable[[], Iterator[Any]]:
        """Batches of tail inputs for ``ids`` (features; images go through the frozen prefix)."""
        tf = load_tensorflow()

        rows = self.rows(ids)
        if self.chunk:
            return lambda: (
                read_rows(self._source, rows[lo : lo + self.eval_batch])
                for lo in range(0, len(rows), self.eval_batch)
            )
        if self.cached:
            return lambda: (
                tf.gather(self._x, rows[lo : lo + self.eval_batch])
                for lo in range(0, len(rows), self.eval_batch)
            )
        extract = extractor(self.bb)
        return lambda: (
            extract(tf.gather(self._x, rows[lo : lo + self.eval_batch]))
            for lo in range(0, len(rows), self.eval_batch)
        )

    def recalibrate(self, ids: Sequence[str]) -> int:
        """Exact BatchNorm statistics of the training rows ``ids`` (see :func:`recalibrate_batchnorm`)."""
        return recalibrate_batchnorm(self.tail_head, self._feature_batches(ids))

    def snapshot(self) -> tuple[list[np.ndarray], Any]:
        """The trained tail + head: its weights and an independent Keras copy."""
        keras = load_keras()

        weights = self.tail_head.get_weights()
        copy = keras.Model.from_config(self.tail_head.get_config())
        copy.set_weights(weights)
        return weights, copy

    # ---- one fold
    def fit(
        self, rows: FoldRows, *, progress: ProgressHook | None = None, n_folds: int = 1
    ) -> FoldResult:
        """Train from the initial state on ``rows.train``; predict ``rows.val`` and ``rows.test``."""
        cfg, fold = self.cfg, rows.fold
        t0 = time.perf_counter()
        self.reset()
        reset_s = time.perf_counter() - t0
        train_ids = list(rows.train["image_id"])
        y_tr = rows.train["label_index"].to_numpy(np.int64)
        weights = (
            balanced_class_weights(y_tr, self.n_classes) if cfg.class_weight == "balanced" else None
        )
        w_tr = (
            np.asarray([weights[int(c)] for c in y_tr], np.float32)
            if weights
            else np.ones(len(y_tr), np.float32)
        )
        val_ids = list(rows.val["image_id"])
        val_true = rows.val["label_index"].to_numpy(np.int64)
        t1 = time.perf_counter()
        history = self._epochs(train_ids, y_tr, w_tr, val_ids, val_true, fold, n_folds, progress)
        self.recalibrate(train_ids)
        fit_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        test_ids = list(rows.test["image_id"])
        val_prob, test_prob = self.predict(val_ids), self.predict(test_ids)
        predict_s = time.perf_counter() - t2
        trained, model = self.snapshot()
        return FoldResult(
            fold=fold,
            weights=trained,
            model=model,
            history=history,
            val_ids=val_ids,
            val_true=val_true,
            val_prob=val_prob,
            test_ids=test_ids,
            test_true=rows.test["label_index"].to_numpy(np.int64),
            test_prob=test_prob,
            class_weights=weights,
            timing={
                "reset_s": reset_s,
                "fit_s": fit_s,
                "predict_s": predict_s,
                "epochs_run": float(len(history["loss"])),
            },
            info=provenance(self.bb, self.inputs),
        )

    def _epochs(
        self,
        train_ids: list[str],
        y_tr: np.ndarray,
        w_tr: np.ndarray,
        val_ids: list[str],
        val_true: np.ndarray,
        fold: int,
        n_folds: int,
        progress: ProgressHook | None,
    ) -> dict[str, list[float]]:
        """The epoch loop: one compiled call per epoch, validation, early stopping."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed + fold)
        rows, onehot = self.rows(train_ids), _one_hot(y_tr, self.n_classes)
        history: dict[str, list[float]] = {"loss": [], "accuracy": []}
        if val_ids:
            history.update(val_loss=[], val_accuracy=[])
        stopper = _EarlyStopping(cfg.patience) if cfg.early_stopping and val_ids else None
        for epoch in range(1, cfg.epochs + 1):
            order = rng.permutation(len(rows))
            loss, acc = self._run_epoch(rows[order], onehot[order], w_tr[order])
            history["loss"].append(float(loss))
            history["accuracy"].append(float(acc))
            if val_ids:
                prob = self.predict(val_ids)
                history["val_loss"].append(_cross_entropy(val_true, prob))
                history["val_accuracy"].append(float((prob.argmax(1) == val_true).mean()))
            if progress is not None:
                logs = {k: v[-1] for k, v in history.items()}
                progress(TrainEvent("epoch_end", fold, n_folds, epoch, cfg.epochs, logs))
            if stopper is not None and stopper.stop(history["val_loss"][-1], self.model):
                break
        if stopper is not None:
            stopper.restore(self.model)
        return history


class _EarlyStopping:
    """Stop after ``patience`` epochs without a lower val_loss; restore the best weights."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.wait = patience, np.inf, 0
        self.weights: list[np.ndarray] | None = None

    def stop(self, val_loss: float, model: Any) -> bool:
        if val_loss < self.best:
            self.best, self.wait, self.weights = val_loss, 0, model.get_weights()
            return False
        self.wait += 1
        return self.wait >= self.patience

    def restore(self, model: Any) -> None:
        if self.weights is not None:
            model.set_weights(self.weights)


def _optimizer(cfg: TrainConfig, precision: str) -> Any:
    keras = load_keras()

    opt = keras.optimizers.SGD(learning_rate=cfg.learning_rate, momentum=cfg.momentum)
    return keras.optimizers.LossScaleOptimizer(opt) if precision == "mixed_float16" else opt


def _one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]


def _cross_entropy(y: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean categorical cross-entropy (Keras' clipping), unweighted like Keras' val_loss."""
    p = np.clip(prob[np.arange(len(y)), y], eps, 1.0 - eps)
    return float(-np.log(p).mean()) if len(y) else float("nan")


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
    trainer: FoldTrainer | None = None,
) -> list[FoldResult]:
    """Run the fold tasks ``folds`` (default every CV fold; 0 = the final model) in turn.

    Args:
        inputs: cached features or images, covering every image in ``splits``.
        splits: output of :func:`mammoflow.data.split.make_splits`.
        bb: the backbone the inputs came from.
        model_cfg: head settings (head_units, dropout).
        train_cfg: epochs, batch size, optimiser, class weights, early stopping, seed.
        n_classes: number of classes.
        folds: folds to run (default all CV folds).
        pooling: head pooling, ``avg`` or ``flatten``.
        progress: receives :class:`TrainEvent` values.
        trainer: a :class:`FoldTrainer` to reuse (else one is built).

    Raises:
        TrainError: bad parameters, splits without CV rows, or an unknown fold.
    """
    check_train_params(train_cfg, n_classes)
    chosen = list(folds) if folds is not None else check_splits(splits)
    plans = [fold_rows(splits, f) for f in chosen]
    if trainer is None:
        trainer = FoldTrainer(
            inputs,
            bb,
            model_cfg=model_cfg,
            train_cfg=train_cfg,
            n_classes=n_classes,
            pooling=pooling,
        )
    results: list[FoldResult] = []
    for rows in plans:
        if progress is not None:
            progress(TrainEvent("fold_start", rows.fold, len(plans), epochs=train_cfg.epochs))
        result = trainer.fit(rows, progress=progress, n_folds=len(plans))
        result.timing["build_s"] = trainer.build_s if not results else 0.0
        results.append(result)
        if progress is not None:
            progress(TrainEvent("fold_end", rows.fold, len(plans), epochs=train_cfg.epochs))
    return results


def fold_task(
    inp: StudyInputs,
    bb: BackboneModel,
    data: FeatureSet | ImageSet,
    fold: int,
    *,
    trainer: FoldTrainer | None = None,
    progress: Any | None = None,
) -> FoldResult:
    """The unit of work: train fold ``fold`` (0 = every CV row) and predict its val and test rows.

    Pure: features and split rows in, a :class:`~mammoflow.training.fit.FoldResult` out.
    """
    (res,) = train_folds(
        data,
        inp.splits,
        bb,
        model_cfg=inp.cfg.model,
        train_cfg=inp.cfg.train,
        n_classes=inp.n_classes,
        folds=[fold],
        trainer=trainer,
        progress=progress,
    )
    return res
