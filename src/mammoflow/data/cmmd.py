"""CMMD: walk a TCIA download tree, join the clinical table, build manifest rows.

The tree is ``CMMD/<patient>/<study>/<series>/1-N.dcm`` as the NBIA Data Retriever writes it;
every ``.dcm`` under ``source`` is read. Laterality comes from ImageLaterality (else
Laterality), the view from ViewPosition (else ViewCodeSequence), and the label from the clinical
row of (PatientID, side), so a woman with a benign and a malignant breast is labelled per side.
An image of a patient with no clinical row at all is a bad file. In the real CMMD many women have
images of both breasts but a clinical row (a lesion) for one side only: those images of the other
side carry no label for this study, so they are left out of the manifest and listed, each with its
reason, in ``unlabelled.json`` and the result; they never vanish silently.

Each file first passes the acceptance rules of :func:`mammoflow.data.dicom.acceptance_problem`
(an image, not QC, not FOR PROCESSING unless accepted, large enough); a refused file is a bad
file with its own reason.

Only pseudonymous values reach the manifest: the dataset's patient ID (``D1-0001``), or with a
keyed :class:`~mammoflow.data.pseudonym.Pseudonymizer` its HMAC, side, view, ``image_id`` such as
``D1-0001_L_CC`` (``_2``, ``_3`` … on repeats), and in ``extras`` the abnormality, subtype and
an age band by decade (``"50-59"``, ``"90+"``), never the exact age. ``raw_path`` is relative to
the source root with date-bearing folder names replaced (every name keyed under ``hmac``), and
bad-file messages, ``quarantine.json`` and ``unlabelled.json`` use the same paths and IDs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mammoflow.data.dicom import DEFAULT_MIN_SIZE, Acceptance, DicomError, read_dicom
from mammoflow.data.quarantine import (
    BadFiles,
    IngestError,
    IngestResult,
    Interface,
    OnBadFile,
    check_policy,
    finish,
    format_bad,
    hint,
)
from mammoflow.data.manifest import ManifestRow, label_index
from mammoflow.data.pseudonym import Pseudonymizer
from mammoflow.data.readers import DICOM_SUFFIXES, raw_stats
from mammoflow.files import sha256_file

KIND = "cmmd"
REQUIRED_COLUMNS = ("ID1", "LeftRight", "Age", "abnormality", "classification")
_LABELS = {"benign": "benign", "malignant": "malignant"}


class ClinicalTableError(IngestError):
    """The clinical table is unreadable or has bad rows; the message names each row and value."""


@dataclass(frozen=True)
class ClinicalRow:
    """One (patient, side) row of the clinical table, pseudonymous fields only."""

    patient_id: str
    side: str  # "L" | "R"
    label: str  # "benign" | "malignant"
    abnormality: str | None
    subtype: str | None
    age_band: str | None


def age_band(age: Any) -> str | None:
    """Decade band of an age (``47`` → ``"40-49"``; 90 and over → ``"90+"``); None if unknown."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    text = str(age).strip()
    if not text or text.lower() in ("nan", "none", "na"):
        return None
    years = int(float(text))
    if years < 0 or years > 130:
        raise ValueError(f"age {years} is out of range")
    if years >= 90:
        return "90+"
    low = years // 10 * 10
    return f"{low}-{low + 9}"


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text if text and text.lower() != "nan" else None


def load_clinical_frame(path: Path) -> pd.DataFrame:
    """Read the clinical .xlsx/.xls or .csv as strings.

    Raises:
        ClinicalTableError: missing file, unknown suffix or missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ClinicalTableError(f"{path}: clinical table not found; pass the CMMD .xlsx or .csv")
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xls"):
        frame = pd.read_excel(path, dtype=str)
    elif suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    else:
        raise ClinicalTableError(
            f"{path}: unsupported clinical table suffix {path.suffix!r}; use .xlsx or .csv"
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ClinicalTableError(
            f"{path}: clinical table lacks columns {missing}; found {list(frame.columns)}; "
            f"CMMD needs {list(REQUIRED_COLUMNS)} (subtype optional)"
        )
    return frame


def parse_clinical(
    frame: pd.DataFrame, name: str = "clinical table", pseudonymizer: Pseudonymizer | None = None
) -> dict[tuple[str, str], ClinicalRow]:
    """Validate clinical rows into ``(patient_id, side) → ClinicalRow``.

    Row numbers in messages are spreadsheet rows (the header is row 1). With a keyed
    ``pseudonymizer`` the patient IDs (keys, rows and messages) are its pseudonyms.

    Raises:
        ClinicalTableError: listing every bad row (empty ID, side not L/R, unknown
            classification, bad age, duplicate patient and side).
    """
    rows: dict[tuple[str, str], ClinicalRow] = {}
    first_seen: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    has_subtype = "subtype" in frame.columns
    pz = pseudonymizer or Pseudonymizer()
    for index, record in enumerate(frame.to_dict("records")):
        number = index + 2
        patient = _text(record.get("ID1"))
        patient = pz.patient(patient) if patient is not None else None
        where = f"{name} row {number}"
        if patient is None:
            problems.append(f"{where}: empty ID1; every row needs a patient ID such as 'D1-0001'")
            continue
        side_raw = _text(record.get("LeftRight"))
        side = (side_raw or "").upper()
        label = _LABELS.get((_text(record.get("classification")) or "").lower())
        row_ok = True
        if side not in ("L", "R"):
            problems.append(f"{where} (ID1 {patient!r}): LeftRight {side_raw!r} is not 'L' or 'R'")
            row_ok = False
        if label is None:
            problems.append(
                f"{where} (ID1 {patient!r}): classification {record.get('classification')!r} "
                "is not 'Benign' or 'Malignant'"
            )
            row_ok = False
        try:
            band = age_band(record.get("Age"))
        except ValueError:
            problems.append(f"{where} (ID1 {patient!r}): Age is not a plausible number of years")
            row_ok = False
        if not row_ok or label is None:
            continue
        key = (patient, side)
        if key in rows:
            problems.append(
                f"{where}: duplicate row for patient {patient!r} side {side} (first on row "
                f"{first_seen[key]}); keep one row per patient and side"
            )
            continue
        first_seen[key] = number
        rows[key] = ClinicalRow(
            patient_id=patient,
            side=side,
            label=label,
            abnormality=_text(record.get("abnormality")),
            subtype=_text(record.get("subtype")) if has_subtype else None,
            age_band=band,
        )
    if problems:
        raise ClinicalTableError(
            f"{name} has {len(problems)} bad row(s):\n  - " + "\n  - ".join(problems)
        )
    return rows


def read_clinical(
    path: Path, pseudonymizer: Pseudonymizer | None = None
) -> dict[tuple[str, str], ClinicalRow]:
    """Read and validate the CMMD clinical table (.xlsx or .csv export)."""
    return parse_clinical(load_clinical_frame(path), str(path), pseudonymizer)


@dataclass
class _Image:
    path: str  # the stored raw_path
    patient_id: str
    side: str
    view: str | None
    sha256: str
    width: int
    height: int
    bits: int
    mean: float
    std: float
    extras: dict[str, Any]
    clinical: ClinicalRow


def dicom_files(source: Path) -> list[Path]:
    """Every DICOM file under ``source``, sorted."""
    return sorted(
        p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES
    )


@dataclass(frozen=True)
class _Unlabelled:
    reason: str


def _examine(
    path: Path,
    stored: str,
    clinical: Mapping[tuple[str, str], ClinicalRow],
    clinical_name: str,
    rules: Acceptance,
    pz: Pseudonymizer,
) -> _Image | _Unlabelled | str:
    """Read one DICOM, apply the acceptance rules and join it to the clinical table.

    Returns:
        The image; :class:`_Unlabelled` for a side without a clinical row of a patient who has
        one for the other side; or the reason the file is bad.
    """
    try:
        image = read_dicom(path, rules)
    except DicomError as exc:  # the file's real path never reaches a message
        return str(exc).removeprefix(f"{path}: ").replace(str(path), stored)
    if image.modality not in (None, "MG"):
        return f"modality {image.modality!r} is not MG (mammography); remove it from the source"
    if image.patient_id is None:
        return "no PatientID in the DICOM header; cannot join the clinical table"
    if image.laterality is None:
        return "no ImageLaterality or Laterality (L/R) in the DICOM header"
    patient = pz.patient(image.patient_id)
    row = clinical.get((patient, image.laterality))
    if row is None and any(p == patient for p, _ in clinical):
        return _Unlabelled(
            f"patient {patient} has a clinical row for the other side only; "
            f"side {image.laterality} has no label in {clinical_name}"
        )
    if row is None:
        return (
            f"no clinical row for patient {patient} side {image.laterality} in "
            f"{clinical_name}; add the row or remove the image"
        )
    mean, std = raw_stats(image.pixels)
    height, width = image.pixels.shape
    return _Image(
        path=stored,
        patient_id=patient,
        side=image.laterality,
        view=image.view,
        sha256=sha256_file(path),
        width=int(width),
        height=int(height),
        bits=image.bits_stored,
        mean=mean,
        std=std,
        extras={
            "abnormality": row.abnormality,
            "subtype": row.subtype,
            "age_band": row.age_band,
            "photometric": image.photometric,
            "transfer_syntax": image.transfer_syntax,
            "voi": image.voi,
            "image_type": image.image_type,
        },
        clinical=row,
    )


def assign_image_ids(keys: list[tuple[str, str, str | None]]) -> list[str]:
    """``(patient, side, view)`` → ``D1-0001_L_CC``; repeats get ``_2``, ``_3`` … in order."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for patient, side, view in keys:
        base = f"{patient}_{side}_{view or 'UNK'}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def ingest_cmmd(
    source: Path,
    clinical: Path,
    out_dir: Path,
    dataset: str = "cmmd",
    on_bad_file: OnBadFile = "fail",
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    accept_for_processing: bool = False,
    accept_burned_in: bool = False,
    pseudonymizer: Pseudonymizer | None = None,
    interface: Interface = "python",
) -> IngestResult:
    """Ingest a CMMD-shaped DICOM tree joined with its clinical table.

    Args:
        source: the TCIA download folder (holding ``CMMD/<patient>/...``) or any folder above
            the ``.dcm`` files, which are never moved; ``raw_path`` is relative to it.
        clinical: CMMD_clinicaldata_revision.xlsx or a CSV export with the same columns.
        out_dir: where manifest.parquet and quarantine.json go.
        dataset: the manifest's ``dataset`` value.
        on_bad_file: "fail" raises :class:`IngestError` listing every bad file and writes
            nothing; "quarantine" writes the good images plus ``out_dir/quarantine.json``.
        min_size: refuse images whose short side has fewer pixels.
        accept_for_processing: take FOR PROCESSING (raw detector) images too.
        accept_burned_in: take images with BurnedInAnnotation YES (text in the pixels) too.
        pseudonymizer: maps patient IDs and raw paths (default: IDs kept, dates removed).
        interface: the spelling of hints in messages (Python argument, CLI option, params key).

    Raises:
        ClinicalTableError: the clinical table is unreadable or has bad rows.
        IngestError: no DICOM files, bad files under "fail", or no image left.
    """
    policy = check_policy(on_bad_file)
    pz = pseudonymizer or Pseudonymizer()
    rules = Acceptance(
        min_size=min_size,
        accept_for_processing=accept_for_processing,
        min_size_hint=hint("min_size", interface),
        for_processing_hint=hint("accept_for_processing", interface),
        accept_burned_in=accept_burned_in,
        burned_in_hint=hint("accept_burned_in", interface),
    )
    source, clinical, out_dir = Path(source), Path(clinical), Path(out_dir)
    if not source.is_dir():
        raise IngestError(f"{source}: not a folder; pass the TCIA download folder (holding CMMD/)")
    table = read_clinical(clinical, pz)
    files = dicom_files(source)
    if not files:
        raise IngestError(
            f"{source}: no .dcm files found; expected CMMD/<patient>/<study>/<series>/1-N.dcm"
        )
    bad, unlabelled = BadFiles(), BadFiles()
    examined = _examine_all(files, source, table, str(clinical), rules, pz, bad, unlabelled)
    good = _drop_duplicates(examined, bad)
    bad.items.sort()
    if bad and policy == "fail":
        raise IngestError(format_bad("CMMD", source, bad.items, interface))
    return finish(
        kind=KIND,
        source=source,
        rows=_rows(good, dataset),
        bad=bad,
        out_dir=out_dir,
        on_bad_file=policy,
        unlabelled=unlabelled.items,
        interface=interface,
    )


def _examine_all(
    files: Sequence[Path],
    source: Path,
    table: Mapping[tuple[str, str], ClinicalRow],
    clinical: str,
    rules: Acceptance,
    pz: Pseudonymizer,
    bad: BadFiles,
    unlabelled: BadFiles,
) -> list[_Image]:
    """Every file examined: the good images returned, the others added to ``bad`` or
    ``unlabelled`` under their stored (pseudonymous) paths."""
    stored = pz.raw_paths(files, source)
    good: list[_Image] = []
    for path in files:
        result = _examine(path, stored[path], table, clinical, rules, pz)
        if isinstance(result, str):
            bad.add(stored[path], result)
        elif isinstance(result, _Unlabelled):
            unlabelled.add(stored[path], result.reason)
        else:
            good.append(result)
    return good


def _drop_duplicates(good: list[_Image], bad: BadFiles) -> list[_Image]:
    """Images whose bytes are identical to another's all go to ``bad`` (none is kept)."""
    by_sha: dict[str, list[_Image]] = {}
    for image in good:
        by_sha.setdefault(image.sha256, []).append(image)
    duplicates = {id(i) for copies in by_sha.values() if len(copies) > 1 for i in copies}
    for copies in by_sha.values():
        if len(copies) > 1:
            for image in copies:
                bad.add(
                    image.path,
                    f"duplicate image: identical bytes in {[c.path for c in copies]}",
                )
    return [image for image in good if id(image) not in duplicates]


def _rows(good: Sequence[_Image], dataset: str) -> list[ManifestRow]:
    """The manifest rows of the accepted images (image ids assigned per patient/side/view)."""
    ids = assign_image_ids([(i.patient_id, i.side, i.view) for i in good])
    return [
        ManifestRow(
            image_id=image_id,
            patient_id=image.patient_id,
            dataset=dataset,
            laterality=image.side,
            view=image.view,
            label=image.clinical.label,
            label_index=label_index(KIND, image.clinical.label),
            raw_path=image.path,
            raw_sha256=image.sha256,
            width=image.width,
            height=image.height,
            bits=image.bits,
            intensity_mean=image.mean,
            intensity_std=image.std,
            extras=image.extras,
        )
        for image_id, image in zip(ids, good, strict=True)
    ]
