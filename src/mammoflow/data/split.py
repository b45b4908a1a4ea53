"""Held-out test set + stratified K-fold cross-validation, grouped by patient (pure).

``group_by="patient"`` (default): a patient's images all land in the test set or all in one CV
fold. The test set is drawn per stratum (each patient's most severe label, i.e. the highest
``label_index``) with a seeded shuffle; the folds come from scikit-learn's
``StratifiedGroupKFold``. ``group_by="image"`` treats every image as its own group, which
reproduces the paper's leaky image-level split (left and right breast of one woman may fall on
both sides).

Output columns: ``image_id, patient_id, label_index, split ("test" | "cv"), fold`` where ``fold`` is
the fold (1..k) in which the row is *validation*, and -1 for test rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mammoflow.config import Config, SplitConfig
from mammoflow.paths import Layout

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mammoflow.files import atomic_write_bytes, sha256_bytes

SPLITS_NAME = "splits.parquet"
COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "label_index", "split", "fold")
GroupBy = Literal["patient", "image"]


class SplitError(ValueError):
    """The requested split is impossible; the message names the class, counts and fix."""


def _class_name(label: int, names: Mapping[int, str]) -> str:
    return f"{names[label]!r} (label_index {label})" if label in names else f"label_index {label}"


def _names(frame: pd.DataFrame) -> dict[int, str]:
    if "label" not in frame.columns:
        return {}
    pairs = frame[["label_index", "label"]].drop_duplicates()
    return {int(i): str(n) for i, n in zip(pairs["label_index"], pairs["label"], strict=True)}


def _groups_per_class(frame: pd.DataFrame, group_col: str) -> dict[int, int]:
    counts = frame.groupby("label_index")[group_col].nunique()
    return {int(str(k)): int(v) for k, v in counts.items()}


def _check_folds(
    frame: pd.DataFrame, group_col: str, k: int, names: Mapping[int, str], where: str
) -> None:
    unit = "patients" if group_col == "patient_id" else "images"
    for label, count in sorted(_groups_per_class(frame, group_col).items(), key=lambda kv: kv[1]):
        if count < k:
            raise SplitError(
                f"class {_class_name(label, names)} has only {count} {unit} {where}, fewer than "
                f"k_folds={k}; every fold needs one. Lower split.k_folds to at most {count}, "
                "lower split.test_size, or add data"
            )


def _draw_test(
    frame: pd.DataFrame, group_col: str, test_size: float, seed: int, names: Mapping[int, str]
) -> set[str]:
    """Groups for the test set: per stratum (group's max label), round(test_size * n), ≥ 1."""
    strata = frame.groupby(group_col)["label_index"].max()
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted(strata.unique()):
        groups = np.array(sorted(strata.index[strata == label].astype(str)))
        n_test = max(1, round(test_size * len(groups)))
        if n_test >= len(groups):
            raise SplitError(
                f"class {_class_name(int(label), names)} has only {len(groups)} "
                f"{'patients' if group_col == 'patient_id' else 'images'}; test_size={test_size} "
                "would leave none for cross-validation. Add data or use a smaller split.test_size"
            )
        chosen.update(rng.permutation(groups)[:n_test].tolist())
    return chosen


def make_splits(
    frame: pd.DataFrame,
    test_size: float = 0.1,
    k_folds: int = 5,
    group_by: GroupBy = "patient",
    seed: int = 42,
) -> pd.DataFrame:
    """Assign every image to the test set or to one CV validation fold.

    Args:
        frame: manifest rows (needs ``image_id``, ``patient_id``, ``label_index``; ``label`` is
            used for messages when present).
        test_size: fraction of groups held out for testing (0 = no test set).
        k_folds: number of CV folds (≥ 2).
        group_by: ``patient`` (no patient straddles test/CV or two folds) or ``image`` (leaky).
        seed: seeds the test draw and the fold shuffle; equal inputs give equal outputs.

    Returns:
        DataFrame with :data:`COLUMNS`, sorted by ``image_id``.

    Raises:
        SplitError: missing columns, bad parameters, more folds than a class has groups, or a
            test set that would miss a class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    missing = [c for c in ("image_id", "patient_id", "label_index") if c not in frame.columns]
    if missing:
        raise SplitError(f"split input lacks columns {missing!r}; pass the manifest")
    if frame.empty:
        raise SplitError("split input has no rows; ingest and convert a dataset first")
    if frame["image_id"].duplicated().any():
        dup = frame.loc[frame["image_id"].duplicated(), "image_id"].tolist()[:5]
        raise SplitError(f"duplicate image_id values {dup!r}; each image must appear once")
    if group_by not in ("patient", "image"):
        raise SplitError(f"split.group_by={group_by!r}; use 'patient' or 'image'")
    if not 0.0 <= test_size < 1.0:
        raise SplitError(f"split.test_size={test_size}; use a fraction in [0, 1), e.g. 0.1")
    if k_folds < 2:
        raise SplitError(f"split.k_folds={k_folds}; cross-validation needs at least 2 folds")

    data = (
        frame[["image_id", "patient_id", "label_index"]]
        .astype({"image_id": str, "patient_id": str, "label_index": np.int64})
        .sort_values("image_id", kind="stable")
        .reset_index(drop=True)
    )
    names = _names(frame)
    group_col = "patient_id" if group_by == "patient" else "image_id"
    _check_folds(data, group_col, k_folds, names, "in the dataset")

    test_groups = _draw_test(data, group_col, test_size, seed, names) if test_size > 0 else set()
    is_test = data[group_col].isin(test_groups).to_numpy()
    if test_size > 0:
        absent = sorted(set(data["label_index"]) - set(data.loc[is_test, "label_index"]))
        if absent:
            label = int(absent[0])
            raise SplitError(
                f"the test set would contain no image of class {_class_name(label, names)} "
                f"(test_size={test_size}, seed={seed}); raise split.test_size or try another seed"
            )
    cv = data.loc[~is_test]
    _check_folds(cv, group_col, k_folds, names, "left for cross-validation after the test split")

    folds = np.full(len(data), -1, dtype=np.int64)
    sgkf = StratifiedGroupKFold(n_splits=k_folds, shuffle=True, random_state=seed)
    cv_index = cv.index.to_numpy()
    for number, (_, val_idx) in enumerate(
        sgkf.split(np.zeros(len(cv)), cv["label_index"].to_numpy(), cv[group_col].to_numpy()),
        start=1,
    ):
        folds[cv_index[val_idx]] = number
    out = data.assign(split=np.where(is_test, "test", "cv"), fold=folds)
    return out[list(COLUMNS)]


def splits_for(frame: pd.DataFrame, split: SplitConfig) -> pd.DataFrame:
    """:func:`make_splits` with the ``split:`` section of params.yaml."""
    return make_splits(
        frame,
        test_size=split.test_size,
        k_folds=split.k_folds,
        group_by=split.group_by,
        seed=split.seed,
    )


def canonical_csv(splits: pd.DataFrame) -> bytes:
    """The splits as canonical CSV bytes (columns in :data:`COLUMNS` order, rows by image_id)."""
    frame = splits[list(COLUMNS)].sort_values("image_id", kind="stable")
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue().encode("utf-8")


def split_hash(splits: pd.DataFrame) -> str:
    """sha256 of :func:`canonical_csv` (identifies a split in tracking and caches)."""
    return sha256_bytes(canonical_csv(splits))


def write_splits(splits: pd.DataFrame, path: Path | str) -> str:
    """Atomically write ``splits`` as parquet; returns :func:`split_hash`."""
    missing = [c for c in COLUMNS if c not in splits.columns]
    if missing:
        raise SplitError(f"splits lack columns {missing!r}; build them with make_splits")
    frame = splits[list(COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(Path(path), buf.getvalue())
    return split_hash(frame)


def read_splits(path: Path | str) -> pd.DataFrame:
    """Read a splits parquet file (a directory means ``<dir>/splits.parquet``).

    Raises:
        SplitError: the file is missing or lacks columns.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPLITS_NAME
    if not path.is_file():
        raise SplitError(f"{path}: splits not found; run `mammoflow split` first")
    frame = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise SplitError(f"{path}: lacks columns {missing!r}; re-run `mammoflow split`")
    return frame


def fold_summary(splits: pd.DataFrame) -> dict[str, dict[int, int]]:
    """Images per class in the test set and in each fold (for logs and reports)."""
    out: dict[str, dict[int, int]] = {}
    for key, part in splits.groupby(["split", "fold"]):
        split, fold = key if isinstance(key, tuple) else (key, -1)
        name = "test" if split == "test" else f"fold{fold}"
        out[name] = {
            int(str(k)): int(v) for k, v in part["label_index"].value_counts().sort_index().items()
        }
    return out


def split_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Held-out test set + stratified K folds, grouped by patient; written to data/splits."""
    from mammoflow.data.manifest import read_manifest

    cfg.dataset(dataset)
    layout = layout or Layout()
    frame = read_manifest(layout.processed(dataset))
    splits = splits_for(frame, cfg.split)
    digest = write_splits(splits, layout.splits(dataset))
    return {"dataset": dataset, "split_hash": digest, "images": fold_summary(splits)}
