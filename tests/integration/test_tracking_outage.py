"""The MLflow server killed, or stopped, in the middle of a train stage on the team stack.

A throw-away team stack (the ``stack`` fixture: supervisord, PostgreSQL, SeaweedFS, MLflow
with basic auth, artifacts proxied to S3). ``mammoflow train`` for sample_mias, one backbone,
tiny settings, runs as its own process with the environment of ``stack.env``:

* killed: once the first fold run exists the MLflow server's process group gets SIGKILL and
  supervisord restarts it. The stage waits for it (bounded backoff) and exits 0, with every
  fold run FINISHED and carrying its metrics, one run per fold, the parent FINISHED with its
  aggregates and the model;
* stopped: the server stays down past ``MAMMOFLOW_TRACKING_RETRY_S``. The stage exits 75
  (transient) naming the server; with the server back, the rerun resumes the folds that
  finished, and the half-logged fold run is FAILED, not reused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra.local import stack as stack_mod

from mammoflow.errors import EX_TEMPFAIL
from tests.helpers import tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "sample_mias"
BACKBONE = "vgg16"
FOLDS = 3


@pytest.fixture(scope="module")
def project(stack: stack_mod.Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project folder with sample_mias acquired, ingested, converted and split."""
    from mammoflow.config import parse_config
    from mammoflow.data.acquire import acquire_stage
    from mammoflow.data.convert import convert_stage
    from mammoflow.data.ingest import ingest_stage
    from mammoflow.data.split import split_stage
    from mammoflow.paths import Layout

    root = tmp_path_factory.mktemp("outage-project")
    raw = tiny_params(  # 3 epochs: time for the fault to land while folds are left to train
        [DATASET],
        [BACKBONE],
        sample={"mias_patients": 16},
        split={"k_folds": FOLDS},
        train={"epochs": 3},
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = parse_config(raw)
    layout = Layout(root)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for stage in (acquire_stage, ingest_stage, convert_stage):
            stage(cfg, DATASET, layout)
        split_stage(cfg, DATASET, layout)
    finally:
        os.chdir(cwd)
    yield root


def _env(stack: stack_mod.Stack, **extra: str) -> dict[str, str]:
    """This machine's environment switched onto the stack (as `source stack.env` does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MAMMOFLOW_"))}
    return {**env, **stack.env(), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _train(project: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mammoflow", "train", "--dataset", DATASET]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*cmd, "--backbone", BACKBONE], cwd=project, env=env, stdout=out, stderr=out
        )


def _client(stack: stack_mod.Stack) -> Any:
    """An MLflow client of the stack that fails at once while the server is down."""
    from mlflow import MlflowClient

    env = stack.env()
    os.environ["MLFLOW_TRACKING_USERNAME"] = env["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_TRACKING_PASSWORD"]
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.fixture
def restore_env() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _fold_runs(client: Any, experiment: str, status: str | None = None) -> list[Any]:
    """The experiment's fold runs (``status``: only those), or [] while the server is down."""
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], "tags.`mammoflow.role` = 'fold'")
    except Exception:  # the server is down or restarting: nothing to see yet
        return []
    return [r for r in runs if status is None or r.info.status == status]


def _wait_for(proc: subprocess.Popen[bytes], found: Any, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        if found():
            return
        time.sleep(0.2)
    raise AssertionError("the train stage ended (or took too long) before the fault point")


def _finish(proc: subprocess.Popen[bytes], log: Path, limit_s: float = 600) -> str:
    try:
        proc.wait(limit_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(encoding="utf-8", errors="replace")


def _study(client: Any, experiment: str) -> tuple[Any, dict[str, list[Any]]]:
    """The experiment's parent run and its children by name."""
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`mammoflow.role` = 'parent'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    children: dict[str, list[Any]] = {}
    for run in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    ):
        children.setdefault(run.info.run_name, []).append(run)
    return parent, children


def _assert_complete(client: Any, parent: Any, finished: dict[str, Any]) -> None:
    """Every fold and the test FINISHED with their metrics; the parent's aggregates and model."""
    assert sorted(finished) == [*(f"fold-{k}" for k in range(1, FOLDS + 1)), "test"]
    for name, run in finished.items():
        prefix = "test_" if name == "test" else "val_"
        assert f"{prefix}f1_macro" in run.data.metrics, (name, run.data.metrics)
        artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id)}
        assert "predictions.json" in artifacts, (name, artifacts)
    parent = client.get_run(parent.info.run_id)  # with its outputs (the logged model)
    assert parent.info.status == "FINISHED"
    assert {"f1_macro_mean", "f1_macro_std", "test_f1_macro"} <= set(parent.data.metrics)
    model_uri = finished["test"].data.tags["mammoflow.model_uri"]
    model_id = model_uri.removeprefix("models:/")
    assert model_id in {o.model_id for o in parent.outputs.model_outputs}
    files = {Path(a.path).name for a in client.list_logged_model_artifacts(model_id)}
    assert "MLmodel" in files, files


def test_mlflow_killed_mid_stage_is_waited_for(
    stack: stack_mod.Stack, project: Path, tmp_path: Path, restore_env: None
) -> None:
    experiment = f"mammoflow-{DATASET}-killed"
    client = _client(stack)
    log = tmp_path / "train.log"
    # MLflow's own urllib3 retries (≈ 12 s) can absorb a fast restart on a quiet machine, and the
    # stage would then never meet the outage (seen here): without them every call made while the
    # server is down reaches MammoFlow's retry layer, which is what this test is about.
    env = _env(stack, MAMMOFLOW_EXPERIMENT_SUFFIX="-killed", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    proc = _train(project, env, log)
    try:
        _wait_for(proc, lambda: _fold_runs(client, experiment), limit_s=600)
        old = stack.pid("mlflow")
        assert old is not None
        os.killpg(old, signal.SIGKILL)  # the server and its workers; supervisord restarts it
        killed = time.monotonic()
        deadline = killed + 180
        while stack.pid("mlflow") in (None, old) or not stack._mlflow_ready():
            assert time.monotonic() < deadline, "supervisord did not restart MLflow"
            time.sleep(0.5)
        print(f"MLflow answered again {time.monotonic() - killed:.1f} s after the kill")
    finally:
        output = _finish(proc, log)
    assert proc.returncode == 0, output
    assert "unreachable during" in output, output  # the stage did meet the outage
    print(*(line for line in output.splitlines() if "MLflow tracking server" in line), sep="\n")
    parent, children = _study(client, experiment)
    assert {n: len(r) for n, r in children.items() if len(r) > 1} == {}  # no duplicate runs
    _assert_complete(client, parent, {n: r[0] for n, r in children.items()})


def test_mlflow_down_past_the_bound_fails_then_resumes(
    stack: stack_mod.Stack, project: Path, tmp_path: Path, restore_env: None
) -> None:
    experiment = f"mammoflow-{DATASET}-stopped"
    client = _client(stack)
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    env = _env(stack, MAMMOFLOW_EXPERIMENT_SUFFIX="-stopped", MAMMOFLOW_TRACKING_RETRY_S="8")
    log = tmp_path / "train.log"
    proc = _train(project, env, log)
    try:
        _wait_for(proc, lambda: _fold_runs(client, experiment, "FINISHED"), limit_s=600)
        assert stack.stop_service("mlflow")  # supervisorctl stop: it stays down
        output = _finish(proc, log)
    finally:
        if stack.pid("mlflow") is None:
            stack.start_service("mlflow")
    assert proc.returncode == EX_TEMPFAIL, output
    print(*(line for line in output.splitlines() if "MLflow tracking server" in line), sep="\n")
    assert f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) did not answer" in output
    finished_before = {r.info.run_name for r in _fold_runs(client, experiment, "FINISHED")}
    assert "fold-1" in finished_before

    retry = _train(project, _env(stack, MAMMOFLOW_EXPERIMENT_SUFFIX="-stopped"), log)
    output = _finish(retry, log)
    assert retry.returncode == 0, output
    parent, children = _study(client, experiment)
    resumed = json.loads(parent.data.tags["resumed_folds"])
    assert {f"fold-{k}" for k in resumed} == finished_before
    finished: dict[str, Any] = {}
    for name, runs in children.items():
        done = [r for r in runs if r.info.status == "FINISHED"]
        assert len(done) == 1, (name, [r.info.status for r in runs])  # one counts, once
        # the run the outage cut off was marked FAILED by the rerun, and not reused
        assert all(r.info.status == "FAILED" for r in runs if r is not done[0]), name
        finished[name] = done[0]
    _assert_complete(client, parent, finished)
