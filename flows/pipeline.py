"""Prefect flows for MammoFlow: Prefect schedules, retries and shows; DVC executes.

Every task runs one pipeline stage as ``dvc repro --single-item <stage>`` in the project
checkout (the folder holding ``params_path``, which must be the project's params.yaml), through
:mod:`mammoflow.dvc_runner`. So a scheduled run updates dvc.lock, puts its outputs into the DVC
cache and skips unchanged stages exactly as a person's `dvc repro` does; a flow that changed
data ends with `dvc push --run-cache` to the project's default remote. Nothing here holds
pipeline logic: stages live in dvc.yaml and src/mammoflow.

Flows:
    data_flow      source → acquire → ingest → validate → convert, per dataset
    train_flow     split, then the train stage of each backbone (which fans its folds out on
                   Dask itself when MAMMOFLOW_DASK_ADDRESS is set)
    evaluate_flow  champion per dataset, Grad-CAM check, comparison report
    pipeline_flow  the three in order, then push; artifacts in the Prefect UI
    tune_flow      tuning/dvc.yaml's Optuna stages;  audit_flow  audit/dvc.yaml's leakage audit
    score_flow     score the new images of a folder with a dataset's champion (mammoflow.serving.predict)

Two flow runs on one checkout queue on DVC's repo lock (``dvc --wait-for-lock``). Training tasks
carry the tag ``mammoflow-train`` (``prefect concurrency-limit create mammoflow-train 1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from mammoflow import dvc_runner
from mammoflow.config import Config, ConfigError, load_config
from mammoflow.errors import is_transient
from mammoflow.paths import Layout
from mammoflow.reporting import summary

DASK_ADDRESS_ENV = "MAMMOFLOW_DASK_ADDRESS"
TRAIN_TAG = "mammoflow-train"
IO_RETRIES = 2
IO_RETRY_DELAYS: list[float] = [2.0, 10.0]
DATA_STAGES = ("source", "acquire", "ingest", "validate", "convert")

Summary = dict[str, Any]
P = ParamSpec("P")
R = TypeVar("R")


def _load(params_path: str) -> tuple[Config, Path]:
    """The config and the project checkout (the folder of params.yaml), which DVC runs in."""
    path = Path(params_path)
    if path.name != "params.yaml":
        raise ConfigError(
            f"{params_path}: DVC reads the project's params.yaml; pass the params.yaml of the "
            "project checkout (other parameters: `dvc exp run -S KEY=VALUE`)"
        )
    root = path.parent.resolve()
    dvc_runner.check_project(root)
    return load_config(path), root


def transient_io_error(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only transient I/O (a stage exiting 75, a stale handle), never bad input or a
    missing prerequisite such as ``FileNotFoundError``."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def retrying_task(
    *, retries: int = IO_RETRIES, delays: float | list[float] = IO_RETRY_DELAYS, **options: Any
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """``@task`` for work that touches files, servers or DVC: retried ``retries`` times after
    ``delays`` seconds, but only on transient I/O (:func:`transient_io_error`); bad input or a
    missing prerequisite fails at once with its message. ``options`` go to ``@task``."""
    return task(
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=delays,
        retry_condition_fn=transient_io_error,
        **options,
    )


def _stage(params_path: str, stage: str) -> Summary:
    """Run one stage through DVC in the project, streaming its output to the run's log."""
    _, root = _load(params_path)
    log = get_run_logger()
    run = dvc_runner.repro(root, stage, on_line=log.info)
    log.info("%s: %s in %.1f s", stage, run.outcome, run.seconds)
    return {"stage": stage, "outcome": run.outcome, "seconds": round(run.seconds, 1)}


@retrying_task(task_run_name="{stage}")
def run_stage(params_path: str, stage: str) -> Summary:
    """One DVC stage (``dvc repro --single-item``): ran, restored from the run cache, or skipped."""
    return _stage(params_path, stage)


# Training resumes finished folds (MLflow), so one retry after a transient error is cheap.
@retrying_task(task_run_name="{stage}", tags=[TRAIN_TAG], retries=1, delays=30)
def run_training_stage(params_path: str, stage: str) -> Summary:
    """A stage that trains (train, tune, audit): tagged for a Prefect concurrency limit."""
    return _stage(params_path, stage)


@task(task_run_name="plan", cache_policy=NO_CACHE)
def plan(
    params_path: str, datasets: list[str] | None = None, backbones: list[str] | None = None
) -> dict[str, list[str]]:
    """Which datasets and backbones a run covers: params.yaml's, or a part of them.

    DVC has stages only for ``pipeline.datasets`` × ``model.backbones``; a backbone list other
    than params.yaml's would train a subset but evaluate and report the whole list, so it is
    refused with the way to run it as a DVC experiment.
    """
    cfg, _ = _load(params_path)
    names = list(datasets or cfg.pipeline.datasets)
    unknown = [n for n in names if n not in cfg.pipeline.datasets]
    if unknown:
        raise ConfigError(
            f"datasets {unknown} are not in pipeline.datasets {list(cfg.pipeline.datasets)}: DVC "
            "has no stages for them; add them to pipeline.datasets in params.yaml"
        )
    wanted = list(backbones or cfg.model.backbones)
    if wanted != list(cfg.model.backbones):
        raise ConfigError(
            f"backbones {wanted} differ from model.backbones {list(cfg.model.backbones)}; a "
            "subset is a different study: set model.backbones in params.yaml, or run it as a DVC "
            f"experiment: dvc exp run -S 'model.backbones=[{','.join(wanted)}]'"
        )
    return {"datasets": names, "backbones": wanted}


@flow(name="mammoflow-data")
def data_flow(params_path: str = "params.yaml", datasets: list[str] | None = None) -> list[Summary]:
    """Source check → acquire → ingest → validate → convert, each dataset in turn."""
    names = plan(params_path, datasets)["datasets"]
    return [run_stage(params_path, f"{s}@{d}") for d in names for s in DATA_STAGES]


@flow(name="mammoflow-train")
def train_flow(
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    dask_address: str | None = None,
) -> list[Summary]:
    """Split each dataset, then the train stage of every backbone on it.

    With a Dask address (argument or ``$MAMMOFLOW_DASK_ADDRESS``) each train stage fans its
    folds out on that cluster; where folds run does not change their numbers.
    """
    if dask_address:
        os.environ[DASK_ADDRESS_ENV] = dask_address  # the DVC subprocesses inherit it
    todo = plan(params_path, datasets, backbones)
    out = [run_stage(params_path, f"split@{d}") for d in todo["datasets"]]
    return out + [
        run_training_stage(params_path, f"train@{d}-{b}")
        for d in todo["datasets"]
        for b in todo["backbones"]
    ]


@flow(name="mammoflow-evaluate")
def evaluate_flow(params_path: str = "params.yaml", datasets: list[str] | None = None) -> Summary:
    """Champion per dataset (MLflow registry), the Grad-CAM check, then the comparison report."""
    names = plan(params_path, datasets)["datasets"]
    stages = [
        run_stage(params_path, f"{s}@{d}") for d in names for s in ("evaluate", "explain_check")
    ]
    return {"stages": stages, "report": run_stage(params_path, "report")}


@retrying_task(task_run_name="push", delays=10)
def push(params_path: str) -> Summary:
    """Send the data and run cache to the project's default DVC remote; say what was sent."""
    from mammoflow.tracking.lineage import mark_pushed

    _, root = _load(params_path)
    res = dvc_runner.push(root, on_line=get_run_logger().info)
    marked = mark_pushed(root)  # their runs' data is now fetchable from the remote: say so
    create_markdown_artifact(
        key="dvc-push",
        markdown=f"**DVC push** to remote `{res.remote}` (`{res.url}`): {res.pushed} file(s) "
        f"sent, data and run cache.\n\n`{res.message}`\n\nMLflow runs now marked "
        f"`dvc_data_location: remote`: {len(marked)}",
        description="What this run pushed to the DVC remote",
    )
    return {"remote": res.remote, "url": res.url, "pushed": res.pushed, "runs_marked": marked}


@task(task_run_name="artifacts", cache_policy=NO_CACHE)
def publish(params_path: str, datasets: list[str], backbones: list[str]) -> None:
    """The study in the Prefect UI: comparison table, links to MLflow and the reports, the
    validation summary. Keys are per dataset, so each new run is a new version of the same."""
    from mammoflow.tracking import Tracker, tracking_uri

    _, root = _load(params_path)
    layout = Layout(root=root)
    ui = summary.mlflow_ui(tracking_uri(root))
    tracker = Tracker(root=root)
    for dataset in datasets:
        key = dataset.lower().replace("_", "-")
        rows = summary.comparison_rows(layout, dataset, backbones)
        create_table_artifact(
            key=f"comparison-{key}",
            table=rows,
            description=f"{dataset}: macro-F1 (CV mean ± std; held-out test [95% CI]), ECE",
        )
        exp = tracker.experiment_id(dataset)
        create_link_artifact(
            key=f"mlflow-{key}",
            link=summary.run_link(ui, exp),
            link_text=f"MLflow: the {dataset} runs",
        )
        report = layout.reports() / dataset / "report.html"
        if report.is_file():
            create_link_artifact(
                key=f"report-{key}", link=report.as_uri(), link_text=f"{dataset} study report"
            )
    create_markdown_artifact(
        key="validation",
        markdown=summary.validation_markdown(layout, datasets),
        description="Great Expectations, per dataset",
    )


@flow(name="mammoflow-pipeline")
def pipeline_flow(
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    dask_address: str | None = None,
    push_data: bool = True,
) -> Summary:
    """The whole study through DVC: data, training, evaluation; then push what changed."""
    todo = plan(params_path, datasets, backbones)
    data = data_flow(params_path, todo["datasets"])
    trained = train_flow(params_path, todo["datasets"], todo["backbones"], dask_address)
    evaluated = evaluate_flow(params_path, todo["datasets"])
    runs = [*data, *trained, *evaluated["stages"], evaluated["report"]]
    # the source check runs every time (DVC's always_changed); what it finds shows as acquire
    changed = [
        r["stage"]
        for r in runs
        if r["outcome"] != "skipped" and not r["stage"].startswith("source@")
    ]
    log = get_run_logger()
    log.info("stages that ran: %s", ", ".join(changed) or "none (nothing changed)")
    pushed = push(params_path) if changed and push_data else None
    publish(params_path, todo["datasets"], todo["backbones"])
    return {"stages": runs, "changed": changed, "pushed": pushed}


@flow(name="mammoflow-tune")
def tune_flow(
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
) -> list[Summary]:
    """One Optuna study per (dataset, backbone): tuning/dvc.yaml (not in pipeline_flow).

    Trials, pruner and search space are params.yaml's ``tune:``, as for `dvc repro`.
    """
    todo = plan(params_path, datasets, backbones)
    out = [run_stage(params_path, f"split@{d}") for d in todo["datasets"]]
    return out + [
        run_training_stage(params_path, f"tuning/dvc.yaml:tune@{d}-{b}")
        for d in todo["datasets"]
        for b in todo["backbones"]
    ]


@flow(name="mammoflow-audit")
def audit_flow(
    params_path: str = "params.yaml", datasets: list[str] | None = None
) -> list[Summary]:
    """The leakage audit of each dataset: audit/dvc.yaml (trains one backbone twice)."""
    names = plan(params_path, datasets)["datasets"]
    out = [run_stage(params_path, f"split@{d}") for d in names]
    return out + [run_training_stage(params_path, f"audit/dvc.yaml:audit@{d}") for d in names]


@task(task_run_name="score-{dataset}", cache_policy=NO_CACHE)
def score(
    params_path: str, folder: str, dataset: str, out: str, model_uri: str | None = None
) -> Summary:
    """Score every image under ``folder`` (the same function as ``mammoflow predict``)."""
    from mammoflow.serving.predict import PredictError, predict_files

    cfg = load_config(params_path)
    root = Path(params_path).parent
    res = predict_files([folder], cfg, dataset, model_uri=model_uri, out=root / out, progress=False)
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
    atomically). A folder that does not exist yet has nothing to score. Scoring is not a
    pipeline stage (its inputs arrive daily, outside DVC), so it runs directly.
    """
    from datetime import UTC, datetime

    root = Path(params_path).parent
    if not (root / folder).exists():
        return {"dataset": dataset, "scored": 0, "out": None}
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    target = out or f"reports/scores/{dataset}-{stamp}.csv"
    return score(params_path, str(root / folder), dataset, target, model_uri)
