"""What a trial is: the study's identity, the trial's MLflow log and the objective.

One study per (dataset, backbone, configuration): the search space, objective metric and
direction, and every parameter the trials do not tune (split, convert, weights, input size,
epochs, seed …) together with the data and split hashes form the study name
``<dataset>-<backbone>-<hash12>``.

:class:`Objective` trains the tail + head fold by fold with
:func:`mammoflow.training.fit.fold_task` on the frozen-prefix features — cached on disk per N and
kept in memory per process, so a trial costs only the tail + head training — and reports the
running mean of the validation metric after each fold. :class:`MlflowTrialLog` records each trial
as a nested MLflow run (through :class:`~mammoflow.tracking.Tracker` only).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from mammoflow.config import Config
from mammoflow.paths import Layout
from mammoflow.tuning.params import MODEL_KEYS, TRAIN_KEYS, TuneError, apply_params
from mammoflow.tuning.space import suggest
from mammoflow.tuning.storage import resolve_storage

if TYPE_CHECKING:
    import optuna

    from mammoflow.tracking import Tracker

log = logging.getLogger(__name__)

#: Study parameters that do not define the objective (excluded from the study key).
_NOT_IN_KEY = ("evaluate.", "tracking.")


# ----------------------------------------------------------------------------- study identity


def key_params(cfg: Config, dataset: str) -> dict[str, Any]:
    """What defines a study's objective: the untuned study params, space, metric, direction."""
    from mammoflow.provenance import study_params

    tuned = {f"model.{k}" for k in MODEL_KEYS} | {f"train.{k}" for k in TRAIN_KEYS}
    params = {
        k: v
        for k, v in study_params(cfg, dataset).items()
        if k not in tuned and not k.startswith(_NOT_IN_KEY)
    }
    params["tune.metric"] = cfg.tune.metric
    params["tune.direction"] = cfg.tune.direction
    params["tune.space"] = cfg.tune.space.model_dump(mode="json")
    return params


def study_name(cfg: Config, dataset: str, backbone: str, data_hash: str, split_hash: str) -> str:
    """``<dataset>-<backbone>-<first 12 hex of the study key>``."""
    from mammoflow.provenance import config_hash

    key = config_hash({**key_params(cfg, dataset), "backbone": backbone}, data_hash, split_hash)
    return f"{dataset}-{backbone}-{key[:12]}"


def study_identity(
    cfg: Config, dataset: str, backbone: str, layout: Layout | None = None
) -> tuple[str, str, dict[str, str]]:
    """``(study name, storage URL, {split_hash, dvc_data_hash})`` of a tuning run.

    Raises:
        FileNotFoundError: the dataset has not been split yet.
    """
    from mammoflow.data.split import read_splits, split_hash
    from mammoflow.provenance import dvc_data_hash

    layout = layout or Layout()
    splits_path = layout.splits(dataset)
    if not splits_path.is_file():
        raise FileNotFoundError(f"{splits_path}: missing; run `mammoflow split {dataset}` first")
    hashes = {
        "split_hash": split_hash(read_splits(splits_path)),
        "dvc_data_hash": dvc_data_hash(dataset, layout.root),
    }
    name = study_name(cfg, dataset, backbone, hashes["dvc_data_hash"], hashes["split_hash"])
    return name, resolve_storage(cfg.tune.storage, layout.root), hashes


# ----------------------------------------------------------------------------- trial logging


class TrialLog(Protocol):
    """Where a trial's life is recorded (MLflow in :func:`run_tuning`; None in pure use)."""

    def start(self, number: int, params: Mapping[str, Any]) -> str: ...

    def step(self, run_id: str, step: int, fold_value: float, running: float) -> None: ...

    def end(self, run_id: str, state: str, folds: int, value: float | None = None) -> None: ...


class MlflowTrialLog:
    """One nested MLflow run per trial under the study's parent run."""

    def __init__(
        self,
        tracker: Tracker,
        experiment_id: str,
        parent_id: str,
        study: str,
        dataset: str,
        backbone: str,
        metric: str,
    ) -> None:
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.study = study
        self.dataset = dataset
        self.backbone = backbone
        self.metric = metric

    def start(self, number: int, params: Mapping[str, Any]) -> str:
        from mammoflow.tracking import TAG_BACKBONE, TAG_DATASET, TAG_STUDY, TAG_TRIAL

        return str(
            self.tracker.start_child(
                self.experiment_id,
                self.parent_id,
                f"trial-{number:04d}",
                "trial",
                {
                    TAG_STUDY: self.study,
                    TAG_TRIAL: str(number),
                    TAG_DATASET: self.dataset,
                    TAG_BACKBONE: self.backbone,
                    "worker": _worker_id(),
                },
                {**params, "trial": number},
            )
        )

    def step(self, run_id: str, step: int, fold_value: float, running: float) -> None:
        self.tracker.log_metrics(
            run_id,
            {f"fold_{self.metric}": fold_value, f"running_{self.metric}": running},
            step=step,
        )

    def end(self, run_id: str, state: str, folds: int, value: float | None = None) -> None:
        """Final state: ``complete`` (FINISHED, with the objective value), ``pruned`` (KILLED,
        no final value: the running mean of a partial CV is not one), ``failed`` (FAILED)."""
        from mammoflow.tracking import TAG_TRIAL_STATE

        final = {"folds_done": float(folds)}
        if value is not None:
            final[self.metric] = value
        self.tracker.log_metrics(run_id, final)
        self.tracker.set_tags(run_id, {TAG_TRIAL_STATE: state})
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
        self.tracker.end(run_id, status)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _NoRetracingWarning(logging.Filter):
    """Drop TensorFlow's "triggered tf.function retracing" warning: every trial builds a new
    tail + head (other units, dropout, optimiser), so retracing is expected, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "tf.function retracing" not in record.getMessage()


def _quiet_retracing() -> None:
    tf_log = logging.getLogger("tensorflow")
    if not any(isinstance(f, _NoRetracingWarning) for f in tf_log.filters):
        tf_log.addFilter(_NoRetracingWarning())


class Objective:
    """``objective(trial) -> mean validation metric over the CV folds`` (prunable per fold).

    Loads the manifest and splits once; keeps one backbone and one feature set per trainable
    layers N in memory (from the on-disk cache, extracted on the first miss), so a trial costs
    only the tail + head training.
    """

    def __init__(
        self,
        cfg: Config,
        dataset: str,
        backbone: str,
        layout: Layout | None = None,
        trial_log: TrialLog | None = None,
    ) -> None:
        from mammoflow.training.inputs import InputsError, load_inputs

        self.cfg = cfg
        self.dataset = dataset
        self.backbone = backbone
        self.layout = layout or Layout()
        self.trial_log = trial_log
        self.metric = cfg.tune.metric
        try:
            # tuned params are the search's to choose: never apply an earlier best here
            base = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"use_best": False})})
            self.study_inputs = load_inputs(base, dataset, backbone, self.layout)
        except InputsError as exc:
            raise TuneError(str(exc)) from None
        self.class_names = self.study_inputs.class_names
        self.folds = list(self.study_inputs.folds)
        self._inputs: dict[int, tuple[Any, Any]] = {}
        _quiet_retracing()
        if cfg.train.augment or not cfg.train.feature_cache:
            log.warning("tuning without the feature cache (augment or feature_cache off): slow")

    def inputs(self, trainable_layers: int) -> tuple[Any, Any]:
        """``(backbone, features)`` for N = ``trainable_layers`` (one cache entry per N)."""
        if trainable_layers not in self._inputs:
            from mammoflow.training.inputs import load_features

            self._inputs[trainable_layers] = load_features(
                self.study_inputs, self.layout, trainable_layers=trainable_layers
            )
        return self._inputs[trainable_layers]

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from mammoflow.evaluation.metrics import compute_metrics
        from mammoflow.training.fit import FoldTrainer, fold_task

        params = suggest(trial, self.cfg.tune.space)
        trial.set_user_attr("worker", _worker_id())
        cfg = apply_params(self.cfg, params)
        bb, feats = self.inputs(int(params["trainable_layers"]))
        inp = replace(self.study_inputs, cfg=cfg)
        trainer = FoldTrainer(
            feats, bb, model_cfg=cfg.model, train_cfg=cfg.train, n_classes=inp.n_classes
        )
        run_id = self.trial_log.start(trial.number, params) if self.trial_log else ""
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        values: list[float] = []
        running = math.nan
        try:
            for step, fold in enumerate(self.folds, start=1):
                res = fold_task(inp, bb, feats, fold, trainer=trainer)
                metrics = compute_metrics(res.val_true, res.val_prob, self.class_names)
                if self.metric not in metrics:
                    raise TuneError(
                        f"tune.metric {self.metric!r} is not computed for {self.dataset!r}; "
                        f"available: {sorted(metrics)!r}"
                    )
                value = float(metrics[self.metric])
                values.append(value)
                finite = [v for v in values if math.isfinite(v)]
                running = sum(finite) / len(finite) if finite else math.nan
                trial.report(running, step)
                if self.trial_log:
                    self.trial_log.step(run_id, step, value, running)
                if trial.should_prune():
                    raise optuna.TrialPruned(
                        f"running {self.metric} {running:.4f} after {step} of "
                        f"{len(self.folds)} folds"
                    )
        except optuna.TrialPruned:
            if self.trial_log:
                self.trial_log.end(run_id, "pruned", len(values))
            raise
        except BaseException:
            if self.trial_log:
                try:
                    self.trial_log.end(run_id, "failed", len(values))
                except Exception:
                    log.exception("could not mark MLflow run %s FAILED", run_id)
            raise
        if self.trial_log:
            state = "complete" if math.isfinite(running) else "failed"  # NaN: Optuna fails it
            self.trial_log.end(run_id, state, len(values), running)
        return running
