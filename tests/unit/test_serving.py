"""Serving on image files without a server: readers from bytes, the request body, the wrapper's
per-row errors and its cache key (the served end to end is tests/integration/test_serving.py)."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from mammoflow.config import ConvertConfig
from mammoflow.data.convert import encode_png
from mammoflow.data.dicom import Acceptance, DicomError, read_dicom
from mammoflow.data.images import MAX_PIXELS
from mammoflow.data.pgm import encode_pgm
from mammoflow.data.readers import (
    UnsupportedFormatError,
    load_bytes,
    load_png,
    load_raw,
    sniff_format,
)
from mammoflow.serving.predict import serve_command
from tests.helpers import dicom_bytes


def _film(h: int = 40, w: int = 32) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, h * w, dtype=np.float32).reshape(h, w)
    ramp[:, :4] = 0.0
    return ramp


def _files(tmp_path: Path) -> dict[str, Path]:
    img = _film()
    files = {
        "png": tmp_path / "a.png",
        "pgm": tmp_path / "a.pgm",
        "dicom": tmp_path / "a.dcm",
    }
    files["png"].write_bytes(encode_png(np.round(img * 255).astype(np.uint8)))
    files["pgm"].write_bytes(encode_pgm(np.round(img * 4095).astype(np.uint16), 4095))
    files["dicom"].write_bytes(dicom_bytes(img, encoding=1))  # MONOCHROME1: the chain inverts
    return files


def test_bytes_read_as_the_files_do(tmp_path: Path) -> None:
    files = _files(tmp_path)
    rules = Acceptance(min_size=8)
    expected = {
        "png": load_png(files["png"]),
        "pgm": load_raw(files["pgm"]),
        "dicom": read_dicom(files["dicom"], rules).pixels,
    }
    for kind, path in files.items():
        data = path.read_bytes()
        assert sniff_format(data) == kind
        got = load_bytes(data, "row 0", rules)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[kind])


def test_bad_bytes_name_the_row_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match=r"^row 3: not a DICOM .* start with b'hello"):
        load_bytes(b"hello world", "row 3")
    with pytest.raises(ValueError, match=r"^row 0: empty"):
        load_bytes(b"", "row 0")
    png = _files(tmp_path)["png"].read_bytes()
    with pytest.raises(ValueError, match=r"^row 1: cannot read the PNG"):
        load_bytes(png[:60], "row 1")  # truncated
    dicom = dicom_bytes(_film(), encoding=1)
    # ingestion's acceptance rules apply to bytes as to files: a thumbnail is refused
    with pytest.raises(DicomError, match=r"^row 2: .*short side below the minimum of 64"):
        load_bytes(dicom, "row 2", Acceptance(min_size=64))
    with pytest.raises(ValueError, match=r"^row 4: bad PGM header"):
        load_bytes(b"P5 12 x\n", "row 4")


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``width`` x ``height`` (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def test_png_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(ValueError, match=r"^row 0: PNG declares 60000x60000 = 3,600,000,000"):
        load_bytes(_png_header(60000, 60000), "row 0")
    with pytest.raises(ValueError, match=r"9000x9000 = 81,000,000 pixels, above the limit"):
        load_bytes(_png_header(9000, 9000), "row 0")  # below Pillow's own bomb limit
    assert MAX_PIXELS == 8192 * 8192  # the documented limit the message quotes


def test_file_body_is_base64_of_the_files(tmp_path: Path) -> None:
    from mammoflow.serving.serve import IMAGE_COLUMN, file_body

    files = _files(tmp_path)
    body = file_body([files["png"], files["dicom"]])
    split = body["dataframe_split"]
    assert split["columns"] == [IMAGE_COLUMN]
    assert [base64.b64decode(row[0]) for row in split["data"]] == [
        files["png"].read_bytes(),
        files["dicom"].read_bytes(),
    ]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt: not a DICOM .* by its first bytes"):
        file_body([text])
    with pytest.raises(ValueError, match=r"missing\.png: cannot read it"):
        file_body([tmp_path / "missing.png"])


def test_wrapper_refuses_bad_rows_together_and_scores_none(tmp_path: Path) -> None:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from mammoflow.serving.serve import IMAGE_COLUMN, ImageClassifier, RefusedInputError
    from mammoflow.tracking.pyfunc import PyfuncScorer

    files = _files(tmp_path)
    wrapper = ImageClassifier()
    wrapper.convert = ConvertConfig(size=48)
    wrapper.rules = Acceptance(min_size=8)
    good = wrapper.pixels([files["png"].read_bytes(), files["dicom"].read_bytes()])
    assert [p.shape for p in good] == [(48, 48), (48, 48)]
    assert float(good[1].min()) >= 0 and float(good[1].max()) <= 255
    with pytest.raises(RefusedInputError) as bad:
        wrapper.pixels([files["png"].read_bytes(), b"GIF89a...", b""])
    text = str(bad.value)
    assert text.startswith("2 of 3 image(s) refused, none scored")
    assert "image row 1: not a DICOM" in text and "image row 2: empty" in text
    assert "image row 0" not in text
    with pytest.raises(RefusedInputError, match="no rows"):
        wrapper.pixels([])
    # served (MLflow's pyfunc around it): the refusal is an HTTP 400 with the same message
    wrapper.call = lambda batch: batch  # never reached: nothing is scored
    frame = pd.DataFrame({IMAGE_COLUMN: [files["png"].read_bytes(), b"GIF89a..."]})
    with pytest.raises(MlflowException) as served:
        PyfuncScorer(wrapper).predict(None, frame)
    assert served.value.get_http_status_code() == 400
    assert served.value.message.startswith("1 of 2 image(s) refused, none scored")


def test_cache_folder_follows_store_version_and_settings(tmp_path: Path) -> None:
    from mammoflow.serving.serve import Pinned, cache_dir

    def config(version: str, size: int = 512) -> dict[str, object]:
        pinned = Pinned("models:/m@champion", f"models:/m/{version}", "m", version)
        return {"model": pinned.__dict__, "convert": {"size": size}}

    one = cache_dir("sqlite:///a.db", config("1"), tmp_path)
    assert one.name.startswith("m-v1-") and one.parent == tmp_path
    assert cache_dir("sqlite:///a.db", config("1"), tmp_path) == one
    others = {
        cache_dir("sqlite:///a.db", config("2"), tmp_path),
        cache_dir("sqlite:///b.db", config("1"), tmp_path),
        cache_dir("sqlite:///a.db", config("1", 256), tmp_path),
    }
    assert one not in others and len(others) == 3


def test_serve_command_has_workers() -> None:
    cmd = serve_command("/m", 5005, workers=3)
    assert cmd[-2:] == ["-w", "3"] and cmd[cmd.index("-p") + 1] == "5005"
    with pytest.raises(ValueError, match="at least 1 worker"):
        serve_command("/m", 5005, workers=0)
