"""Classification metrics as pure NumPy functions (checked against scikit-learn in the tests).

Conventions: ``y_true`` holds class indices ``0..n_classes-1``; ``y_prob`` is ``(n, n_classes)``
class probabilities; the predicted class is the arg-max. Precision / recall / F1 of a class with
no predicted (or no true) samples are 0, as scikit-learn's ``zero_division=0``. The *positive*
class for sensitivity / specificity and the ROC curve is malignant, the last class of both MIAS
(normal, benign, malignant) and CMMD (benign, malignant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


class MetricsError(ValueError):
    """Inputs that metrics cannot be computed from; the message names the shapes or values."""


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise MetricsError(
            f"y_prob has shape {p.shape}; expected ({y.shape[0]}, n_classes) to match y_true"
        )
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise MetricsError(
            f"y_true has labels {sorted(set(y.tolist()))!r} outside 0..{p.shape[1] - 1}"
        )
    return y, p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    q = np.asarray(y_pred, dtype=np.int64).ravel()
    return np.bincount(y * n_classes + q, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions."""
    y = np.asarray(y_true).ravel()
    return float(np.mean(y == np.asarray(y_pred).ravel())) if y.size else math.nan


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return precision, recall, f1, support


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    _, recall, _, support = per_class_prf(cm)
    present = support > 0
    return float(recall[present].mean()) if present.any() else math.nan


def binary_roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties count ½); NaN with one class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties, vectorised (a loop over tie groups was most of a 1,000-resample
    # bootstrap's time): each sorted position takes its tie group's mean rank
    changes = np.diff(sorted_s) != 0
    starts = np.r_[0, np.flatnonzero(changes) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(np.r_[False, changes])]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Binary AUC of the last class, or one-vs-rest macro AUC for more than 2 classes.

    Classes absent from ``y_true`` are skipped in the macro mean; NaN if none is usable.
    """
    y, p = _check(y_true, y_prob)
    k = p.shape[1]
    if k == 2:
        return binary_roc_auc(y == 1, p[:, 1])
    aucs = [binary_roc_auc(y == c, p[:, c]) for c in range(k)]
    usable = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(usable)) if usable else math.nan


def sensitivity_specificity(
    y_true: np.ndarray, y_pred: np.ndarray, positive: int
) -> tuple[float, float]:
    """Sensitivity (recall of ``positive``) and specificity (recall of "not positive")."""
    y = np.asarray(y_true).ravel() == positive
    q = np.asarray(y_pred).ravel() == positive
    tp, fn = int((y & q).sum()), int((y & ~q).sum())
    tn, fp = int((~y & ~q).sum()), int((~y & q).sum())
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return sens, spec


def compute_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str],
    positive: int | None = None,
) -> dict[str, float]:
    """All scalar metrics as a flat dict (JSON / tracking friendly).

    Keys: ``accuracy, balanced_accuracy, roc_auc, sensitivity, specificity``,
    ``{precision,recall,f1}_{macro,weighted}`` and ``{precision,recall,f1}_<class>``.

    Args:
        y_true: class indices.
        y_prob: class probabilities ``(n, n_classes)``.
        class_names: names in class-index order.
        positive: index of the malignant class (default: the last class).
    """
    y, p = _check(y_true, y_prob)
    k = p.shape[1]
    if len(class_names) != k:
        raise MetricsError(
            f"class_names {list(class_names)!r} has {len(class_names)} names; y_prob has {k} columns"
        )
    pos = k - 1 if positive is None else positive
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    precision, recall, f1, support = per_class_prf(cm)
    weights = _safe_div(support, np.full_like(support, support.sum()))
    sens, spec = sensitivity_specificity(y, pred, pos)
    out: dict[str, float] = {
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred, k),
        "roc_auc": roc_auc(y, p),
        "sensitivity": sens,
        "specificity": spec,
    }
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"{name}_macro"] = float(values.mean())
        out[f"{name}_weighted"] = float((values * weights).sum())
        for c, cname in enumerate(class_names):
            out[f"{name}_{cname}"] = float(values[c])
    return out


def aggregate(folds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{metric}_mean`` and ``{metric}_std`` (sample std, ddof=1; 0 for one fold) over folds.

    NaN values (e.g. AUC of a fold with one class) are ignored.
    """
    out: dict[str, float] = {}
    keys = sorted({k for fold in folds for k in fold})
    for key in keys:
        vals = np.array([f[key] for f in folds if key in f and not math.isnan(f[key])], float)
        out[f"{key}_mean"] = float(vals.mean()) if vals.size else math.nan
        out[f"{key}_std"] = (
            float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else math.nan)
        )
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    class_names: Sequence[str],
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro"),
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CIs of :func:`compute_metrics` that resample *patients*.

    Returns:
        ``{metric: {"point", "low", "high", "n_valid"}}`` (see :func:`patient_bootstrap`).

    Raises:
        MetricsError: bad ``n`` / ``ci`` or ``groups`` of the wrong length.
    """
    y, p = _check(y_true, y_prob)
    return patient_bootstrap(
        y,
        p,
        groups,
        lambda yy, pp: compute_metrics(yy, pp, class_names),
        metrics,
        n=n,
        ci=ci,
        seed=seed,
    )


Statistic = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


def patient_bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    statistic: Statistic,
    names: Sequence[str],
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Percentile CIs of ``statistic(y, p)[name]`` over resamples of whole patients (all of a
    patient's images together).

    Returns:
        ``{name: {"point", "low", "high", "n_valid"}}``; resamples where a value is undefined
        (NaN, e.g. AUC with one class) are skipped and counted out of ``n_valid``.

    Raises:
        MetricsError: bad ``n`` / ``ci`` or ``groups`` of the wrong length.
    """
    g = np.asarray(groups).astype(str)
    if g.shape[0] != y.shape[0]:
        raise MetricsError(f"groups has {g.shape[0]} entries; y_true has {y.shape[0]}")
    if n < 1:
        raise MetricsError(f"bootstrap n={n}; use at least 1 resample (e.g. 1000)")
    if not 0.0 < ci < 1.0:
        raise MetricsError(f"ci={ci}; use a level between 0 and 1, e.g. 0.95")
    point = statistic(y, p)
    members = patient_rows(g)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(n if members else 0):
        picked = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[i] for i in picked])
        values = statistic(y[idx], p[idx])
        for m in names:
            samples[m].append(values[m])
    out: dict[str, dict[str, float]] = {}
    for m in names:
        low, high, n_valid = percentile_interval(samples[m], ci)
        out[m] = {"point": point[m], "low": low, "high": high, "n_valid": float(n_valid)}
    return out


def patient_rows(groups: Sequence[str] | np.ndarray) -> list[np.ndarray]:
    """The row indices of each patient (sorted patient ids), the unit a bootstrap resamples."""
    unique, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return [np.flatnonzero(inverse == i) for i in range(len(unique))]


def percentile_interval(values: Sequence[float], ci: float) -> tuple[float, float, int]:
    """``(low, high, n_valid)``: the central ``ci`` percentile interval of the replicates that
    are defined (NaNs dropped); NaN bounds when none is."""
    vals = np.array(values, float)
    vals = vals[~np.isnan(vals)]
    if not vals.size:
        return math.nan, math.nan, 0
    alpha = (1.0 - ci) / 2.0
    return float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha)), int(vals.size)


def roc_points(
    y_true: np.ndarray, y_prob: np.ndarray, positive: int | None = None
) -> list[dict[str, float | None]]:
    """ROC curve of ``positive`` vs rest as DVC-plots rows ``{"fpr", "tpr", "threshold"}``.

    One point per distinct score (like ``sklearn.metrics.roc_curve(drop_intermediate=False)``);
    the first point (0, 0) has threshold None (nothing predicted positive).
    """
    tps, fps, thresholds, n_pos, n_neg = _ranked_counts(y_true, y_prob, positive)
    tpr = tps / n_pos if n_pos else np.full_like(tps, math.nan)
    fpr = fps / n_neg if n_neg else np.full_like(fps, math.nan)
    rows: list[dict[str, float | None]] = [{"fpr": 0.0, "tpr": 0.0, "threshold": None}]
    rows.extend(
        {"fpr": float(f), "tpr": float(r), "threshold": float(th)}
        for f, r, th in zip(fpr, tpr, thresholds, strict=True)
    )
    return rows


def _ranked_counts(
    y_true: np.ndarray, y_prob: np.ndarray, positive: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """True / false positives at each distinct score of ``positive`` (highest first), those
    scores, and the numbers of positives and negatives: what ROC and PR curves are drawn from."""
    y, p = _check(y_true, y_prob)
    pos = p.shape[1] - 1 if positive is None else positive
    truth = y == pos
    score = p[:, pos]
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], truth[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[last_of_run].astype(float)
    fps = (last_of_run + 1 - tps).astype(float)
    return tps, fps, s[last_of_run], float(truth.sum()), float((~truth).sum())


def pr_points(
    y_true: np.ndarray, y_prob: np.ndarray, positive: int | None = None
) -> list[dict[str, float | None]]:
    """Precision-recall curve of ``positive`` vs rest as DVC-plots rows
    ``{"recall", "precision", "threshold"}``, one point per distinct score (highest first, like
    ``sklearn.metrics.precision_recall_curve`` read backwards, without its (0, 1) end point);
    recall is None when no sample is positive."""
    tps, fps, thresholds, n_pos, _ = _ranked_counts(y_true, y_prob, positive)
    return [
        {
            "recall": float(tp / n_pos) if n_pos else None,
            "precision": float(tp / (tp + fp)),  # tp + fp >= 1: each run holds a sample
            "threshold": float(th),
        }
        for tp, fp, th in zip(tps, fps, thresholds, strict=True)
    ]


def confusion_rows(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` row per sample (DVC ``confusion`` plot template)."""
    return [
        {"actual": class_names[int(a)], "predicted": class_names[int(b)]}
        for a, b in zip(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel(), strict=True)
    ]
