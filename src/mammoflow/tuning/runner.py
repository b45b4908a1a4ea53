"""Running a study: :func:`run_tuning`, its worker processes, the best record and plots.

Re-running the same configuration reopens the study (:mod:`~mammoflow.tuning.objective` names
it) and tops it up to ``tune.n_trials`` (complete + pruned); so do several invocations or
``--workers`` processes sharing one PostgreSQL storage (:mod:`~mammoflow.tuning.storage`).

MLflow (through :class:`~mammoflow.tracking.Tracker` only): experiment
``mammoflow-<dataset>-tuning``, one parent run per study and one nested run per trial (params,
per-fold and running metric, final state complete / pruned / failed); the parent gets the best
value, the trial counts, the parameter importances and the optimisation-history, importance and
intermediate-value plots. The best parameters go to ``tuning/<dataset>-<backbone>.json`` (a DVC
out); with ``tune.use_best: true`` the train stage applies them through
:func:`~mammoflow.tuning.params.apply_best`.

Optuna, Keras and MLflow are imported lazily.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammoflow.config import Config, parse_config
from mammoflow.files import atomic_write_json
from mammoflow.paths import Layout
from mammoflow.tuning.objective import MlflowTrialLog, Objective, key_params, study_identity
from mammoflow.tuning.params import TuneError, best_params_path, overrides
from mammoflow.tuning.space import make_pruner, make_sampler
from mammoflow.tuning.storage import (
    STORAGE_ENV,
    is_server_storage,
    make_storage,
    redact_url,
    resolve_storage,
)

if TYPE_CHECKING:
    import optuna

    from mammoflow.tracking import Tracker

log = logging.getLogger(__name__)

BEST_FORMAT = 1


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
    from mammoflow.console import interrupt_on_sigterm

    interrupt_on_sigterm()  # for the process's whole life: nothing to put back
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
    _log_start(req, before, resumed)
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


def _log_start(req: _Request, before: Mapping[str, int], resumed: bool) -> None:
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
