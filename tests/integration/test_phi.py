"""PHI scan: a hospital-shaped DICOM export through acquire → ingest → validate → convert → split
with ``ingest.pseudonymize: hmac``; no identifier of the export reaches any output or log.

The export carries medical-record-number PatientIDs, names, birth dates, accession numbers, the
institution and study dates in its headers, and the MRN, name, accession number and date in its
folder and file names, as PACS exports do. It has a flat-field QC image (quarantined) and a side
without a clinical row (unlabelled), so ``quarantine.json`` and ``unlabelled.json`` are not
empty. The hmac run goes on through train → evaluate → report, and the MLflow store (SQLite
and artifacts) is scanned with everything else.

``data/raw/<dataset>`` is the acquired copy of the export itself (hard links to the very
DICOMs, headers and all) and is the one place not scanned.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from mammoflow.cli import app
from mammoflow.data.sample import mammogram_dicom

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEY = "phi-scan-secret-key-5f0c2a9e"
PATIENTS = 12
INSTITUTION = "Saint Example General Hospital"
SECRETS = [
    "MRN0048",  # prefix of every PatientID
    "QUIMBY",  # surnames
    "HORTENSIA",  # given name
    "19640229",  # birth date
    "1964-02-29",
    "ACC7731",  # prefix of every accession number
    "Saint Example",
    "20190412",  # study date
    "2019-04-12",  # in folder names
    "04-12-2019",
    "Dr^Referrer",
    KEY,
]


def _mrn(i: int) -> str:
    return f"MRN0048{i:04d}"


def _image(rng: np.random.Generator, side: str) -> np.ndarray:
    rows, cols = np.mgrid[0:288, 0:256].astype(np.float64)
    x = cols / 256 if side == "L" else 1 - cols / 256
    breast = ((rows - 144) / 120) ** 2 + (x / 0.8) ** 2 < 1
    return np.clip(breast * (0.4 + 0.3 * rng.random((288, 256))), 0, 1)


def _write(path: Path, data: bytes, i: int, **tags: str) -> None:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName = f"QUIMBY{i:02d}^HORTENSIA"
    ds.PatientBirthDate = "19640229"
    ds.AccessionNumber = f"ACC7731{i:04d}"
    ds.InstitutionName = INSTITUTION
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20190412"
    ds.ReferringPhysicianName = "Dr^Referrer"
    ds.StudyDescription = f"MAMMO SCREENING {INSTITUTION}"
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _export(root: Path) -> tuple[Path, Path]:
    """A PACS-style export ``CMMD/<MRN_NAME>/<date_ACC>/<series>/<ACC>_N.dcm`` and its table."""
    rng = np.random.default_rng(7)
    tree = root / "CMMD"
    clinical = []
    for i in range(PATIENTS):
        patient = _mrn(i)
        study = f"2019-04-12_ACC7731{i:04d}" if i % 2 else f"04-12-2019-ACC7731{i:04d}"
        folder = tree / f"{patient}_QUIMBY{i:02d}" / study / "MG 20190412"
        label = "Malignant" if i % 2 else "Benign"
        labels = {"L": label, "R": label}
        if i == PATIENTS - 1:
            labels = {"L": "Benign"}  # the right side has no clinical row: unlabelled
        for side, label in labels.items():
            clinical.append((patient, side, 50 + i, label))
        number = 0
        for side in ("L", "R"):
            for view in ("CC", "MLO"):
                number += 1
                data = mammogram_dicom(
                    seed=i,
                    image=_image(rng, side),
                    encoding=number % 4,
                    special=0,
                    patient=patient,
                    side=side,
                    view=view,
                    number=number,
                    study_uid=generate_uid(entropy_srcs=[patient, "study"]),
                    series_uid=generate_uid(entropy_srcs=[patient, "series"]),
                )
                _write(folder / f"ACC7731{i:04d}_{number}.dcm", data, i)
        if i == 0:  # a flat-field QC exposure filed with the patient's study
            data = mammogram_dicom(
                seed=99,
                image=np.full((288, 256), 0.5) + 0.01 * rng.random((288, 256)),
                encoding=0,
                special=0,
                patient=patient,
                side="L",
                view="CC",
                number=9,
                study_uid=generate_uid(entropy_srcs=[patient, "study"]),
                series_uid=generate_uid(entropy_srcs=[patient, "qc"]),
            )
            _write(folder / "ACC77310000_QC.dcm", data, i, ViewPosition="FLATFIELD")
    table = root / "clinical.csv"
    pd.DataFrame(
        [
            {
                "ID1": p,
                "LeftRight": s,
                "Age": a,
                "number": 1,
                "abnormality": "mass",
                "classification": c,
            }
            for p, s, a, c in clinical
        ]
    ).to_csv(table, index=False)
    return tree, table


def _leaks(text: str) -> list[str]:
    lower = text.lower()
    return [s for s in SECRETS if s in text or s.lower() in lower]


def _pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> tuple[Path, list[str]]:
    """Acquire → ingest → validate → convert → split of the export through the CLI (as DVC runs
    them); the project folder and every command's output."""
    tree, table = _export(tmp_path / "export")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["pipeline"]["datasets"] = ["hospital"]
    raw["datasets"]["hospital"] = {
        "kind": "cmmd",
        "acquire": "local",
        "source": str(tree),
        "clinical": str(table),
    }
    raw["ingest"].update({"on_bad_file": "fail", "pseudonymize": mode})
    raw["convert"].update({"size": 64, "workers": 1})
    raw["split"].update({"k_folds": 3, "test_size": 0.2})
    # tiny training for the hmac run's train → evaluate → report (the MLflow store is scanned)
    raw["model"].update({"backbones": ["vgg16"], "weights": "none", "input_size": 32})
    raw["train"].update({"epochs": 1, "batch_size": 8})
    raw["evaluate"]["bootstrap"] = 20
    project = tmp_path / "project"
    project.mkdir()
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(project)
    monkeypatch.delenv("MAMMOFLOW_PSEUDONYM_KEY", raising=False)
    runner = CliRunner()
    outputs: list[str] = []

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args))
        outputs.append(result.output)
        assert result.exit_code == code, result.output
        return result.output if code else result.stdout  # an error's message; else the result

    run("acquire", "hospital")
    if mode == "hmac":  # without the key: a clear error, nothing written
        assert "MAMMOFLOW_PSEUDONYM_KEY is not set" in run("ingest", "dataset", "hospital", code=2)
        assert not (project / "data/interim/hospital").exists()
        monkeypatch.setenv("MAMMOFLOW_PSEUDONYM_KEY", KEY)
    # on_bad_file: fail lists the QC image with the params spelling of the hint
    refused = " ".join(run("ingest", "dataset", "hospital", code=2).split())
    assert "quality-control or calibration image (ViewPosition 'FLATFIELD')" in refused
    assert "set ingest.on_bad_file: quarantine in params.yaml" in refused
    params.write_text(params.read_text().replace("on_bad_file: fail", "on_bad_file: quarantine"))
    ingested = json.loads(run("ingest", "dataset", "hospital", "--json"))
    assert ingested["bad_files"] == 1 and ingested["images"] == 4 * PATIENTS - 2
    assert ingested["patients"] == PATIENTS
    for stage in ("validate", "convert", "split"):
        run(stage, "hospital")
    interim = project / "data/interim/hospital"
    assert len(json.loads((interim / "quarantine.json").read_text())["bad"]) == 1
    assert len(json.loads((interim / "unlabelled.json").read_text())["unlabelled"]) == 2
    frame = pd.read_parquet(project / "data/processed/hospital/manifest.parquet")
    assert len(pd.read_parquet(project / "data/splits/hospital.parquet")) == len(frame)
    return project, outputs


def _scan(project: Path, texts: list[str]) -> tuple[dict[str, list[str]], int]:
    """Secrets found per file (names and contents) and output; files scanned."""
    scanned = 0
    leaks: dict[str, list[str]] = {}
    for path in sorted(project.rglob("*")):
        rel = path.relative_to(project)
        if rel.parts[:3] == ("data", "raw", "hospital") or rel.name == "params.yaml":
            continue
        found = _leaks(str(rel))
        if path.is_file():
            scanned += 1
            if path.suffix == ".parquet":
                found += _leaks(pd.read_parquet(path).to_json())
            found += _leaks(path.read_bytes().decode("latin-1"))
        if found:
            leaks[str(rel)] = sorted(set(found))
    for i, text in enumerate(texts):
        if _leaks(text):
            leaks[f"output {i}"] = _leaks(text)
    return leaks, scanned


@pytest.mark.slow
def test_no_phi_anywhere_after_the_whole_pipeline_with_hmac(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """… → split → train → evaluate → report: data/, models/, metrics/, plots/, reports/,
    dvc-free run stores (mlflow.db and mlartifacts/, params, tags, metric names, artifacts)."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, outputs = _pipeline(tmp_path, monkeypatch, "hmac")
    runner = CliRunner()
    for args in (
        ["train", "--dataset", "hospital", "--backbone", "vgg16"],
        ["evaluate", "--dataset", "hospital"],
        ["report", "--dataset", "hospital"],
    ):
        result = runner.invoke(app, args)
        outputs.append(result.output)
        assert result.exit_code == 0, result.output
    for folder in ("mlflow.db", "mlartifacts", "models", "metrics", "plots", "reports"):
        assert (project / folder).exists(), folder
    frame = pd.read_parquet(project / "data/processed/hospital/manifest.parquet")
    assert frame["patient_id"].str.fullmatch(r"p[0-9a-f]{16}").all()
    leaks, scanned = _scan(project, [*outputs, caplog.text])
    assert leaks == {}
    assert scanned > 4 * PATIENTS  # manifests, reports, data docs, PNGs, splits
    # the acquired raw copy is the export itself: its DICOM headers still hold the PHI
    raw_copy = project / "data/raw/hospital"
    assert any(b"QUIMBY" in p.read_bytes() for p in raw_copy.rglob("*.dcm"))


def test_the_scan_finds_what_none_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: with ``pseudonymize: none`` the MRNs (IDs, folder names) and the accession
    numbers in file names do reach the outputs; header-only PHI and dates still never do."""
    project, outputs = _pipeline(tmp_path, monkeypatch, "none")
    leaks, _ = _scan(project, outputs)
    found = {secret for secrets in leaks.values() for secret in secrets}
    assert found == {"MRN0048", "QUIMBY", "ACC7731"}
    assert "data/interim/hospital/manifest.parquet" in leaks
