"""Ingestion against the real data in ../shared/data (read by path, never copied).

MIAS: the complete mini-MIAS archive. CMMD: the real clinical spreadsheet, joined with a
CMMD-shaped DICOM tree built with pydicom from real labels and real folder names
(metadata.csv), for a subset of patients.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid

from mammoflow.data.cmmd import dicom_files, ingest_cmmd, read_clinical
from mammoflow.data.mias import ingest_mias
from mammoflow.data.pseudonym import Pseudonymizer, is_date_shaped, locate_raw
from mammoflow.data.sample import mammogram_dicom

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MIAS_ARCHIVE = DATA / "mias" / "all-mias.tar.gz"
CMMD_SHEET = DATA / "cmmd" / "CMMD_clinicaldata_revision.xlsx"
CMMD_METADATA = DATA / "cmmd" / "metadata.csv"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mias(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    if not MIAS_ARCHIVE.is_file():
        pytest.skip(f"real MIAS archive not found at {MIAS_ARCHIVE} (../shared/data/mias)")
    out = tmp_path_factory.mktemp("mias")
    result = ingest_mias(MIAS_ARCHIVE, out, dataset="mias")
    assert result.bad == []
    return out, result.frame


def test_mias_counts(mias: tuple[Path, pd.DataFrame]) -> None:
    out, frame = mias
    assert len(frame) == 322
    assert frame["patient_id"].nunique() == 161
    assert frame["label"].value_counts().to_dict() == {"normal": 207, "benign": 63, "malignant": 52}
    assert set(frame["width"]) == {1024} and set(frame["height"]) == {1024}
    assert set(frame["bits"]) == {8} and set(frame["view"]) == {"MLO"}
    assert (frame["laterality"] == "R").sum() == 161
    assert sorted(p.name for p in (out / "raw").iterdir() if not p.name.endswith(".pgm")) == [
        "Info.txt",
        "Licence.txt",
        "README",
    ]
    assert json.loads((out / "quarantine.json").read_text())["bad"] == []


def test_mias_special_images(mias: tuple[Path, pd.DataFrame]) -> None:
    _, frame = mias
    rows = {str(r["image_id"]): r for r in frame.to_dict("records")}
    assert rows["mdb212"]["label"] == "benign" and rows["mdb214"]["label"] == "benign"
    assert rows["mdb144"]["label"] == "malignant"
    lesions = json.loads(rows["mdb144"]["extras"])["lesions"]
    assert [(lesion["severity"], lesion["x"], lesion["y"]) for lesion in lesions] == [
        ("B", 233, 994),
        ("M", 313, 540),
    ]
    assert rows["mdb001"]["patient_id"] == rows["mdb002"]["patient_id"] == "mias-P001"
    assert (rows["mdb001"]["laterality"], rows["mdb002"]["laterality"]) == ("R", "L")
    for image_id in ("mdb059", "mdb216", "mdb233", "mdb245"):
        assert json.loads(rows[image_id]["extras"])["lesions"][0]["x"] is None
    multi = {i for i, r in rows.items() if len(json.loads(r["extras"])["lesions"]) > 1}
    assert multi == {"mdb005", "mdb132", "mdb144", "mdb223", "mdb226", "mdb239", "mdb249"}


@pytest.fixture(scope="module")
def clinical() -> pd.DataFrame:
    if not CMMD_SHEET.is_file() or not CMMD_METADATA.is_file():
        pytest.skip(f"real CMMD labels not found under {DATA / 'cmmd'}")
    return pd.read_excel(CMMD_SHEET, dtype={"ID1": str})


def test_cmmd_sheet(clinical: pd.DataFrame) -> None:
    rows = read_clinical(CMMD_SHEET)
    assert len(rows) == 1872
    assert len({p for p, _ in rows}) == 1775
    labels = [r.label for r in rows.values()]
    assert labels.count("malignant") == 1316 and labels.count("benign") == 556
    per_patient: dict[str, set[str]] = {}
    for (patient, _), row in rows.items():
        per_patient.setdefault(patient, set()).add(row.label)
    assert sum(len(v) == 2 for v in per_patient.values()) == 30
    assert sum(p.startswith("D1-") for p, _ in rows) == 1107


def _subset(clinical: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """Real series of: one-sided 2-image patients, 4-image one-row patients, mixed patients."""
    rows = clinical.groupby("ID1").size()
    mixed = clinical.groupby("ID1")["classification"].nunique()
    meta = metadata.assign(rows=metadata["Subject ID"].map(rows))
    pick = pd.concat(
        [
            meta[(meta["Number of Images"] == 2) & meta["Subject ID"].str.startswith("D1")].head(2),
            meta[(meta["Number of Images"] == 2) & meta["Subject ID"].str.startswith("D2")].head(2),
            meta[(meta["Number of Images"] == 4) & (meta["rows"] == 1)].head(3),
            meta[meta["Subject ID"].isin(mixed[mixed > 1].index)].head(3),
        ]
    )
    return pick.reset_index(drop=True)


def test_cmmd_tree_from_real_labels(clinical: pd.DataFrame, tmp_path: Path) -> None:
    metadata = pd.read_csv(CMMD_METADATA)
    subset = _subset(clinical, metadata)
    sides_of = clinical.groupby("ID1")["LeftRight"].apply(sorted).to_dict()
    root = tmp_path / "download"
    unlabelled: set[Path] = set()
    rng = np.random.default_rng(0)
    for series in subset.to_dict("records"):
        patient = str(series["Subject ID"])
        location = str(series["File Location"])
        count = int(series["Number of Images"])
        folder = root.joinpath(*PureWindowsPath(location).parts[1:])  # drop the leading "."
        sides = ["L", "L", "R", "R"] if count == 4 else [sides_of[patient][0]] * 2
        for number, side in enumerate(sides, start=1):
            view = "CC" if number % 2 else "MLO"
            path = folder / f"1-{number}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(
                mammogram_dicom(
                    seed=1,
                    image=np.clip(rng.uniform(0.2, 0.8, (32, 24)), 0, 1),
                    encoding=number % 4,
                    special=0,
                    patient=patient,
                    side=side,
                    view=view,
                    number=number,
                    study_uid=generate_uid(entropy_srcs=[patient, "study"]),
                    series_uid=generate_uid(entropy_srcs=[patient, "series"]),
                )
            )
            if side not in sides_of[patient]:
                unlabelled.add(path)
    assert any(folder.name.startswith("1.000000-NA-") for folder in root.rglob("1.000000-NA-*"))
    assert len(unlabelled) == 6  # the real CMMD often images both breasts but labels one
    # a side without a clinical row (the other side has one) is listed, not a bad file
    result = ingest_cmmd(root, CMMD_SHEET, tmp_path / "out", min_size=16)  # 32 x 24 images
    assert result.bad == []
    on_disk = locate_raw(dicom_files(root), root, Pseudonymizer())
    assert {on_disk[p] for p, _ in result.unlabelled} == unlabelled
    assert all("for the other side only" in reason for _, reason in result.unlabelled)
    listed = json.loads((tmp_path / "out" / "unlabelled.json").read_text())["unlabelled"]
    assert {on_disk[item["path"]] for item in listed} == unlabelled
    # raw paths are relative to the download folder, TCIA's dated study folders replaced
    for stored in [*result.frame["raw_path"], *(item["path"] for item in listed)]:
        assert not stored.startswith("/") and on_disk[stored].is_file()
        assert not any(is_date_shaped(part) for part in stored.split("/")), stored
    truth = {
        (str(r["ID1"]), str(r["LeftRight"])): str(r["classification"]).lower()
        for r in clinical.to_dict("records")
    }
    frame = result.frame
    assert len(frame) == int(subset["Number of Images"].sum()) - 6
    for row in frame.to_dict("records"):
        assert row["label"] == truth[(row["patient_id"], row["laterality"])]
    mixed = frame.groupby("patient_id")["label"].nunique()
    assert (mixed == 2).sum() == 3
    assert frame["patient_id"].str.startswith("D2").any()
