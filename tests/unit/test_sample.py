"""The synthetic sample: determinism, real formats, label mix, and clean ingestion."""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from mammoflow.data.cmmd import ingest_cmmd
from mammoflow.data.mias import ingest_mias, parse_info_lenient
from mammoflow.data.pgm import read_pgm
from mammoflow.data.sample import (
    CLINICAL_COLUMNS,
    FAKE_PHI,
    MAMMO_FOR_PRESENTATION,
    image_shape,
    make_sample,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_sample(tmp_path / "a", seed=5, mias_patients=3, cmmd_patients=4, size=64)
    b = make_sample(tmp_path / "b", seed=5, mias_patients=3, cmmd_patients=4, size=64)
    c = make_sample(tmp_path / "c", seed=6, mias_patients=3, cmmd_patients=4, size=64)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert [p.relative_to(tmp_path / "a") for p in a.files] == [
        p.relative_to(tmp_path / "b") for p in b.files
    ]
    assert set(_digest(tmp_path / "a")) == {str(p.relative_to(tmp_path / "a")) for p in a.files}
    assert c.mias_dir == tmp_path / "c" / "mias"


def test_default_size_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_sample(tmp_path, seed=20240601, mias_patients=20, cmmd_patients=12, size=256)
    assert time.perf_counter() - start < 5.0


def test_mias_layout_and_info(tmp_path: Path) -> None:
    result = make_sample(tmp_path, seed=3, mias_patients=10, cmmd_patients=4, size=64)
    pgms = sorted(result.mias_dir.glob("*.pgm"))
    assert [p.name for p in pgms] == [f"mdb{i:03d}.pgm" for i in range(1, 21)]
    image = read_pgm(pgms[0])
    assert (image.width, image.height, image.maxval) == (64, 64, 255)
    assert pgms[0].read_bytes()[:2] == b"P5"
    raw = (result.mias_dir / "Info.txt").read_bytes()
    assert b"\r\n" in raw
    text = raw.decode("latin-1")
    assert text.index("MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY") < text.index("mdb001")
    prose = text[: text.index("mdb001")].splitlines()
    assert len(prose) > 12
    images, problems = parse_info_lenient(text)
    assert problems == []
    assert {k: v.label for k, v in images.items()} == result.mias_labels
    shares = Counter(result.mias_labels.values())
    assert shares == {"normal": 8, "benign": 6, "malignant": 6}
    assert any(len(v.lesions) == 2 and v.label == "benign" for v in images.values())
    mixed = [v for v in images.values() if {lesion.severity for lesion in v.lesions} == {"B", "M"}]
    assert mixed and mixed[0].label == "malignant"
    assert any(lesion.x is None for v in images.values() for lesion in v.lesions)
    rows = [line for line in text.splitlines() if line.startswith("mdb")]
    assert any(line.endswith("NORM ") for line in rows)  # trailing space, as in the real file


def test_mias_lesion_coordinates_point_at_the_lesion(tmp_path: Path) -> None:
    result = make_sample(tmp_path, seed=4, mias_patients=6, cmmd_patients=4, size=128)
    images, problems = parse_info_lenient(
        (result.mias_dir / "Info.txt").read_text(encoding="latin-1")
    )
    assert problems == []
    for image_id, info in images.items():
        pixels = read_pgm(result.mias_dir / f"{image_id}.pgm").pixels.astype(float)
        for lesion in info.lesions:
            if lesion.x is None or lesion.y is None:
                continue
            row = 127 - lesion.y  # origin bottom-left
            patch = pixels[max(row - 2, 0) : row + 3, max(lesion.x - 2, 0) : lesion.x + 3]
            breast = pixels[pixels > 40]
            assert patch.mean() > np.median(breast), image_id


def test_cmmd_tree_tags_and_clinical(tmp_path: Path) -> None:
    result = make_sample(tmp_path, seed=8, mias_patients=2, cmmd_patients=6, size=64)
    files = sorted((result.cmmd_dir / "CMMD").rglob("*"))
    dcms = [p for p in files if p.is_file()]
    pattern = re.compile(
        r"^CMMD/D1-\d{4}/\d{2}-\d{2}-\d{4}-NA-NA-\d{5}/1\.000000-NA-\d{5}/1-\d+\.dcm$"
    )
    for path in dcms:
        assert pattern.match(str(path.relative_to(result.cmmd_dir))), path
    datasets = [pydicom.dcmread(p) for p in dcms]
    assert {str(d.SOPClassUID) for d in datasets} == {MAMMO_FOR_PRESENTATION}
    assert {d.Modality for d in datasets} == {"MG"}
    assert all(
        d.PatientID == p.relative_to(result.cmmd_dir).parts[1]
        for d, p in zip(datasets, dcms, strict=True)
    )
    assert {d.PhotometricInterpretation for d in datasets} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(d.BitsStored) for d in datasets} == {12, 16}
    assert any("WindowCenter" in d for d in datasets)
    assert any("RescaleSlope" in d for d in datasets)
    assert any("ImageLaterality" not in d and "Laterality" in d for d in datasets)
    assert any("ViewPosition" not in d and "ViewCodeSequence" in d for d in datasets)
    for key, value in FAKE_PHI.items():
        assert all(str(d.get(key)) == value for d in datasets)
    assert {str(d.ViewPosition) for d in datasets if "ViewPosition" in d} == {"CC", "MLO"}
    clinical = pd.read_excel(result.clinical_path)
    assert tuple(clinical.columns) == CLINICAL_COLUMNS
    labels = {
        (str(r["ID1"]), str(r["LeftRight"])): str(r["classification"]).lower()
        for r in clinical.to_dict("records")
    }
    assert labels == result.cmmd_labels
    both = clinical.groupby("ID1")["classification"].nunique()
    assert (both > 1).any()
    assert clinical.loc[clinical["classification"] == "Benign", "subtype"].isna().all()
    assert len(dcms) == 2 * len(clinical)


def test_sample_ingests_cleanly(tmp_path: Path) -> None:
    result = make_sample(tmp_path / "s", seed=20240601, mias_patients=6, cmmd_patients=4, size=64)
    mias = ingest_mias(result.mias_dir, tmp_path / "m", dataset="sample_mias")
    small = min(image_shape("cmmd", 64))  # the pipeline checks the sample against its own size
    cmmd = ingest_cmmd(
        result.cmmd_dir, result.clinical_path, tmp_path / "c", dataset="sample_cmmd", min_size=small
    )
    assert mias.bad == [] and cmmd.bad == []
    assert mias.counts == dict(Counter(result.mias_labels.values())) | {
        k: 0 for k in ("normal", "benign", "malignant") if k not in result.mias_labels.values()
    }
    assert len(mias.frame) == 12 and mias.frame["patient_id"].nunique() == 6
    assert len(cmmd.frame) == 2 * len(result.cmmd_labels)
    assert set(cmmd.counts) == {"benign", "malignant"} and min(cmmd.counts.values()) > 0


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"at least 2 MIAS and 2 CMMD patients"):
        make_sample(tmp_path, seed=1, mias_patients=1, cmmd_patients=4, size=64)
    with pytest.raises(ValueError, match=r"sample image size 8 must be between 32 and 4096"):
        make_sample(tmp_path, seed=1, mias_patients=2, cmmd_patients=4, size=8)
