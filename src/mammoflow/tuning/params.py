"""Tuned parameters: a trial's or the best-params file's values written over a Config.

Kept apart from the tuner (:mod:`mammoflow.tuning.runner`: Optuna, MLflow) so that the
study's inputs can apply ``tune.use_best`` without importing the tuner.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout

#: Trial parameters that live in ``model`` and in ``train`` (names as in ``tune.space``).
MODEL_KEYS = ("head_units", "dropout", "trainable_layers")
TRAIN_KEYS = ("learning_rate", "momentum", "batch_size", "class_weight")
PARAM_NAMES = MODEL_KEYS + TRAIN_KEYS


class TuneError(ValueError):
    """Bad tuning input (storage, best-params file, workers); the message says what to do."""


def apply_params(cfg: Config, params: Mapping[str, Any]) -> Config:
    """``cfg`` with trial (or best) ``params`` written into ``model`` and ``train`` (validated).

    Raises:
        TuneError: an unknown parameter name.
        pydantic.ValidationError: a value out of the model/train range.
    """
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise TuneError(f"unknown tuning parameter(s) {unknown!r}; known: {list(PARAM_NAMES)!r}")
    model_upd = {k: params[k] for k in MODEL_KEYS if k in params}
    train_upd = {k: params[k] for k in TRAIN_KEYS if k in params}
    model = type(cfg.model).model_validate({**cfg.model.model_dump(), **model_upd})
    train = type(cfg.train).model_validate({**cfg.train.model_dump(), **train_upd})
    return cfg.model_copy(update={"model": model, "train": train})


def overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Trial params as dotted params.yaml keys (``model.head_units`` …)."""
    return {
        f"{'model' if k in MODEL_KEYS else 'train'}.{k}": v
        for k, v in params.items()
        if k in PARAM_NAMES
    }


def best_params_path(dataset: str, backbone: str, layout: Layout | None = None) -> Path:
    """``tuning/<dataset>-<backbone>.json`` under the project root (the tune stage's DVC out)."""
    return (layout or Layout()).best_params(dataset, backbone)


def read_best(path: Path | str) -> dict[str, Any]:
    """Parse a best-params file written by :func:`run_tuning`.

    Raises:
        FileNotFoundError: no such file (the message names the command that writes it).
        TuneError: not a best-params file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: tuned parameters not found; run `mammoflow tune --dataset <dataset> "
            "--backbone <backbone>` first, or set tune.use_best: false"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TuneError(f"{path}: not valid JSON ({exc}); run `mammoflow tune` again") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise TuneError(f"{path}: no 'params' object; not a MammoFlow best-params file")
    return data


def apply_best(cfg: Config, dataset: str, backbone: str, path: Path | str) -> Config:
    """``cfg`` with the best trial's params of ``path`` applied over ``model`` and ``train``.

    Pure apart from reading ``path``. The file must have been tuned for this dataset and backbone.

    Raises:
        FileNotFoundError: the file is missing.
        TuneError: the file belongs to another dataset/backbone or has unknown params.
    """
    data = read_best(path)
    got = (data.get("dataset"), data.get("backbone"))
    if got != (dataset, backbone):
        raise TuneError(
            f"{path}: tuned for dataset {got[0]!r} / backbone {got[1]!r}, not "
            f"{dataset!r} / {backbone!r}"
        )
    return apply_params(cfg, data["params"])
