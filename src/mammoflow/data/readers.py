"""One entry point for raw images: ``load_raw`` → 2-D ``float32`` in [0, 1].

The conversion stage relies on exactly this function, so every raw format is scaled the same way
here: PGM divided by its maxval, DICOM through :mod:`mammoflow.data.dicom`'s display chain.
:func:`load_bytes` reads a file's bytes (a served request) through the same readers, the
format told by its magic bytes.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mammoflow.data.images import MAX_PIXELS
from mammoflow.data.dicom import Acceptance, read_dicom, read_dicom_bytes
from mammoflow.data.pgm import PgmImage, parse_pgm, read_pgm

PGM_SUFFIXES = (".pgm",)
DICOM_SUFFIXES = (".dcm", ".dicom")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    path = Path(path)
    return _png_pixels(path, str(path))


def decode_png(data: bytes, name: str) -> np.ndarray:
    """:func:`load_png` of a file's bytes (a served request); messages start with ``name``."""
    return _png_pixels(io.BytesIO(data), name)


def _png_pixels(source: Path | BinaryIO, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, Path):
            with source.open("rb") as fh:
                head = fh.read(24)
        else:
            head = source.read(24)
            source.seek(0)
        _check_png_size(head, name)  # before Pillow opens it (its own limit is higher)
        with Image.open(source) as img:
            if img.format != "PNG":
                raise ValueError(f"{name}: not a PNG file (format {img.format!r})")
            if img.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(img, dtype=np.float32) / np.float32(65535.0)
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{name}: cannot read the PNG: {exc}") from None
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"{name}: PNG has shape {arr.shape}; expected a 2-D image")
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def _check_png_size(head: bytes, name: str) -> None:
    """Refuse a PNG whose IHDR (the first chunk, bytes 16-24) declares more than MAX_PIXELS."""
    if head.startswith(PNG_MAGIC) and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        if width * height > MAX_PIXELS:
            raise ValueError(
                f"{name}: PNG declares {width}x{height} = {width * height:,} pixels, above the "
                f"limit of {MAX_PIXELS:,} (images.MAX_PIXELS); not decoded: a corrupt header or "
                "a decompression bomb, not a mammogram"
            )


def sniff_format(data: bytes) -> str | None:
    """``"dicom"``, ``"png"`` or ``"pgm"`` from a file's first bytes (its magic); else None.

    DICOM Part 10 has ``DICM`` after its 128-byte preamble, PNG its 8-byte signature, a PGM
    ``P5`` (``P2``, ASCII PGM, is named too so that its reader says it is not supported).
    """
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[:2] in (b"P5", b"P2"):
        return "pgm"
    return None


def load_bytes(data: bytes, name: str, rules: Acceptance | None = None) -> np.ndarray:
    """A file's bytes (DICOM, PNG or PGM, told by their magic) as 2-D ``float32`` in [0, 1].

    The same readers as files on disk: DICOM through ``rules`` and the display chain, PGM
    divided by its maxval, PNG as grey.

    Raises:
        ValueError: bytes of no format MammoFlow reads, or a file its reader refuses (the
            message starts with ``name`` and says why).
    """
    kind = sniff_format(data)
    if kind == "dicom":
        return read_dicom_bytes(data, name, rules).pixels
    if kind == "png":
        return decode_png(data, name)
    if kind == "pgm":
        return pgm_to_unit(parse_pgm(data, name))
    if not data:
        raise ValueError(f"{name}: empty; send the image file's bytes (base64 in JSON)")
    raise UnsupportedFormatError(
        f"{name}: not a DICOM (Part 10: 'DICM' at byte 128), PNG or binary PGM (P5) file; "
        f"its {len(data):,} bytes start with {data[:16]!r}: send the image file's own bytes "
        "(base64 in JSON), not pixels or a path"
    )
