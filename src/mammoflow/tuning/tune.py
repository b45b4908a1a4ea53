"""The tune stage (``mammoflow tune``): Optuna over one backbone's head and learning rate."""

from __future__ import annotations

from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout


def tune_stage(
    cfg: Config,
    dataset: str,
    backbone: str,
    layout: Layout | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Optuna study of ``backbone`` on ``dataset``; best params → tuning/<dataset>-<backbone>.json."""
    from mammoflow.tuning.runner import run_tuning

    cfg = cfg.for_dataset(dataset)  # its own model / train keys, as the train stage uses them
    return run_tuning(cfg, dataset, backbone, n_trials, workers, layout or Layout())
