"""The paper's transfer-learning model, split at a frozen prefix and a trainable tail + head.

Model (per backbone)::

    raw grey image (any size, values in [0, 255])
      → Resizing(input_size) → grey replicated to 3 channels → the backbone's own preprocess_input
      → frozen prefix (inputs → the cut tensor)                      ← cacheable features
      → tail (cut tensor → base output; the last N weighted layers trainable)
      → GlobalAveragePooling2D | Flatten → Dense(head_units, relu) → BatchNormalization
      → Dropout(p) → Dense(n_classes, softmax, float32)

Trainable layers (``model.trainable_layers`` = N):
    N counts layers that own *trainable* weights, excluding BatchNormalization (i.e. conv,
    depthwise-conv and dense layers), taken from the output backwards in the graph's topological
    order. Weightless layers (pooling, activation, add, concatenate) do not count. Keras' own
    ``base.layers[-N:]`` would count those, so VGG16's ``N=3`` there unfreezes only 2 convs; here it
    unfreezes block5_conv1..3. BatchNormalization layers are always frozen and always run in
    inference mode (the tail is called with ``training=False``), also inside the tail.

Where the graph is cut:
    ResNet50 and InceptionV3 have residual / branching graphs, so "the last N layers" is not a
    single tensor in general. The prefix/tail cut is placed at the *latest single-tensor point*
    (a block boundary: a tensor every input→output path passes through) at or before the first
    trainable layer. Layers between the cut and the first trainable layer belong to the tail but
    stay frozen: with N=3, ResNet50's tail is the whole ``conv5_block3`` (cut at
    ``conv5_block2_out``; its three convs trainable) and InceptionV3's tail is the whole
    ``mixed10`` block (cut at ``mixed9``; the last three convs in topological order trainable).

Keras is imported lazily, so this module is cheap to import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from mammoflow.models.backbones import BackboneSpec, get_spec, input_size_for
from mammoflow.models.weights import WeightsInfo, resolve_weights
from mammoflow.quiet import load_keras

Pooling = Literal["avg", "flatten"]
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
RANDOM_INIT_SEED = 0  # initialisation of a backbone built with model.weights: none


class ModelBuildError(ValueError):
    """A model setting cannot be honoured; the message names the value and the fix."""


@dataclass(frozen=True)
class CutPlan:
    """Where a base model is split.

    Attributes:
        cut_layer: the layer whose (single) output is the prefix output / tail input.
        cut_index: its index in ``base.layers``.
        trainable: names of the tail layers left trainable (the last N weighted layers).
        tail_layers: names of all layers after the cut (frozen or not).
    """

    cut_layer: str
    cut_index: int
    trainable: tuple[str, ...]
    tail_layers: tuple[str, ...]


@dataclass
class BackboneModel:
    """A built backbone split into a frozen prefix and a tail.

    Attributes:
        name: registry name.
        spec: registry entry.
        base: the ``keras.applications`` model (include_top=False), all layers frozen.
        input_size: square input size in pixels.
        trainable_layers: N.
        plan: the cut.
        precision: Keras dtype policy the model was built under.
        weights: which weights were loaded.
        prefix: frozen model ``image (preprocessed RGB) → cut tensor``.
        tail: model ``cut tensor → base output`` sharing layers with ``base`` (never trained
            directly; :func:`trainable_tail_and_head` clones it), or None when N = 0.
        compiled: traced functions reused across calls (e.g. the feature extractor).
    """

    name: str
    spec: BackboneSpec
    base: Any
    input_size: int
    trainable_layers: int
    plan: CutPlan
    precision: str
    weights: WeightsInfo
    prefix: Any
    tail: Any | None
    compiled: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one prefix output (the cached feature), without the batch axis."""
        return tuple(int(d) for d in self.prefix.output.shape[1:])


def check_precision(precision: str) -> str:
    """Validate a resolved precision (a Keras dtype policy name).

    Raises:
        ModelBuildError: for anything but float32 / mixed_bfloat16 / mixed_float16.
    """
    if precision not in PRECISIONS:
        raise ModelBuildError(
            f"precision {precision!r} is not a dtype policy; use one of {PRECISIONS!r} "
            "(resolve 'auto' with mammoflow.models.features.resolve_precision first)"
        )
    return precision


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under Keras dtype policy ``precision``, restoring the old one afterwards."""
    keras = load_keras()

    check_precision(precision)
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


@cache
def _grey_affine(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(scale, offset)`` of backbone ``name``'s ``preprocess_input`` on grey input.

    Every registered ``preprocess_input`` (caffe: BGR flip and mean subtraction; tf: scale to
    [-1, 1]; torch: ImageNet mean/std; none) is a per-channel affine map, and on a grey image
    replicated to 3 channels the BGR flip is a no-op. Probing the function itself at 0, 1 and 255
    recovers the map exactly, so the model uses Keras' numbers, not a copy of them.

    Raises:
        ModelBuildError: the function is not per-channel affine (a new backbone needing a
            different preprocessing layer).
    """
    import numpy as np

    from mammoflow.models.backbones import preprocess_function

    probe = np.stack([np.full((1, 1, 3), v, np.float32) for v in (0.0, 1.0, 255.0)])
    out = np.asarray(preprocess_function(name)(probe.copy()), dtype=np.float64)[:, 0, 0, :]
    offset, scale = out[0], out[1] - out[0]
    if np.any(scale == 0) or not np.allclose(out[2], scale * 255.0 + offset, rtol=1e-5, atol=1e-3):
        raise ModelBuildError(
            f"preprocess_input of {name!r} is not a per-channel affine map on grey images; "
            "its preprocessing needs its own layer"
        )
    return tuple(float(v) for v in scale), tuple(float(v) for v in offset)


def grey_preprocess(name: str, x: Any) -> Any:
    """Grey ``(…, 1)`` in [0, 255] → 3 channels → backbone ``name``'s preprocess_input.

    Built from stock Keras layers only (Concatenate, Normalization), so a saved model loads
    without MammoFlow's code (``mlflow models serve`` anywhere).
    """
    keras = load_keras()

    scale, offset = _grey_affine(name)
    rgb = keras.layers.Concatenate(axis=-1, name="grey_to_rgb", dtype="float32")([x, x, x])
    if all(v == 1.0 for v in scale) and all(v == 0.0 for v in offset):
        return rgb
    # Normalization computes (x - mean) / sqrt(variance) = scale * x + offset
    mean = [-o / s for s, o in zip(scale, offset, strict=True)]
    variance = [1.0 / (s * s) for s in scale]
    return keras.layers.Normalization(
        mean=mean, variance=variance, name="preprocess", dtype="float32"
    )(rgb)


def _is_batchnorm(layer: Any) -> bool:
    keras = load_keras()

    return isinstance(layer, keras.layers.BatchNormalization)


def weighted_layers(base: Any) -> list[str]:
    """Names of the layers N counts, in topological order.

    Layers with weights, except BatchNormalization and Normalization (whose weights are
    statistics, never trained). Independent of the layers' current ``trainable`` flags.
    """
    keras = load_keras()

    stats = (keras.layers.BatchNormalization, keras.layers.Normalization)
    return [layer.name for layer in base.layers if layer.weights and not isinstance(layer, stats)]


def single_tensor_cuts(base: Any) -> list[int]:
    """Indices ``i`` of ``base.layers`` after which exactly one tensor (layer i's output) is live.

    ``base.layers`` of a functional model is a topological order sorted by depth, so every tensor
    that dominates the output (a block boundary) shows up here.
    """
    layers = base.layers
    last_use: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                last_use[id(t)] = max(last_use.get(id(t), -1), i)
    live: set[int] = set()
    cuts: list[int] = []
    for i, layer in enumerate(layers):
        for t in list(live):
            if last_use.get(t, -1) <= i:
                live.discard(t)
        outs = [id(t) for node in layer._inbound_nodes for t in node.output_tensors]
        live.update(t for t in outs if last_use.get(t, len(layers)) > i)
        if i == len(layers) - 1 or (len(live) == 1 and live == set(outs)):
            cuts.append(i)
    return cuts


def plan_cut(base: Any, trainable_layers: int) -> CutPlan:
    """Choose the trainable layers and the single-tensor cut for ``base``.

    Raises:
        ModelBuildError: if ``trainable_layers`` is negative or exceeds the weighted layers.
    """
    weighted = weighted_layers(base)
    if not 0 <= trainable_layers <= len(weighted):
        raise ModelBuildError(
            f"model.trainable_layers={trainable_layers} is out of range for {base.name!r}, which "
            f"has {len(weighted)} layers with weights; use 0..{len(weighted)}"
        )
    trainable = tuple(weighted[len(weighted) - trainable_layers :])
    names = [layer.name for layer in base.layers]
    first = names.index(trainable[0]) if trainable else len(names)
    cut = max(i for i in single_tensor_cuts(base) if i < first)
    return CutPlan(
        cut_layer=names[cut],
        cut_index=cut,
        trainable=trainable,
        tail_layers=tuple(names[cut + 1 :]),
    )


def build_base(
    backbone: str, input_size: int, weights: WeightsInfo, precision: str = "float32"
) -> Any:
    """Build ``keras.applications.<backbone>(include_top=False)`` for RGB ``input_size`` px.

    Raises:
        ModelBuildError: if the weights file does not fit the architecture.
    """

    from mammoflow.models.backbones import constructor

    ctor = constructor(backbone)
    with dtype_policy(precision):
        try:
            base = ctor(
                include_top=False,
                weights=weights.keras_arg,
                input_shape=(input_size, input_size, 3),
            )
        except ValueError as exc:
            raise ModelBuildError(
                f"cannot load weights {weights.path!r} into {backbone!r}: {exc}; the file must "
                "hold no-top weights of the same architecture (or use model.weights: none)"
            ) from exc
    if weights.source == "none":
        # Random weights must be the same in every process: the feature cache is keyed on
        # "none", and a cached prefix must meet the tail of the same initialisation.
        seeded_init(base, RANDOM_INIT_SEED)
    return base


def seeded_init(model: Any, seed: int) -> None:
    """Re-initialise every weight of ``model`` from a private NumPy generator seeded with ``seed``.

    Keras initialisers without a seed draw from Python's global ``random`` module, which other
    threads of the process (a Dask worker's, a server's) may advance at any time; this does not.
    Kernels: Glorot uniform (Keras' default); biases, BN beta and moving means: 0; BN gamma and
    moving variances: 1.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.path.rsplit("/", 1)[-1]
        shape = tuple(int(d) for d in var.shape)
        if "kernel" in name and len(shape) >= 2:
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            if "depthwise" in name:
                fan_out = shape[-2] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-limit, limit, shape)
        elif name in ("gamma", "moving_variance"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        var.assign(value.astype(np.float32))


def load_backbone(
    name: str,
    *,
    weights: WeightsInfo | str = "none",
    trainable_layers: int = 3,
    input_size: int | None = None,
    precision: str = "float32",
    keras_home: Path | str | None = None,
) -> BackboneModel:
    """Build backbone ``name`` and split it into frozen prefix and tail.

    Args:
        name: registry name.
        weights: a resolved :class:`WeightsInfo` or a ``model.weights`` string.
        trainable_layers: N (see module docstring).
        input_size: square size; default the backbone's native size.
        precision: Keras dtype policy (float32, mixed_bfloat16, mixed_float16).
        keras_home: Keras home for the ImageNet cache.
    """
    keras = load_keras()

    spec = get_spec(name)
    size = input_size_for(name, input_size)
    check_precision(precision)
    info = (
        weights
        if isinstance(weights, WeightsInfo)
        else resolve_weights(name, weights, keras_home=keras_home)
    )
    base = build_base(name, size, info, precision)
    plan = plan_cut(base, trainable_layers)
    cut_tensor = base.layers[plan.cut_index].output
    prefix = keras.Model(base.input, cut_tensor, name=f"{name}_prefix")
    tail = (
        keras.Model(cut_tensor, base.output, name=f"{name}_tail_shared")
        if plan.tail_layers
        else None
    )
    base.trainable = False
    return BackboneModel(
        name=name,
        spec=spec,
        base=base,
        input_size=size,
        trainable_layers=trainable_layers,
        plan=plan,
        precision=precision,
        weights=info,
        prefix=prefix,
        tail=tail,
    )


def _fresh_tail(bb: BackboneModel) -> Any:
    """An independent copy of the tail (own layers, same initial weights, trainable flags set)."""
    keras = load_keras()

    if bb.tail is None:
        return None
    with dtype_policy(bb.precision):
        tail = keras.Model.from_config(bb.tail.get_config())
    tail.set_weights(bb.tail.get_weights())
    tail.trainable = True
    keep = set(bb.plan.trainable)
    for layer in tail.layers:
        layer.trainable = layer.name in keep and not _is_batchnorm(layer)
    return tail


def trainable_tail_and_head(
    bb: BackboneModel,
    n_classes: int,
    *,
    head_units: int = 512,
    dropout: float = 0.5,
    pooling: Pooling = "avg",
    name: str | None = None,
    seed: int = 0,
) -> Any:
    """The trainable model ``cut tensor (cached feature) → class probabilities``.

    A fresh copy of the tail (initial weights from the backbone) is made on every call, so each
    fold starts from the same weights. The tail runs with ``training=False`` (BatchNorm in
    inference mode); only the last N weighted layers and the head are trainable.

    Raises:
        ModelBuildError: for fewer than 2 classes or an unknown pooling.
    """
    keras = load_keras()

    if n_classes < 2:
        raise ModelBuildError(f"n_classes={n_classes}; a classifier needs at least 2 classes")
    if pooling not in ("avg", "flatten"):
        raise ModelBuildError(f"pooling={pooling!r}; use 'avg' or 'flatten'")
    tail = _fresh_tail(bb)
    with dtype_policy(bb.precision):
        features = keras.Input(shape=bb.feature_shape, name="features")
        x = tail(features, training=False) if tail is not None else features
        x = (
            keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
            if pooling == "avg"
            else keras.layers.Flatten(name="head_flatten")(x)
        )
        # explicit seeds: the head is the same in every process and thread (see seeded_init)
        glorot = keras.initializers.GlorotUniform
        x = keras.layers.Dense(
            head_units, activation="relu", kernel_initializer=glorot(seed), name="head_dense"
        )(x)
        x = keras.layers.BatchNormalization(name="head_bn")(x)
        x = keras.layers.Dropout(dropout, seed=seed + 1, name="head_dropout")(x)
        out = keras.layers.Dense(
            n_classes,
            activation="softmax",
            kernel_initializer=glorot(seed + 2),
            dtype="float32",
            name="predictions",
        )(x)
    return keras.Model(features, out, name=name or f"{bb.name}_tail_head")


def extraction_model(bb: BackboneModel) -> Any:
    """``grey (input_size, [0, 255]) → 3 channels → preprocess_input → frozen prefix``: the features.

    The model the feature cache runs, and the frozen part of :func:`full_model` for images
    already at ``bb.input_size``; always in inference mode.
    """
    keras = load_keras()

    inp = keras.Input(shape=(bb.input_size, bb.input_size, 1), name="image")
    x = bb.prefix(grey_preprocess(bb.name, inp), training=False)
    return keras.Model(inp, x, name=f"{bb.name}_extract")


def full_model(bb: BackboneModel, tail_and_head: Any, *, augment: bool = False) -> Any:
    """End-to-end model for export / serving, or for training without a feature cache.

    ``raw grey (any size, [0, 255]) → [augmentation] → resize → 3 channels → preprocess_input →
    frozen prefix → tail + head``. With ``augment`` a random horizontal flip and a small rotation
    run (training only) after resizing.
    """
    keras = load_keras()

    inp = keras.Input(shape=(None, None, 1), name="image")
    x = keras.layers.Resizing(bb.input_size, bb.input_size, dtype="float32", name="resize")(inp)
    if augment:
        x = keras.layers.RandomFlip("horizontal", dtype="float32", name="aug_flip")(x)
        x = keras.layers.RandomRotation(
            0.05, fill_mode="constant", dtype="float32", name="aug_rot"
        )(x)
    x = grey_preprocess(bb.name, x)
    x = bb.prefix(x, training=False)
    out = tail_and_head(x)
    return keras.Model(inp, out, name=f"{bb.name}_full")


def ensemble_model(
    bb: BackboneModel, tail_heads: list[Any], temperature: float | None = None
) -> Any:
    """The K fold models as one serving model: a shared frozen prefix, K tails, averaged.

    ``raw grey (any size, [0, 255]) → resize → preprocess → frozen prefix → [tail + head]×K →
    mean probability``. Stock Keras layers only (Average), so it loads without MammoFlow.

    With ``temperature`` T, each member's softmax is replaced by ``softmax(z_k / T)`` on its
    logits ``z_k`` — equal to calibration.py's ``softmax(log p_k / T)`` (softmax ignores the
    per-row shift between ``z_k`` and ``log p_k``) — before the mean: T is fitted on single fold
    models' out-of-fold predictions, so it is applied to single fold models. Still stock layers
    (Rescaling by 1/T named ``temperature``, Activation softmax), so the served model returns
    calibrated probabilities anywhere; :func:`with_temperature` rebuilds it with another T.
    """
    keras = load_keras()

    if not tail_heads:
        raise ModelBuildError("an ensemble needs at least one fold model")
    if temperature is not None and not (temperature > 0 and temperature < float("inf")):
        raise ModelBuildError(f"temperature={temperature!r}; use a positive finite number")
    inp = keras.Input(shape=(None, None, 1), name="image")
    x = keras.layers.Resizing(bb.input_size, bb.input_size, dtype="float32", name="resize")(inp)
    x = bb.prefix(grey_preprocess(bb.name, x), training=False)
    if temperature is None:
        outs = [th(x) for th in tail_heads]
    else:
        scale = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name=TEMPERATURE_LAYER)
        softmax = keras.layers.Activation("softmax", dtype="float32", name="calibrated_softmax")
        outs = [softmax(scale(logits_model(th)(x))) for th in tail_heads]
    out = (
        outs[0] if len(outs) == 1 else keras.layers.Average(name="fold_mean", dtype="float32")(outs)
    )
    return keras.Model(inp, out, name=f"{bb.name}_ensemble")


#: the Rescaling layer (scale 1/T) of a calibrated serving model
TEMPERATURE_LAYER = "temperature"


def logits_model(tail_head: Any) -> Any:
    """A copy of a tail + head that outputs the logits (its ``predictions`` layer, linear)."""
    keras = load_keras()

    cfg = tail_head.get_config()
    found = [c for c in cfg["layers"] if c["config"].get("name") == "predictions"]
    if len(found) != 1:
        raise ModelBuildError(
            f"model {tail_head.name!r} has no single 'predictions' layer to take logits from"
        )
    found[0]["config"]["activation"] = "linear"
    cfg["name"] = f"{tail_head.name}_logits"
    model = keras.Model.from_config(cfg)
    model.set_weights(tail_head.get_weights())
    return model


def model_temperature(model: Any) -> float | None:
    """The temperature a serving model applies (its ``temperature`` layer), None if none."""
    try:
        layer = model.get_layer(TEMPERATURE_LAYER)
    except ValueError:
        return None
    return 1.0 / float(layer.get_config()["scale"])


def with_temperature(model: Any, temperature: float) -> Any:
    """``model`` rebuilt with temperature ``temperature`` (1.0: the raw, uncalibrated model).

    Raises:
        ModelBuildError: the model has no temperature layer (it serves raw probabilities).
    """
    keras = load_keras()

    if model_temperature(model) is None:
        raise ModelBuildError(
            f"model {model.name!r} has no {TEMPERATURE_LAYER!r} layer: it serves raw "
            "probabilities already (trained before calibrated serving)"
        )
    cfg = model.get_config()
    for layer in cfg["layers"]:
        if layer["config"].get("name") == TEMPERATURE_LAYER:
            layer["config"]["scale"] = 1.0 / temperature
    rebuilt = keras.Model.from_config(cfg)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def ensemble_head(bb: BackboneModel, tail_heads: list[Any]) -> Any:
    """``prefix features → mean probability of the tails + heads`` (one head: itself)."""
    keras = load_keras()

    if len(tail_heads) == 1:
        return tail_heads[0]
    features = keras.Input(shape=bb.feature_shape, name="features")
    outs = [th(features) for th in tail_heads]
    out = keras.layers.Average(name="fold_mean", dtype="float32")(outs)
    return keras.Model(features, out, name=f"{bb.name}_ensemble_head")


def trainable_layer_names(model: Any) -> list[str]:
    """Names of layers (recursing into sub-models) that own trainable weights."""
    out: list[str] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(trainable_layer_names(layer) if layer.trainable else [])
        elif layer.trainable_weights:
            out.append(layer.name)
    return out
