"""The ingest stage: a raw dataset (MIAS archive or folder, CMMD-shaped DICOM tree) → its
manifest in data/interim/<dataset>, bad files failed or quarantined (data/quarantine.py)."""

from __future__ import annotations

from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout


def ingest_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Parse the raw files into ``data/interim/<dataset>/manifest.parquet``."""
    from mammoflow.data.acquire import find_clinical
    from mammoflow.data.raw import cmmd_root, min_size

    layout = layout or Layout()
    ds = cfg.dataset(dataset)
    raw = layout.raw(dataset)
    if not raw.exists():
        raise FileNotFoundError(f"{raw}: raw data missing; run `mammoflow acquire {dataset}` first")
    if ds.kind == "mias":
        from mammoflow.data.mias import ingest_mias

        result = ingest_mias(
            raw,
            layout.interim(dataset),
            dataset=dataset,
            on_bad_file=cfg.ingest.on_bad_file,
            interface="params",
        )
    else:
        from mammoflow.data.cmmd import ingest_cmmd
        from mammoflow.data.pseudonym import pseudonymizer

        result = ingest_cmmd(
            cmmd_root(dataset, layout),
            find_clinical(raw),
            layout.interim(dataset),
            dataset=dataset,
            on_bad_file=cfg.ingest.on_bad_file,
            min_size=min_size(cfg, dataset),
            accept_for_processing=cfg.ingest.accept_for_processing,
            accept_burned_in=cfg.ingest.accept_burned_in,
            pseudonymizer=pseudonymizer(cfg.ingest.pseudonymize),
            interface="params",
        )
    return {
        "dataset": dataset,
        "images": len(result.frame),
        "patients": int(result.frame["patient_id"].nunique()),
        "labels": result.frame["label"].value_counts().to_dict(),
        "bad_files": len(result.bad),
    }
