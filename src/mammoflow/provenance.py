"""What a run was made from: the params that define it, the data and code versions, the machine.

Shared by the study, tuning and reports; imports nothing heavy at module level.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import platform
import posixpath
import re
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mammoflow.config import Config
from mammoflow.quiet import load_keras, load_tensorflow

#: Prefixes of the params that define a backbone's study (the resume key).
STUDY_PARAM_PREFIXES = ("convert.", "split.", "model.", "train.", "evaluate.", "tracking.")


class ProvenanceWarning(UserWarning):
    """Part of a run's provenance could not be recorded (it is tagged 'unknown')."""


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


def config_hash(params: Mapping[str, Any], data_hash: str, split_hash: str) -> str:
    """sha256 over the resolved params, the data hash and the split hash (resume key)."""
    text = json.dumps(
        {"params": dict(params), "data": data_hash, "split": split_hash},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def dvc_data_hash(dataset: str, root: Path = Path()) -> str:
    """The DVC hash (``<md5>.dir``) of ``data/processed/<dataset>`` as it is on disk now.

    Computed by DVC's own hashing code (dvc-data), the value ``dvc.lock`` records for the convert
    stage's output — but of the files actually there, whoever wrote them (``dvc repro``, a
    Prefect flow, a direct command), so a run's lineage tag names the data it used.

    Raises:
        FileNotFoundError: the folder is missing (a run cannot name data it does not have).
    """
    from mammoflow.dvcdata import dvc_hash
    from mammoflow.paths import Layout

    folder = Layout(root).processed(dataset)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no converted data to hash; run `mammoflow convert {dataset}` (or "
            "`dvc repro`) first"
        )
    return dvc_hash(folder)


def git_state(root: Path = Path()) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git).

    ``git_dirty`` is true when tracked code or params differ from the commit: changes to the
    pipeline's own outputs (dvc.lock and the outs / metrics / plots of every dvc.yaml, see
    :func:`pipeline_outputs`) are not counted — every run rewrites them.
    """

    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout

    commit = (run("rev-parse", "HEAD") or "").strip()
    status = run("status", "--porcelain", "-z", "--untracked-files=no")
    prefix = (run("rev-parse", "--show-prefix") or "").strip()
    patterns = [prefix + p for p in pipeline_outputs(root)]
    changed = [] if status is None else changed_paths(status)
    dirty = [p for p in changed if not _matches(p, patterns)]
    state = {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(dirty)).lower(),
    }
    if "unknown" in state.values():
        warnings.warn(
            f"{Path(root).resolve()}: no git commit (not a git checkout, or git failed): the "
            "run is tagged git_commit/git_dirty 'unknown' and cannot be reproduced from a "
            "commit; run from a git clone of the project",
            ProvenanceWarning,
            stacklevel=2,
        )
    return state


def changed_paths(porcelain_z: str) -> list[str]:
    """Paths of ``git status --porcelain -z`` output (a rename's both sides)."""
    out: list[str] = []
    entries = porcelain_z.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        out.append(entry[3:])
        if entry[0] in "RC":  # the next entry is the original path
            out.append(entries[i])
            i += 1
    return out


def pipeline_outputs(root: Path = Path()) -> list[str]:
    """Glob patterns (relative to ``root``) of what the pipeline writes itself.

    Each ``dvc.yaml`` at ``root`` or one folder down: its ``dvc.lock`` and every stage's
    ``outs`` / ``metrics`` / ``plots``, ``${…}`` placeholders as ``*``, after ``wdir``.
    """
    import yaml

    patterns: list[str] = []
    for path in sorted([root / "dvc.yaml", *root.glob("*/dvc.yaml")]):
        if not path.is_file():
            continue
        base = path.parent.relative_to(root)
        patterns.append(posixpath.normpath((base / "dvc.lock").as_posix()))
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for stage in (doc.get("stages") or {}).values():
            body = stage.get("do", stage) if isinstance(stage, dict) else {}
            wdir = base / str(body.get("wdir", "."))
            for key in ("outs", "metrics", "plots"):
                for item in body.get(key) or []:
                    out = next(iter(item)) if isinstance(item, dict) else str(item)
                    out = re.sub(r"\$\{[^}]*\}", "*", out)
                    patterns.append(posixpath.normpath((wdir / out).as_posix()))
    return patterns


def _matches(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` is one of ``patterns`` or inside one (an output folder)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns)


def device() -> str:
    """``GPU xN`` or ``CPU (<processor>)``: where TensorFlow computes."""
    tf = load_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else f"CPU ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str]:
    """TensorFlow and Keras versions."""
    keras = load_keras()
    tf = load_tensorflow()

    return {"tensorflow_version": tf.__version__, "keras_version": keras.__version__}


#: What can change a run's numbers besides the code and data (recorded; `mammoflow reproduce`
#: lists those whose installed version differs).
PACKAGES = (
    "tensorflow",
    "keras",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "pyarrow",
    "pillow",
    "h5py",
    "mlflow",
    "dvc",
)


def packages() -> dict[str, str]:
    """``{package: version}`` of :data:`PACKAGES` as installed, and ``python``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
