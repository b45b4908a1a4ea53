"""Stage entry points: one function per pipeline stage, on the canonical layout.

The CLI (and so every DVC stage) and the Prefect tasks call exactly these functions, so the two
orchestrators share one implementation. Each function takes the validated :class:`Config`, a
dataset name and a :class:`Layout`, does the I/O, and returns a small summary dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout


def acquire_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Bring the raw files of ``dataset`` to ``data/raw/<dataset>``."""
    from mammoflow.data.acquire import acquire

    layout = layout or Layout()
    ds = cfg.dataset(dataset)
    target = acquire(ds, cfg.sample, layout.raw(dataset))
    n_files = sum(1 for p in target.rglob("*") if p.is_file())
    return {"dataset": dataset, "raw_dir": str(target), "files": n_files}


def ingest_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Parse the raw files into ``data/interim/<dataset>/manifest.parquet``."""
    from mammoflow.data.acquire import find_clinical

    layout = layout or Layout()
    ds = cfg.dataset(dataset)
    raw = layout.raw(dataset)
    if not raw.exists():
        raise FileNotFoundError(f"{raw}: raw data missing; run `mammoflow acquire {dataset}` first")
    if ds.kind == "mias":
        from mammoflow.data.mias import ingest_mias

        result = ingest_mias(
            raw, layout.interim(dataset), dataset=dataset, on_bad_file=cfg.ingest.on_bad_file
        )
    else:
        from mammoflow.data.cmmd import ingest_cmmd

        result = ingest_cmmd(
            raw / "CMMD",
            find_clinical(raw),
            layout.interim(dataset),
            dataset=dataset,
            on_bad_file=cfg.ingest.on_bad_file,
        )
    return {
        "dataset": dataset,
        "images": len(result.frame),
        "patients": int(result.frame["patient_id"].nunique()),
        "labels": result.frame["label"].value_counts().to_dict(),
        "bad_files": len(result.bad),
    }


def validate_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Run the Great Expectations suite on the ingested manifest.

    Writes the GE JSON result and data docs under ``reports/validation/<dataset>`` and a small
    DVC metrics file; raises :class:`ValidationFailed` listing the failed expectations.
    """
    from mammoflow.data.manifest import atomic_write_json, read_manifest
    from mammoflow.data.validate import ValidationFailed, validate_manifest

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


def convert_stage(
    cfg: Config, dataset: str, layout: Layout | None = None, progress: bool = True
) -> dict[str, Any]:
    """Convert every ingested image to a padded PNG under ``data/processed/<dataset>``."""
    from mammoflow.data.convert import convert_dataset

    cfg.dataset(dataset)
    layout = layout or Layout()
    result = convert_dataset(
        layout.interim(dataset) / "manifest.parquet",
        layout.processed(dataset),
        cfg.convert,
        progress=progress,
    )
    return {
        "dataset": dataset,
        "converted": len(result.converted),
        "skipped": len(result.skipped),
        "seconds": round(result.seconds, 2),
    }


def processed_manifest(dataset: str, layout: Layout | None = None) -> Path:
    """Path of the converted manifest of ``dataset``."""
    return (layout or Layout()).processed(dataset) / "manifest.parquet"
