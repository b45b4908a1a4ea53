"""CMMD: clinical table, DICOM tree walk, per-side labels, bad files, no PHI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from mammoflow.data import cmmd
from mammoflow.data.cmmd import (
    ClinicalTableError,
    age_band,
    assign_image_ids,
    dicom_files,
    parse_clinical,
    read_clinical,
)
from mammoflow.data.manifest import COLUMNS, read_manifest
from mammoflow.data.pseudonym import Pseudonymizer, locate_raw
from mammoflow.data.quarantine import IngestError, IngestResult
from mammoflow.data.sample import FAKE_PHI, SampleResult, make_sample, mammogram_dicom

FAIL_HEAD = (
    "CMMD ingest of {source} found {n} bad file(s); nothing was written. Fix or remove them, "
    "or rerun with on_bad_file='quarantine' to ingest the rest:\n"
)


def ingest_cmmd(*args: Any, **kwargs: Any) -> IngestResult:
    """The ingestion under test, with a minimum size the 48-px sample here passes."""
    kwargs.setdefault("min_size", 32)
    return cmmd.ingest_cmmd(*args, **kwargs)


def _stored(sample: SampleResult, path: Path) -> str:
    """The manifest's (and messages') raw_path of a file of the sample tree."""
    return Pseudonymizer().raw_paths(dicom_files(sample.cmmd_dir), sample.cmmd_dir)[path]


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
    on_disk = locate_raw(dicom_files(sample.cmmd_dir), sample.cmmd_dir, Pseudonymizer())
    for row in frame.to_dict("records"):
        assert row["label"] == sample.cmmd_labels[(row["patient_id"], row["laterality"])]
        assert row["image_id"] == f"{row['patient_id']}_{row['laterality']}_{row['view']}"
        assert on_disk[row["raw_path"]].is_file() and str(row["raw_path"]).endswith(".dcm")
        # relative to the source root; TCIA's date-bearing study folder is replaced
        assert re.fullmatch(r"CMMD/D1-\d{4}/dated-1/1\.000000-NA-\d{5}/1-\d\.dcm", row["raw_path"])
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
        "image_type",
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
        f"  - {_stored(sample, path)}: no clinical row for patient D9-9999 side {side} in "
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
            _stored(sample, path),
            f"patient {patient} has a clinical row for the other side only; side {other} "
            f"has no label in {sample.clinical_path}",
        )
    ]
    assert _stored(sample, path) not in set(result.frame["raw_path"])
    listed = json.loads((tmp_path / "out" / "unlabelled.json").read_text())
    assert listed["unlabelled"] == [
        {"path": _stored(sample, path), "reason": result.unlabelled[0][1]}
    ]


def test_dicom_without_pixel_data(sample: SampleResult, prior: tuple[Path, bytes, bytes]) -> None:
    patient, side = _one_sided(sample)
    path = _extra_dicom(sample, patient, side, 8)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=sample.cmmd_dir, n=1) + (
        f"  - {_stored(sample, path)}: not an image (SOP class 1.2.840.10008.5.1.4.1.1.1.2 "
        "(Digital Mammography X-Ray Image Storage - For Presentation), Modality MG, no Pixel "
        "Data): remove it from the source"
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
        + f"  - {_stored(sample, path)}: cannot decode the pixel data with transfer syntax 1.2.840.10008.1.2.4.80 "
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
    both = [_stored(sample, series / "1-1.dcm"), _stored(sample, copy)]
    assert str(err.value) == FAIL_HEAD.format(source=sample.cmmd_dir, n=2) + (
        f"  - {both[0]}: duplicate image: identical bytes in {both}\n"
        f"  - {both[1]}: duplicate image: identical bytes in {both}"
    )
    _assert_untouched(prior)
    copy.unlink()
    extra = _extra_dicom(sample, patient, side, 9)  # a second CC of the same breast
    frame = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, tmp_path / "r").frame
    ids = frame.loc[frame["raw_path"] == _stored(sample, extra), "image_id"].tolist()
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
    assert [p for p, _ in result.bad] == [_stored(sample, path)]
    report = json.loads((out / "quarantine.json").read_text())
    assert report["bad"] == [{"path": _stored(sample, path), "reason": result.bad[0][1]}]
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


# ------------------------------------------------------------------ acceptance rules, exit codes


def _variant(sample: SampleResult, patient: str, side: str, number: int, **tags: Any) -> Path:
    """An extra DICOM of ``patient``'s breast with header ``tags`` set (``None`` deletes)."""
    path = _extra_dicom(sample, patient, side, number)
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _refused(sample: SampleResult) -> dict[Path, str]:
    """One file per acceptance rule, each with the start of its reason."""
    patient, side = _one_sided(sample)
    tiny = _series(sample, patient) / "1-15.dcm"
    tiny.write_bytes(
        mammogram_dicom(
            seed=3,
            image=np.array([[0.2, 0.8]]),  # 1 x 2 pixels
            encoding=0,
            special=0,
            patient=patient,
            side=side,
            view="CC",
            number=15,
            study_uid=pydicom.uid.generate_uid(entropy_srcs=["t"]),
            series_uid=pydicom.uid.generate_uid(entropy_srcs=["u"]),
        )
    )
    return {
        _variant(
            sample, patient, side, 11, SOPClassUID="1.2.840.10008.5.1.4.1.1.88.67", Modality="SR"
        ): "not an image (SOP class 1.2.840.10008.5.1.4.1.1.88.67 (X-Ray Radiation Dose SR "
        "Storage), Modality SR): remove it from the source",
        _variant(
            sample,
            patient,
            side,
            12,
            ViewPosition="FLATFIELD",
            SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
        ): "quality-control or calibration image (ViewPosition 'FLATFIELD')",
        _variant(
            sample, patient, side, 13, PresentationIntentType="FOR PROCESSING"
        ): "FOR PROCESSING image (PresentationIntentType 'FOR PROCESSING')",
        _variant(sample, patient, side, 14, PixelData=None): "not an image (",
        tiny: "image is 2x1 pixels, its short side below the minimum of 32",
    }


def test_every_refused_file_is_listed_with_its_own_reason(
    sample: SampleResult, prior: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    refused = _refused(sample)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0])
    text = str(err.value)
    assert text.startswith(FAIL_HEAD.format(source=sample.cmmd_dir, n=len(refused)))
    for path, reason in refused.items():
        assert f"  - {_stored(sample, path)}: {reason}" in text
    assert "re-download" not in text
    _assert_untouched(prior)
    out = tmp_path / "q"
    result = ingest_cmmd(sample.cmmd_dir, sample.clinical_path, out, on_bad_file="quarantine")
    assert len(result.frame) == 2 * len(sample.cmmd_labels)
    assert {p for p, _ in result.bad} == {_stored(sample, p) for p in refused}
    accepting = ingest_cmmd(
        sample.cmmd_dir,
        sample.clinical_path,
        tmp_path / "a",
        on_bad_file="quarantine",
        accept_for_processing=True,
    )
    assert len(accepting.bad) == len(refused) - 1
    assert len(accepting.frame) == len(result.frame) + 1


def test_hints_use_the_spelling_of_the_interface(
    sample: SampleResult, prior: tuple[Path, bytes, bytes]
) -> None:
    _refused(sample)
    expected = {
        "python": ("on_bad_file='quarantine'", "pass accept_for_processing=True"),
        "cli": ("--on-bad-file quarantine", "pass --accept-for-processing"),
        "params": (
            "set ingest.on_bad_file: quarantine in params.yaml",
            "set ingest.accept_for_processing: true in params.yaml",
        ),
    }
    for interface, (quarantine, processing) in expected.items():
        with pytest.raises(IngestError) as err:
            ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0], interface=interface)
        assert quarantine in str(err.value) and processing in str(err.value), interface
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0], interface="cli")
    assert "on_bad_file=" not in str(err.value) and "ingest.on_bad_file" not in str(err.value)


def test_quarantine_of_every_file_is_an_error(
    sample: SampleResult, prior: tuple[Path, bytes, bytes]
) -> None:
    files = dicom_files(sample.cmmd_dir)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ViewPosition = "FLATFIELD"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, prior[0], on_bad_file="quarantine")
    text = str(err.value)
    assert text.startswith(
        f"CMMD ingest of {sample.cmmd_dir}: 0 images ingested, {len(files)} quarantined; "
        "nothing was written."
    )
    assert text.count("quality-control or calibration image") == len(files)
    _assert_untouched(prior)


def test_the_default_sample_passes_the_pipeline_min_size(tmp_path: Path) -> None:
    """The embedded sample (sample.size 256: CMMD images 256 x 214) is never refused."""
    from mammoflow.config import load_config
    from mammoflow.data.raw import min_size

    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml")
    assert cfg.ingest.min_size == 256 and cfg.sample.size == 256
    assert min_size(cfg, "sample_cmmd") == 214 and min_size(cfg, "cmmd") == 256
    assert min_size(cfg, "sample_mias") == 256
    small = make_sample(tmp_path / "s", seed=1, mias_patients=2, cmmd_patients=2, size=256)
    result = cmmd.ingest_cmmd(
        small.cmmd_dir, small.clinical_path, tmp_path / "o", min_size=min_size(cfg, "sample_cmmd")
    )
    assert result.bad == [] and set(result.frame["width"]) == {214}
    with pytest.raises(IngestError, match="image is 214x256 pixels"):
        cmmd.ingest_cmmd(small.cmmd_dir, small.clinical_path, tmp_path / "o")


# ------------------------------------------------------------------ pseudonymisation

KEY = {"MAMMOFLOW_PSEUDONYM_KEY": "test-key-0123456789abcdef"}


def test_hmac_pseudonymises_ids_paths_and_messages(sample: SampleResult, tmp_path: Path) -> None:
    from mammoflow.data.pseudonym import pseudonymizer

    patient, side = _one_sided(sample)
    bad_path = _variant(sample, patient, side, 11, PatientID="D9-9999")
    pz = pseudonymizer("hmac", KEY)
    out = tmp_path / "h"
    result = ingest_cmmd(
        sample.cmmd_dir, sample.clinical_path, out, on_bad_file="quarantine", pseudonymizer=pz
    )
    frame = result.frame
    assert len(frame) == 2 * len(sample.cmmd_labels)
    assert all(re.fullmatch(r"p[0-9a-f]{16}", p) for p in frame["patient_id"])
    assert frame["patient_id"].nunique() == len({p for p, _ in sample.cmmd_labels})
    for row in frame.to_dict("records"):
        assert row["image_id"].startswith(f"{row['patient_id']}_{row['laterality']}_")
        assert re.fullmatch(r"(h[0-9a-f]{12}/){4}h[0-9a-f]{12}\.dcm", row["raw_path"])
    # the labels still join per side: D1-0001 is benign left, malignant right
    mixed = frame[frame["patient_id"] == pz.patient("D1-0001")]
    assert dict(zip(mixed["laterality"], mixed["label"], strict=True)) == {
        "L": "benign",
        "R": "malignant",
    }
    ((stored, reason),) = result.bad
    assert stored == pz.raw_paths([bad_path], sample.cmmd_dir)[bad_path]
    assert reason.startswith(f"no clinical row for patient {pz.patient('D9-9999')} side {side}")
    written = b"".join(p.read_bytes() for p in out.iterdir())
    for original in ["D1-00", "D9-9999", "dated", "07-18-2010", "1.000000-NA"]:
        assert original.encode() not in written, original
        assert original not in frame.to_json()
    assert KEY["MAMMOFLOW_PSEUDONYM_KEY"] not in repr(pz) and b"test-key" not in written
    # same key → same IDs and paths; another key → others
    again = ingest_cmmd(
        sample.cmmd_dir,
        sample.clinical_path,
        tmp_path / "h2",
        on_bad_file="quarantine",
        pseudonymizer=pseudonymizer("hmac", KEY),
    )
    pd.testing.assert_frame_equal(again.frame, frame)
    other = pseudonymizer("hmac", {"MAMMOFLOW_PSEUDONYM_KEY": "another-key-9876543210"})
    assert other.patient("D1-0001") != pz.patient("D1-0001")
    # the raw paths lead back to the files with the same key
    on_disk = locate_raw(dicom_files(sample.cmmd_dir), sample.cmmd_dir, pz)
    assert all(on_disk[p].is_file() for p in frame["raw_path"])


def test_hmac_without_a_key_is_a_clear_error() -> None:
    from mammoflow.data.pseudonym import PseudonymKeyError, pseudonymizer

    with pytest.raises(PseudonymKeyError, match=r"'hmac' but MAMMOFLOW_PSEUDONYM_KEY is not set"):
        pseudonymizer("hmac", {})
    with pytest.raises(PseudonymKeyError, match=r"has 5 characters; use at least 16"):
        pseudonymizer("hmac", {"MAMMOFLOW_PSEUDONYM_KEY": "short"})
    with pytest.raises(ValueError, match=r"pseudonymize must be 'none' or 'hmac', got 'md5'"):
        pseudonymizer("md5", {})


def test_clinical_errors_quote_pseudonyms() -> None:
    from mammoflow.data.pseudonym import pseudonymizer

    pz = pseudonymizer("hmac", KEY)
    frame = pd.DataFrame(
        {
            "ID1": ["MRN12345678"],
            "LeftRight": ["X"],
            "Age": ["50"],
            "abnormality": ["mass"],
            "classification": ["Benign"],
        }
    )
    with pytest.raises(ClinicalTableError) as err:
        parse_clinical(frame, "c.csv", pz)
    assert "MRN12345678" not in str(err.value)
    assert f"(ID1 {pz.patient('MRN12345678')!r})" in str(err.value)


def test_burned_in_annotation_is_refused_naming_the_file_and_the_key(
    sample: SampleResult, tmp_path: Path
) -> None:
    path = dicom_files(sample.cmmd_dir)[0]
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path, enforce_file_format=True)
    stored = _stored(sample, path)
    with pytest.raises(IngestError) as err:
        ingest_cmmd(sample.cmmd_dir, sample.clinical_path, tmp_path / "o", interface="params")
    text = str(err.value)
    assert f"  - {stored}: BurnedInAnnotation YES: text burnt into the pixels" in text
    assert "set ingest.accept_burned_in: true in params.yaml" in text
    accepted = ingest_cmmd(
        sample.cmmd_dir, sample.clinical_path, tmp_path / "a", accept_burned_in=True
    )
    assert accepted.bad == [] and stored in set(accepted.frame["raw_path"])
