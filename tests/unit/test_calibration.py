"""calibration.py: ECE against a loop over bins, temperature scaling, patient bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mammoflow.evaluation import calibration as cal
from mammoflow.evaluation.metrics import MetricsError


def _loop_ece(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al.'s definition written the slow way: bins (lo, hi], 0 in the first."""
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (conf > lo) & (conf <= hi) if b else (conf >= 0) & (conf <= hi)
        if sel.any():
            total += sel.sum() / len(y) * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    return total


def _overconfident(n: int = 600, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); reported probabilities softmax(3 z): overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    true_p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in true_p])
    sharp = np.exp(3 * z) / np.exp(3 * z).sum(axis=1, keepdims=True)
    return y, sharp


def test_ece_matches_the_definition() -> None:
    y, p = _overconfident(300)
    assert cal.ece(y, p) == pytest.approx(_loop_ece(y, p), abs=1e-12)
    assert cal.ece(y, p, n_bins=10) == pytest.approx(_loop_ece(y, p, 10), abs=1e-12)
    # a hand example: two bins' worth of samples
    y2 = np.array([0, 0, 1, 1])
    p2 = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    # bin (0.8667, 0.9333]: conf 0.9, acc 1 → 0.1; bin (0.5333, 0.6]: conf 0.6, acc 0 → 0.6
    assert cal.ece(y2, p2) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)


def test_perfect_and_classwise() -> None:
    y = np.array([0, 1, 2, 1])
    onehot = np.eye(3)[y]
    assert cal.ece(y, onehot) == 0.0
    assert cal.classwise_ece(y, onehot) == 0.0
    assert cal.nll(y, onehot) == pytest.approx(0.0, abs=1e-9)
    assert cal.brier(y, onehot) == 0.0
    uniform = np.full((4, 3), 1 / 3)
    # class k: p = 1/3 everywhere, frequency of k = 1/4, 1/2, 1/4
    expected = np.mean([abs(0.25 - 1 / 3), abs(0.5 - 1 / 3), abs(0.25 - 1 / 3)])
    assert cal.classwise_ece(y, uniform) == pytest.approx(expected)
    assert math.isnan(cal.ece(np.array([], int), np.zeros((0, 3))))


def test_reliability_bins_sum_to_the_samples() -> None:
    y, p = _overconfident(200)
    rows = cal.reliability_bins(y, p)
    assert len(rows) == 15 and rows[0]["low"] == 0.0 and rows[-1]["high"] == 1.0
    assert sum(r["count"] for r in rows) == 200
    gap = sum(r["count"] / 200 * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])
    assert gap == pytest.approx(cal.ece(y, p))
    with pytest.raises(MetricsError, match="n_bins=0"):
        cal.reliability_bins(y, p, n_bins=0)


def test_temperature_fixes_overconfidence_and_keeps_the_argmax() -> None:
    y, p = _overconfident(1500, seed=1)
    t = cal.fit_temperature(y, p)
    assert 2.4 < t < 3.6  # the probabilities were sharpened by 3
    scaled = cal.apply_temperature(p, t)
    assert np.allclose(scaled.sum(axis=1), 1.0)
    assert (scaled.argmax(axis=1) == p.argmax(axis=1)).all()
    assert cal.nll(y, scaled) < cal.nll(y, p)
    assert cal.ece(y, scaled) < cal.ece(y, p)
    assert np.allclose(cal.apply_temperature(p, 1.0), p, atol=1e-9)
    with pytest.raises(MetricsError, match="temperature=0"):
        cal.apply_temperature(p, 0)
    assert cal.fit_temperature(np.array([], int), np.zeros((0, 2))) == 1.0


def test_bootstrap_ci_brackets_the_point_and_checks_inputs() -> None:
    y, p = _overconfident(120, k=2, seed=2)
    groups = [f"p{i // 2}" for i in range(120)]
    ci = cal.bootstrap_calibration_ci(y, p, groups, n=200, seed=0)
    for m in ("ece", "classwise_ece"):
        assert ci[m]["low"] <= ci[m]["point"] <= ci[m]["high"]
        assert ci[m]["n_valid"] == 200
    assert ci == cal.bootstrap_calibration_ci(y, p, groups, n=200, seed=0)
    with pytest.raises(MetricsError, match="groups has 3"):
        cal.bootstrap_calibration_ci(y, p, ["a", "b", "c"], n=10)
    with pytest.raises(MetricsError, match=r"ci=1\.5"):
        cal.bootstrap_calibration_ci(y, p, groups, ci=1.5)


def test_calibrate_fits_on_validation_and_reports_the_test() -> None:
    y, p = _overconfident(900, seed=3)
    res = cal.calibrate(y[:600], p[:600], y[600:], p[600:], [str(i) for i in range(300)], n=50)
    assert res.n_fit == 600 and res.n_test == 300
    assert res.calibrated["ece"] < res.raw["ece"]
    flat = res.metrics()
    assert flat["temperature"] == res.temperature
    assert {"test_ece", "test_calibrated_ece", "test_ece_ci_low", "oof_ece"} <= set(flat)
    doc = json.loads(json.dumps(res.to_dict()))
    assert doc["temperature"] == res.temperature and len(doc["reliability"]["raw"]) == 15
    fig = cal.reliability_figure(res.bins, "vgg16")
    assert len(fig.axes[0].lines) == 3
