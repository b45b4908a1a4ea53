"""Raw → PNG conversion: breast crop, PNG formats, determinism, incremental runs, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammoflow.config import ConvertConfig
from mammoflow.data.convert import (
    STATE_NAME,
    ConvertError,
    convert_dataset,
    encode_png,
    prepare_image,
)
from mammoflow.data.manifest import ManifestRow, read_manifest, to_frame
from mammoflow.files import sha256_file


def write_pgm8(path: Path, pixels: np.ndarray) -> Path:
    """Write an 8-bit binary PGM (P5) file."""
    h, w = pixels.shape
    path.write_bytes(f"P5\n{w} {h}\n255\n".encode("ascii") + pixels.astype(np.uint8).tobytes())
    return path


def pgm_loader(path: Path) -> np.ndarray:
    """Fallback decoder while ``mammoflow.data.readers`` is not there yet (8-bit PGM only)."""
    data = path.read_bytes()
    magic, dims, maxval, rest = data.split(b"\n", 3)
    if magic != b"P5":
        raise ValueError(f"{path}: not a P5 PGM")
    w, h = (int(v) for v in dims.split())
    if len(rest) < w * h:
        raise ValueError(f"{path}: truncated raster ({len(rest)} of {w * h} bytes)")
    return np.frombuffer(rest, np.uint8, w * h).reshape(h, w).astype(np.float32) / int(maxval)


@pytest.fixture(scope="module")
def loader():
    try:
        from mammoflow.data.readers import load_raw
    except ImportError:
        return pgm_loader
    return load_raw


def phantom(h: int, w: int, seed: int) -> np.ndarray:
    """A dark background with a bright textured 'breast' and a small label blob."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    rr, cc = np.mgrid[0:h, 0:w]
    breast = ((rr - h / 2) / (h * 0.35)) ** 2 + (cc / (w * 0.45)) ** 2 < 1
    img[breast] = rng.integers(90, 230, int(breast.sum()))
    img[2:5, w - 8 : w - 3] = 255  # film label, far from the breast
    return img


def make_manifest(tmp: Path, n: int = 3, shape: tuple[int, int] = (80, 60)) -> pd.DataFrame:
    raw = tmp / "raw"
    raw.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        path = write_pgm8(raw / f"mdb{i + 1:03d}.pgm", phantom(*shape, seed=i))
        rows.append(
            ManifestRow(
                image_id=f"mdb{i + 1:03d}",
                patient_id=f"p{i // 2:03d}",
                dataset="unit",
                laterality="LR"[i % 2],
                view="MLO",
                label="normal",
                label_index=0,
                raw_path=path.as_posix(),
                raw_sha256=sha256_file(path),
                width=shape[1],
                height=shape[0],
                bits=8,
                intensity_mean=0.3,
                intensity_std=0.2,
            )
        )
    return to_frame(rows)


CFG = ConvertConfig(size=32, workers=1)


# ---------------------------------------------------------------- prepare_image


def test_crop_to_breast_fills_more_of_the_square() -> None:
    img = np.zeros((300, 300), np.float32)
    img[100:200, 0:60] = 0.8
    plain = prepare_image(img, 64, 8, crop_to_breast=False)
    cropped = prepare_image(img, 64, 8, crop_to_breast=True)
    assert (cropped > 100).mean() > 3 * (plain > 100).mean()


# ---------------------------------------------------------------- PNG output


@pytest.mark.parametrize(("bits", "mode", "dtype"), [(8, "L", np.uint8), (16, "I;16", np.uint16)])
def test_png_bit_depth(tmp_path: Path, loader, bits: int, mode: str, dtype: type) -> None:
    frame = make_manifest(tmp_path, n=1)
    cfg = ConvertConfig(size=40, bit_depth=bits, workers=1)  # type: ignore[arg-type]
    res = convert_dataset(frame, tmp_path / "out", cfg, progress=False, loader=loader)
    out = read_manifest(res.manifest_path)
    png = Path(out.loc[0, "converted_path"])
    assert png == tmp_path / "out" / "images" / "mdb001.png"
    with Image.open(png) as im:
        assert im.mode == mode and im.size == (40, 40)
        arr = np.asarray(im)
        assert im.info == {} or set(im.info) <= {"dpi"}  # no text/time chunks
    assert arr.dtype == dtype and arr.max() > np.iinfo(dtype).max // 4
    assert out.loc[0, "converted_sha256"] == sha256_file(png)


def test_png_bytes_are_deterministic(tmp_path: Path, loader) -> None:
    frame = make_manifest(tmp_path, n=2)
    a = convert_dataset(frame, tmp_path / "a", CFG, progress=False, loader=loader)
    b = convert_dataset(frame, tmp_path / "b", CFG, progress=False, loader=loader)
    for image_id in ("mdb001", "mdb002"):
        assert (a.out_dir / "images" / f"{image_id}.png").read_bytes() == (
            b.out_dir / "images" / f"{image_id}.png"
        ).read_bytes()
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    assert encode_png(pixels) == encode_png(pixels.copy())


def test_parallel_matches_serial(tmp_path: Path, loader) -> None:
    frame = make_manifest(tmp_path, n=4)
    serial = convert_dataset(frame, tmp_path / "s", CFG, progress=False, loader=loader)
    par = convert_dataset(
        frame, tmp_path / "p", ConvertConfig(size=32, workers=2), progress=True, loader=loader
    )
    assert par.workers == 2 and len(par.converted) == 4
    s = read_manifest(serial.manifest_path)
    p = read_manifest(par.manifest_path)
    assert s["converted_sha256"].tolist() == p["converted_sha256"].tolist()


# ---------------------------------------------------------------- incremental


def test_incremental_skips_unchanged_and_redoes_changed(tmp_path: Path, loader) -> None:
    frame = make_manifest(tmp_path, n=3)
    out = tmp_path / "out"
    first = convert_dataset(frame, out, CFG, progress=False, loader=loader)
    assert first.converted == ("mdb001", "mdb002", "mdb003") and first.skipped == ()
    assert (out / STATE_NAME).is_file()

    second = convert_dataset(frame, out, CFG, progress=False, loader=loader)
    assert second.converted == () and len(second.skipped) == 3
    assert read_manifest(second.manifest_path).equals(read_manifest(first.manifest_path))

    # a changed raw (re-ingested: new sha in the manifest) is converted again, alone
    raw = Path(frame.loc[1, "raw_path"])
    write_pgm8(raw, phantom(80, 60, seed=99))
    frame.loc[1, "raw_sha256"] = sha256_file(raw)
    third = convert_dataset(frame, out, CFG, progress=False, loader=loader)
    assert third.converted == ("mdb002",) and len(third.skipped) == 2

    # a tampered PNG is rewritten
    (out / "images" / "mdb003.png").write_bytes(b"not a png")
    fourth = convert_dataset(frame, out, CFG, progress=False, loader=loader)
    assert fourth.converted == ("mdb003",)

    # new parameters convert everything again
    fifth = convert_dataset(
        frame, out, ConvertConfig(size=48, workers=1), progress=False, loader=loader
    )
    assert len(fifth.converted) == 3


def test_failures_collected_and_earlier_outputs_kept(tmp_path: Path, loader) -> None:
    frame = make_manifest(tmp_path, n=4)
    out = tmp_path / "out"
    convert_dataset(frame, out, CFG, progress=False, loader=loader)
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    manifest_before = (out / "manifest.parquet").read_bytes()

    bad = Path(frame.loc[0, "raw_path"])
    bad.write_bytes(b"P5\n60 80\n255\n" + b"\x00" * 10)  # truncated raster
    frame.loc[0, "raw_sha256"] = sha256_file(bad)
    Path(frame.loc[2, "raw_path"]).unlink()
    write_pgm8(Path(frame.loc[3, "raw_path"]), phantom(80, 60, seed=7))  # sha now stale

    with pytest.raises(ConvertError) as info:
        convert_dataset(frame, out, CFG, progress=False, loader=loader)
    err = info.value
    assert isinstance(err, ValueError)
    assert [f.image_id for f in err.failures] == ["mdb001", "mdb003", "mdb004"]
    msg = str(err)
    assert "3 of 4 images failed" in msg
    assert "mdb001.pgm" in msg and "mdb003.pgm" in msg and "not found" in msg
    assert "re-run `mammoflow ingest`" in msg
    after = {p.name: p.read_bytes() for p in (out / "images").iterdir() if p.suffix == ".png"}
    assert after == before  # nothing deleted or overwritten
    assert (out / "manifest.parquet").read_bytes() == manifest_before


def test_unsafe_image_id_is_a_failure(tmp_path: Path, loader) -> None:
    frame = make_manifest(tmp_path, n=1)
    frame.loc[0, "image_id"] = "../escape"
    with pytest.raises(ConvertError, match="not usable as a file name"):
        convert_dataset(frame, tmp_path / "out", CFG, progress=False, loader=loader)
    assert not (tmp_path / "escape.png").exists()


def test_pseudonymous_raw_paths_are_found_and_never_quoted(tmp_path: Path, loader) -> None:
    frame = make_manifest(tmp_path, n=3)
    real = {f"h{i:012x}.pgm": Path(p) for i, p in enumerate(frame["raw_path"])}
    frame["raw_path"] = list(real)
    out = tmp_path / "out"
    result = convert_dataset(frame, out, CFG, progress=False, loader=loader, raw_files=real)
    assert len(result.converted) == 3
    assert list(read_manifest(result.manifest_path)["raw_path"]) == list(real)
    real["h000000000001.pgm"].write_bytes(b"P5\n60 80\n255\n" + b"\x00" * 10)
    real["h000000000002.pgm"].unlink()
    frame.loc[1, "raw_sha256"] = sha256_file(real["h000000000001.pgm"])
    with pytest.raises(ConvertError) as info:
        convert_dataset(frame, out, CFG, progress=False, loader=loader, raw_files=real)
    msg = str(info.value)
    assert "h000000000001.pgm" in msg and "raw file h000000000002.pgm not found" in msg
    assert str(tmp_path) not in msg
    assert ".pgm" not in msg.replace("h000000000001.pgm", "").replace("h000000000002.pgm", "")
