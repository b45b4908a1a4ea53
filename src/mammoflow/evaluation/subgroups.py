"""Metrics per subgroup (pure): counts, patient-bootstrap CIs, a flag on small groups.

The factors come from the manifest: MIAS background tissue (F fatty, G fatty-glandular,
D dense-glandular), abnormality class (the class of the lesion that sets the label — malignant
wins, then benign; NORM without lesions) and laterality; CMMD abnormality (calcification, mass,
both), view, laterality and age band. A subgroup with fewer than ``min_n`` images (10 by
default) is flagged ``small``: its numbers are shown, but they say little.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mammoflow.evaluation.metrics import bootstrap_ci

FACTORS: dict[str, tuple[str, ...]] = {
    "mias": ("tissue", "abnormality", "laterality"),
    "cmmd": ("abnormality", "view", "laterality", "age_band"),
}
METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")
MIN_N = 10
UNKNOWN = "unknown"


def _mias_abnormality(extras: Mapping[str, Any]) -> str:
    lesions = list(extras.get("lesions") or [])
    if not lesions:
        return "NORM"
    for severity in ("M", "B"):
        for lesion in lesions:
            if lesion.get("severity") == severity:
                return str(lesion.get("abnormality") or UNKNOWN)
    return str(lesions[0].get("abnormality") or UNKNOWN)


def factor_frame(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """One row per image (index ``image_id``), one column per factor of the dataset ``kind``.

    Raises:
        ValueError: an unknown dataset kind.
    """
    if kind not in FACTORS:
        raise ValueError(f"dataset kind {kind!r} has no subgroups; use one of {sorted(FACTORS)}")
    extras = [json.loads(s) if isinstance(s, str) else dict(s or {}) for s in frame["extras"]]
    cols: dict[str, list[str]] = {}
    for factor in FACTORS[kind]:
        if factor in ("laterality", "view"):
            values = [str(v) if v is not None else UNKNOWN for v in frame[factor]]
        elif kind == "mias" and factor == "abnormality":
            values = [_mias_abnormality(e) for e in extras]
        else:
            values = [str(e.get(factor) or UNKNOWN) for e in extras]
        cols[factor] = values
    return pd.DataFrame(cols, index=pd.Index(frame["image_id"], name="image_id"))


def subgroup_rows(
    ids: Sequence[str],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    factors: pd.DataFrame,
    patients: Mapping[str, str],
    class_names: Sequence[str],
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_n: int = MIN_N,
) -> list[dict[str, Any]]:
    """One row per (factor, value) present among ``ids``: counts and metrics with CIs.

    Rows are ``{"factor", "value", "n", "patients", "small", "metrics": {m: {"point", "low",
    "high"}}}`` in factor order, then by value.
    """
    y = np.asarray(y_true, np.int64)
    p = np.asarray(y_prob, np.float64)
    sub = factors.reindex(list(ids)).fillna(UNKNOWN)
    groups = np.array([patients.get(i, i) for i in ids], dtype=str)
    rows: list[dict[str, Any]] = []
    for factor in factors.columns:
        column = sub[factor].to_numpy(dtype=str)
        for value in sorted(set(column.tolist())):
            sel = np.flatnonzero(column == value)
            boot = bootstrap_ci(
                y[sel], p[sel], groups[sel], class_names, n=n, ci=ci, seed=seed, metrics=METRICS
            )
            rows.append(
                {
                    "factor": factor,
                    "value": value,
                    "n": int(sel.size),
                    "patients": len(set(groups[sel].tolist())),
                    "small": bool(sel.size < min_n),
                    "metrics": {
                        m: {k: boot[m][k] for k in ("point", "low", "high")} for m in METRICS
                    },
                }
            )
    return rows


def _cell(m: Mapping[str, float]) -> str:
    point = m["point"]
    if point is None or not math.isfinite(point):
        return "–"
    low, high = m["low"], m["high"]
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{point:.3f}"
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def subgroup_markdown(
    tables: Mapping[str, Sequence[Mapping[str, Any]]], min_n: int = MIN_N, ci: float = 0.95
) -> str:
    """Markdown tables, one per split (``test``, ``out-of-fold``), with a note on small groups."""
    from mammoflow.templates import render

    view = {
        split: [{**r, "cells": [_cell(r["metrics"][m]) for m in METRICS]} for r in rows]
        for split, rows in tables.items()
    }
    return render("subgroups.md.j2", tables=view, metrics=METRICS, min_n=min_n, level=f"{ci:.0%}")
