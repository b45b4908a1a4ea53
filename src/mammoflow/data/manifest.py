"""The manifest: one schema for every dataset, and its parquet read/write.

Only this module defines the manifest's columns. A manifest row is one image; every column is
pseudonymous (dataset patient ID, laterality, view, age band at most): never a DICOM name,
birth date, accession number, institution or date.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mammoflow.files import atomic_write_bytes

MANIFEST_NAME = "manifest.parquet"

#: Class names per dataset kind, in label_index order.
CLASSES: dict[str, tuple[str, ...]] = {
    "mias": ("normal", "benign", "malignant"),
    "cmmd": ("benign", "malignant"),
}

#: Core columns, in order, with their arrow types. ``extras`` holds dataset-specific
#: details as a JSON string (tissue, abnormality, lesions, age band, subtype …).
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("laterality", pa.string(), nullable=False),  # L | R
        pa.field("view", pa.string(), nullable=True),  # CC | MLO | None (MIAS: MLO films)
        pa.field("label", pa.string(), nullable=False),
        pa.field("label_index", pa.int64(), nullable=False),
        pa.field("raw_path", pa.string(), nullable=False),
        pa.field("raw_sha256", pa.string(), nullable=False),
        pa.field("width", pa.int64(), nullable=False),  # raw pixels
        pa.field("height", pa.int64(), nullable=False),
        pa.field("bits", pa.int64(), nullable=False),  # raw bits stored (8, 12, 16)
        pa.field("intensity_mean", pa.float64(), nullable=False),  # raw, scaled to [0, 1]
        pa.field("intensity_std", pa.float64(), nullable=False),
        pa.field("converted_path", pa.string(), nullable=True),
        pa.field("converted_sha256", pa.string(), nullable=True),
        pa.field("extras", pa.string(), nullable=False),  # JSON object
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


@dataclass(frozen=True)
class ManifestRow:
    """One image of the manifest (before conversion)."""

    image_id: str
    patient_id: str
    dataset: str
    laterality: str
    view: str | None
    label: str
    label_index: int
    raw_path: str
    raw_sha256: str
    width: int
    height: int
    bits: int
    intensity_mean: float
    intensity_std: float
    converted_path: str | None = None
    converted_sha256: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """Return the row as a dict with ``extras`` serialised to JSON."""
        rec = {name: getattr(self, name) for name in COLUMNS}
        rec["extras"] = json.dumps(dict(self.extras), sort_keys=True)
        return rec


class ManifestError(ValueError):
    """A manifest breaks its schema; the message names the column and values."""


def label_index(kind: str, label: str) -> int:
    """Index of ``label`` in the class list of dataset ``kind``."""
    try:
        return CLASSES[kind].index(label)
    except (KeyError, ValueError):
        raise ManifestError(
            f"label {label!r} is not allowed for dataset kind {kind!r}; allowed: {CLASSES.get(kind)!r}"
        ) from None


def to_frame(rows: Iterable[ManifestRow | Mapping[str, Any]]) -> pd.DataFrame:
    """Build a manifest DataFrame with the canonical column order, sorted by image_id."""
    records = [r.as_record() if isinstance(r, ManifestRow) else dict(r) for r in rows]
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def check(frame: pd.DataFrame) -> None:
    """Raise :class:`ManifestError` if ``frame`` breaks the schema's hard rules."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"manifest lacks columns {missing!r}")
    dup = frame["image_id"][frame["image_id"].duplicated()].unique().tolist()
    if dup:
        raise ManifestError(f"duplicate image_id values {dup[:10]!r}; each image must appear once")
    for col in (
        "image_id",
        "patient_id",
        "dataset",
        "laterality",
        "label",
        "raw_path",
        "raw_sha256",
    ):
        if frame[col].isna().any():
            bad = frame.loc[frame[col].isna(), "image_id"].tolist()[:10]
            raise ManifestError(f"column {col!r} is empty for images {bad!r}")


def write_manifest(frame: pd.DataFrame, path: Path) -> None:
    """Validate and atomically write a manifest parquet file."""
    check(frame)
    table = pa.Table.from_pandas(frame[list(COLUMNS)], schema=SCHEMA, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest; a missing file or column is a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; run `mammoflow ingest` first")
    frame = pq.read_table(path).to_pandas()
    check(frame)
    return frame


def extras(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Decode the ``extras`` JSON column."""
    return [json.loads(s) for s in frame["extras"]]
