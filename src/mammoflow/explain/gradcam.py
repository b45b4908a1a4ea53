"""Grad-CAM on a flat float32 rebuild of the serving graph, and the pointing game.

The logged serving model nests the backbone's frozen prefix and the tail + head as sub-models
(an ensemble nests K of them), so ``get_layer(name).output`` of an inner layer is not reachable
from the outer model. :func:`flat_model` re-runs the graph leaf layer by leaf layer into one flat
functional model whose layers are float32 copies of the originals (same weights): gradients are
taken in float32 whatever the training precision, and an ensemble's K copies of the target layer
get unique names. The Grad-CAM of an ensemble sums the K members' weighted activations (the
gradient of the averaged output reaches each member's copy).

Maps are computed on the converted square canvas, mapped back to the original geometry (padding
removed, aspect restored, a breast crop put back in place) for overlays and for the pointing game:
an abnormal image is a hit when the map's maximum lies inside an annotated lesion circle.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mammoflow.data.prepare import Geometry, Prepared
from mammoflow.quiet import load_keras, load_tensorflow


class ExplainError(ValueError):
    """Grad-CAM cannot be computed as asked (e.g. an unknown target layer)."""


@dataclass(frozen=True)
class FlatModel:
    """A flat float32 copy of a (nested) Keras model.

    Attributes:
        model: inputs → outputs, every layer a leaf (no sub-models).
        copies: original leaf layer name → the names of its copies in ``model`` (several for an
            ensemble's K members).
        convs: original names of the 2-D convolutions, in graph order.
    """

    model: Any
    copies: Mapping[str, tuple[str, ...]]
    convs: tuple[str, ...]


def _is_functional(layer: Any) -> bool:
    return hasattr(layer, "_run_through_graph") and hasattr(layer, "layers")


def flat_model(model: Any) -> FlatModel:
    """Rebuild ``model`` (nested functional models allowed) as one flat float32 model."""
    keras = load_keras()

    copies: dict[str, list[str]] = {}
    convs: list[str] = []
    taken: set[str] = set()

    def clone(layer: Any) -> Any:
        cfg = layer.get_config()
        cfg["dtype"] = "float32"
        name = layer.name
        while name in taken:
            name = f"{layer.name}_m{len(copies.get(layer.name, []))}"
            if name in taken:
                name = f"{name}_{len(taken)}"
        taken.add(name)
        cfg["name"] = name
        new = type(layer).from_config(cfg)
        new.trainable = False  # explanation only: BatchNorm always in inference mode
        copies.setdefault(layer.name, []).append(name)
        if isinstance(layer, keras.layers.Conv2D) and layer.name not in convs:
            convs.append(layer.name)

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("training", None)
            out = new(*args, **kwargs)
            if layer.weights:
                new.set_weights(layer.get_weights())
            return out

        return call

    def operation(op: Any) -> Any:
        if _is_functional(op):
            return lambda *args, **kwargs: op._run_through_graph(args, operation_fn=operation)
        return clone(op)

    inputs = [keras.Input(shape=t.shape[1:], dtype="float32", name=t.name) for t in model.inputs]
    outputs = model._run_through_graph(inputs, operation_fn=operation)
    flat = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs, outputs, name=f"{model.name}_flat"
    )
    return FlatModel(flat, {k: tuple(v) for k, v in copies.items()}, tuple(convs))


def target_names(flat: FlatModel, target_layer: str | None) -> tuple[str, ...]:
    """The flat layer names of the target (default: the last 2-D convolution, all copies).

    Raises:
        ExplainError: the layer is unknown or has no spatial output.
    """
    if target_layer is None:
        if not flat.convs:
            raise ExplainError("the model has no 2-D convolution; pass a target layer by name")
        target_layer = flat.convs[-1]
    names = flat.copies.get(target_layer)
    if not names:
        known = ", ".join(flat.convs[-5:])
        raise ExplainError(
            f"target layer {target_layer!r} is not in the model; last convolutions: {known}"
        )
    shape = flat.model.get_layer(names[0]).output.shape
    if len(shape) != 4:
        raise ExplainError(f"target layer {target_layer!r} has output shape {shape}; need 4-D")
    return names


_CACHE: dict[tuple[int, str | None], tuple[Any, tuple[str, ...]]] = {}


def gradcam_model(model: Any, target_layer: str | None) -> Any:
    """``images → (target activations…, probabilities)`` on the flat rebuild (cached per model)."""
    keras = load_keras()

    key = (id(model), target_layer)
    if key not in _CACHE:
        flat = flat_model(model)
        names = target_names(flat, target_layer)
        outs = [flat.model.get_layer(n).output for n in names]
        grad = keras.Model(flat.model.input, [*outs, flat.model.outputs[0]])
        _CACHE.clear()  # one model at a time; the id of a freed model may be reused
        _CACHE[key] = (grad, names)
    return _CACHE[key][0]


def gradcam_batch(
    model: Any,
    images: NDArray[np.float32],
    classes: Sequence[int] | NDArray[np.integer],
    target_layer: str | None = None,
) -> NDArray[np.float32]:
    """Grad-CAM maps ``(n, h', w')`` in [0, 1] at the target layer's resolution, one call.

    Args:
        model: the serving model (``(n, h, w, 1)`` grey in [0, 255] → probabilities).
        images: ``(n, h, w)`` grey in [0, 255].
        classes: the class whose score is explained, per image.
        target_layer: an original layer name; default the last 2-D convolution.

    Returns:
        ReLU(sum of gradient-weighted activations) / its maximum; all zeros (never NaN) where
        the gradients vanish or the map is nowhere positive.
    """
    tf = load_tensorflow()

    grad = gradcam_model(model, target_layer)
    x = tf.convert_to_tensor(np.asarray(images, np.float32)[..., None])
    onehot = tf.one_hot(np.asarray(classes, np.int32), int(grad.outputs[-1].shape[-1]))
    with tf.GradientTape() as tape:
        *acts, probs = grad(x, training=False)
        score = tf.reduce_sum(tf.cast(probs, tf.float32) * onehot, axis=-1)
    grads = tape.gradient(score, acts)
    cam = tf.zeros(tf.shape(acts[0])[:3], tf.float32)
    for a, g in zip(acts, grads, strict=True):
        if g is None:
            continue
        weights = tf.reduce_mean(tf.cast(g, tf.float32), axis=(1, 2), keepdims=True)
        cam += tf.reduce_sum(weights * tf.cast(a, tf.float32), axis=-1)
    return normalise(np.asarray(tf.nn.relu(cam), np.float32))


def normalise(cams: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each map divided by its maximum; a map with no finite positive value becomes zeros."""
    cams = np.nan_to_num(np.asarray(cams, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = cams.reshape(len(cams), -1).max(axis=1) if cams.size else np.zeros(0, np.float32)
    out = np.zeros_like(cams)
    for i, p in enumerate(peak):
        if p > 0:
            out[i] = cams[i] / p
    return out


# --------------------------------------------------------------------------- geometry


def _resize(arr: NDArray[np.float32], height: int, width: int) -> NDArray[np.float32]:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(arr, np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def to_original(cam: NDArray[np.float32], geo: Geometry) -> NDArray[np.float32]:
    """A canvas map (any resolution) in the original image's geometry (padding removed)."""
    canvas = _resize(cam, geo.size, geo.size)
    inner = canvas[geo.top : geo.top + geo.fit_h, geo.left : geo.left + geo.fit_w]
    top, left, bottom, right = geo.bbox
    out = np.zeros((geo.height, geo.width), np.float32)
    out[top:bottom, left:right] = _resize(inner, bottom - top, right - left)
    return np.clip(out, 0.0, 1.0)


def overlay(image: NDArray[np.floating], cam: NDArray[np.float32]) -> NDArray[np.uint8]:
    """RGB uint8: the grey image with the map in the jet colours over it (alpha follows the map)."""
    from matplotlib import colormaps

    grey = np.clip(np.asarray(image, np.float32), 0.0, 1.0)[..., None].repeat(3, axis=-1)
    heat = colormaps["jet"](cam)[..., :3].astype(np.float32)
    alpha = 0.6 * cam[..., None]
    return np.rint((1.0 - alpha) * grey * 255.0 + alpha * heat * 255.0).astype(np.uint8)


def write_explanation(item: Prepared, cam: NDArray[np.float32], out_dir: Path) -> Path:
    """Write ``<image_id>.png`` (overlay, original geometry) and ``<image_id>.npy`` (raw map).

    The ``.npy`` holds the map at the target layer's resolution over the model's square input.
    """
    from PIL import Image

    from mammoflow.files import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.asarray(cam, np.float32))
    atomic_write_bytes(out_dir / f"{item.image_id}.npy", buf.getvalue())
    png = io.BytesIO()
    Image.fromarray(overlay(item.original, to_original(cam, item.geometry))).save(png, "PNG")
    path = out_dir / f"{item.image_id}.png"
    atomic_write_bytes(path, png.getvalue())
    return path


# --------------------------------------------------------------------------- pointing game


def peak(cam: NDArray[np.float32]) -> tuple[int, int] | None:
    """``(row, col)`` of the map's maximum; None for a map that is flat (all zeros, or a 1 × 1
    target layer such as InceptionV3's last convolution at small input sizes): it points nowhere.
    """
    if not np.any(cam > 0) or float(cam.max()) == float(cam.min()):
        return None
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(row), int(col)


def hit(point: tuple[int, int] | None, lesions: Sequence[Mapping[str, Any]], height: int) -> bool:
    """Whether ``point`` (row, col) lies inside a lesion circle (MIAS x, y from bottom-left)."""
    if point is None:
        return False
    row, col = point
    for lesion in lesions:
        x, y, r = lesion.get("x"), lesion.get("y"), lesion.get("radius")
        if x is None or y is None or r is None:
            continue
        if math.hypot(col - float(x), row - (height - 1 - float(y))) <= float(r):
            return True
    return False


def bootstrap_rate(
    hits: Sequence[bool], groups: Sequence[str], n: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Hit rate with a percentile bootstrap CI that resamples patients (groups).

    Raises:
        ValueError: no images, or ``groups`` of another length.
    """
    h = np.asarray(hits, float)
    g = np.asarray(groups).astype(str)
    if h.size == 0 or g.shape[0] != h.shape[0]:
        raise ValueError(
            f"pointing game needs hits and groups of one length, got {h.size}, {g.size}"
        )
    _, inverse = np.unique(g, return_inverse=True)
    k = int(inverse.max()) + 1
    sums, counts = np.bincount(inverse, h, k), np.bincount(inverse, None, k)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, k, size=(max(n, 1), k))
    rates = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1.0 - ci) / 2.0
    return {
        "hit_rate": float(h.mean()),
        "low": float(np.quantile(rates, alpha)),
        "high": float(np.quantile(rates, 1.0 - alpha)),
        "n": float(h.size),
    }
