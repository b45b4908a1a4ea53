"""The search space, sampler and pruner of a tuning study (Optuna imported lazily).

A trial samples ``tune.space`` (head units, dropout, learning rate, momentum, batch size,
trainable layers N, class weights) with a seeded TPE sampler; after each fold it reports the
running mean of the validation metric (step = folds done) and the pruner (median by default,
Hyperband or none) may stop it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mammoflow.config import FloatRange, TuneConfig, TuneSpace
from mammoflow.tuning.params import PARAM_NAMES

if TYPE_CHECKING:
    import optuna


def suggest(trial: optuna.Trial, space: TuneSpace) -> dict[str, Any]:
    """Sample one point of ``space``: categorical lists, float ranges (log-uniform if ``log``)."""
    out: dict[str, Any] = {}
    for name in PARAM_NAMES:
        spec = getattr(space, name)
        if isinstance(spec, FloatRange):
            out[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        else:
            out[name] = trial.suggest_categorical(name, list(spec))
    return out


def make_sampler(tune: TuneConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded TPE; worker ``i`` of a parallel study uses ``seed + i`` (no duplicate samples)."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=tune.seed + worker, n_startup_trials=tune.sampler_startup_trials
    )


def make_pruner(tune: TuneConfig, n_folds: int) -> optuna.pruners.BasePruner:
    """The pruner of ``tune.pruner``; steps are folds done (1 … ``n_folds``).

    * ``median``: prune a trial whose best running mean is below the median of the complete
      trials at the same fold, once ``pruner_startup_trials`` trials completed and the trial has
      reported more than ``pruner_warmup_folds`` folds.
    * ``hyperband``: successive halving brackets over 1 + ``pruner_warmup_folds`` … ``n_folds``
      folds (reduction factor 3).
    * ``none``: never prune.
    """
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner_startup_trials,
            n_warmup_steps=tune.pruner_warmup_folds + 1,
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min(tune.pruner_warmup_folds + 1, n_folds),
            max_resource=max(n_folds, 1),
            reduction_factor=3,
        )
    return optuna.pruners.NopPruner()
