"""Pure numpy image functions for mammograms: intensity, the breast mask, and geometry (no I/O).

Intensity: :func:`invert`, :func:`normalise_lut_output` and :func:`minmax_over_breast` return
``float32`` in [0, 1] (DICOM windowing is pydicom's ``apply_windowing``, in
:mod:`mammoflow.data.dicom`). The breast: :func:`breast_mask` (the one rule that finds it) and
:func:`breast_bbox`. Geometry on 2-D float images in [0, 1]:
:func:`crop`, :func:`resize_to_fit`, :func:`pad_to_square`, :func:`letterbox`,
:func:`quantize`. Every function takes and returns arrays, so :mod:`mammoflow.data.dicom`,
:mod:`mammoflow.data.convert` and the tests compose them freely.

The breast mask is Otsu's threshold on a block-averaged copy (at a third of it: Otsu alone
cuts into the fatty periphery), a light opening, the largest connected component and its
holes filled. It was chosen over a tolerance rule ("more than 2 % of the range above the
minimum") by ``tests/integration/test_breast_mask.py`` on the 322 real MIAS films: it covers
the annotated lesion centres and leaves the film background out on more films.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

FloatImage = NDArray[np.float32]
BoolImage = NDArray[np.bool_]

#: Which end of the intensity range the background (air) lies at: ``"high"`` for raw
#: MONOCHROME1 values, ``"low"`` otherwise.
Background = Literal["low", "high"]

#: Half-open bounding box ``(top, left, bottom, right)`` in pixel rows/columns.
BBox = tuple[int, int, int, int]

#: The breast mask's defaults: the side of the block-averaged copy and the fraction of
#: Otsu's threshold (above the background level) that separates breast from background.
MASK_MAX_SIDE = 256

#: The most pixels a raw image may declare (8192 × 8192 = 67,108,864). The largest
#: mammography detectors give about 4096 × 5200 (21 Mpx); decoding runs through a few float64
#: copies (8 bytes a pixel each), so this bounds one image's memory to a few GB. Readers check
#: the declared size against it before decoding anything: a 60000 × 60000 header is refused,
#: never allocated.
MAX_PIXELS = 8192 * 8192
OTSU_FRACTION = 1.0 / 3.0


class ImageError(ValueError):
    """An image or an image argument is unusable; the message names the value."""


def _check_image(img: NDArray[np.floating] | NDArray[np.integer], what: str = "image") -> None:
    if img.ndim != 2:
        raise ImageError(f"{what} must be 2-D (rows, cols), got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ImageError(f"{what} is empty (shape {img.shape})")


# ------------------------------------------------------------------------------ intensity


def invert(arr: np.ndarray) -> np.ndarray:
    """Map [0, 1] to [1, 0] (MONOCHROME1 → MONOCHROME2: dense tissue bright)."""
    return (1.0 - np.asarray(arr, dtype=np.float32)).astype(np.float32)


def normalise_lut_output(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Scale the output of a VOI LUT to [0, 1] using the range of the LUT's own entries."""
    table = np.asarray(lut, dtype=np.float64)
    low, high = float(table.min()), float(table.max())
    x = np.asarray(arr, dtype=np.float64)
    if high <= low:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def minmax_over_breast(arr: np.ndarray, background: Background = "low") -> np.ndarray:
    """Min–max scale to [0, 1] from the background level to the breast's extreme pixel.

    With ``background="low"`` the image's minimum (air) maps to 0 and the brightest pixel of
    :func:`breast_mask` to 1, so a label or marker outside the breast cannot compress the
    breast's range (it is clipped to 1); ``"high"`` (raw MONOCHROME1) mirrors this: the
    maximum maps to 1 and the breast's darkest pixel to 0. Without a breast, or for a
    constant image, it is plain min–max (zeros).
    """
    x = np.asarray(arr, dtype=np.float64)
    if x.size == 0:
        return x.astype(np.float32)
    mask = breast_mask(x, background)
    breast = x[mask] if mask.any() else x
    if background == "low":
        low, high = float(x.min()), float(breast.max())
    else:
        low, high = float(breast.min()), float(x.max())
    if high <= low:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------ the breast


def otsu_threshold(img: NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of ``img`` maximising between-class variance.

    Returns:
        The threshold; pixels strictly above it are foreground. A constant image returns its
        value (so no pixel is above it).
    """
    _check_image(img)
    lo, hi = float(np.min(img)), float(np.max(img))
    if hi <= lo:
        return hi
    hist, edges = np.histogram(img, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2.0
    weight_bg = np.cumsum(hist).astype(np.float64)
    weight_fg = weight_bg[-1] - weight_bg
    sum_bg = np.cumsum(hist * centers)
    mean_bg = np.divide(sum_bg, weight_bg, out=np.zeros_like(sum_bg), where=weight_bg > 0)
    mean_fg = np.divide(
        sum_bg[-1] - sum_bg, weight_fg, out=np.zeros_like(sum_bg), where=weight_fg > 0
    )
    between = weight_bg * weight_fg * (mean_bg - mean_fg) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _block_reduce(img: FloatImage, max_side: int) -> tuple[FloatImage, int]:
    factor = max(1, int(np.ceil(max(img.shape) / max_side)))
    if factor == 1:
        return img, 1
    rows, cols = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    if rows == 0 or cols == 0:
        return img, 1
    view = img[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return view.mean(axis=(1, 3), dtype=np.float32), factor


def _breast_component(
    img: NDArray[np.floating], background: Background, max_side: int, otsu_fraction: float
) -> tuple[BoolImage, int]:
    """The breast on the block-averaged copy, and the block size (see :func:`breast_mask`)."""
    if background not in ("low", "high"):
        raise ImageError(f"background must be 'low' or 'high', got {background!r}")
    if max_side < 1:
        raise ImageError(f"max_side must be >= 1, got {max_side!r}")
    _check_image(img)
    small, factor = _block_reduce(np.asarray(img, dtype=np.float32), max_side)
    otsu = otsu_threshold(small)
    if background == "low":
        low = float(small.min())
        mask = small > low + otsu_fraction * (otsu - low)
    else:
        high = float(small.max())
        mask = small < high - otsu_fraction * (high - otsu)
    if mask.any():
        opened = ndimage.binary_opening(mask, structure=np.ones((3, 3), dtype=bool))
        if opened.any():
            mask = opened
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(small.shape, dtype=bool), factor
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(labels == int(np.argmax(sizes)) + 1), factor


def breast_mask(
    img: NDArray[np.floating],
    background: Background = "low",
    max_side: int = MASK_MAX_SIDE,
    otsu_fraction: float = OTSU_FRACTION,
) -> BoolImage:
    """Boolean mask of the breast: one connected region, without labels or background.

    The image is block-averaged to at most ``max_side`` pixels a side and thresholded at
    ``otsu_fraction`` of the way from the background level (its minimum for ``"low"``, its
    maximum for ``"high"``, e.g. raw MONOCHROME1) to Otsu's threshold; a 3×3 opening detaches
    labels and noise, the largest connected component is kept, its holes are filled, and it
    is scaled back to the image's size (rows/columns beyond the last whole block are False).

    Raises:
        ImageError: not a 2-D image, or a bad ``background`` / ``max_side``.
    """
    comp, factor = _breast_component(img, background, max_side, otsu_fraction)
    filled = ndimage.binary_fill_holes(comp)
    up = np.repeat(np.repeat(filled, factor, axis=0), factor, axis=1)
    out = np.zeros(np.shape(img), dtype=bool)
    out[: up.shape[0], : up.shape[1]] = up
    return out


def breast_bbox(
    img: FloatImage,
    margin: float = 0.02,
    max_side: int = MASK_MAX_SIDE,
    otsu_fraction: float = OTSU_FRACTION,
) -> BBox:
    """Bounding box of :func:`breast_mask`, widened by ``margin`` (a fraction of each side).

    Returns:
        ``(top, left, bottom, right)``, half-open; the whole image when no breast is found.
    """
    comp, factor = _breast_component(img, "low", max_side, otsu_fraction)
    height, width = img.shape
    if not comp.any():
        return (0, 0, height, width)
    rows, cols = np.nonzero(comp)
    top, bottom = int(rows.min()) * factor, (int(rows.max()) + 1) * factor
    left, right = int(cols.min()) * factor, (int(cols.max()) + 1) * factor
    pad_r, pad_c = round(margin * height), round(margin * width)
    return (
        max(0, top - pad_r),
        max(0, left - pad_c),
        min(height, bottom + pad_r),
        min(width, right + pad_c),
    )


# ------------------------------------------------------------------------------ geometry


def crop(img: FloatImage, bbox: BBox) -> FloatImage:
    """Return the half-open ``bbox`` region of ``img`` (a view)."""
    _check_image(img)
    top, left, bottom, right = bbox
    if not (0 <= top < bottom <= img.shape[0] and 0 <= left < right <= img.shape[1]):
        raise ImageError(f"bounding box {bbox} does not fit an image of shape {img.shape}")
    return img[top:bottom, left:right]


def fit_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` whose longer side is ``size``, keeping the aspect ratio."""
    if size < 1:
        raise ImageError(f"target size must be >= 1, got {size}")
    if height < 1 or width < 1:
        raise ImageError(f"image size must be positive, got {height}x{width}")
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_to_fit(img: FloatImage, size: int) -> FloatImage:
    """Resize so the longer side is ``size`` (aspect kept), Lanczos-filtered on float data.

    Pillow's Lanczos widens its kernel when shrinking, so downscaling is anti-aliased.
    Values may overshoot [0, 1] slightly at edges; :func:`quantize` clips them.
    """
    _check_image(img)
    out_h, out_w = fit_size(img.shape[0], img.shape[1], size)
    src = np.ascontiguousarray(img, dtype=np.float32)
    if (out_h, out_w) == src.shape:
        return src.copy()
    resized = Image.fromarray(src).resize((out_w, out_h), resample=Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float32).copy()


def pad_to_square(img: FloatImage, size: int, value: float = 0.0) -> FloatImage:
    """Centre ``img`` on a ``size`` x ``size`` canvas filled with ``value`` (black)."""
    _check_image(img)
    h, w = img.shape
    if h > size or w > size:
        raise ImageError(f"image {h}x{w} is larger than the {size}x{size} canvas; resize first")
    out = np.full((size, size), value, dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def letterbox(img: FloatImage, size: int) -> FloatImage:
    """Resize keeping the aspect ratio, then pad with black to ``size`` x ``size``."""
    return pad_to_square(resize_to_fit(img, size), size)


def quantize(img: FloatImage, bit_depth: int) -> NDArray[np.uint8] | NDArray[np.uint16]:
    """Map [0, 1] floats to 8- or 16-bit unsigned integers (clipped, rounded half to even)."""
    if bit_depth not in (8, 16):
        raise ImageError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    top = 255.0 if bit_depth == 8 else 65535.0
    scaled = np.rint(np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0) * top)
    return scaled.astype(np.uint8 if bit_depth == 8 else np.uint16)


#: The model is fed grey in [0, 255] whatever the PNG's depth. TensorFlow decodes any PNG as
#: uint16 with 8-bit values scaled by 257, and a 16-bit value / 257 is in [0, 255] too, so
#: training (features.load_images) and serving (:func:`to_model_range`) divide by this.
UINT16_PER_MODEL_UNIT = 257.0


def to_model_range(pixels: NDArray[np.uint8] | NDArray[np.uint16]) -> NDArray[np.float32]:
    """Converted pixels (as the PNG holds them) as the model is fed: float32 grey in [0, 255].

    The serving side of the training/serving parity (tests/unit/test_features.py checks both
    give the same array for 8- and 16-bit conversions).
    """
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / np.float32(UINT16_PER_MODEL_UNIT)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    raise ImageError(f"converted pixels must be uint8 or uint16, got {pixels.dtype}")
