"""Calibration as pure NumPy / SciPy functions: ECE, classwise ECE, reliability bins, temperature.

* Top-label ECE (Guo et al. 2017): the confidence of the predicted class (the arg-max) against
  its accuracy, in ``n_bins`` equal-width bins over [0, 1] (15 by default); bin ``b`` holds the
  confidences in ``(b/n, (b+1)/n]``, the first bin also 0. ECE = Σ_b |B_b|/n · |acc_b − conf_b|.
* Classwise ECE (Kull et al. 2019): the same binned gap for each class's probability against
  "is this class", averaged over the classes.
* Temperature scaling (Guo et al. 2017): the stored probabilities become logits through
  ``log`` (softmax is shift-invariant, so ``softmax(log p / T)`` is the scaled model); ``T`` is
  fitted by minimising the negative log-likelihood on the out-of-fold validation predictions —
  predictions of single fold models — and so applied to single models: to each member of an
  ensemble before the mean (:func:`calibrated_probabilities`), exactly as the registered
  serving model does it (a ``temperature`` layer, see ``models.build.ensemble_model``). On one
  model it never changes the arg-max; on an ensemble's mean it can (counted: ``argmax_changed``).
* Confidence intervals resample *patients*, as :func:`mammoflow.evaluation.metrics.bootstrap_ci` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mammoflow.evaluation.metrics import MetricsError, _check, patient_bootstrap

N_BINS = 15
_EPS = 1e-12
T_BOUNDS = (0.05, 20.0)  # temperatures outside this range mean a degenerate validation set


def _edges(n_bins: int) -> np.ndarray:
    if n_bins < 1:
        raise MetricsError(f"n_bins={n_bins}; use at least 1 bin (e.g. 15)")
    return np.linspace(0.0, 1.0, n_bins + 1)


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: ``(b/n, (b+1)/n]`` → b, and 0 → 0."""
    _edges(n_bins)
    idx = np.ceil(np.clip(conf, 0.0, 1.0) * n_bins).astype(np.int64) - 1
    return np.clip(idx, 0, n_bins - 1)


def _binned_gap(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> float:
    """Σ_b |B_b|/n · |mean(hit_b) − mean(conf_b)|; NaN for no samples."""
    if conf.size == 0:
        return math.nan
    b = _bin_index(conf, n_bins)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(b, weights=hit.astype(np.float64), minlength=n_bins)
    return float(np.abs(hit_sum - conf_sum).sum() / conf.size)


def ece(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error (Guo et al. 2017), 15 equal-width bins by default."""
    y, p = _check(y_true, y_prob)
    return _binned_gap(p.max(axis=1), p.argmax(axis=1) == y, n_bins)


def classwise_ece(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = N_BINS) -> float:
    """Mean over the classes of the binned gap between ``p[:, k]`` and ``y == k``."""
    y, p = _check(y_true, y_prob)
    if y.size == 0:
        return math.nan
    return float(np.mean([_binned_gap(p[:, k], y == k, n_bins) for k in range(p.shape[1])]))


def nll(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    y, p = _check(y_true, y_prob)
    if y.size == 0:
        return math.nan
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], _EPS, 1.0))))


def brier(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of Σ_k (p_k − 1[y = k])²."""
    y, p = _check(y_true, y_prob)
    if y.size == 0:
        return math.nan
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = N_BINS
) -> dict[str, float]:
    """``{"ece", "classwise_ece", "nll", "brier"}`` of one set of predictions."""
    return {
        "ece": ece(y_true, y_prob, n_bins),
        "classwise_ece": classwise_ece(y_true, y_prob, n_bins),
        "nll": nll(y_true, y_prob),
        "brier": brier(y_true, y_prob),
    }


def reliability_bins(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = N_BINS
) -> list[dict[str, float]]:
    """Top-label reliability-diagram data: one row per bin.

    Rows are ``{"low", "high", "count", "confidence", "accuracy"}``; empty bins have count 0
    and NaN confidence / accuracy.
    """
    y, p = _check(y_true, y_prob)
    edges = _edges(n_bins)
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(np.float64)
    b = _bin_index(conf, n_bins)
    rows = []
    for i in range(n_bins):
        sel = b == i
        n = int(sel.sum())
        rows.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "count": float(n),
                "confidence": float(conf[sel].mean()) if n else math.nan,
                "accuracy": float(hit[sel].mean()) if n else math.nan,
            }
        )
    return rows


# ----------------------------------------------------------------------------- temperature


def logits_of(y_prob: np.ndarray) -> np.ndarray:
    """``log p`` (clipped at 1e-12): logits up to a per-row constant, which softmax ignores."""
    return np.log(np.clip(np.asarray(y_prob, dtype=np.float64), _EPS, 1.0))


def apply_temperature(y_prob: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the probabilities of the temperature-scaled model.

    Raises:
        MetricsError: a temperature that is not a positive finite number.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise MetricsError(f"temperature={temperature!r}; use a positive finite number")
    z = logits_of(y_prob) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrated_probabilities(members: Sequence[np.ndarray], temperature: float) -> np.ndarray:
    """What the served (registered) model returns: ``mean_k softmax(log p_k / T)``.

    ``members``: the probabilities of the test model's members on the same rows — the K fold
    models of an ``ensemble`` (T, fitted on single fold models' out-of-fold predictions, is
    applied to each before the mean, as it was fitted), or the one ``refit`` model.

    Raises:
        MetricsError: no members, members of different shapes, or a bad temperature.
    """
    if not members:
        raise MetricsError("no member probabilities to calibrate")
    arrays = [np.asarray(m, np.float64) for m in members]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise MetricsError(f"member probabilities differ in shape: {[a.shape for a in arrays]}")
    return np.mean([apply_temperature(a, temperature) for a in arrays], axis=0)


def fit_temperature(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """The temperature minimising the NLL of ``softmax(log p / T)`` on ``(y_true, y_prob)``.

    Searched over ``log T`` in ``T_BOUNDS`` (bounded Brent). 1.0 when there is nothing to fit
    (no samples).
    """
    from scipy.optimize import minimize_scalar

    y, p = _check(y_true, y_prob)
    if y.size == 0:
        return 1.0
    z = logits_of(p)
    rows = np.arange(y.size)

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(s).sum(axis=1))
        return float(np.mean(log_norm - s[rows, y]))

    lo, hi = (math.log(b) for b in T_BOUNDS)
    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    best = float(res.x)
    return float(math.exp(best)) if loss(best) <= loss(0.0) else 1.0


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_calibration_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    n_bins: int = N_BINS,
) -> dict[str, dict[str, float]]:
    """Patient-bootstrap percentile CIs of ECE and classwise ECE.

    Returns:
        ``{"ece" | "classwise_ece": {"point", "low", "high", "n_valid"}}``.

    Raises:
        MetricsError: bad ``n`` / ``ci`` or ``groups`` of the wrong length.
    """
    y, p = _check(y_true, y_prob)
    return patient_bootstrap(
        y,
        p,
        groups,
        lambda yy, pp: {"ece": ece(yy, pp, n_bins), "classwise_ece": classwise_ece(yy, pp, n_bins)},
        ("ece", "classwise_ece"),
        n=n,
        ci=ci,
        seed=seed,
    )


# ----------------------------------------------------------------------------- a study's calibration


@dataclass
class Calibration:
    """Temperature fitted on out-of-fold validation, raw and calibrated test calibration."""

    temperature: float
    n_fit: int
    n_test: int
    n_bins: int
    raw: dict[str, float]
    calibrated: dict[str, float]
    raw_ci: dict[str, dict[str, float]]
    calibrated_ci: dict[str, dict[str, float]]
    oof: dict[str, float]
    bins: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    members: int = 1  # test-model members T is applied to before the mean (K for an ensemble)
    argmax_changed: int = 0  # test rows whose predicted class calibration changed (ensemble)

    def to_dict(self) -> dict[str, Any]:
        """The ``calibration.json`` sidecar (what ``predict`` needs: ``temperature``)."""
        return {
            "method": "temperature_scaling",
            "temperature": self.temperature,
            "fitted_on": "out-of-fold validation predictions",
            "logits": "log(probability)",
            "applied": "per member, then averaged: mean_k softmax(log p_k / T)"
            if self.members > 1
            else "softmax(log p / T)",
            "members": self.members,
            "served": "the registered model applies T itself (layer 'temperature'); "
            "`mammoflow predict --raw` gives the uncalibrated probabilities",
            "argmax_changed": self.argmax_changed,
            "n_fit": self.n_fit,
            "n_test": self.n_test,
            "n_bins": self.n_bins,
            "test_raw": self.raw,
            "test_calibrated": self.calibrated,
            "test_raw_ci": self.raw_ci,
            "test_calibrated_ci": self.calibrated_ci,
            "oof_raw": self.oof,
            "reliability": self.bins,
        }

    def metrics(self) -> dict[str, float]:
        """Flat metrics for tracking: ``test_ece``, ``test_calibrated_ece``, CIs, temperature."""
        out: dict[str, float] = {"temperature": self.temperature}
        for prefix, vals, cis in (
            ("test_", self.raw, self.raw_ci),
            ("test_calibrated_", self.calibrated, self.calibrated_ci),
        ):
            out.update({f"{prefix}{k}": v for k, v in vals.items()})
            for m, c in cis.items():
                out[f"{prefix}{m}_ci_low"] = c["low"]
                out[f"{prefix}{m}_ci_high"] = c["high"]
        out.update({f"oof_{k}": v for k, v in self.oof.items()})
        out["test_calibrated_argmax_changed"] = float(self.argmax_changed)
        return out


def calibrate(
    val_y: np.ndarray,
    val_prob: np.ndarray,
    test_y: np.ndarray,
    test_prob: np.ndarray,
    test_groups: Sequence[str] | np.ndarray,
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    n_bins: int = N_BINS,
    test_members: Sequence[np.ndarray] | None = None,
    temperature: float | None = None,
) -> Calibration:
    """Fit T on the out-of-fold validation predictions; measure the test before and after.

    ``test_members``: the test model's members' probabilities (an ensemble's fold models); the
    calibrated test is :func:`calibrated_probabilities` of them, as the served model computes
    it. Default: ``test_prob`` is one model. ``temperature``: use this T (already fitted on the
    same out-of-fold predictions) instead of fitting it again.
    """
    if temperature is None:
        temperature = fit_temperature(val_y, val_prob)
    members = list(test_members) if test_members is not None else [test_prob]
    scaled = calibrated_probabilities(members, temperature)
    raw = np.asarray(test_prob, np.float64)
    boot: dict[str, Any] = {"n": n, "ci": ci, "seed": seed, "n_bins": n_bins}
    return Calibration(
        temperature=temperature,
        n_fit=int(np.asarray(val_y).size),
        n_test=int(np.asarray(test_y).size),
        n_bins=n_bins,
        raw=calibration_metrics(test_y, test_prob, n_bins),
        calibrated=calibration_metrics(test_y, scaled, n_bins),
        raw_ci=bootstrap_calibration_ci(test_y, test_prob, test_groups, **boot),
        calibrated_ci=bootstrap_calibration_ci(test_y, scaled, test_groups, **boot),
        oof=calibration_metrics(val_y, val_prob, n_bins),
        bins={
            "raw": reliability_bins(test_y, test_prob, n_bins),
            "calibrated": reliability_bins(test_y, scaled, n_bins),
        },
        members=len(members),
        argmax_changed=int((scaled.argmax(axis=1) != raw.argmax(axis=1)).sum()) if raw.size else 0,
    )


def reliability_figure(
    bins: Mapping[str, Sequence[Mapping[str, float]]], title: str = "Reliability"
) -> Any:
    """Reliability diagram: accuracy per confidence bin for each curve, and the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for label, rows in bins.items():
        used = [r for r in rows if r["count"] > 0]
        ax.plot(
            [r["confidence"] for r in used],
            [r["accuracy"] for r in used],
            marker="o",
            label=f"{label} (n={int(sum(r['count'] for r in used))})",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top label)", ylabel="accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
