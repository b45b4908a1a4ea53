"""The evaluate stage: the champion of each dataset, chosen by the selection rule and
registered in MLflow (metrics/champion/<dataset>.json)."""

from __future__ import annotations

import logging
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout

log = logging.getLogger(__name__)


def evaluate_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Pick the best backbone of ``dataset`` and promote it in the MLflow registry."""
    import json

    from mammoflow.evaluation import champion
    from mammoflow.files import atomic_write_json
    from mammoflow.tracking import Tracker, metrics_run_id

    cfg.dataset(dataset)
    layout = layout or Layout()
    metric = cfg.tracking.registry_metric
    scores: dict[str, float] = {}
    runs: dict[str, str] = {}
    for backbone in cfg.model.backbones:
        path = layout.metrics(dataset, backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; run `mammoflow train --dataset {dataset} --backbone {backbone}`"
            )
        summary = json.loads(path.read_text(encoding="utf-8"))
        scores[backbone] = champion.value(summary, metric)
        runs[backbone] = metrics_run_id(layout, dataset, backbone)
    best = champion.rank(scores)[0]
    out: dict[str, Any] = {
        "dataset": dataset,
        "metric": metric,
        "scores": scores,
        "best": best,
        "rule": champion.rule_text(metric),
        "peeks_at_test": champion.peeks(metric),
    }
    warning = champion.warning_text(metric)
    if warning:
        out["warning"] = warning
        log.warning("%s", warning)
    if cfg.tracking.log_models != "none":
        out["registry"] = Tracker(root=layout.root).promote(
            dataset, runs[best], metric, scores[best]
        )

        out["model_cards"] = Tracker(root=layout.root).write_model_cards(dataset)
    atomic_write_json(layout.champion(dataset), out)
    return out
