"""PGM (P5) reader/writer: header grammar, sizes, and precise errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mammoflow.data.pgm import PgmError, encode_pgm, parse_pgm, read_pgm, write_pgm
from mammoflow.data.readers import UnsupportedFormatError, load_raw, raw_stats


def _ramp(h: int = 3, w: int = 4) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint8) * 7).reshape(h, w)


def test_roundtrip_8bit(tmp_path: Path) -> None:
    pixels = _ramp()
    path = write_pgm(tmp_path / "a.pgm", pixels, 255)
    assert path.read_bytes()[:11] == b"P5\n4 3\n255\n"
    image = read_pgm(path)
    assert (image.width, image.height, image.maxval, image.bits) == (4, 3, 255, 8)
    assert image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, pixels)


def test_roundtrip_16bit_big_endian() -> None:
    pixels = np.array([[0x0102, 4095], [0, 1000]], dtype=np.uint16)
    data = encode_pgm(pixels, 4095)
    assert data.startswith(b"P5\n2 2\n4095\n")
    assert data[len(b"P5\n2 2\n4095\n") :][:2] == b"\x01\x02"  # big-endian
    image = parse_pgm(data, "x.pgm")
    assert image.pixels.dtype == np.uint16
    assert image.bits == 12
    np.testing.assert_array_equal(image.pixels, pixels)


def test_header_comments_and_whitespace() -> None:
    raster = bytes(range(6))
    data = b"P5 # made by hand\n# another comment\r\n 3\t\v2\r\n# maxval next\n255\n" + raster
    image = parse_pgm(data, "c.pgm")
    assert (image.width, image.height) == (3, 2)
    assert image.pixels.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_gimp_style_header_and_comment_after_maxval() -> None:
    gimp = b"P5\n# CREATOR: GIMP PNM Filter Version 1.1\n2 1\n255\n\x00\x09"
    assert parse_pgm(gimp, "g.pgm").pixels.tolist() == [[0, 9]]
    tail = b"P5 2 1 255# comment ends the header\n\x01\x02"
    assert parse_pgm(tail, "t.pgm").pixels.tolist() == [[1, 2]]


def test_truncated_names_file_and_byte_counts() -> None:
    data = encode_pgm(_ramp(), 255)[:-5]
    with pytest.raises(PgmError) as err:
        parse_pgm(data, "cut.pgm")
    assert str(err.value) == (
        "cut.pgm: truncated PGM: the header (4x3, maxval 255) needs 12 pixel bytes but only 7 "
        "follow the 11-byte header (file is 18 bytes, expected 23); re-download or re-extract "
        "the file"
    )


def test_truncated_16bit_counts_two_bytes_per_pixel() -> None:
    data = encode_pgm(np.zeros((2, 2), np.uint16), 65535)[:-1]
    with pytest.raises(PgmError, match=r"needs 8 pixel bytes but only 7 follow"):
        parse_pgm(data, "w.pgm")


def test_wrong_magic_names_the_magic_found() -> None:
    with pytest.raises(PgmError) as err:
        parse_pgm(b"P6\n1 1\n255\n\x00\x00\x00", "colour.ppm")
    assert str(err.value) == (
        "colour.ppm: wrong magic number b'P6', expected b'P5': the file is not a binary PGM (P5)"
    )
    with pytest.raises(PgmError, match=r"magic number b'P2'.*ASCII PGM \(P2\) is not supported"):
        parse_pgm(b"P2\n1 1\n255\n0\n", "ascii.pgm")


def test_bad_header_values() -> None:
    with pytest.raises(PgmError) as err:
        parse_pgm(b"P5\nab 3\n255\n", "h.pgm")
    assert str(err.value) == (
        "h.pgm: bad PGM header: expected the width as a decimal number, found b'ab 3\\n255\\n'; "
        "rewrite the header as 'P5 <width> <height> <maxval>'"
    )
    with pytest.raises(PgmError, match=r"maxval 70000 must be between 1 and 65535"):
        parse_pgm(b"P5 1 1 70000\n\x00\x00", "m.pgm")
    with pytest.raises(PgmError, match=r"maxval 0 must be between 1 and 65535"):
        parse_pgm(b"P5 1 1 0\n\x00", "m.pgm")
    with pytest.raises(PgmError, match=r"width 0 and height 1 must both be at least 1"):
        parse_pgm(b"P5 0 1 255\n", "z.pgm")
    with pytest.raises(PgmError, match=r"header ends before the maxval"):
        parse_pgm(b"P5 1 1", "short.pgm")
    with pytest.raises(PgmError, match=r"the width b'12x' is not a decimal"):
        parse_pgm(b"P5 12x 1 255\n", "x.pgm")


def test_trailing_bytes_only_a_newline() -> None:
    good = encode_pgm(_ramp(), 255)
    assert parse_pgm(good + b"\n", "n.pgm").width == 4
    assert parse_pgm(good + b"\r\n", "n.pgm").width == 4
    with pytest.raises(PgmError) as err:
        parse_pgm(good + b"\n\n", "n.pgm")
    assert str(err.value) == (
        "n.pgm: 2 unexpected bytes after the 12-byte raster (starting b'\\n\\n'); the header's "
        "size (4x3, maxval 255) does not match the file, or several images are concatenated"
    )
    with pytest.raises(PgmError, match=r"1 unexpected bytes after"):
        parse_pgm(good + b"x", "n.pgm")


def test_pixel_above_maxval() -> None:
    with pytest.raises(PgmError) as err:
        parse_pgm(b"P5 2 1 100\n\x05\xc8", "v.pgm")
    assert str(err.value) == (
        "v.pgm: pixel value 200 exceeds the header's maxval 100; the header is wrong or the "
        "raster is corrupt"
    )


def test_read_pgm_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.pgm"
    path.write_bytes(b"GIF89a")
    with pytest.raises(PgmError, match=rf"^{path}: wrong magic number b'GI'"):
        read_pgm(path)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(PgmError, match=r"2-D"):
        encode_pgm(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(PgmError, match=r"integers, got dtype float32"):
        encode_pgm(np.zeros((2, 2), np.float32))
    with pytest.raises(PgmError, match=r"\[0, 300\] fall outside \[0, maxval=255\]"):
        encode_pgm(np.array([[0, 300]], np.uint16), 255)


def test_load_raw_scales_by_maxval(tmp_path: Path) -> None:
    path = write_pgm(tmp_path / "s.pgm", np.array([[0, 2047, 4094]], np.uint16), 4094)
    arr = load_raw(path)
    assert arr.dtype == np.float32 and arr.shape == (1, 3)
    np.testing.assert_allclose(arr, [[0.0, 2047 / 4094, 1.0]], rtol=1e-6)
    mean, std = raw_stats(arr)
    assert mean == pytest.approx(float(np.mean(arr)))
    assert std == pytest.approx(float(np.std(arr)))


def test_load_raw_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError) as err:
        load_raw(path)
    assert str(err.value) == (
        f"{path}: unsupported raw image suffix '.png'; expected one of .pgm, .dcm, .dicom "
        "(rename the file or convert it)"
    )


@pytest.mark.parametrize(("width", "height"), [(60000, 60000), (8193, 8192)])
def test_declared_size_above_the_pixel_limit_is_refused(width: int, height: int) -> None:
    """A header declaring a bomb is refused before the raster is even measured."""
    data = f"P5\n{width} {height}\n255\n".encode() + b"\0" * 16
    with pytest.raises(PgmError, match=r"above the limit of 67,108,864 \(images.MAX_PIXELS\)"):
        parse_pgm(data, "bomb.pgm")
    assert parse_pgm(b"P5\n8192 1\n255\n" + b"\0" * 8192).width == 8192
