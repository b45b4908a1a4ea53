"""Hyperparameter search with Optuna on the cached frozen-prefix features.

One study per (dataset, backbone, configuration): the search space, objective metric and
direction, and every parameter the trials do not tune (split, convert, weights, input size,
epochs, seed …) together with the data and split hashes form the study name
``<dataset>-<backbone>-<hash12>``. Re-running the same configuration reopens the study and tops it
up to ``tune.n_trials`` (complete + pruned); so do several invocations or ``--workers`` processes
sharing one PostgreSQL storage.

A trial samples the space (``tune.space``: head units, dropout, learning rate, momentum, batch
size, trainable layers N, class weights), then trains the tail + head fold by fold with
:func:`mammoflow.training.fit.train_folds` on the frozen-prefix features — cached on disk per N and kept
in memory per process, so a trial costs only the tail + head training. After each fold it reports
the running mean of the validation metric (step = folds done) and the pruner (median by default,
Hyperband or none) may stop it.

Storage: ``tune.storage`` (default ``sqlite:///optuna.db`` under the project root), overridden by
``MAMMOFLOW_OPTUNA_STORAGE`` (the team stack sets a PostgreSQL URL). MLflow (through
:class:`~mammoflow.tracking.Tracker` only): experiment ``mammoflow-<dataset>-tuning``, one parent
run per study and one nested run per trial (params, per-fold and running metric, final state
complete / pruned / failed); the parent gets the best value, the trial counts, the parameter
importances and the optimisation-history, importance and intermediate-value plots. The best
parameters go to ``tuning/<dataset>-<backbone>.json`` (a DVC out); with ``tune.use_best: true``
the train stage applies them through :func:`apply_best`.

Optuna, Keras and MLflow are imported lazily; the space, config and storage helpers are pure.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mammoflow.config import Config, FloatRange, TuneConfig, TuneSpace, parse_config
from mammoflow.files import atomic_write_json
from mammoflow.paths import Layout
from mammoflow.tuning.params import (
    MODEL_KEYS,
    PARAM_NAMES,
    TRAIN_KEYS,
    TuneError,
    apply_params,
    best_params_path,
    overrides,
)

if TYPE_CHECKING:
    import optuna

    from mammoflow.tracking import Tracker

log = logging.getLogger(__name__)

STORAGE_ENV = "MAMMOFLOW_OPTUNA_STORAGE"
BEST_FORMAT = 1
#: Study parameters that do not define the objective (excluded from the study key).
_NOT_IN_KEY = ("evaluate.", "tracking.")
HEARTBEAT_S = 60  # RDB heartbeat: a trial silent for 3 intervals (killed worker) becomes FAIL


# ----------------------------------------------------------------------------- search space


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


# ----------------------------------------------------------------------------- sampler, pruner


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


# ----------------------------------------------------------------------------- storage


def resolve_storage(
    configured: str, root: Path | str = ".", env: Mapping[str, str] | None = None
) -> str:
    """The SQLAlchemy URL of the Optuna storage.

    ``MAMMOFLOW_OPTUNA_STORAGE`` (in ``env``, default ``os.environ``) wins over ``configured``
    (``tune.storage``). A relative SQLite path is made absolute under ``root`` (the project
    root); ``postgresql://`` / ``postgres://`` get the psycopg 3 driver (``postgresql+psycopg``).
    """
    environ = os.environ if env is None else env
    url = (environ.get(STORAGE_ENV) or configured).strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise TuneError(
            f"storage {url!r} is not a database URL; use e.g. sqlite:///optuna.db or "
            "postgresql://user:password@host:5432/optuna"
        )
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    if scheme == "sqlite" and rest.startswith("/"):
        path = rest[1:]
        if path and path != ":memory:" and not Path(path).is_absolute():
            rest = "/" + str((Path(root) / path).resolve())
    return f"{scheme}://{rest}"


def is_server_storage(url: str) -> bool:
    """True for a database server (PostgreSQL, MySQL …), False for SQLite."""
    return not url.split("://", 1)[0].startswith("sqlite")


def redact_url(url: str) -> str:
    """``url`` with its password masked (safe for logs, MLflow and DVC outputs)."""
    try:
        from sqlalchemy.engine import make_url

        return str(make_url(url).render_as_string(hide_password=True))
    except Exception:
        scheme, sep, rest = url.partition("://")
        creds, at, host = rest.rpartition("@")
        if not at or ":" not in creds:
            return url
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (a killed worker's RUNNING trial becomes FAIL)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if is_server_storage(url):
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    else:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=3 * HEARTBEAT_S,
            **kwargs,
        )


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


# ----------------------------------------------------------------------------- the objective


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


# ----------------------------------------------------------------------------- running a study


@dataclass(frozen=True)
class _Job:
    """Everything a worker process needs (picklable)."""

    params: dict[str, Any]  # the Config as params.yaml data
    dataset: str
    backbone: str
    root: str
    storage: str
    study: str
    n_trials: int
    timeout: float | None
    worker: int
    experiment_id: str
    parent_id: str


def open_study(
    cfg: Config, name: str, storage: str, worker: int = 0, n_folds: int | None = None
) -> optuna.Study:
    """Create or load study ``name`` with the configured direction, sampler and pruner.

    ``n_folds`` (default ``split.k_folds``) is the pruner's full budget in steps.
    """
    import optuna

    return optuna.create_study(
        storage=make_storage(storage),
        study_name=name,
        direction=cfg.tune.direction,
        sampler=make_sampler(cfg.tune, worker),
        pruner=make_pruner(cfg.tune, n_folds or cfg.split.k_folds),
        load_if_exists=True,
    )


def _counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {
        state.name.lower(): sum(t.state == state for t in trials)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }


def _optimize(job: _Job, tracker: Tracker | None = None) -> None:
    """One worker: optimise until the study holds ``n_trials`` complete + pruned trials."""
    import optuna
    from optuna.trial import TrialState

    from mammoflow.tracking import Tracker

    cfg = parse_config(job.params)
    layout = Layout(root=Path(job.root))
    study = open_study(cfg, job.study, job.storage, job.worker)
    counts = _counts(study)
    remaining = job.n_trials - counts["complete"] - counts["pruned"]
    if remaining <= 0:
        return
    tracker = tracker or Tracker(root=layout.root)
    trial_log = MlflowTrialLog(
        tracker,
        job.experiment_id,
        job.parent_id,
        job.study,
        job.dataset,
        job.backbone,
        cfg.tune.metric,
    )
    objective = Objective(cfg, job.dataset, job.backbone, layout, trial_log)
    study.pruner = make_pruner(cfg.tune, len(objective.folds))
    # Counting RUNNING trials stops this worker once the others' running trials fill the quota.
    stop = optuna.study.MaxTrialsCallback(
        job.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    )
    study.optimize(
        objective,
        n_trials=remaining,
        timeout=job.timeout,
        callbacks=[stop],
        gc_after_trial=True,
    )


def _worker_main(job: _Job) -> None:
    """Entry point of a worker process (spawned: TensorFlow is not fork-safe).

    SIGTERM (the coordinator stopping it) becomes KeyboardInterrupt, so the running trial is
    marked FAIL in Optuna and FAILED in MLflow on the way out.
    """
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format=f"[worker {job.worker}] %(message)s")
    _optimize(job)


def _run_workers(jobs: list[_Job]) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(job,), name=f"tune-{job.worker}") for job in jobs
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=30)
        raise
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"tuning worker(s) failed: {failed}; see their output above")


def run_tuning(
    cfg: Config,
    dataset: str,
    backbone: str,
    n_trials: int | None = None,
    workers: int | None = None,
    layout: Layout | None = None,
    *,
    timeout: float | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Tune ``backbone`` on ``dataset``: the study, its MLflow runs and the best-params file.

    Args:
        cfg: the validated config (``tune`` section: space, metric, sampler, pruner, storage).
        dataset, backbone: what to tune (the dataset must be converted and split).
        n_trials: the study's total of complete + pruned trials (default ``tune.n_trials``);
            trials already in the study count.
        workers: processes sharing the study (default ``tune.workers``); more than one needs a
            server storage (PostgreSQL).
        layout: project layout (root of ``optuna.db``, ``mlflow.db``, ``tuning/``).
        timeout: seconds per worker (default ``tune.timeout``).
        tracker: a :class:`~mammoflow.tracking.Tracker` (default: the project's store).

    Returns:
        A summary: study name, storage (password hidden), trial counts, best value / params /
        trial, ``trials_per_min`` of this invocation, seconds, MLflow parent run, best-params
        path.
    """
    from mammoflow.tracking import Tracker

    t_start = time.perf_counter()
    layout = layout or Layout()
    req = _request(cfg, dataset, backbone, n_trials, workers, timeout, layout)
    study = open_study(cfg, req.study, req.storage)  # creates the tables before the workers
    for key, value in {"dataset": dataset, "backbone": backbone, "metric": cfg.tune.metric}.items():
        study.set_user_attr(key, value)
    before = _counts(study)
    tracker = tracker or Tracker(root=layout.root)
    job, resumed = _open_parent(cfg, req, study, tracker, layout)
    log.info(
        "study %s (%s) on %s: %d complete, %d pruned; target %d trials, %d worker(s)",
        req.study,
        "resumed" if resumed else "new",
        redact_url(req.storage),
        before["complete"],
        before["pruned"],
        req.n_trials,
        req.workers,
    )
    with tracker.run_guard(job.parent_id):
        t_opt = time.perf_counter()
        if req.workers == 1:
            _optimize(job, tracker)
        else:
            _run_workers([replace(job, worker=i) for i in range(req.workers)])
        optimize_s = time.perf_counter() - t_opt
        study = open_study(cfg, req.study, req.storage)
        after = _counts(study)
        finished = sum(after[k] - before[k] for k in ("complete", "pruned", "fail"))
        per_min = finished / (optimize_s / 60.0) if optimize_s > 0 else 0.0
        record = _best_record(cfg, req, study, after, job.parent_id)
        path = best_params_path(dataset, backbone, layout)
        atomic_write_json(path, record)
        importances = _log_study(tracker, job.parent_id, study, cfg, record, per_min)
    return {
        "dataset": dataset,
        "backbone": backbone,
        "study_name": req.study,
        "storage": redact_url(req.storage),
        "resumed": resumed,
        "workers": req.workers,
        "trials": after,
        "new_trials": finished,
        "best_value": record["best_value"],
        "best_trial": record["best_trial"],
        "best_params": record["params"],
        "importances": importances,
        "trials_per_min": round(per_min, 3),
        "seconds": {
            "optimize": round(optimize_s, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "parent_run_id": job.parent_id,
        "best_path": str(path),
    }


@dataclass(frozen=True)
class _Request:
    """A checked tuning request: what, how many, where."""

    dataset: str
    backbone: str
    n_trials: int
    workers: int
    timeout: float | None
    storage: str
    study: str
    hashes: dict[str, str]


def _request(
    cfg: Config,
    dataset: str,
    backbone: str,
    n_trials: int | None,
    workers: int | None,
    timeout: float | None,
    layout: Layout,
) -> _Request:
    """Defaults from ``tune``, checked; the study's name and storage.

    Raises:
        TuneError: unknown backbone, non-positive counts, several workers on SQLite.
    """
    from mammoflow.models.backbones import BACKBONE_NAMES

    cfg.dataset(dataset)
    if backbone not in BACKBONE_NAMES:
        raise TuneError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONE_NAMES)!r}")
    n_trials = n_trials or cfg.tune.n_trials
    workers = workers or cfg.tune.workers
    if n_trials < 1 or workers < 1:
        raise TuneError(f"n_trials={n_trials}, workers={workers}: both must be at least 1")
    storage = resolve_storage(cfg.tune.storage, layout.root)
    if workers > 1 and not is_server_storage(storage):
        raise TuneError(
            f"--workers {workers} needs a database server: SQLite ({redact_url(storage)}) locks "
            f"under concurrent writers. Set {STORAGE_ENV} (or tune.storage) to a PostgreSQL "
            "URL, e.g. from `python -m infra.local.stack up`, or use one worker"
        )
    name, storage, hashes = study_identity(cfg, dataset, backbone, layout)
    return _Request(
        dataset=dataset,
        backbone=backbone,
        n_trials=n_trials,
        workers=workers,
        timeout=timeout if timeout is not None else cfg.tune.timeout,
        storage=storage,
        study=name,
        hashes=hashes,
    )


def _open_parent(
    cfg: Config, req: _Request, study: optuna.Study, tracker: Tracker, layout: Layout
) -> tuple[_Job, bool]:
    """The study's MLflow parent run (reopened through the study's user attribute)."""
    from mammoflow.provenance import git_state
    from mammoflow.tracking import TAG_BACKBONE, TAG_DATASET

    exp_id = tracker.tuning_experiment_id(req.dataset)
    parent_params = {
        **key_params(cfg, req.dataset),
        "backbone": req.backbone,
        "tune.n_trials": req.n_trials,
        "tune.seed": cfg.tune.seed,
        "tune.sampler_startup_trials": cfg.tune.sampler_startup_trials,
        "tune.pruner": cfg.tune.pruner,
        "tune.pruner_startup_trials": cfg.tune.pruner_startup_trials,
        "tune.pruner_warmup_folds": cfg.tune.pruner_warmup_folds,
        "tune.storage": redact_url(req.storage),
    }
    tags = {
        TAG_DATASET: req.dataset,
        TAG_BACKBONE: req.backbone,
        **req.hashes,
        **git_state(layout.root),
    }
    parent_id, resumed = tracker.open_study_parent(
        exp_id, req.study, tags, parent_params, run_id=study.user_attrs.get("mlflow_parent_run_id")
    )
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    job = _Job(
        params=cfg.model_dump(mode="json", by_alias=True),
        dataset=req.dataset,
        backbone=req.backbone,
        root=str(layout.root.resolve()),
        storage=req.storage,
        study=req.study,
        n_trials=req.n_trials,
        timeout=req.timeout,
        worker=0,
        experiment_id=exp_id,
        parent_id=parent_id,
    )
    return job, resumed


def _best_record(
    cfg: Config, req: _Request, study: optuna.Study, after: Mapping[str, int], parent_id: str
) -> dict[str, Any]:
    """The best-params file's content.

    Raises:
        TuneError: the study has no complete trial.
    """
    if after["complete"] == 0:
        raise TuneError(
            f"study {req.study}: no complete trial ({dict(after)}); widen tune.space or raise "
            "n_trials"
        )
    best = study.best_trial
    return {
        "format": BEST_FORMAT,
        "dataset": req.dataset,
        "backbone": req.backbone,
        "study_name": req.study,
        "storage": redact_url(req.storage),
        "metric": cfg.tune.metric,
        "direction": cfg.tune.direction,
        "best_value": float(best.value) if best.value is not None else math.nan,
        "best_trial": best.number,
        "params": dict(best.params),
        "overrides": overrides(best.params),
        "trials": {k: after[k] for k in ("complete", "pruned", "fail")},
        "mlflow_parent_run_id": parent_id,
    }


def _log_study(
    tracker: Tracker,
    parent_id: str,
    study: optuna.Study,
    cfg: Config,
    record: Mapping[str, Any],
    per_min: float,
) -> dict[str, float]:
    """Best value, counts, importances and plots on the study's parent run."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    metric = cfg.tune.metric
    counts = record["trials"]
    tracker.log_metrics(
        parent_id,
        {
            f"best_{metric}": record["best_value"],
            "best_trial": record["best_trial"],
            "trials_complete": counts["complete"],
            "trials_pruned": counts["pruned"],
            "trials_failed": counts["fail"],
            "trials_per_min": per_min,
        },
    )
    tracker.set_tags(parent_id, {"best_trial": str(record["best_trial"])})
    tracker.log_dict(parent_id, dict(record), "best_params.json")
    importances: dict[str, float] = {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=cfg.tune.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _plot(tracker, parent_id, "optimization_history.png", ovm.plot_optimization_history, study)
        _plot(tracker, parent_id, "intermediate_values.png", ovm.plot_intermediate_values, study)
        try:
            importances = {
                k: float(v)
                for k, v in optuna.importance.get_param_importances(
                    study, evaluator=evaluator
                ).items()
            }
        except (ValueError, RuntimeError) as exc:
            tracker.log_text(
                parent_id, f"no parameter importances: {exc}\n", "param_importances.txt"
            )
        else:
            tracker.log_metrics(parent_id, importances, prefix="importance_")
            _plot(
                tracker,
                parent_id,
                "param_importances.png",
                ovm.plot_param_importances,
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=cfg.tune.seed),
            )
    return importances


def _plot(tracker: Tracker, run_id: str, name: str, func: Any, study: Any, **kwargs: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        axes = func(study, **kwargs)
    except (ValueError, RuntimeError) as exc:
        log.warning("plot %s skipped: %s", name, exc)
        plt.close("all")
        return
    figure = getattr(axes, "figure", None)
    if figure is None:  # some plots return an array of axes
        figure = axes.flat[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    tracker.log_figure(run_id, figure, name)
