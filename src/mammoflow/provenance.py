"""What a run was made from: the params that define it, the data and code versions, the machine.

Shared by the study, tuning and reports; imports nothing heavy at module level.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

from mammoflow.config import Config

#: Prefixes of the params that define a backbone's study (the resume key).
STUDY_PARAM_PREFIXES = ("convert.", "split.", "model.", "train.", "evaluate.", "tracking.")


def study_params(cfg: Config, dataset: str) -> dict[str, Any]:
    """The flattened params that define a study of ``dataset`` (backbone list excluded).

    The dataset's own model / train keys are applied first, so the values are those it ran with.
    """
    cfg = cfg.for_dataset(dataset)
    flat = cfg.flat()
    out = {
        k: v
        for k, v in flat.items()
        if k.startswith(STUDY_PARAM_PREFIXES) and k != "model.backbones"
    }
    ds = cfg.dataset(dataset)
    out["dataset.name"] = dataset
    out["dataset.kind"] = ds.kind
    return out


def dvc_data_hash(dataset: str, root: Path = Path()) -> str:
    """The DVC hash (``<md5>.dir``) of ``data/processed/<dataset>`` as it is on disk now.

    Computed by DVC's own hashing code (dvc-data), the value ``dvc.lock`` records for the convert
    stage's output — but of the files actually there, whoever wrote them (``dvc repro``, a
    Prefect flow, a direct command), so a run's lineage tag names the data it used.
    'unknown' when the folder is missing.
    """
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = root / "data" / "processed" / dataset
    if not folder.is_dir():
        return "unknown"
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="mammoflow-hash-") as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(folder.resolve()), fs, "md5", dry_run=True)
    return str(obj.hash_info.value)


def git_state(root: Path = Path()) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git)."""

    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip()

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def device() -> str:
    """``GPU xN`` or ``CPU (<processor>)``: where TensorFlow computes."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else f"CPU ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str]:
    """TensorFlow and Keras versions."""
    import keras
    import tensorflow as tf

    return {"tensorflow_version": tf.__version__, "keras_version": keras.__version__}
