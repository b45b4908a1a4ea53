"""Great Expectations 1.x validation of a manifest, with a JSON report and HTML data docs.

The suite checks the manifest's columns and, through derived columns computed here, the files
behind it: raw (and converted) files present and readable, decoded sizes as declared, sha256 of
converted PNGs, and the patient structure (a MIAS film pair belongs to one patient, no image is
shared across patients, a patient has at most two breasts), and that every image is a patient
mammogram: a known view, no QC/calibration exposure, the short side at least ``min_size``
pixels (ingestion refuses these already; the suite proves the manifest holds none). Everything
is written under
``reports_dir``: ``validation.json`` (atomically) and ``data_docs/index.html``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from mammoflow.data.manifest import CLASSES, COLUMNS
from mammoflow.files import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

# GE reads this when it is imported; it must never phone home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPORT_NAME = "validation.json"
DOCS_DIR = "data_docs"
#: Unexpected values / image IDs quoted per failed expectation.
EXAMPLES = 10

#: Mammography view codes (DICOM ViewPosition for MG); an unknown view is null in the manifest.
MAMMO_VIEWS = ("CC", "MLO", "ML", "LM", "LMO", "FB", "SIO", "XCCL", "XCCM", "AT", "CV")

_MIAS_ID = re.compile(r"mdb(\d+)", re.IGNORECASE)
_HEADER_BYTES = 4096


class ValidationFailed(ValueError):  # noqa: N818 (the stage's documented name)
    """The manifest broke expectations; ``report`` holds every result."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.describe_failures())


class ConvertedImagesInvalid(ValueError):  # noqa: N818 (named like ValidationFailed)
    """Converted PNGs do not match their manifest; ``failures`` holds the failed checks."""

    def __init__(self, dataset: str, failures: list[ExpectationOutcome], sizes: str = "") -> None:
        self.failures = failures
        lines = [
            f"converted images of dataset {dataset!r} failed {len(failures)} check(s); delete "
            f"the named PNGs (or data/processed/{dataset}) and convert again:",
            *(f"  - {o.describe()}" for o in failures),
        ]
        super().__init__("\n".join(lines + ([f"  sizes: {sizes}"] if sizes else [])))


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, in plain Python values."""

    expectation: str
    column: str | None
    check: str
    success: bool
    unexpected_count: int | None = None
    unexpected_examples: list[Any] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)
    observed_value: Any = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "expectation": self.expectation,
            "column": self.column,
            "check": self.check,
            "success": self.success,
            "unexpected_count": self.unexpected_count,
            "unexpected_examples": self.unexpected_examples,
            "image_ids": self.image_ids,
            "missing": self.missing,
            "observed_value": self.observed_value,
            "error": self.error,
        }

    def describe(self) -> str:
        """One readable line: type, column, what it checks, what was wrong."""
        where = f" on {self.column!r}" if self.column else ""
        parts = [f"{self.expectation}{where} ({self.check})"]
        if self.error:
            parts.append(f"error: {self.error}")
        if self.unexpected_count:
            parts.append(f"{self.unexpected_count} unexpected, e.g. {self.unexpected_examples!r}")
        if self.image_ids:
            parts.append(f"images {self.image_ids!r}")
        if self.missing:
            parts.append(f"missing {self.missing!r}")
        if (
            not (self.unexpected_count or self.missing or self.error)
            and self.observed_value is not None
        ):
            parts.append(f"observed {self.observed_value!r}")
        return ": ".join(parts[:1]) + (": " + "; ".join(parts[1:]) if parts[1:] else "")


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of :func:`validate_manifest`."""

    success: bool
    dataset: str
    kind: str
    rows: int
    outcomes: tuple[ExpectationOutcome, ...]
    json_path: Path
    docs_index: Path

    @property
    def failures(self) -> list[ExpectationOutcome]:
        """The expectations that failed."""
        return [o for o in self.outcomes if not o.success]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no timestamps, so an unchanged manifest gives identical JSON)."""
        return {
            "success": self.success,
            "dataset": self.dataset,
            "kind": self.kind,
            "rows": self.rows,
            "statistics": {
                "evaluated": len(self.outcomes),
                "successful": len(self.outcomes) - len(self.failures),
                "failed": len(self.failures),
            },
            "data_docs": f"{DOCS_DIR}/index.html",
            "results": [o.as_dict() for o in self.outcomes],
        }

    def describe_failures(self) -> str:
        """A readable multi-line list of the failed expectations."""
        head = (
            f"manifest of dataset {self.dataset!r} ({self.kind}, {self.rows} rows) failed "
            f"{len(self.failures)} of {len(self.outcomes)} expectations "
            f"(details: {self.json_path}, {self.docs_index}):"
        )
        return "\n".join([head, *(f"  - {o.describe()}" for o in self.failures)])


# --------------------------------------------------------------------------- file probes (I/O)


@dataclass(frozen=True)
class FileProbe:
    """What a cheap look at one file found."""

    problem: str | None = None  # missing / unreadable, with the path
    width: int | None = None
    height: int | None = None
    sha256: str | None = None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from a file's header only (PGM, DICOM, or anything Pillow opens).

    Raises:
        ValueError: the header cannot be parsed.
    """
    suffix = path.suffix.lower()
    if suffix == ".pgm":
        from mammoflow.data.pgm import parse_header

        with path.open("rb") as fh:
            head = fh.read(_HEADER_BYTES)
        width, height, _maxval, _offset = parse_header(head, str(path))
        return width, height
    if suffix in (".dcm", ".dicom"):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Columns), int(ds.Rows)
    from PIL import Image

    with Image.open(path) as im:
        return int(im.size[0]), int(im.size[1])


def probe_file(
    path_str: object,
    root: Path | None,
    hash_file: bool = False,
    files: Mapping[str, Path] | None = None,
) -> FileProbe | None:
    """Check one file: present, header readable, size (and sha256 when ``hash_file``).

    ``files`` maps pseudonymous paths to the files on disk. Returns ``None`` when ``path_str``
    is empty (nothing to check).
    """
    if not isinstance(path_str, str) or not path_str:
        return None
    path = Path((files or {}).get(path_str, path_str))
    if root is not None and not path.is_absolute():
        path = root / path
    if not path.is_file():
        return FileProbe(problem=f"missing: {path_str}")
    try:
        width, height = image_size(path)
    except Exception as exc:  # any decoder error is reported as data
        detail = str(exc).replace(str(path), path_str)
        return FileProbe(problem=f"unreadable: {path_str} ({type(exc).__name__}: {detail})")
    return FileProbe(width=width, height=height, sha256=sha256_file(path) if hash_file else None)


def probe_files(
    paths: Sequence[object],
    root: Path | None = None,
    hash_files: bool = False,
    files: Mapping[str, Path] | None = None,
) -> list[FileProbe | None]:
    """:func:`probe_file` for each path."""
    return [probe_file(p, root, hash_files, files) for p in paths]


# --------------------------------------------------------------------------- derived columns (pure)


def mias_film_pair(image_id: object) -> str | None:
    """The film-pair key of a MIAS image ID (mdb001 and mdb002 → ``"mdb001+mdb002"``)."""
    if not isinstance(image_id, str):
        return None
    match = _MIAS_ID.search(image_id)
    if not match:
        return None
    first = (int(match.group(1)) + 1) // 2 * 2 - 1
    return f"mdb{first:03d}+mdb{first + 1:03d}"


def image_qc_marker(view: object, extras: object) -> str | None:
    """What marks a manifest row as a QC/calibration image (its view or extras' ImageType)."""
    from mammoflow.data.dicom import qc_marker

    image_type = None
    if isinstance(extras, str) and extras:
        try:
            details = json.loads(extras)
        except ValueError:
            details = {}
        image_type = details.get("image_type") if isinstance(details, dict) else None
    return qc_marker(view if isinstance(view, str) else None, image_type)


def _nunique_by(frame: pd.DataFrame, key: str, value: str) -> pd.Series:
    return frame.groupby(key, dropna=True)[value].transform("nunique")


def derive_columns(
    frame: pd.DataFrame,
    kind: str,
    raw: Sequence[FileProbe | None],
    converted: Sequence[FileProbe | None] | None = None,
) -> pd.DataFrame:
    """Return ``frame`` plus the derived columns the suite checks.

    Args:
        frame: the manifest.
        kind: dataset kind (``mias`` or ``cmmd``).
        raw: one probe per row of the raw files.
        converted: one probe per row of the converted PNGs, or ``None`` when not converted.
    """
    out = frame.reset_index(drop=True).copy()
    classes = CLASSES.get(kind, ())

    def _obj(values: list[Any]) -> pd.Series:
        return pd.Series(values, index=out.index, dtype=object)

    if "label" in out:
        out["expected_label_index"] = _obj(
            [classes.index(v) if v in classes else None for v in out["label"]]
        )
    if {"width", "height"} <= set(out.columns):
        out["short_side"] = out[["width", "height"]].min(axis=1)
    if "view" in out:
        extras = out["extras"] if "extras" in out else pd.Series([None] * len(out))
        out["qc_marker"] = _obj(
            [image_qc_marker(v, e) for v, e in zip(out["view"], extras, strict=True)]
        )
    out["raw_file_problem"] = _obj([p.problem if p else None for p in raw])
    out["raw_actual_width"] = _obj([p.width if p else None for p in raw])
    out["raw_actual_height"] = _obj([p.height if p else None for p in raw])
    if {"patient_id", "laterality"} <= set(out.columns):
        out["patient_lateralities"] = _nunique_by(out, "patient_id", "laterality")
    if {"patient_id", "image_id"} <= set(out.columns):
        out["patients_per_image"] = _nunique_by(out, "image_id", "patient_id")
        if kind == "mias":
            out["images_per_patient"] = out.groupby("patient_id")["image_id"].transform("size")
            out["film_pair"] = _obj([mias_film_pair(v) for v in out["image_id"]])
            out["film_pair_patients"] = _nunique_by(out, "film_pair", "patient_id")
    if converted is not None:
        out["converted_file_problem"] = _obj([p.problem if p else None for p in converted])
        out["converted_actual_width"] = _obj([p.width if p else None for p in converted])
        out["converted_actual_height"] = _obj([p.height if p else None for p in converted])
        out["converted_actual_sha256"] = _obj([p.sha256 if p else None for p in converted])
    return out


# --------------------------------------------------------------------------- the suite


def build_expectations(
    kind: str, dataset: str, converted: bool, min_size: int = 1
) -> list[Expectation]:
    """The expectations for a manifest of ``kind`` (and its converted PNGs).

    ``min_size`` is the smallest short side in pixels an image may have (``ingest.min_size``).
    """
    import great_expectations as gx

    e = gx.expectations
    suite = _identity_expectations(e, kind, dataset)
    suite += _geometry_expectations(e, min_size)
    suite += _patient_expectations(e, kind)
    if converted:
        suite += converted_expectations()
    return suite


def _identity_expectations(e: Any, kind: str, dataset: str) -> list[Expectation]:
    """Columns, ids, labels, laterality, view and QC: what each row says it is."""
    classes = list(CLASSES[kind])
    pair_missing: Literal["either_value_is_missing"] = "either_value_is_missing"
    suite: list[Expectation] = [
        e.ExpectTableColumnsToMatchSet(
            column_set=list(COLUMNS), exact_match=False, description="all manifest columns"
        ),
        e.ExpectTableRowCountToBeBetween(min_value=1, description="at least one image"),
        e.ExpectColumnValuesToBeUnique(column="image_id", description="unique image_id"),
    ]
    for col in ("image_id", "patient_id", "laterality", "label", "raw_path"):
        suite.append(e.ExpectColumnValuesToNotBeNull(column=col, description=f"{col} filled"))
    suite += [
        e.ExpectColumnValuesToBeInSet(
            column="dataset", value_set=[dataset], description=f"dataset is {dataset!r}"
        ),
        e.ExpectColumnValuesToBeInSet(
            column="label", value_set=classes, description=f"label allowed for {kind}"
        ),
        e.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=classes, description="every class present"
        ),
        e.ExpectColumnPairValuesToBeEqual(
            column_A="label_index",
            column_B="expected_label_index",
            ignore_row_if=pair_missing,
            description="label_index matches label",
        ),
        e.ExpectColumnValuesToBeInSet(
            column="laterality", value_set=["L", "R"], description="laterality L or R"
        ),
        e.ExpectColumnValuesToBeNull(
            column="raw_file_problem", description="raw file present and readable"
        ),
        e.ExpectColumnValuesToBeInSet(
            column="view", value_set=list(MAMMO_VIEWS), description="view is a mammography view"
        ),
        e.ExpectColumnValuesToBeNull(
            column="qc_marker", description="no QC or calibration image (flat field, phantom)"
        ),
    ]
    return suite


def _geometry_expectations(e: Any, min_size: int) -> list[Expectation]:
    """Sizes, bit depth and intensity: what each raw file holds."""
    pair_missing: Literal["either_value_is_missing"] = "either_value_is_missing"
    return [
        e.ExpectColumnValuesToBeBetween(
            column="short_side",
            min_value=min_size,
            description=f"short side at least {min_size} pixels (ingest.min_size)",
        ),
        e.ExpectColumnValuesToBeBetween(column="width", min_value=1, description="width > 0"),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=1, description="height > 0"),
        e.ExpectColumnPairValuesToBeEqual(
            column_A="width",
            column_B="raw_actual_width",
            ignore_row_if=pair_missing,
            description="declared width = raw file's width",
        ),
        e.ExpectColumnPairValuesToBeEqual(
            column_A="height",
            column_B="raw_actual_height",
            ignore_row_if=pair_missing,
            description="declared height = raw file's height",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="bits", min_value=1, max_value=16, description="1-16 bits stored"
        ),
        e.ExpectColumnValuesToBeBetween(
            column="intensity_mean", min_value=0, max_value=1, description="mean in [0, 1]"
        ),
        e.ExpectColumnValuesToBeBetween(
            column="intensity_std",
            min_value=0,
            strict_min=True,
            description="intensity not constant (std > 0)",
        ),
    ]


def _patient_expectations(e: Any, kind: str) -> list[Expectation]:
    """How images group into patients (MIAS: film pairs)."""
    suite: list[Expectation] = [
        e.ExpectColumnValuesToBeBetween(
            column="patient_lateralities",
            min_value=1,
            max_value=2,
            description="each patient has at most two lateralities",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="patients_per_image",
            max_value=1,
            description="no image_id shared across patients",
        ),
    ]
    if kind == "mias":
        suite += [
            e.ExpectColumnValuesToBeBetween(
                column="film_pair_patients",
                max_value=1,
                description="a MIAS film pair (odd/even mdbNNN) belongs to one patient",
            ),
            e.ExpectColumnValuesToBeBetween(
                column="images_per_patient",
                max_value=2,
                description="a MIAS patient has at most two films",
            ),
        ]
    return suite


def converted_expectations() -> list[Expectation]:
    """The checks of the converted PNGs: present, readable, square, one size, sha256 as recorded.

    Part of :func:`build_expectations` for a converted manifest, and run alone by
    :func:`validate_converted` after every conversion.
    """
    import great_expectations as gx

    e = gx.expectations
    pair_missing: Literal["either_value_is_missing"] = "either_value_is_missing"
    return [
        e.ExpectColumnValuesToNotBeNull(
            column="converted_path", description="every image converted"
        ),
        e.ExpectColumnValuesToBeNull(
            column="converted_file_problem", description="converted PNG present and readable"
        ),
        e.ExpectColumnPairValuesToBeEqual(
            column_A="converted_actual_width",
            column_B="converted_actual_height",
            ignore_row_if=pair_missing,
            description="converted PNG is square",
        ),
        e.ExpectColumnUniqueValueCountToBeBetween(
            column="converted_actual_width",
            min_value=1,
            max_value=1,
            description="all converted PNGs have one size",
        ),
        e.ExpectColumnPairValuesToBeEqual(
            column_A="converted_sha256",
            column_B="converted_actual_sha256",
            ignore_row_if=pair_missing,
            description="converted_sha256 matches the PNG",
        ),
    ]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    for sub in info.values():
        msg = _exception_message(sub)
        if msg:
            return msg.strip().splitlines()[-1]
    return None


def _outcome(result: dict[str, Any], check: str) -> ExpectationOutcome:
    cfg = result["expectation_config"]
    kwargs = cfg.get("kwargs", {})
    res = result.get("result") or {}
    column = kwargs.get("column")
    if column is None and "column_A" in kwargs:
        column = f"{kwargs['column_A']}={kwargs['column_B']}"
    success = bool(result["success"])
    examples: list[Any] = list(res.get("partial_unexpected_list") or [])
    missing: list[Any] = []
    details = res.get("details")
    if not success and isinstance(details, dict) and "mismatched" in details:
        missing = list(details["mismatched"].get("missing") or [])  # absent columns
    if not success and "partial_missing_list" in res:  # absent distinct values
        missing = sorted(res["partial_missing_list"], key=str)
    ids = [
        str(row["image_id"])
        for row in res.get("partial_unexpected_index_list") or []
        if isinstance(row, dict) and "image_id" in row
    ]
    count = res.get("unexpected_count")
    observed = res.get("observed_value")
    return ExpectationOutcome(
        expectation=str(cfg["type"]),
        column=column,
        check=check,
        success=success,
        unexpected_count=int(count) if count is not None else None,
        unexpected_examples=_jsonable(examples[:EXAMPLES]),
        image_ids=ids[:EXAMPLES],
        missing=_jsonable(missing),
        observed_value=_jsonable(observed) if not isinstance(observed, list) else None,
        error=None if success else _exception_message(result.get("exception_info")),
    )


def run_suite(
    frame: pd.DataFrame, expectations: list[Expectation], dataset: str, docs_dir: Path
) -> tuple[bool, list[ExpectationOutcome]]:
    """Validate ``frame`` with GE (ephemeral context) and build data docs in ``docs_dir``.

    Returns:
        Overall success and one outcome per expectation, in suite order.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    for site in list(context.get_site_names()):
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        "mammoflow",
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    batch = (
        context.data_sources.add_pandas(f"{dataset}_manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole_manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}.manifest"))
    checks: dict[str, str] = {}
    for exp in expectations:
        added = suite.add_expectation(exp)
        checks[str(added.id)] = exp.description or ""
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{dataset}.manifest", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{dataset}.validate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": ["image_id"],
                "partial_unexpected_count": EXAMPLES,
            },
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    (result,) = run.run_results.values()
    raw = result.to_json_dict()["results"]
    order = {eid: i for i, eid in enumerate(checks)}
    raw.sort(key=lambda r: order.get(str(r["expectation_config"].get("id")), len(order)))
    outcomes = [_outcome(r, checks.get(str(r["expectation_config"].get("id")), "")) for r in raw]
    return bool(run.success), outcomes


# --------------------------------------------------------------------------- stage


def _has_converted(frame: pd.DataFrame) -> bool:
    return "converted_path" in frame and bool(frame["converted_path"].notna().any())


def validate_manifest(
    frame: pd.DataFrame,
    kind: str,
    reports_dir: Path,
    dataset: str,
    *,
    fail_on_error: bool = True,
    root: Path | None = None,
    min_size: int = 1,
    raw_files: Mapping[str, Path] | None = None,
) -> ValidationReport:
    """Validate a manifest with the GE suite; write ``validation.json`` and data docs.

    Args:
        frame: the manifest (raw, or converted with ``converted_path`` filled).
        kind: dataset kind, a key of :data:`manifest.CLASSES`.
        reports_dir: receives ``validation.json`` and ``data_docs/`` (nothing else is written).
        dataset: dataset name (the manifest's ``dataset`` column must equal it).
        fail_on_error: raise :class:`ValidationFailed` when any expectation fails.
        root: directory relative file paths are resolved against (default: the cwd).
        min_size: the smallest short side in pixels (``ingest.min_size``).
        raw_files: pseudonymous ``raw_path`` → file on disk (see :mod:`mammoflow.data.pseudonym`).

    Raises:
        ValueError: unknown ``kind``.
        ValidationFailed: some expectation failed and ``fail_on_error`` is true.
    """
    if kind not in CLASSES:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(CLASSES)!r}")
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    converted = _has_converted(frame)
    raw_paths = frame["raw_path"].tolist() if "raw_path" in frame else [None] * len(frame)
    derived = derive_columns(
        frame,
        kind,
        probe_files(raw_paths, root, files=raw_files),
        probe_files(frame["converted_path"].tolist(), root, hash_files=True) if converted else None,
    )
    docs_dir = reports_dir / DOCS_DIR
    staging = Path(tempfile.mkdtemp(prefix=".data_docs.", dir=reports_dir))
    try:
        success, outcomes = run_suite(
            derived, build_expectations(kind, dataset, converted, min_size), dataset, staging
        )
        old = reports_dir / f".data_docs.old.{os.getpid()}"
        if docs_dir.exists():
            docs_dir.replace(old)
        staging.replace(docs_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = ValidationReport(
        success=success,
        dataset=dataset,
        kind=kind,
        rows=len(frame),
        outcomes=tuple(outcomes),
        json_path=reports_dir / REPORT_NAME,
        docs_index=docs_dir / "index.html",
    )
    atomic_write_json(report.json_path, report.as_dict())
    if fail_on_error and not success:
        raise ValidationFailed(report)
    return report


def validate_converted(
    frame: pd.DataFrame, kind: str, dataset: str, root: Path | None = None
) -> list[ExpectationOutcome]:
    """Run :func:`converted_expectations` on a converted manifest; write nothing.

    The convert stage calls it after every conversion, so a PNG that is missing, unreadable,
    not square, of another size or not the bytes the manifest records stops the pipeline
    (whatever ``validate.fail_on_error`` says: these are integrity checks, not data quality).

    Args:
        frame: the converted manifest (``converted_path`` and ``converted_sha256`` filled).
        kind: dataset kind, a key of :data:`manifest.CLASSES`.
        dataset: dataset name, for messages.
        root: directory relative ``converted_path`` values are resolved against (default: cwd).

    Returns:
        One outcome per check, all successful.

    Raises:
        ValueError: unknown ``kind``.
        ConvertedImagesInvalid: some check failed; the message names the images.
    """
    if kind not in CLASSES:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(CLASSES)!r}")
    probes = probe_files(frame["converted_path"].tolist(), root, hash_files=True)
    derived = derive_columns(frame, kind, [None] * len(frame), probes)
    with tempfile.TemporaryDirectory(prefix=".converted_docs.") as docs:
        success, outcomes = run_suite(derived, converted_expectations(), dataset, Path(docs))
    if success:
        return outcomes
    sizes: dict[str, list[str]] = {}
    for image_id, probe in zip(derived["image_id"], probes, strict=True):
        if probe is not None and probe.width is not None:
            sizes.setdefault(f"{probe.width}x{probe.height}", []).append(str(image_id))
    detail = (
        "; ".join(f"{k}: {v[:EXAMPLES]!r}" for k, v in sorted(sizes.items()))
        if len(sizes) > 1
        else ""
    )
    raise ConvertedImagesInvalid(dataset, [o for o in outcomes if not o.success], detail)


def validate_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Run the Great Expectations suite on the ingested manifest.

    Writes the GE JSON result and data docs under ``reports/validation/<dataset>`` and a small
    DVC metrics file; raises :class:`ValidationFailed` listing the failed expectations.
    """
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.raw import min_size, raw_files
    from mammoflow.files import atomic_write_json

    kind = cfg.dataset(dataset).kind
    layout = layout or Layout()
    frame = read_manifest(layout.interim(dataset))
    summary: dict[str, Any] = {"dataset": dataset, "images": len(frame)}
    try:
        report = validate_manifest(
            frame,
            kind=kind,
            reports_dir=layout.validation(dataset),
            dataset=dataset,
            fail_on_error=cfg.validate_.fail_on_error,
            min_size=min_size(cfg, dataset),
            raw_files=raw_files(cfg, dataset, layout),
        )
    except ValidationFailed as exc:
        summary |= {"success": False, "failed": len(exc.report.failures)}
        atomic_write_json(layout.validation_metrics(dataset), summary)
        raise
    summary |= {
        "success": report.success,
        "expectations": len(report.outcomes),
        "failed": len(report.failures),
    }
    atomic_write_json(layout.validation_metrics(dataset), summary)
    return summary
