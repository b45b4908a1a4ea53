"""The champion's selection rule, as pure functions: which number ranks the backbones.

The default rule (``tracking.registry_metric: cv_f1_macro_mean``) ranks on the mean of the
out-of-fold (cross-validated) metric, so the held-out test set plays no part in choosing the
model and the champion's test score stays an unbiased estimate of its performance. A ``test_*``
metric is still allowed, but selecting on the test set and then reporting that same test score is
optimistic by construction (the winner's curse); every place that states the rule says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from mammoflow.config import REGISTRY_METRIC_PATTERN

#: the default selection metric: CV mean of macro F1 over the folds' validation predictions
DEFAULT_METRIC = "cv_f1_macro_mean"


class SelectionError(ValueError):
    """A selection metric that names no number of the study."""


def check_metric(metric: str) -> str:
    """``metric`` if it is ``cv_<name>_mean`` / ``cv_<name>_std`` or ``test_<name>``.

    Raises:
        SelectionError: another shape (the message names the value and the two forms).
    """
    if re.fullmatch(REGISTRY_METRIC_PATTERN, metric):
        return metric
    raise SelectionError(
        f"tracking.registry_metric={metric!r}: use cv_<metric>_mean (cross-validated, e.g. "
        f"{DEFAULT_METRIC!r}) or test_<metric> (held-out test, optimistic when used to select)"
    )


def peeks(metric: str) -> bool:
    """True when the rule selects on the held-out test set."""
    return metric.startswith("test_")


def value(summary: Mapping[str, Any], metric: str) -> float:
    """The selection number of one backbone from its metrics JSON (``cv`` / ``test`` sections).

    NaN when the metric could not be computed (that backbone ranks last).

    Raises:
        SelectionError: a metric of neither form.
    """
    check_metric(metric)
    section, key = ("test", metric.removeprefix("test_")) if peeks(metric) else ("cv", metric[3:])
    raw = (summary.get(section) or {}).get(key)
    return math.nan if raw is None else float(raw)


def rank(scores: Mapping[str, float]) -> list[str]:
    """Backbones best first; NaN scores last (higher is better)."""
    return sorted(scores, key=lambda b: (scores[b] == scores[b], scores[b]), reverse=True)


def rule_text(metric: str) -> str:
    """One sentence stating the rule, for the report and the model card."""
    if not re.fullmatch(REGISTRY_METRIC_PATTERN, metric):
        return f"Champion chosen on `{metric}` (neither a CV nor a test metric of the study)."
    if peeks(metric):
        return (
            f"Champion chosen on the held-out test metric `{metric}`, the same test set its "
            "performance is reported on."
        )
    return (
        f"Champion chosen on the cross-validated metric `{metric}` (out-of-fold validation "
        "predictions only); the held-out test set played no part in the choice, so the "
        "champion's test numbers are an unbiased estimate."
    )


def warning_text(metric: str) -> str | None:
    """The winner's-curse warning when the rule peeks at the test set, else None."""
    if not peeks(metric):
        return None
    return (
        f"Warning: selected on the test set (`{metric}`). The champion's test estimate is "
        "optimistic (selected and reported on the same images); set "
        f"tracking.registry_metric: {DEFAULT_METRIC} for an unbiased one."
    )
