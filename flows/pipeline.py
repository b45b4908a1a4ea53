"""Prefect flows for MammoFlow: thin sequences of tasks that call :mod:`mammoflow.stages`.

Every task loads the config from ``params_path`` and calls one stage function, the same function
the DVC stage calls through the CLI; nothing here holds pipeline logic. The project root (where
``data/``, ``reports/``, ``metrics/`` … live) is the folder that holds ``params_path``, as with
DVC; relative dataset ``source`` paths in params.yaml resolve from the working directory, which
for a deployment is the project checkout.

Flows:
    data_flow      acquire → ingest → validate → convert, per dataset
    train_flow     split per dataset, then K-fold training of each backbone: one task each (with
                   a Dask address the train stage itself runs one Dask task per fold)
    evaluate_flow  best backbone per dataset into the MLflow registry, then the comparison report
    pipeline_flow  the three in order
    score_flow     score the new images of a folder with a dataset's champion (mammoflow.predict)

Training runs one task at a time by default (2 CPU cores); set ``MAMMOFLOW_DASK_ADDRESS`` or pass
``dask_address`` and the train stage fans its folds out to that Dask cluster (as under
``dvc repro`` and ``mammoflow study``). Training tasks carry the
tag ``mammoflow-train``: ``prefect concurrency-limit create mammoflow-train 1`` on a server caps
them across all flow runs and workers (without a server the tag is a no-op).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Flow, Task, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture, wait
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from mammoflow import stages
from mammoflow.config import Config, load_config
from mammoflow.paths import Layout
from mammoflow.train import FoldResult

DASK_ADDRESS_ENV = "MAMMOFLOW_DASK_ADDRESS"
TRAIN_TAG = "mammoflow-train"
IO_RETRIES = 2
IO_RETRY_DELAYS: list[float] = [2.0, 10.0]

Summary = dict[str, Any]
P = ParamSpec("P")
R = TypeVar("R")


def _load(params_path: str) -> tuple[Config, Layout]:
    """Load the config; the project root is the folder holding the params file."""
    return load_config(params_path), Layout(root=Path(params_path).parent)


def transient_io_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only on OS-level I/O errors (a busy disk or NFS hiccup), never on bad input."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


@task(task_run_name="plan")
def plan(
    params_path: str, datasets: list[str] | None = None, backbones: list[str] | None = None
) -> dict[str, list[str]]:
    """Resolve which datasets and backbones a run covers (params.yaml unless given)."""
    cfg, _ = _load(params_path)
    names = list(datasets or cfg.pipeline.datasets)
    for name in names:
        cfg.dataset(name)
    return {"datasets": names, "backbones": list(backbones or cfg.model.backbones)}


@task(
    task_run_name="acquire-{dataset}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def acquire(params_path: str, dataset: str) -> Summary:
    """Bring the raw files of ``dataset`` to data/raw/<dataset>."""
    cfg, layout = _load(params_path)
    return stages.acquire_stage(cfg, dataset, layout=layout)


@task(
    task_run_name="ingest-{dataset}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def ingest(params_path: str, dataset: str) -> Summary:
    """Parse the raw files into data/interim/<dataset>/manifest.parquet."""
    cfg, layout = _load(params_path)
    return stages.ingest_stage(cfg, dataset, layout=layout)


@task(
    task_run_name="validate-{dataset}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def validate(params_path: str, dataset: str) -> Summary:
    """Great Expectations checks on the ingested manifest."""
    cfg, layout = _load(params_path)
    return stages.validate_stage(cfg, dataset, layout=layout)


@task(
    task_run_name="convert-{dataset}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def convert(params_path: str, dataset: str) -> Summary:
    """Convert the raw images to padded PNGs under data/processed/<dataset>."""
    cfg, layout = _load(params_path)
    return stages.convert_stage(cfg, dataset, layout=layout, progress=False)


@task(
    task_run_name="split-{dataset}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def split(params_path: str, dataset: str) -> Summary:
    """Patient-grouped held-out test set and K folds of ``dataset``."""
    cfg, layout = _load(params_path)
    return stages.split_stage(cfg, dataset, layout=layout)


# Training resumes finished folds, so one retry after a transient I/O error is cheap.
@task(
    task_run_name="train-{dataset}-{backbone}",
    tags=[TRAIN_TAG],
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=transient_io_error,
)
def train_backbone(
    params_path: str, dataset: str, backbone: str, dask_address: str | None = None
) -> Summary:
    """K-fold training of one backbone on one dataset, tracked in MLflow, tested on hold-out.

    With a Dask address (argument or ``$MAMMOFLOW_DASK_ADDRESS``) the stage fans its folds out.
    """
    cfg, layout = _load(params_path)
    return stages.train_stage(
        cfg, dataset, backbone, layout=layout, progress=False, dask_address=dask_address
    )


@task(
    task_run_name="features-{dataset}-{backbone}",
    tags=[TRAIN_TAG],
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def prepare_backbone(params_path: str, dataset: str, backbone: str) -> list[int]:
    """Extract the backbone's features once (the shared cache); return the fold tasks to run."""
    cfg, layout = _load(params_path)
    return stages.prepare_train_stage(cfg, dataset, backbone, layout=layout)


@task(
    task_run_name="fold-{dataset}-{backbone}-{fold}",
    tags=[TRAIN_TAG],
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=transient_io_error,
)
def train_fold(params_path: str, dataset: str, backbone: str, fold: int) -> FoldResult:
    """One fold task (0 = the refit model) on the cached features; a portable result."""
    cfg, layout = _load(params_path)
    return stages.fold_stage(cfg, dataset, backbone, fold, layout=layout)


@task(task_run_name="study-{dataset}-{backbone}", cache_policy=NO_CACHE)
def finish_backbone(
    params_path: str, dataset: str, backbone: str, results: list[FoldResult]
) -> Summary:
    """Aggregate the fold tasks: MLflow runs, held-out test, DVC outputs (as the train stage)."""
    cfg, layout = _load(params_path)
    computed = {r.fold: r for r in results}
    return stages.train_stage(cfg, dataset, backbone, layout=layout, computed=computed)


@task(
    task_run_name="evaluate-{dataset}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def evaluate(params_path: str, dataset: str) -> Summary:
    """Pick the best backbone on ``dataset`` and promote it in the MLflow model registry."""
    cfg, layout = _load(params_path)
    return stages.evaluate_stage(cfg, dataset, layout=layout)


@task(
    task_run_name="report",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=transient_io_error,
)
def report(params_path: str, datasets: list[str]) -> Summary:
    """The comparison report (reports/comparison.md and .html) from MLflow."""
    cfg, layout = _load(params_path)
    return stages.compare_stage(cfg, datasets, layout=layout)


@task(
    task_run_name="tune-{dataset}-{backbone}",
    tags=[TRAIN_TAG],
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=transient_io_error,
)
def tune_backbone(
    params_path: str,
    dataset: str,
    backbone: str,
    n_trials: int | None = None,
    workers: int | None = None,
) -> Summary:
    """Optuna study of one backbone on one dataset; best params to tuning/<dataset>-<backbone>.json."""
    cfg, layout = _load(params_path)
    return stages.tune_stage(
        cfg, dataset, backbone, layout=layout, n_trials=n_trials, workers=workers
    )


def one_thread() -> TaskRunner[Any]:
    """A runner that runs one task at a time (training and conversion use every core)."""
    return ThreadPoolTaskRunner(max_workers=1)


def task_runner_for(address: str | None = None) -> TaskRunner[Any]:
    """The Dask runner for ``address`` (or ``$MAMMOFLOW_DASK_ADDRESS``), else one thread."""
    address = address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return one_thread()


def with_task_runner(base: Flow[P, R], address: str | None = None) -> Flow[P, R]:
    """``base`` with :func:`task_runner_for` ``address`` as its task runner."""
    return base.with_options(task_runner=task_runner_for(address))


def _results(futures: list[PrefectFuture[Summary]]) -> list[Summary]:
    wait(futures)
    return [f.result() for f in futures]


@flow(name="mammoflow-data", task_runner=one_thread())
def data_flow(params_path: str = "params.yaml", datasets: list[str] | None = None) -> list[Summary]:
    """Acquire → ingest → validate → convert each dataset (params.yaml's list by default)."""
    names = plan(params_path, datasets)["datasets"]
    chains: list[list[PrefectFuture[Summary]]] = []
    for name in names:
        got = acquire.submit(params_path, name)
        parsed = ingest.submit(params_path, name, wait_for=[got], return_state=False)
        checked = validate.submit(params_path, name, wait_for=[parsed], return_state=False)
        done = convert.submit(params_path, name, wait_for=[checked], return_state=False)
        chains.append([got, parsed, checked, done])
    # each chain's results in order: a failed stage raises its own error (e.g. the validation
    # report), not the "upstream not ready" of the stages after it
    return [_results(chain)[-1] for chain in chains]


@flow(name="mammoflow-train-backbones", task_runner=one_thread())
def train_backbones_flow(
    params_path: str,
    datasets: list[str],
    backbones: list[str],
    dask_address: str | None = None,
) -> list[Summary]:
    """One training task per (dataset, backbone); the task runner sets the concurrency."""
    return _results(
        [
            train_backbone.submit(params_path, d, b, dask_address)
            for d in datasets
            for b in backbones
        ]
    )


@flow(name="mammoflow-train-folds")
def train_folds_flow(params_path: str, datasets: list[str], backbones: list[str]) -> list[Summary]:
    """(dataset × backbone × fold) tasks: features once per pair, folds fanned out, then aggregated.

    Superseded by the train stage's own fan-out (``train_flow`` no longer calls it); still safe
    to call: the stage trains nothing the fold tasks handed in.
    """
    prepared = {
        (d, b): prepare_backbone.submit(params_path, d, b) for d in datasets for b in backbones
    }
    finals = []
    for (d, b), todo in prepared.items():
        folds = [train_fold.submit(params_path, d, b, f) for f in todo.result()]
        finals.append(finish_backbone.submit(params_path, d, b, folds))  # type: ignore[arg-type]
    return _results(finals)


@flow(name="mammoflow-train")
def train_flow(
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    dask_address: str | None = None,
) -> list[Summary]:
    """Split each dataset, then train every backbone on it.

    One task per backbone, one at a time; with a Dask address (argument or
    ``$MAMMOFLOW_DASK_ADDRESS``) each task's train stage runs its folds on that cluster.
    """
    todo = plan(params_path, datasets, backbones)
    for name in todo["datasets"]:
        split(params_path, name)
    address = dask_address or os.environ.get(DASK_ADDRESS_ENV) or None
    return train_backbones_flow(params_path, todo["datasets"], todo["backbones"], address)


@flow(name="mammoflow-evaluate")
def evaluate_flow(params_path: str = "params.yaml", datasets: list[str] | None = None) -> Summary:
    """Promote each dataset's best backbone in the registry, then write the comparison report."""
    names = plan(params_path, datasets)["datasets"]
    champions = [evaluate(params_path, name) for name in names]
    return {"champions": champions, "report": report(params_path, names)}


@flow(name="mammoflow-pipeline")
def pipeline_flow(
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    dask_address: str | None = None,
) -> Summary:
    """The whole study: data, training, evaluation."""
    data = data_flow(params_path, datasets)
    trained = train_flow(params_path, datasets, backbones, dask_address)
    return {"data": data, "train": trained, "evaluate": evaluate_flow(params_path, datasets)}


@flow(name="mammoflow-tune", task_runner=one_thread())
def tune_flow(
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
) -> list[Summary]:
    """Split each dataset, then one Optuna study per (dataset, backbone). Not in pipeline_flow."""
    todo = plan(params_path, datasets, backbones)
    for name in todo["datasets"]:
        split(params_path, name)
    return [
        tune_backbone(params_path, d, b, n_trials, workers)
        for d in todo["datasets"]
        for b in todo["backbones"]
    ]


@task(task_run_name="score-{dataset}", cache_policy=NO_CACHE)
def score(
    params_path: str, folder: str, dataset: str, out: str, model_uri: str | None = None
) -> Summary:
    """Score every image under ``folder`` (the same function as ``mammoflow predict``)."""
    from mammoflow.predict import PredictError, predict_files

    cfg, layout = _load(params_path)
    res = predict_files(
        [folder], cfg, dataset, model_uri=model_uri, out=layout.root / out, progress=False
    )
    if res.failures:  # the good files are scored and written; the run still fails, naming them
        raise PredictError(res.failures, scored=len(res.rows))
    return {
        "dataset": dataset,
        "scored": len(res.rows),
        "out": out,
        "images_per_s": res.images_per_s,
    }


@flow(name="mammoflow-score")
def score_flow(
    folder: str,
    dataset: str,
    params_path: str = "params.yaml",
    out: str | None = None,
    model_uri: str | None = None,
) -> Summary:
    """Score the images under ``folder`` with ``dataset``'s champion (or ``model_uri``).

    Results go to ``out`` (default ``reports/scores/<dataset>-<UTC date>.csv``, written
    atomically). A folder that does not exist yet has nothing to score.
    """
    from datetime import UTC, datetime

    root = Path(params_path).parent
    if not (root / folder).exists():
        return {"dataset": dataset, "scored": 0, "out": None}
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    target = out or f"reports/scores/{dataset}-{stamp}.csv"
    return score(params_path, str(root / folder), dataset, target, model_uri)
