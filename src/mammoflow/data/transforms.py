"""Pure numpy transforms on mammogram pixel arrays (no I/O).

Intensity transforms take any real array and return ``float32`` in [0, 1]:
:func:`invert`, :func:`window` (DICOM VOI windowing), :func:`normalise_lut_output`,
:func:`breast_mask` and :func:`minmax_over_breast`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]

#: Fraction of the intensity range above the background level below which a pixel is background.
BACKGROUND_TOLERANCE = 0.02


def invert(arr: np.ndarray) -> np.ndarray:
    """Map [0, 1] to [1, 0] (MONOCHROME1 → MONOCHROME2: dense tissue bright)."""
    return (1.0 - np.asarray(arr, dtype=np.float32)).astype(np.float32)


def window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a DICOM window (PS3.3 C.11.2.1.2) and scale the output to [0, 1].

    Args:
        arr: modality-LUT output values (after Rescale Slope/Intercept).
        center: Window Center.
        width: Window Width (> 0; >= 1 for LINEAR).
        function: VOI LUT Function: LINEAR (default), LINEAR_EXACT or SIGMOID.

    Raises:
        ValueError: unknown function or a width out of range.
    """
    func = (function or "LINEAR").strip().upper()
    x = np.asarray(arr, dtype=np.float64)
    if func == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width} must be >= 1 for the LINEAR VOI function")
        c, w = center - 0.5, width - 1.0
        out = (x > c).astype(np.float64) if w == 0 else np.clip((x - c) / w + 0.5, 0.0, 1.0)
    elif func == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be > 0 for LINEAR_EXACT")
        out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    elif func == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be > 0 for SIGMOID")
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700, 700)))
    else:
        raise ValueError(
            f"unknown VOI LUT Function {function!r}; expected LINEAR, LINEAR_EXACT or SIGMOID"
        )
    return out.astype(np.float32)


def normalise_lut_output(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Scale the output of a VOI LUT to [0, 1] using the range of the LUT's own entries."""
    table = np.asarray(lut, dtype=np.float64)
    low, high = float(table.min()), float(table.max())
    x = np.asarray(arr, dtype=np.float64)
    if high <= low:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def breast_mask(
    arr: np.ndarray,
    background: Literal["low", "high"] = "low",
    tolerance: float = BACKGROUND_TOLERANCE,
) -> np.ndarray:
    """Boolean mask of the pixels that are not background.

    The background level is the array's minimum (``background="low"``) or maximum
    (``"high"``, e.g. raw MONOCHROME1); a pixel is breast when it lies more than
    ``tolerance × (max − min)`` away from that level.
    """
    x = np.asarray(arr, dtype=np.float64)
    low, high = float(x.min()), float(x.max())
    margin = tolerance * (high - low)
    if background == "low":
        return np.asarray(x > low + margin)
    if background == "high":
        return np.asarray(x < high - margin)
    raise ValueError(f"background must be 'low' or 'high', got {background!r}")


def minmax_over_breast(
    arr: np.ndarray,
    background: Literal["low", "high"] = "low",
    tolerance: float = BACKGROUND_TOLERANCE,
) -> np.ndarray:
    """Min–max scale to [0, 1] using only breast pixels (see :func:`breast_mask`).

    The breast's darkest pixel maps to 0 and its brightest to 1; background is clipped to
    0 (``"low"``) or 1 (``"high"``). A constant image maps to zeros.
    """
    x = np.asarray(arr, dtype=np.float64)
    if x.size == 0:
        return x.astype(np.float32)
    mask = breast_mask(x, background, tolerance)
    values = x[mask] if mask.any() else x
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)
