"""Binary PGM (P5) reading and writing, pure and strict.

The header is ``P5``, then width, height and maxval as ASCII decimals separated by whitespace,
with ``#`` comments (to the end of the line) allowed between tokens, then exactly one whitespace
byte, then the raster: ``width × height`` samples, one byte each when ``maxval < 256``, else two
bytes big-endian. After the raster only a single newline (``\\n`` or ``\\r\\n``) is tolerated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammoflow.data.images import MAX_PIXELS
from mammoflow.files import atomic_write_bytes

MAGIC = b"P5"
_WHITESPACE = b" \t\n\r\v\f"
_TRAILING_OK = (b"", b"\n", b"\r\n")


class PgmError(ValueError):
    """A PGM file is malformed; the message names the file, the bad value and a fix."""


@dataclass(frozen=True)
class PgmImage:
    """A decoded PGM: 2-D ``uint8`` (maxval < 256) or ``uint16`` pixels and the header values."""

    pixels: np.ndarray
    width: int
    height: int
    maxval: int

    @property
    def bits(self) -> int:
        """Bits needed for ``maxval`` (8 for 255, 12 for 4095, 16 for 65535)."""
        return max(int(self.maxval).bit_length(), 1)


def _skip_comment(data: bytes, pos: int) -> int:
    """Return the position of the newline (or CR) ending the comment that starts at ``pos``."""
    ends = [i for i in (data.find(b"\n", pos), data.find(b"\r", pos)) if i >= 0]
    return min(ends) if ends else len(data)


def _next_token(data: bytes, pos: int, name: str, what: str) -> tuple[int, int]:
    """Read one decimal header token starting at ``pos``; return (value, position after it)."""
    n = len(data)
    while pos < n:
        byte = data[pos : pos + 1]
        if byte == b"#":
            pos = _skip_comment(data, pos)
        elif byte in _WHITESPACE:
            pos += 1
        else:
            break
    start = pos
    while pos < n and data[pos : pos + 1].isdigit():
        pos += 1
    if start == pos:
        found = data[start : start + 10]
        if not found:
            raise PgmError(
                f"{name}: PGM header ends before the {what}; the file is truncated or not a PGM"
            )
        raise PgmError(
            f"{name}: bad PGM header: expected the {what} as a decimal number, found {found!r}; "
            "rewrite the header as 'P5 <width> <height> <maxval>'"
        )
    if pos < n and data[pos : pos + 1] not in _WHITESPACE + b"#":
        raise PgmError(
            f"{name}: bad PGM header: the {what} {data[start : pos + 1]!r} is not a decimal "
            "number followed by whitespace"
        )
    return int(data[start:pos]), pos


def parse_header(data: bytes, name: str = "<bytes>") -> tuple[int, int, int, int]:
    """Parse a P5 header; return ``(width, height, maxval, raster_offset)``.

    Raises:
        PgmError: wrong magic, non-numeric or out-of-range header values.
    """
    magic = data[:2]
    if magic != MAGIC:
        hint = (
            "ASCII PGM (P2) is not supported; convert it to binary, e.g. `pnmtopnm` or Pillow"
            if magic == b"P2"
            else "the file is not a binary PGM (P5)"
        )
        raise PgmError(f"{name}: wrong magic number {magic!r}, expected b'P5': {hint}")
    if len(data) < 3 or data[2:3] not in _WHITESPACE + b"#":
        raise PgmError(f"{name}: bad PGM header: magic {data[:3]!r} must be followed by whitespace")
    width, pos = _next_token(data, 2, name, "width")
    height, pos = _next_token(data, pos, name, "height")
    maxval, pos = _next_token(data, pos, name, "maxval")
    if data[pos : pos + 1] == b"#":  # a comment may end the header before its last whitespace
        pos = _skip_comment(data, pos)
    if pos >= len(data) or data[pos : pos + 1] not in _WHITESPACE:
        raise PgmError(
            f"{name}: bad PGM header: maxval {maxval} must be followed by exactly one whitespace "
            f"byte, found {data[pos : pos + 1]!r}; the file is truncated or not a PGM"
        )
    if width < 1 or height < 1:
        raise PgmError(
            f"{name}: bad PGM header: width {width} and height {height} must both be at least 1"
        )
    if not 0 < maxval < 65536:
        raise PgmError(f"{name}: bad PGM header: maxval {maxval} must be between 1 and 65535")
    if width * height > MAX_PIXELS:
        raise PgmError(
            f"{name}: bad PGM header: {width}x{height} = {width * height:,} pixels, above the "
            f"limit of {MAX_PIXELS:,} (images.MAX_PIXELS); not decoded: a corrupt header, not a "
            "mammogram"
        )
    return width, height, maxval, pos + 1


def parse_pgm(data: bytes, name: str = "<bytes>") -> PgmImage:
    """Decode the bytes of a binary PGM (P5) file.

    Args:
        data: the whole file's bytes.
        name: the file's name, used in error messages.

    Raises:
        PgmError: bad magic or header, truncated raster, trailing garbage, or a pixel above maxval.
    """
    width, height, maxval, offset = parse_header(data, name)
    sample = 1 if maxval < 256 else 2
    expected = width * height * sample
    actual = len(data) - offset
    if actual < expected:
        raise PgmError(
            f"{name}: truncated PGM: the header ({width}x{height}, maxval {maxval}) needs "
            f"{expected} pixel bytes but only {actual} follow the {offset}-byte header "
            f"(file is {len(data)} bytes, expected {offset + expected}); "
            "re-download or re-extract the file"
        )
    trailing = data[offset + expected :]
    if trailing not in _TRAILING_OK:
        raise PgmError(
            f"{name}: {len(trailing)} unexpected bytes after the {expected}-byte raster "
            f"(starting {trailing[:8]!r}); the header's size ({width}x{height}, maxval {maxval}) "
            "does not match the file, or several images are concatenated"
        )
    dtype = np.dtype(np.uint8) if sample == 1 else np.dtype(">u2")
    raster = np.frombuffer(data, dtype=dtype, count=width * height, offset=offset)
    pixels = raster.reshape(height, width).astype(np.uint8 if sample == 1 else np.uint16, copy=True)
    top = int(pixels.max())
    if top > maxval:
        raise PgmError(
            f"{name}: pixel value {top} exceeds the header's maxval {maxval}; "
            "the header is wrong or the raster is corrupt"
        )
    return PgmImage(pixels=pixels, width=width, height=height, maxval=maxval)


def read_pgm(path: str | Path) -> PgmImage:
    """Read and decode a binary PGM file (see :func:`parse_pgm`)."""
    path = Path(path)
    return parse_pgm(path.read_bytes(), str(path))


def encode_pgm(pixels: np.ndarray, maxval: int | None = None) -> bytes:
    """Encode a 2-D integer array as P5 bytes (header ``P5\\n<w> <h>\\n<maxval>\\n``).

    Args:
        pixels: 2-D array of non-negative integers.
        maxval: the header's maxval; defaults to 255 for ``uint8`` input, else 65535.

    Raises:
        PgmError: wrong shape or dtype, or a value above ``maxval``.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.size == 0:
        raise PgmError(f"PGM pixels must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PgmError(f"PGM pixels must be integers, got dtype {arr.dtype}")
    if maxval is None:
        maxval = 255 if arr.dtype == np.uint8 else 65535
    if not 0 < maxval < 65536:
        raise PgmError(f"maxval {maxval} must be between 1 and 65535")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > maxval:
        raise PgmError(f"PGM pixel values [{low}, {high}] fall outside [0, maxval={maxval}]")
    height, width = arr.shape
    header = f"P5\n{width} {height}\n{maxval}\n".encode("ascii")
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    return header + arr.astype(dtype).tobytes()


def write_pgm(path: str | Path, pixels: np.ndarray, maxval: int | None = None) -> Path:
    """Atomically write ``pixels`` as a binary PGM (see :func:`encode_pgm`); return the path."""
    path = Path(path)
    atomic_write_bytes(path, encode_pgm(pixels, maxval))
    return path
