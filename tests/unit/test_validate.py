"""Great Expectations validation of manifests: a good one passes, each bad one fails readably."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammoflow.config import ConvertConfig
from mammoflow.data.convert import convert_dataset
from mammoflow.data.manifest import ManifestRow, to_frame
from mammoflow.data.readers import load_raw
from mammoflow.data.validate import (
    REPORT_NAME,
    ConvertedImagesInvalid,
    ValidationFailed,
    mias_film_pair,
    validate_converted,
    validate_manifest,
)
from mammoflow.files import sha256_file

LABELS = ["normal", "normal", "benign", "benign", "malignant", "normal"]


def write_pgm8(path: Path, pixels: np.ndarray) -> Path:
    h, w = pixels.shape
    path.write_bytes(f"P5\n{w} {h}\n255\n".encode("ascii") + pixels.astype(np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """A valid six-image MIAS manifest (three patients, film pairs) with real PGM files."""
    raw = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(LABELS):
        number = i + 1
        pixels = rng.integers(0, 256, (40, 30))
        path = write_pgm8(raw / f"mdb{number:03d}.pgm", pixels)
        rows.append(
            ManifestRow(
                image_id=f"mdb{number:03d}",
                patient_id=f"mias-P{(number + 1) // 2:03d}",
                dataset="unit_mias",
                laterality="R" if number % 2 else "L",
                view="MLO",
                label=label,
                label_index=["normal", "benign", "malignant"].index(label),
                raw_path=path.as_posix(),
                raw_sha256=sha256_file(path),
                width=30,
                height=40,
                bits=8,
                intensity_mean=float(pixels.mean() / 255),
                intensity_std=float(pixels.std() / 255),
            )
        )
    return to_frame(rows)


def run(frame: pd.DataFrame, reports: Path, fail: bool = True):
    return validate_manifest(frame, "mias", reports, "unit_mias", fail_on_error=fail)


def test_good_manifest_passes_and_writes_reports(good: pd.DataFrame, tmp_path: Path) -> None:
    report = run(good, tmp_path / "reports")
    assert report.success and report.failures == []
    data = json.loads((tmp_path / "reports" / REPORT_NAME).read_text())
    assert data["success"] is True and data["rows"] == 6
    assert data["statistics"]["failed"] == 0 and data["statistics"]["evaluated"] >= 20
    checks = {r["check"] for r in data["results"]}
    assert "every class present" in checks and "intensity not constant (std > 0)" in checks
    index = tmp_path / "reports" / "data_docs" / "index.html"
    assert index.is_file() and "unit_mias" in index.read_text()
    leftovers = {p.name for p in (tmp_path / "reports").iterdir()}
    assert leftovers == {REPORT_NAME, "data_docs"}


def test_converted_manifest_checks_pngs(good: pd.DataFrame, tmp_path: Path) -> None:
    res = convert_dataset(
        good, tmp_path / "conv", ConvertConfig(size=32, workers=1), progress=False, loader=load_raw
    )
    converted = pd.read_parquet(res.manifest_path)
    report = run(converted, tmp_path / "ok")
    checks = {o.check for o in report.outcomes}
    assert "converted PNG is square" in checks and "converted_sha256 matches the PNG" in checks

    Path(converted.loc[2, "converted_path"]).unlink()
    converted.loc[4, "converted_sha256"] = "0" * 64
    with pytest.raises(ValidationFailed) as info:
        run(converted, tmp_path / "bad")
    msg = str(info.value)
    assert "converted PNG present and readable" in msg and "mdb003.png" in msg
    assert "converted_sha256 matches the PNG" in msg and "mdb005" in msg


def test_validate_converted_names_the_images(
    good: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = convert_dataset(
        good, tmp_path / "conv", ConvertConfig(size=32, workers=1), progress=False, loader=load_raw
    )
    converted = pd.read_parquet(res.manifest_path)
    monkeypatch.chdir(tmp_path)  # it writes nothing, not even in the working directory
    outcomes = validate_converted(converted, "mias", "unit_mias")
    assert [o.check for o in outcomes] == [
        "every image converted",
        "converted PNG present and readable",
        "converted PNG is square",
        "all converted PNGs have one size",
        "converted_sha256 matches the PNG",
    ]
    assert all(o.success for o in outcomes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]

    Path(converted.loc[2, "converted_path"]).unlink()
    small = Path(converted.loc[0, "converted_path"])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(small)
    converted.loc[0, "converted_sha256"] = sha256_file(small)
    converted.loc[4, "converted_sha256"] = "0" * 64
    with pytest.raises(ConvertedImagesInvalid) as info:
        validate_converted(converted, "mias", "unit_mias")
    msg = str(info.value)
    assert msg.startswith("converted images of dataset 'unit_mias' failed 3 check(s)")
    assert "converted PNG present and readable" in msg and "mdb003.png" in msg
    assert "all converted PNGs have one size" in msg
    assert "sizes: 16x16: ['mdb001']; 32x32: ['mdb002', 'mdb004', 'mdb005', 'mdb006']" in msg
    assert "converted_sha256 matches the PNG" in msg and "images ['mdb005']" in msg
    with pytest.raises(ValueError, match=r"unknown dataset kind 'ddsm'"):
        validate_converted(converted, "ddsm", "unit_mias")


def _dup_id(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[1, "image_id"] = "mdb001"
    return f


def _unknown_label(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[0, "label"] = "cancerous"
    return f


def _missing_class(f: pd.DataFrame) -> pd.DataFrame:
    return f[f["label"] != "malignant"].reset_index(drop=True)


def _missing_file(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[3, "raw_path"] = "nowhere/mdb004.pgm"
    return f


def _constant(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[2, "intensity_std"] = 0.0
    return f


def _split_pair(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[1, "patient_id"] = "mias-P099"
    return f


def _wrong_dims(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[0, "width"] = 31
    return f


def _flat_field(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[0, "view"] = "FLATFIELD"
    return f


def _qc_image_type(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[1, "extras"] = json.dumps({"image_type": "ORIGINAL/PRIMARY/QC"})
    return f


CASES: list[tuple[str, Callable[[pd.DataFrame], pd.DataFrame], list[str]]] = [
    ("duplicate id", _dup_id, ["expect_column_values_to_be_unique on 'image_id'", "mdb001"]),
    (
        "unknown label",
        _unknown_label,
        ["expect_column_values_to_be_in_set on 'label'", "cancerous"],
    ),
    (
        "missing class",
        _missing_class,
        ["expect_column_distinct_values_to_contain_set on 'label'", "missing ['malignant']"],
    ),
    (
        "missing file",
        _missing_file,
        ["raw file present and readable", "missing: nowhere/mdb004.pgm", "mdb004"],
    ),
    ("constant", _constant, ["on 'intensity_std'", "intensity not constant", "mdb003"]),
    ("split pair", _split_pair, ["'film_pair_patients'", "one patient", "mdb001", "mdb002"]),
    ("wrong dims", _wrong_dims, ["'width=raw_actual_width'", "[31, 30]", "mdb001"]),
    (
        "flat field",
        _flat_field,
        ["view is a mammography view", "FLATFIELD", "no QC or calibration image", "mdb001"],
    ),
    ("QC image type", _qc_image_type, ["no QC or calibration image", "QC", "mdb002"]),
]


@pytest.mark.parametrize(("name", "mutate", "needles"), CASES, ids=[c[0] for c in CASES])
def test_each_expectation_fails_readably(
    good: pd.DataFrame,
    tmp_path: Path,
    name: str,
    mutate: Callable[[pd.DataFrame], pd.DataFrame],
    needles: list[str],
) -> None:
    with pytest.raises(ValidationFailed) as info:
        run(mutate(good.copy()), tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in msg, f"{name}: {needle!r} not in:\n{msg}"
    data = json.loads((tmp_path / REPORT_NAME).read_text())
    assert data["success"] is False
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_no_raise_when_fail_on_error_is_false(good: pd.DataFrame, tmp_path: Path) -> None:
    report = run(_constant(good.copy()), tmp_path, fail=False)
    assert not report.success
    assert [o.column for o in report.failures] == ["intensity_std"]


def test_unknown_kind_and_film_pairs() -> None:
    with pytest.raises(ValueError, match="unknown dataset kind 'xray'"):
        validate_manifest(pd.DataFrame(), "xray", Path("unused"), "d")
    assert mias_film_pair("mdb001") == mias_film_pair("mdb002") == "mdb001+mdb002"
    assert mias_film_pair("mdb322") == "mdb321+mdb322"
    assert mias_film_pair("IMG_1") is None


def test_minimum_size(good: pd.DataFrame, tmp_path: Path) -> None:
    report = validate_manifest(good, "mias", tmp_path / "a", "unit_mias", min_size=30)
    assert "short side at least 30 pixels (ingest.min_size)" in {o.check for o in report.outcomes}
    with pytest.raises(ValidationFailed) as info:
        validate_manifest(good, "mias", tmp_path / "b", "unit_mias", min_size=31)
    msg = str(info.value)
    assert "short side at least 31 pixels" in msg and "mdb001" in msg
