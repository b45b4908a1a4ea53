"""One entry point for raw images: ``load_raw`` → 2-D ``float32`` in [0, 1].

The conversion stage relies on exactly this function, so every raw format is scaled the same way
here: PGM divided by its maxval, DICOM through :mod:`mammoflow.data.dicom`'s display chain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammoflow.data.dicom import read_dicom
from mammoflow.data.pgm import PgmImage, read_pgm

PGM_SUFFIXES = (".pgm",)
DICOM_SUFFIXES = (".dcm", ".dicom")


class UnsupportedFormatError(ValueError):
    """A raw file's suffix names no format MammoFlow reads."""


def pgm_to_unit(image: PgmImage) -> np.ndarray:
    """A decoded PGM's pixels divided by its maxval, as ``float32`` in [0, 1]."""
    return (image.pixels.astype(np.float32) / np.float32(image.maxval)).astype(np.float32)


def load_raw(path: str | Path) -> np.ndarray:
    """Read a raw ``.pgm`` or ``.dcm`` file as a 2-D ``float32`` array in [0, 1].

    Raises:
        UnsupportedFormatError: the suffix is neither .pgm nor .dcm/.dicom.
        PgmError, DicomError: the file is malformed (both are ``ValueError``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PGM_SUFFIXES:
        return pgm_to_unit(read_pgm(path))
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path).pixels
    raise UnsupportedFormatError(
        f"{path}: unsupported raw image suffix {path.suffix!r}; expected one of "
        f"{', '.join(PGM_SUFFIXES + DICOM_SUFFIXES)} (rename the file or convert it)"
    )


def raw_stats(arr: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of an image, as Python floats."""
    values = np.asarray(arr, dtype=np.float64)
    if values.size == 0:
        raise ValueError("raw_stats got an empty array; the image has no pixels")
    return float(values.mean()), float(values.std())


def load_png(path: str | Path) -> np.ndarray:
    """Read a greyscale (or colour, converted to grey) PNG as 2-D ``float32`` in [0, 1].

    8-bit PNGs are divided by 255 and 16-bit ones by 65535, so a converted PNG reads back as
    the image it was written from.

    Raises:
        ValueError: the file is not a readable PNG.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise ValueError(f"{path}: not a PNG file (format {img.format!r})")
            if img.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(img, dtype=np.float32) / np.float32(65535.0)
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the PNG: {exc}") from None
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"{path}: PNG has shape {arr.shape}; expected a 2-D image")
    return np.clip(arr, 0.0, 1.0).astype(np.float32)
