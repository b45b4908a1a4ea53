"""Leakage audit: the same study split by image and by patient, and checks of a split file.

:func:`run_audit` studies one backbone twice — ``split.group_by: image`` (the paper's leaky split,
where the two breasts or two views of one woman may sit in training and test) and ``patient`` —
with the same seed, K and epochs, and reports per metric the *inflation* (image − patient) with
an independent patient-bootstrap CI of the difference. :func:`check_split` looks in a split file
for patients on both sides (test vs CV, several folds), exact duplicate images (sha256) and
near duplicates (a 256-bit dHash of the breast region within ``max_distance`` bits, calibrated
on real MIAS films: :data:`NEAR_DUPLICATE_CALIBRATION`) across partitions.

The two studies train into ``.cache/audit/<dataset>/<grouping>/`` (splits, models, metrics), never
over the pipeline's DVC outputs, and track into the MLflow experiment ``mammoflow-<dataset>-audit``
with one ``audit`` run that holds both results. The summary is written to
``reports/<dataset>/audit.json`` / ``audit.md`` for the study report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mammoflow.config import Config
from mammoflow.evaluation.metrics import compute_metrics, patient_rows, percentile_interval
from mammoflow.paths import Layout

if TYPE_CHECKING:
    from mammoflow.config import Config

GROUPINGS = ("image", "patient")
METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
HASH_SIZE = 16  # dHash of a 17 × 16 thumbnail: 256 bits (8 × 8 is too coarse for mammograms,
# whose thumbnails all look alike: distinct sample films came within 1 bit of 64)
NEAR_DUPLICATE_BITS = 24  # Hamming distance (of 256 bits) counted as a near duplicate
MAX_SHOWN_PAIRS = 50  # flagged pairs kept with their files for the report's thumbnails
#: How the breast-region dHash and its threshold were chosen on the 322 real MIAS films
#: (benchmarks/near_duplicates.py, 168 s on the loaded 2-core AMD EPYC). Known positives: each film
#: re-encoded (JPEG q80), resized (0.6×), re-windowed (γ 0.7) and cropped (4 % a side), then
#: converted like the convert stage; known negatives: every pair of films of different women.
#: The whole-film dHash it replaces flagged 437 of the negatives at 24 bits (FPR 0.85 %) and found
#: 93.3 % of the copies; at 24 bits the breast key finds 95.2 % and flags 1 (at 28: 97.4 %, 4).
NEAR_DUPLICATE_CALIBRATION = {
    "descriptor": "dHash (256 bits) of the breast's bounding box (Otsu mask), not the film",
    "threshold_bits": NEAR_DUPLICATE_BITS,
    "data": "real MIAS, 322 films of 161 women",
    "positives": 1288,
    "true_positive_rate": 0.952,
    "negatives": 51520,
    "false_positives": 1,
    "false_positive_rate": 1.9e-05,
}


@dataclass(frozen=True)
class AuditLayout(Layout):
    """The project's layout, with splits, models, metrics and plots moved under ``out``."""

    out: Path = Path(".cache") / "audit"

    def splits(self, dataset: str) -> Path:
        """The audit's split file."""
        return self.out / "splits" / f"{dataset}.parquet"

    def models(self, dataset: str, backbone: str) -> Path:
        """The audit study's predictions and head."""
        return self.out / "models" / dataset / backbone

    def metrics(self, dataset: str, backbone: str) -> Path:
        """The audit study's metrics JSON."""
        return self.out / "metrics" / dataset / f"{backbone}.json"

    def plots(self, dataset: str, backbone: str) -> Path:
        """The audit study's plots data."""
        return self.out / "plots" / dataset / backbone


# ----------------------------------------------------------------------------- inflation


def inflation(
    image: tuple[np.ndarray, np.ndarray, Sequence[str]],
    patient: tuple[np.ndarray, np.ndarray, Sequence[str]],
    class_names: Sequence[str],
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per metric: image-level, patient-level, their difference and its CI.

    Each side is ``(y_true, prob, patient per row)`` of its own held-out test set. The two test
    sets differ, so the CI resamples the patients of each side independently (percentile CI of
    the difference of the replicates).

    Raises:
        ValueError: ``n`` below 1 or ``ci`` outside (0, 1).
    """
    if n < 1 or not 0.0 < ci < 1.0:
        raise ValueError(f"bootstrap n={n}, ci={ci}; use n >= 1 and 0 < ci < 1")
    sides = [(np.asarray(y), np.asarray(p), patient_rows(g)) for y, p, g in (image, patient)]
    points = [compute_metrics(y, p, class_names) for y, p, _ in sides]
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n):
        reps = []
        for y, p, members in sides:
            idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
            reps.append(compute_metrics(y[idx], p[idx], class_names))
        for m in METRICS:
            diffs[m].append(reps[0][m] - reps[1][m])
    out: dict[str, dict[str, float]] = {}
    for m in METRICS:
        low, high, _ = percentile_interval(diffs[m], ci)
        out[m] = {
            "image": points[0][m],
            "patient": points[1][m],
            "inflation": points[0][m] - points[1][m],
            "low": low,
            "high": high,
        }
    return out


# ----------------------------------------------------------------------------- split checks


def dhash_array(arr: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """Difference hash of a grey uint8 array: a ``(size+1) × size`` thumbnail, left < right per
    pixel, packed into ``size * size / 8`` bytes (uint8); compare two with :func:`hamming`."""
    from PIL import Image

    small = Image.fromarray(arr).convert("L").resize((size + 1, size), Image.Resampling.BILINEAR)
    px = np.asarray(small, dtype=np.int16)
    return np.packbits((px[:, 1:] > px[:, :-1]).ravel())


def _grey8(path: Path | str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.dtype != np.uint8:  # a 16-bit PNG
        arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    return arr if arr.ndim == 2 else np.asarray(Image.fromarray(arr).convert("L"))


def dhash(path: Path | str, size: int = HASH_SIZE) -> np.ndarray:
    """:func:`dhash_array` of the whole image file."""
    return dhash_array(_grey8(path), size)


def breast_dhash(path: Path | str, size: int = HASH_SIZE) -> np.ndarray:
    """:func:`breast_dhash_array` of an image file: the audit's near-duplicate key."""
    return breast_dhash_array(_grey8(path), size)


def breast_dhash_array(arr: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """:func:`dhash_array` of the breast's tight bounding box (Otsu mask, no margin).

    The whole film's thumbnail is mostly dark background and one bright breast shape, so films of
    different women look alike to it; the breast's own texture does not (see
    :data:`NEAR_DUPLICATE_CALIBRATION`), and padding or a slight crop no longer moves it.
    """
    from mammoflow.data.images import breast_bbox

    top, left, bottom, right = breast_bbox(arr.astype(np.float32) / 255.0, margin=0.0)
    crop = arr[top:bottom, left:right]
    return dhash_array(crop if crop.size else arr, size)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed hashes ``(n, bytes)`` and ``(m, bytes)``."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return _POPCOUNT[x].sum(axis=-1, dtype=np.int64)


def near_pairs(
    hashes: np.ndarray, max_distance: int, block: int = 256
) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for ``i < j`` within ``max_distance`` bits, in row blocks."""
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(hashes), block):
        dist = hamming(hashes[start : start + block], hashes)
        for i, j in zip(*np.nonzero(dist <= max_distance), strict=True):
            if start + i < j:
                out.append((int(start + i), int(j), int(dist[i, j])))
    return out


def _partition(splits: pd.DataFrame) -> pd.Series:
    return pd.Series(
        np.where(splits["split"] == "test", "test", "fold" + splits["fold"].astype(str)),
        index=splits["image_id"].to_numpy(),
    )


def _pairs_across(keys: pd.Series, part: pd.Series) -> list[tuple[str, str]]:
    """Image pairs that share a key (a hash) but sit in different partitions."""
    pairs = []
    for _, members in keys.groupby(keys).groups.items():
        ids = sorted(str(m) for m in members)
        pairs += [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :] if part[a] != part[b]]
    return pairs


def check_split(
    splits: pd.DataFrame,
    frame: pd.DataFrame,
    root: Path = Path(),
    max_distance: int = NEAR_DUPLICATE_BITS,
) -> dict[str, Any]:
    """Patients on both sides, exact and near-duplicate images across partitions.

    Args:
        splits: a split file's rows (``image_id, patient_id, split, fold``).
        frame: the converted manifest (``converted_sha256``, ``converted_path``).
        root: what relative ``converted_path`` values are relative to.
        max_distance: dHash bits within which two images count as near duplicates.
    """
    part = _partition(splits)
    pat = splits.set_index("image_id")["patient_id"]
    test_p = set(pat[part == "test"].tolist())
    cv_p = set(pat[part != "test"].tolist())
    folds_per_patient = pd.Series(part[part != "test"].to_numpy(), index=pat[part != "test"])
    several = folds_per_patient.groupby(level=0).nunique()
    rows = frame.set_index("image_id").reindex(part.index)
    exact = _pairs_across(rows["converted_sha256"].dropna(), part)
    paths = [p if Path(p).is_absolute() else root / p for p in rows["converted_path"].astype(str)]
    hashes = np.stack([breast_dhash(p) for p in paths]) if paths else np.zeros((0, 32), np.uint8)
    ids = list(part.index)
    near = [
        (ids[i], ids[j], d)
        for i, j, d in near_pairs(hashes, max_distance)
        if part.iloc[i] != part.iloc[j]
    ]
    where = dict(zip(ids, (str(p) for p in paths), strict=True))
    return {
        "patients_in_test_and_cv": len(test_p & cv_p),
        "patients_in_several_folds": int((several > 1).sum()),
        "exact_duplicates_across": len(exact),
        "near_duplicates_across": len(near),
        "near_duplicate_bits": max_distance,
        "near_duplicate_calibration": NEAR_DUPLICATE_CALIBRATION,
        "examples": {
            "patients": sorted(test_p & cv_p)[:10],
            "exact": [list(p) for p in exact[:10]],
            "near": [list(p) for p in near[:10]],
        },
        # every flagged pair with both files, for a person to judge (the report shows them)
        "near_pairs": [
            {"a": a, "b": b, "bits": d, "path_a": where[a], "path_b": where[b]}
            for a, b, d in near[:MAX_SHOWN_PAIRS]
        ],
    }


# ----------------------------------------------------------------------------- the audit


def _study(
    cfg: Config, dataset: str, backbone: str, group_by: str, layout: Layout, tracker: Any
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """One grouping: its split written under the audit layout, the study, its predictions."""
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.split import splits_for, write_splits
    from mammoflow.training.train import run_study

    cfg = cfg.with_overrides({"split.group_by": group_by}, source="audit")
    al = AuditLayout(root=layout.root, out=layout.audit_work(dataset, group_by))
    frame = read_manifest(layout.processed(dataset))
    splits = splits_for(frame, cfg.split)
    split_hash = write_splits(splits, al.splits(dataset))
    result = run_study(cfg, dataset, backbone, layout=al, tracker=tracker)
    preds = json.loads((al.models(dataset, backbone) / "predictions.json").read_text("utf-8"))
    summary = {**result.summary(), "split_hash": split_hash, "split_file": str(al.splits(dataset))}
    return summary, preds["test"], splits


def run_audit(
    cfg: Config, dataset: str, backbone: str | None = None, layout: Layout | None = None
) -> dict[str, Any]:
    """Study ``backbone`` (default: the first of ``model.backbones``) split by image and by
    patient; inflation per metric with CIs, split checks; one MLflow run; reports/<ds>/audit.*.

    Raises:
        ValueError: a backbone that is not in ``model.backbones``.
    """
    from mammoflow.data.manifest import CLASSES, read_manifest
    from mammoflow.tracking import AuditTracker

    layout = layout or Layout()
    cfg = cfg.for_dataset(dataset)
    backbone = backbone or cfg.model.backbones[0]
    if backbone not in cfg.model.backbones:
        raise ValueError(f"backbone {backbone!r} is not in model.backbones {cfg.model.backbones!r}")
    tracker = AuditTracker(root=layout.root)
    frame = read_manifest(layout.processed(dataset))
    patients = dict(zip(frame["image_id"], frame["patient_id"], strict=True))
    sides: dict[str, Any] = {}
    studies: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for group_by in GROUPINGS:
        summary, test, splits = _study(cfg, dataset, backbone, group_by, layout, tracker)
        studies[group_by] = summary
        y, prob = np.asarray(test["y_true"]), np.asarray(test["prob"])
        sides[group_by] = (y, prob, [patients[i] for i in test["image_id"]])
        checks[group_by] = check_split(splits, frame, layout.root)
    table = inflation(
        sides["image"],
        sides["patient"],
        CLASSES[cfg.dataset(dataset).kind],
        n=max(cfg.evaluate.bootstrap, 1),
        ci=cfg.evaluate.ci,
        seed=cfg.train.seed,
    )
    out = {
        "dataset": dataset,
        "backbone": backbone,
        "seed": cfg.split.seed,
        "k_folds": cfg.split.k_folds,
        "epochs": cfg.train.epochs,
        "ci": cfg.evaluate.ci,
        "inflation": table,
        "checks": checks,
        "studies": studies,
    }
    text = summary_text(out)
    out["mlflow_run_id"] = tracker.log_audit(dataset, backbone, out, text)
    _write(layout, dataset, out, text)
    return out


def _num(v: Any) -> str:
    return f"{v:+.3f}" if isinstance(v, float) and math.isfinite(v) else "–"


def summary_text(audit: Mapping[str, Any]) -> str:
    """The printed summary: inflation per metric with CIs, then the split checks."""
    level = f"{audit['ci']:.0%}"
    lines = [
        f"Leakage audit of {audit['dataset']} ({audit['backbone']}; seed {audit['seed']}, "
        f"{audit['k_folds']} folds, {audit['epochs']} epochs): held-out test, image-level split "
        "vs patient-level split",
        f"{'metric':<18} {'image':>8} {'patient':>8} {'inflation':>10}  [{level} CI]",
    ]
    for m, v in audit["inflation"].items():
        img, pat = (f"{v[k]:.3f}" if math.isfinite(v[k]) else "–" for k in ("image", "patient"))
        lines.append(
            f"{m:<18} {img:>8} {pat:>8} {_num(v['inflation']):>10}  "
            f"[{_num(v['low'])}, {_num(v['high'])}]"
        )
    lines.append(
        "inflation = image-level − patient-level; positive means the leaky split flatters."
    )
    for group_by, c in audit["checks"].items():
        lines.append(
            f"split by {group_by}: {c['patients_in_test_and_cv']} patients in test and CV, "
            f"{c['patients_in_several_folds']} in several folds, "
            f"{c['exact_duplicates_across']} exact and {c['near_duplicates_across']} near-duplicate "
            f"(breast-region dHash ≤ {c['near_duplicate_bits']} of {HASH_SIZE**2} bits; false-"
            f"positive rate {NEAR_DUPLICATE_CALIBRATION['false_positive_rate']:.1e} on real MIAS) "
            "image pairs across partitions"
        )
    return "\n".join(lines) + "\n"


def _write(layout: Layout, dataset: str, audit: Mapping[str, Any], text: str) -> None:
    from mammoflow.files import atomic_write_json, atomic_write_text, finite_json

    folder = layout.reports() / dataset
    atomic_write_json(folder / "audit.json", finite_json(dict(audit)))
    atomic_write_text(folder / "audit.md", f"```\n{text}```\n")


def audit_stage(
    cfg: Config, dataset: str, backbone: str | None = None, layout: Layout | None = None
) -> dict[str, Any]:
    """Leakage audit of ``dataset``: image- vs patient-level study, inflation, split checks.

    Returns:
        ``{"dataset", "backbone", "inflation", "checks", "run_id", "summary"}`` (the summary is
        the printed text); the whole audit is in reports/<dataset>/audit.json.
    """

    res = run_audit(cfg, dataset, backbone, layout or Layout())
    keys = ("dataset", "backbone", "inflation", "checks")
    return {
        **{k: res[k] for k in keys},
        "run_id": res["mlflow_run_id"],
        "summary": summary_text(res),
    }
