"""What a run was made from: the params that define it, the data and code versions, the machine.

Shared by the study, tuning and reports; imports nothing heavier than YAML at module level.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

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
    """The DVC hash of ``data/processed/<dataset>`` from dvc.lock ('unknown' outside DVC)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return "unknown"
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    stage = stages.get(f"convert@{dataset}", {})
    for out in stage.get("outs", []):
        if out.get("path") == f"data/processed/{dataset}":
            return str(out.get("md5", "unknown"))
    return "unknown"


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
