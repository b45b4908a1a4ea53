"""A dataset's acquired raw files: where they are and the size rule they are held to.

Shared by the ingest stage, scoring (serving/predict) and the explain_check stage, so they
all read the same files under the same rule.
"""

from __future__ import annotations

from pathlib import Path

from mammoflow.config import Config
from mammoflow.paths import Layout


def min_size(cfg: Config, dataset: str) -> int:
    """``ingest.min_size``; for the embedded sample, at most its images' own short side.

    The sample is deliberately small (``sample.size``, 256 px by default) so that the pipeline
    runs on a laptop; the rule exists to refuse thumbnails and test patterns in real data.
    """
    ds = cfg.dataset(dataset)
    if ds.acquire != "sample":
        return cfg.ingest.min_size
    from mammoflow.data.sample import image_shape

    return min(cfg.ingest.min_size, *image_shape(ds.kind, cfg.sample.size))


def cmmd_root(dataset: str, layout: Layout | None = None) -> Path:
    """The source root of an acquired CMMD dataset; its manifest's ``raw_path`` is relative to it."""
    return (layout or Layout()).raw(dataset) / "CMMD"


def raw_files(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Path] | None:
    """Manifest ``raw_path`` → file on disk for a DICOM dataset (``None`` for MIAS).

    Raises:
        PseudonymKeyError: ``ingest.pseudonymize: hmac`` without the key in the environment.
    """
    if cfg.dataset(dataset).kind != "cmmd":
        return None
    from mammoflow.data.cmmd import dicom_files
    from mammoflow.data.pseudonym import locate_raw, pseudonymizer

    root = cmmd_root(dataset, layout)
    files = dicom_files(root) if root.is_dir() else []
    return locate_raw(files, root, pseudonymizer(cfg.ingest.pseudonymize))
