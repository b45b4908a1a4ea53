"""What DVC's own views show: the study's comparison table and the backbones' curves.

- ``dvc metrics show`` / ``dvc exp show`` read one short row per dataset × backbone,
  ``metrics/summary/<dataset>/<backbone>.json`` (:func:`summary_row`): the train stage's own
  numbers, rounded to 4 decimals in this view only; the detail (every fold metric, CIs, run ids)
  stays in ``metrics/<dataset>/<backbone>.json``, a plain DVC out.
- ``dvc plots show`` / ``dvc plots diff`` overlay the backbones of a dataset (dvc.yaml's
  top-level ``plots``) from the curve data of each backbone in ``plots/<dataset>/<backbone>/``
  (:func:`plot_data`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: the summary's keys: DVC's columns (which it sorts by name)
SUMMARY_KEYS = (
    "cv_f1",  # CV macro-F1, mean over the folds
    "cv_f1_std",  # … its standard deviation over the folds
    "test_f1",  # held-out test macro-F1 of the test model
    "test_f1_lo",  # … its bootstrap CI (evaluate.ci, patients resampled)
    "test_f1_hi",
    "auc",  # held-out test ROC AUC (test.roc_auc of the detail)
    "ece",  # test ECE of the raw probabilities
    "ece_cal",  # … after temperature scaling (what the registered model serves)
)

#: curve files of one backbone, in plots/<dataset>/<backbone>/ (dvc.yaml's top-level plots)
PLOT_FILES = ("confusion.json", "roc.json", "pr.json", "reliability.json", "learning.json")


def _pick(detail: Mapping[str, Any], *keys: str) -> Any:
    node: Any = detail
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(
                f"metrics detail has no {'.'.join(keys)!r}: the train stage writes it "
                "(rerun `dvc repro train`)"
            )
        node = node[key]
    return node


def _round(value: Any) -> float | None:
    """4 decimals; None for a missing or non-finite value (DVC shows it as ``-``)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 4)


def summary_row(detail: Mapping[str, Any]) -> dict[str, float | None]:
    """The summary of one backbone from its detail (``StudyResult.summary()``): :data:`SUMMARY_KEYS`.

    ECE is None when the detail has no calibration (the train stage fits it whenever the
    out-of-fold predictions allow).

    Raises:
        KeyError: a CV / test / CI value is missing from ``detail`` (names the key).
    """
    cal = detail.get("calibration") or {}
    values = {
        "cv_f1": _pick(detail, "cv", "f1_macro_mean"),
        "cv_f1_std": _pick(detail, "cv", "f1_macro_std"),
        "test_f1": _pick(detail, "test", "f1_macro"),
        "test_f1_lo": _pick(detail, "test_ci", "f1_macro", "low"),
        "test_f1_hi": _pick(detail, "test_ci", "f1_macro", "high"),
        "auc": _pick(detail, "test", "roc_auc"),
        "ece": (cal.get("test_raw") or {}).get("ece"),
        "ece_cal": (cal.get("test_calibrated") or {}).get("ece"),
    }
    return {key: _round(values[key]) for key in SUMMARY_KEYS}


def reliability_rows(
    reliability: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """Reliability-diagram rows of the temperature-scaled test predictions (what the registered
    model serves): ``{"confidence", "accuracy", "count"}`` per non-empty bin of calibration.py's
    ``reliability["calibrated"]`` (empty bins have no accuracy and are left out)."""
    return [
        {"confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"]}
        for b in reliability.get("calibrated", [])
        if b.get("count") and b.get("accuracy") is not None
    ]


def learning_rows(histories: Mapping[Any, Mapping[str, Sequence[float]]]) -> list[dict[str, Any]]:
    """Learning curves: per epoch, each history key (loss, val_loss, …) averaged over the CV
    folds that ran that epoch (``folds``: how many; fold 0, the refit model, has no validation
    and is left out)."""
    cv = [h for fold, h in sorted(histories.items(), key=lambda kv: int(kv[0])) if int(fold) > 0]
    epochs = max((len(v) for h in cv for v in h.values()), default=0)
    rows: list[dict[str, Any]] = []
    for e in range(epochs):
        row: dict[str, Any] = {"epoch": e + 1}
        for key in sorted({k for h in cv for k in h}):
            values = [h[key][e] for h in cv if len(h.get(key, [])) > e]
            row[key] = float(np.mean(values))
        row["folds"] = sum(1 for h in cv if any(len(v) > e for v in h.values()))
        rows.append(row)
    return rows


def plot_data(
    y: np.ndarray,
    prob: np.ndarray,
    calibration: Mapping[str, Any],
    histories: Mapping[Any, Mapping[str, Sequence[float]]],
) -> dict[str, list[dict[str, Any]]]:
    """The overlay curves of one backbone by file name (plots/<dataset>/<backbone>/, beside the
    train stage's confusion.json and roc.json): pr.json, reliability.json, learning.json.

    A curve without data (no calibration, or every fold resumed from MLflow without its
    per-epoch history) is empty, with a warning: its chart then lacks this backbone.
    """
    from mammoflow.evaluation.metrics import pr_points

    curves = {
        "pr.json": pr_points(y, prob),
        "reliability.json": reliability_rows(calibration.get("reliability") or {}),
        "learning.json": learning_rows(histories),
    }
    for name, rows in curves.items():
        if not rows:
            log.warning("%s: no data (%s); its chart lacks this backbone", name, _why_empty(name))
    return curves


def _why_empty(name: str) -> str:
    if name == "reliability.json":
        return "no calibration was fitted"
    if name == "learning.json":
        return "no fold trained in this run: folds resumed from MLflow bring no per-epoch history"
    return "no test predictions"
