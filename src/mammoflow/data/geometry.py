"""Pure geometry on 2-D float images in [0, 1]: breast crop, aspect-kept resize, square pad.

Every function takes and returns numpy arrays and touches no files, so the conversion stage
(:mod:`mammoflow.data.convert`) and the tests can compose them freely.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

FloatImage = NDArray[np.float32]

#: Half-open bounding box ``(top, left, bottom, right)`` in pixel rows/columns.
BBox = tuple[int, int, int, int]


class GeometryError(ValueError):
    """An image or a geometry argument is unusable; the message names the value."""


def _check_image(img: NDArray[np.floating] | NDArray[np.integer], what: str = "image") -> None:
    if img.ndim != 2:
        raise GeometryError(f"{what} must be 2-D (rows, cols), got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise GeometryError(f"{what} is empty (shape {img.shape})")


def otsu_threshold(img: FloatImage, bins: int = 256) -> float:
    """Otsu's threshold of ``img`` (values in [0, 1]) maximising between-class variance.

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


def breast_bbox(
    img: FloatImage,
    threshold: float | None = None,
    margin: float = 0.02,
    max_side: int = 256,
    otsu_fraction: float = 1.0 / 3.0,
) -> BBox:
    """Bounding box of the largest bright region (the breast) of a mammogram.

    The image is block-averaged to at most ``max_side`` pixels a side, thresholded (at
    ``otsu_fraction`` of Otsu's threshold unless ``threshold`` is given: Otsu alone cuts into
    the fatty periphery of the breast), lightly opened to detach labels and noise, and the
    largest connected component's box is scaled back and widened by ``margin`` (a fraction
    of each side).

    Returns:
        ``(top, left, bottom, right)``, half-open; the whole image when nothing is above the
        threshold.
    """
    _check_image(img)
    height, width = img.shape
    small, factor = _block_reduce(np.asarray(img, dtype=np.float32), max_side)
    t = otsu_fraction * otsu_threshold(small) if threshold is None else float(threshold)
    mask = small > t
    if mask.any():
        opened = ndimage.binary_opening(mask, structure=np.ones((3, 3), dtype=bool))
        if opened.any():
            mask = opened
    labels, count = ndimage.label(mask)
    if count == 0:
        return (0, 0, height, width)
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    top, bottom = int(rows.min()) * factor, (int(rows.max()) + 1) * factor
    left, right = int(cols.min()) * factor, (int(cols.max()) + 1) * factor
    pad_r, pad_c = round(margin * height), round(margin * width)
    return (
        max(0, top - pad_r),
        max(0, left - pad_c),
        min(height, bottom + pad_r),
        min(width, right + pad_c),
    )


def crop(img: FloatImage, bbox: BBox) -> FloatImage:
    """Return the half-open ``bbox`` region of ``img`` (a view)."""
    _check_image(img)
    top, left, bottom, right = bbox
    if not (0 <= top < bottom <= img.shape[0] and 0 <= left < right <= img.shape[1]):
        raise GeometryError(f"bounding box {bbox} does not fit an image of shape {img.shape}")
    return img[top:bottom, left:right]


def fit_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` whose longer side is ``size``, keeping the aspect ratio."""
    if size < 1:
        raise GeometryError(f"target size must be >= 1, got {size}")
    if height < 1 or width < 1:
        raise GeometryError(f"image size must be positive, got {height}x{width}")
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
        raise GeometryError(f"image {h}x{w} is larger than the {size}x{size} canvas; resize first")
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
        raise GeometryError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    top = 255.0 if bit_depth == 8 else 65535.0
    scaled = np.rint(np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0) * top)
    return scaled.astype(np.uint8 if bit_depth == 8 else np.uint16)
