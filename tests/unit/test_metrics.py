"""metrics.py against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mammoflow.evaluation import metrics as mm

NAMES3 = ("normal", "benign", "malignant")


def _data(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    logits = np.round(logits, 1)  # create ties
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, prob


@pytest.mark.parametrize(("k", "seed"), [(2, 0), (3, 1), (3, 2)])
def test_compute_metrics_equals_sklearn(k: int, seed: int) -> None:
    y, p = _data(80, k, seed)
    names = NAMES3[-k:]
    pred = p.argmax(1)
    got = mm.compute_metrics(y, p, names)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert got[f"precision_{avg}"] == pytest.approx(pr)
        assert got[f"recall_{avg}"] == pytest.approx(rc)
        assert got[f"f1_{avg}"] == pytest.approx(f1)
    pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    for c, name in enumerate(names):
        assert got[f"f1_{name}"] == pytest.approx(f1[c])
        assert got[f"precision_{name}"] == pytest.approx(pr[c])
    expected_auc = (
        skm.roc_auc_score(y, p[:, 1])
        if k == 2
        else skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    )
    assert got["roc_auc"] == pytest.approx(expected_auc)
    pos = k - 1
    assert got["sensitivity"] == pytest.approx(skm.recall_score(y == pos, pred == pos))
    assert got["specificity"] == pytest.approx(skm.recall_score(y != pos, pred != pos))
    np.testing.assert_array_equal(
        mm.confusion_matrix(y, pred, k), skm.confusion_matrix(y, pred, labels=range(k))
    )


def test_roc_points_equal_sklearn() -> None:
    y, p = _data(60, 3, 3)
    rows = mm.roc_points(y, p)
    fpr, tpr, thr = skm.roc_curve(y == 2, p[:, 2], drop_intermediate=False)
    assert [r["fpr"] for r in rows] == pytest.approx(list(fpr))
    assert [r["tpr"] for r in rows] == pytest.approx(list(tpr))
    assert [r["threshold"] for r in rows[1:]] == pytest.approx(list(thr[1:]))


def test_confusion_rows_and_aggregate() -> None:
    rows = mm.confusion_rows(np.array([0, 2]), np.array([1, 2]), NAMES3)
    assert rows == [
        {"actual": "normal", "predicted": "benign"},
        {"actual": "malignant", "predicted": "malignant"},
    ]
    agg = mm.aggregate([{"accuracy": 0.5, "roc_auc": math.nan}, {"accuracy": 0.7, "roc_auc": 0.8}])
    assert agg["accuracy_mean"] == pytest.approx(0.6)
    assert agg["accuracy_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert agg["roc_auc_mean"] == pytest.approx(0.8) and agg["roc_auc_std"] == 0.0


def test_bootstrap_resamples_patients_and_is_seeded() -> None:
    y, p = _data(40, 2, 4)
    groups = np.repeat([f"p{i}" for i in range(20)], 2)
    a = mm.bootstrap_ci(y, p, groups, ("benign", "malignant"), n=200, seed=1)
    b = mm.bootstrap_ci(y, p, groups, ("benign", "malignant"), n=200, seed=1)
    assert a == b
    for m, v in a.items():
        assert v["low"] <= v["point"] <= v["high"] or math.isnan(v["point"]), m
    # one patient only: every resample is the same patient → degenerate interval
    one = mm.bootstrap_ci(y[:2], p[:2], ["p0", "p0"], ("benign", "malignant"), n=20, seed=0)
    assert one["accuracy"]["low"] == one["accuracy"]["high"]
    with pytest.raises(mm.MetricsError, match="groups has 3 entries"):
        mm.bootstrap_ci(y, p, ["a", "b", "c"], ("benign", "malignant"))


def test_bad_shapes_are_clear() -> None:
    with pytest.raises(mm.MetricsError, match=r"shape \(3, 2\)"):
        mm.compute_metrics(np.array([0, 1]), np.zeros((3, 2)), ("a", "b"))
    with pytest.raises(mm.MetricsError, match=r"outside 0\.\.1"):
        mm.compute_metrics(np.array([0, 5]), np.zeros((2, 2)), ("a", "b"))


def _auc_by_tie_loop(y: np.ndarray, s: np.ndarray) -> float:
    """The rank AUC as first written (a loop over tie groups): the reference of the CIs in
    metrics/, which must not move."""
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_equals_the_tie_loop_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (2, 7, 60, 400):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.uniform(size=n), int(rng.integers(1, 4)))  # many ties
        assert mm.binary_roc_auc(y, s) == _auc_by_tie_loop(y, s)


def test_pr_points_equal_sklearn() -> None:
    y, p = _data(60, 3, 3)
    rows = mm.pr_points(y, p)
    prec, rec, thr = skm.precision_recall_curve(y == 2, p[:, 2])
    # sklearn: thresholds ascending, then its (recall 0, precision 1) end point; ours: descending
    assert [r["precision"] for r in rows] == pytest.approx(list(prec[:-1][::-1]))
    assert [r["recall"] for r in rows] == pytest.approx(list(rec[:-1][::-1]))
    assert [r["threshold"] for r in rows] == pytest.approx(list(thr[::-1]))
