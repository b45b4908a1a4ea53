"""The tune stage: Optuna over the head and the learning rate, and the tuned values.

Rooms, one idea each:

* :mod:`~mammoflow.tuning.space`: the search space, the seeded sampler, the pruner;
* :mod:`~mammoflow.tuning.storage`: the Optuna storage URL (``tune.storage`` or
  ``MAMMOFLOW_OPTUNA_STORAGE``) and the RDB storage with heartbeats;
* :mod:`~mammoflow.tuning.objective`: the study's identity, the trial's MLflow log, the
  objective (one trial = the tail + head trained fold by fold on cached features);
* :mod:`~mammoflow.tuning.runner`: :func:`run_tuning` — the study, its worker processes, the
  best-params record, the study's plots;
* :mod:`~mammoflow.tuning.params`: a trial's or the best-params file's values over a Config.

Every name below can be imported from ``mammoflow.tuning``. Only :mod:`params` is imported
with the package: the train stage's inputs import it to apply ``tune.use_best`` and must not
load the tuner (nor make its DVC stage depend on it); the other rooms load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mammoflow.tuning.params import (
    MODEL_KEYS,
    PARAM_NAMES,
    TRAIN_KEYS,
    TuneError,
    apply_best,
    apply_params,
    best_params_path,
    overrides,
    read_best,
)

#: public name → the room that defines it (loaded on first access, see the docstring)
_LAZY = {
    "make_pruner": "space",
    "make_sampler": "space",
    "suggest": "space",
    "STORAGE_ENV": "storage",
    "is_server_storage": "storage",
    "make_storage": "storage",
    "redact_url": "storage",
    "resolve_storage": "storage",
    "MlflowTrialLog": "objective",
    "Objective": "objective",
    "TrialLog": "objective",
    "key_params": "objective",
    "study_identity": "objective",
    "study_name": "objective",
    "BEST_FORMAT": "runner",
    "open_study": "runner",
    "run_tuning": "runner",
}

__all__ = [
    "MODEL_KEYS",
    "PARAM_NAMES",
    "TRAIN_KEYS",
    "TuneError",
    "apply_best",
    "apply_params",
    "best_params_path",
    "overrides",
    "read_best",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """``mammoflow.tuning.<name>`` for a name of a room not loaded with the package."""
    room = _LAZY.get(name)
    if room is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{room}"), name)
