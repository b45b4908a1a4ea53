"""CMMD: clinical table, DICOM tree walk, per-side labels, bad files, no PHI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from mammoflow.data.cmmd import (
    ClinicalTableError,
    age_band,
    assign_image_ids,
    ingest_cmmd,
    parse_clinical,
    read_clinical,
)
from mammoflow.data.ingest import IngestError
from mammoflow.data.manifest import COLUMNS, read_manifest
from mammoflow.data.sample import FAKE_PHI, SampleResult, make_sample, mammogram_dicom

FAIL_HEAD = (
    "CMMD ingest of {source} found {n} bad file(s); nothing was written. Fix or remove them, "
    "or rerun with on_bad_file='quarantine' to ingest the rest:\n"
)


@pytest.fixture
def sample(tmp_path: Path) -> SampleResult:
    return make_sample(tmp_path / "sample", seed=11, mias_patients=2, cmmd_patients=3, size=48)


@pytest.fixture
def prior(sample: SampleResult, tmp_path: Path) -> tuple[Path, bytes, bytes]:
    out = tmp_path / "out"
    ingest_cmmd(sample.cmmd_dir, sample.clinical_path, out)
    return out, (out / "manifest.parquet").read_bytes(), (out / "quarantine.json").read_bytes()


def _assert_untouched(prior: tuple[Path, bytes, bytes]) -> None:
    out, manifest, quarantine = prior
    assert (out / "manifest.parquet").read_bytes() == manifest
    assert (out / "quarantine.json").read_bytes() == quarantine


def _one_sided(sample: SampleResult) -> tuple[str, str]:
    sides: dict[str, list[str]] = {}
    for patient, side in sample.cmmd_labels:
        sides.setdefault(patient, []).append(side)
    patient = next(p for p, s in sorted(sides.items()) if len(s) == 1)
    return patient, sides[patient][0]


def _series(sample: SampleResult, patient: str) -> Path:
    return next((sample.cmmd_dir / "CMMD" / patient).glob("*/*"))


# ------------------------------------------------------------------ clinical table


def test_age_band() -> None:
    assert [age_band(a) for a in (17, 40, 49, 50, 89, 90, 101)] == [
        "10-19",
        "40-49",
        "40-49",
        "50-59",
        "80-89",
        "90+",
        "90+",
    ]
    assert age_band(None) is None and age_band(float("nan")) is None and age_band("52") == "50-59"


def test_parse_clinical_reports_every_bad_row() -> None:
    frame = pd.DataFrame(
        {
            "ID1": ["D1-0001", "D1-0001", "D1-0002", None, "D1-0003", "D1-0001"],
            "LeftRight": ["L", "R", "X", "L", "L", "L"],
            "Age": ["44", "44", "50", "50", "abc", "44"],
            "abnormality": ["mass"] * 6,
            "classification": ["Benign", "Malignant", "Benign", "Benign", "Unknown", "Benign"],
            "subtype": [None, "Luminal A", None, None, None, None],
        }
    )
    with pytest.raises(ClinicalTableError) as err:
        parse_clinical(frame, "c.xlsx")
    assert str(err.value) == (
        "c.xlsx has 5 bad row(s):\n"
        "  - c.xlsx row 4 (ID1 'D1-0002'): LeftRight 'X' is not 'L' or 'R'\n"
        "  - c.xlsx row 5: empty ID1; every row needs a patient ID such as 'D1-0001'\n"
        "  - c.xlsx row 6 (ID1 'D1-0003'): classification 'Unknown' is not 'Benign' or 'Malignant'\n"
        "  - c.xlsx row 6 (ID1 'D1-0003'): Age is not a plausible number of years\n"
        "  - c.xlsx row 7: duplicate row for patient 'D1-0001' side L (first on row 2); keep one "
        "row per patient and side"
    )


def test_parse_clinical_good_rows() -> None:
    frame = pd.DataFrame(
        {
            "ID1": [" D1-0087", "D1-0087"],
            "LeftRight": ["L", "r"],
            "Age": ["59", "59"],
            "number": ["2", "2"],
            "abnormality": ["calcification", "both"],
            "classification": ["Benign", "MALIGNANT"],
            "subtype": [None, "Luminal B"],
        }
    )
    rows = parse_clinical(frame)
    assert rows[("D1-0087", "L")].label == "benign"
    right = rows[("D1-0087", "R")]
    assert (right.label, right.subtype, right.age_band, right.abnormality) == (
        "malignant",
        "Luminal B",
        "50-59",
        "both",
    )


def test_clinical_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.csv"
    bad.write_text("ID1,LeftRight\nD1-0001,L\n")
    with pytest.raises(ClinicalTableError) as err:
        read_clinical(bad)
    assert str(err.value) == (
        f"{bad}: clinical table lacks columns ['Age', 'abnormality', 'classification']; found "
        "['ID1', 'LeftRight']; CMMD needs ['ID1', 'LeftRight', 'Age', 'abnormality', "
        "'classification'] (subtype optional)"
    )
    other = tmp_path / "c.json"
    other.write_text("{}")
    with pytest.raises(ClinicalTableError, match=r"unsupported clinical table suffix '.json'"):
        read_clinical(other)
    with pytest.raises(ClinicalTableError, match=r"clinical table not found"):
        read_clinical(tmp_path / "missing.xlsx")


def test_assign_image_ids() -> None:
    keys = [("D1-0001", "L", "CC"), ("D1-0001", "L", "CC"), ("D1-0001", "L", None)]
    assert assign_image_ids(keys) == ["D1-0001_L_CC", "D1-0001_L_CC_2", "D1-0001_L_UNK"]


# ------------------------------------------------------------------ ingestion


def test_ingest_sample_tree(sample: SampleResult, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, out, dataset="sample_cmmd")
    frame = result.frame
    assert list(frame.columns) == list(COLUMNS)
    assert result.bad == []
    assert len(frame) == 2 * len(sample.cmmd_labels)
    for row in frame.to_dict("records"):
        assert row["label"] == sample.cmmd_labels[(row["patient_id"], row["laterality"])]
        assert row["image_id"] == f"{row['patient_id']}_{row['laterality']}_{row['view']}"
        assert Path(row["raw_path"]).is_file() and str(row["raw_path"]).endswith(".dcm")
        assert row["bits"] in (12, 16)
        assert 0.0 < float(row["intensity_mean"]) < 1.0
    mixed = frame[frame["patient_id"] == "D1-0001"]
    assert dict(zip(mixed["laterality"], mixed["label"], strict=True)) == {
        "L": "benign",
        "R": "malignant",
    }
    assert set(frame["view"]) == {"CC", "MLO"} and set(frame["dataset"]) == {"sample_cmmd"}
    extras = [json.loads(e) for e in frame["extras"]]
    assert {k for e in extras for k in e} == {
        "abnormality",
        "subtype",
        "age_band",
        "photometric",
        "transfer_syntax",
        "voi",
    }
    assert {e["photometric"] for e in extras} == {"MONOCHROME1", "MONOCHROME2"}
    assert {e["voi"] for e in extras} == {"minmax", "window"}
    assert all(e["age_band"].endswith("9") for e in extras)
    counts = frame["label"].value_counts().to_dict()
    assert result.counts == {
        "benign": counts.get("benign", 0),
        "malignant": counts.get("malignant", 0),
    }


def test_phi_never_reaches_the_manifest(sample: SampleResult, tmp_path: Path) -> None:
    first = next((sample.cmmd_dir / "CMMD").rglob("*.dcm"))
    ds = pydicom.dcmread(first)
    assert str(ds.PatientName) == FAKE_PHI["PatientName"]  # the PHI really is in the files
    out = tmp_path / "o"
    result = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, out)
    blob = (out / "manifest.parquet").read_bytes() + (out / "quarantine.json").read_bytes()
    text = result.frame.to_json()
    ages = pd.read_excel(sample.clinical_path)["Age"].astype(str).tolist()
    for secret in [*FAKE_PHI.values(), "SAMPLE", "047Y"]:
        assert secret.encode() not in blob
        assert secret not in text
    for extras in result.frame["extras"]:
        assert all(str(v) not in ages for v in json.loads(extras).values())


def test_csv_export_gives_same_manifest(sample: SampleResult, tmp_path: Path) -> None:
    csv = tmp_path / "clinical.csv"
    pd.read_excel(sample.clinical_path, dtype=str).to_csv(csv, index=False)
    a = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, tmp_path / "a").frame
    b = ingest_cmmd(sample.cmmd_dir, csv, tmp_path / "b").frame
    pd.testing.assert_frame_equal(a, b)


def _extra_dicom(sample: SampleResult, patient: str, side: str, number: int) -> Path:
    data = mammogram_dicom(
        seed=99,
        image=np.linspace(0, 1, 48 * 40).reshape(48, 40),
        encoding=0,
        special=0,
        patient=patient,
        side=side,
        view="CC",
        number=number,
        study_uid=pydicom.uid.generate_uid(entropy_srcs=["s"]),
        series_uid=pydicom.uid.generate_uid(entropy_srcs=["r"]),
    )
    path = _series(sample, patient) / f"1-{number}.dcm"
    path.write_bytes(data)
    return path


def test_image_without_clinical_row(sample: SampleResult, prior: tuple[Path, bytes, bytes]) -> None:
    patient, side = _one_sided(sample)
    path = _series(sample, patient) / "1-1.dcm"
    ds = pydicom.dcmread(path)
    ds.PatientID = "D9-9999"  # a patient the clinical table does not know at all
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=sample.cmmd_dir, n=1) + (
        f"  - {path}: no clinical row for patient D9-9999 side {side} in "
        f"{sample.clinical_path}; add the row or remove the image"
    )
    _assert_untouched(prior)


def test_unlabelled_side_is_listed_not_dropped(sample: SampleResult, tmp_path: Path) -> None:
    patient, side = _one_sided(sample)
    other = "L" if side == "R" else "R"
    path = _extra_dicom(sample, patient, other, 7)
    result = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, tmp_path / "out")
    assert result.bad == []
    assert result.unlabelled == [
        (
            str(path),
            f"patient {patient} has a clinical row for the other side only; side {other} "
            f"has no label in {sample.clinical_path}",
        )
    ]
    assert str(path) not in set(result.frame["raw_path"])
    listed = json.loads((tmp_path / "out" / "unlabelled.json").read_text())
    assert listed["unlabelled"] == [{"path": str(path), "reason": result.unlabelled[0][1]}]


def test_dicom_without_pixel_data(sample: SampleResult, prior: tuple[Path, bytes, bytes]) -> None:
    patient, side = _one_sided(sample)
    path = _extra_dicom(sample, patient, side, 8)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=sample.cmmd_dir, n=1) + (
        f"  - {path}: no pixel data (transfer syntax 1.2.840.10008.1.2.1 (Explicit VR Little "
        "Endian)); the file holds only a header (e.g. a structured report or a header-only "
        "download): re-download it"
    )
    _assert_untouched(prior)


def test_undecodable_transfer_syntax(
    sample: SampleResult, prior: tuple[Path, bytes, bytes]
) -> None:
    patient, side = _one_sided(sample)
    path = _extra_dicom(sample, patient, side, 8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 garbage \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0])
    text = str(err.value)
    assert text.startswith(
        FAIL_HEAD.format(source=sample.cmmd_dir, n=1)
        + f"  - {path}: cannot decode the pixel data with transfer syntax 1.2.840.10008.1.2.4.80 "
        "(JPEG-LS Lossless Image Compression): "
    )
    assert text.endswith(
        "; hint: install pylibjpeg-libjpeg or pyjpegls (`uv add pylibjpeg pylibjpeg-libjpeg`)"
    )
    _assert_untouched(prior)


def test_duplicate_files_and_repeated_views(
    sample: SampleResult, prior: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    patient, side = _one_sided(sample)
    series = _series(sample, patient)
    copy = series / "1-9.dcm"
    shutil.copyfile(series / "1-1.dcm", copy)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0])
    both = [str(series / "1-1.dcm"), str(copy)]
    assert str(err.value) == FAIL_HEAD.format(source=sample.cmmd_dir, n=2) + (
        f"  - {both[0]}: duplicate image: identical bytes in {both}\n"
        f"  - {both[1]}: duplicate image: identical bytes in {both}"
    )
    _assert_untouched(prior)
    copy.unlink()
    extra = _extra_dicom(sample, patient, side, 9)  # a second CC of the same breast
    frame = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, tmp_path / "r").frame
    ids = frame.loc[frame["raw_path"] == str(extra), "image_id"].tolist()
    assert ids == [f"{patient}_{side}_CC_2"]


def test_quarantine(sample: SampleResult, tmp_path: Path) -> None:
    patient, side = _one_sided(sample)
    path = _extra_dicom(sample, patient, side, 7)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "q"
    result = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, out, on_bad_file="quarantine")
    assert len(result.frame) == 2 * len(sample.cmmd_labels)
    assert [p for p, _ in result.bad] == [str(path)]
    report = json.loads((out / "quarantine.json").read_text())
    assert report["bad"] == [{"path": str(path), "reason": result.bad[0][1]}]
    assert path.is_file()
    assert read_manifest(out).equals(result.frame)


def test_bad_sources(sample: SampleResult, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IngestError, match=r"no .dcm files found"):
        ingest_cmmd(empty, sample.clinical_path, tmp_path / "o")
    with pytest.raises(IngestError, match=r"not a folder"):
        ingest_cmmd(tmp_path / "nope", sample.clinical_path, tmp_path / "o")
    assert not (tmp_path / "o").exists()
