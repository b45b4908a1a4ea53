"""Model cards (Mitchell et al. 2019) written from the tracked numbers, never by hand.

:func:`model_card` turns :class:`CardFacts` — what MLflow holds about one registered model
version: its test run's params, its parent run's metrics and provenance tags, the subgroup
table — into markdown with the paper's sections (model details, intended use, factors, metrics,
evaluation and training data, subgroup results, calibration, caveats), through the template
``templates/card.md.j2``. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# What the paper this project started from reports, and how (the comparison needs the "how").
PAPER_CLAIM = (
    "98–99 % accuracy, measured on image-level splits (images of one woman may sit in both "
    "training and test)"
)
DESCRIPTION_LIMIT = 5000  # MLflow's model-version description column (String(5000))
_TEST_METRICS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("f1_macro", "F1 (macro)"),
    ("roc_auc", "ROC AUC (one-vs-rest macro)"),
)


@dataclass(frozen=True)
class CardFacts:
    """What a model card is written from (all read from MLflow by ``Tracker.card_facts``)."""

    name: str
    version: str
    alias: str
    dataset: str
    backbone: str
    test_run_id: str
    parent_run_id: str
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    subgroups_md: str = ""
    selection_metric: str = ""  # tracking.registry_metric it was promoted on ("" = unknown)
    #: external dataset → its external run's metrics (and "run": the run id)
    external: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _with_ci(m: Mapping[str, float], key: str) -> str:
    point = _num(m.get(key))
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if low is None or high is None:
        return point
    return f"{point} [{_num(low)}, {_num(high)}]"


def _sha(sha: str) -> str:
    return f" (sha256 {sha[:16]}…)" if sha and sha not in ("none", "unknown") else ""


def model_card(facts: CardFacts, *, subgroups: bool = True) -> str:
    """The markdown model card of one registered version (``templates/card.md.j2``)."""
    from mammoflow.evaluation.champion import rule_text, warning_text
    from mammoflow.templates import render

    metric = facts.selection_metric
    sub = ""
    if subgroups and facts.subgroups_md:  # the run's ### headings sit under this card's ##
        sub = facts.subgroups_md.replace("\n### ", "\n#### ").replace("### ", "#### ", 1)
    return render(
        "card.md.j2",
        f=facts,
        rule=rule_text(metric) if metric else "",
        warning=warning_text(metric) if metric else "",
        subgroups_md=sub,
        test_metrics=_TEST_METRICS,
        paper_claim=PAPER_CLAIM,
        num=_num,
        with_ci=_with_ci,
        sha=_sha,
        count=int,
    )


def description(facts: CardFacts, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a model-version description: without the subgroup table when too long."""
    text = model_card(facts)
    if len(text) <= limit:
        return text
    short = model_card(facts, subgroups=False)
    note = "\n_The full card is the artifact `model_card.md` of the test run._\n"
    return (short + note) if len(short) + len(note) <= limit else short[: limit - 1] + "…"
