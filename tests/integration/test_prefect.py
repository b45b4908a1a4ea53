"""Prefect flows and deployments against a real local Prefect server (and in ephemeral mode).

The server is ``prefect server start`` in a subprocess with a temporary PREFECT_HOME; flow runs
from deployments go through a real process worker (``prefect worker start --run-once``). Data
runs use a tiny embedded sample (6 MIAS women, 4 CMMD patients, 64 px).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tests.helpers import (
    drain_prefect_workers,
    dvc_project,
    dvc_status,
    free_port,
    replace_film,
    stop_process_tree,
    tiny_params,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
POOL = "mammoflow-pool"
TINY = {
    "sample": {"mias_patients": 6, "cmmd_patients": 4, "size": 64},
    "convert": {"size": 64, "workers": 1},
}

pytestmark = pytest.mark.integration


def tiny_project(folder: Path, datasets: list[str] | None = None) -> Path:
    """A project checkout in ``folder`` (git + DVC, a local remote) whose params.yaml is the
    repo's with tiny sample sizes; return the params.yaml path."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, values in TINY.items():
        raw[section].update(values)
    if datasets:
        raw["pipeline"]["datasets"] = datasets
    return dvc_project(folder, raw)


def _clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any PREFECT_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false"}
    return env | extra


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


@dataclass(frozen=True)
class Server:
    """A running Prefect server."""

    api_url: str
    home: Path
    log: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `prefect server start` on a free port, with the client pointed at it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
    )
    log = home / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prefect server did not start:\n{_tail(log)}")
            time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_HOME: home}):
            yield Server(api_url, home, log, env)
            drain_prefect_workers()
    finally:
        stop_process_tree(proc, grace=15.0)


@pytest.fixture(scope="module")
def deployed(server: Server) -> dict[str, UUID]:
    """Every MammoFlow deployment, created on the server's process work pool."""
    from flows.deploy import deploy_all

    return deploy_all(POOL, project_dir=ROOT)


def _client() -> Any:
    from prefect import get_client

    return get_client(sync_client=True)


# --- no server -------------------------------------------------------------------------------


def test_prefect_yaml_matches_deploy_table() -> None:
    """prefect.yaml (for `prefect deploy --all`) declares what flows/deploy.py deploys."""
    from flows.deploy import DEPLOYMENTS

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    declared = {
        (d["entrypoint"], d["name"], tuple(s["cron"] for s in d.get("schedules") or []))
        for d in spec["deployments"]
    }
    expected = {(d.entrypoint, d.name, (d.cron,) if d.cron else ()) for d in DEPLOYMENTS}
    assert declared == expected
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {POOL}


def test_data_flow_in_ephemeral_mode(tmp_path: Path) -> None:
    """With no PREFECT_API_URL the data flow runs (on a temporary server) in a fresh process,
    each stage through DVC: dvc.lock records them and `dvc status` has nothing left to do."""
    tiny_project(tmp_path, datasets=["sample_cmmd"])  # the flow's default: params.yaml's list
    home = tmp_path / ".prefect"
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from flows.pipeline import data_flow\n"
        "print('RESULT=' + json.dumps(data_flow('params.yaml')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_clean_env(
            PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT="))
    summaries = json.loads(line.removeprefix("RESULT="))
    stages = ["source", "acquire", "ingest", "validate", "convert"]
    assert [s["stage"] for s in summaries] == [f"{s}@sample_cmmd" for s in stages]
    assert {s["outcome"] for s in summaries} == {"ran"}
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert {f"{s}@sample_cmmd" for s in stages} <= set(lock)
    assert dvc_status(tmp_path, ["convert@sample_cmmd"]) == {}
    assert (tmp_path / "data" / "processed" / "sample_cmmd" / "manifest.parquet").is_file()
    assert not (tmp_path / "data" / "raw" / "sample_mias").exists()
    assert (home / "prefect.db").is_file()  # the temporary server kept its state under tmp


# --- against a real server -------------------------------------------------------------------


@pytest.mark.slow
def test_deployments_have_their_cron_schedules(server: Server, deployed: dict[str, UUID]) -> None:
    from flows.deploy import DEPLOYMENTS

    assert len(deployed) == len(DEPLOYMENTS)
    with _client() as client:
        pool = client.read_work_pool(POOL)
        assert pool.type == "process"
        nightly = client.read_deployment_by_name("mammoflow-data/nightly-validation")
        weekly = client.read_deployment_by_name("mammoflow-pipeline/weekly-retrain")
        on_demand = client.read_deployment_by_name("mammoflow-train/on-demand")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 0"]
    assert all(s.active for s in [*nightly.schedules, *weekly.schedules])
    assert on_demand.schedules == []
    for dep in (nightly, weekly):
        assert dep.work_pool_name == POOL
        assert dep.entrypoint.startswith("flows/pipeline.py:")
        assert dep.parameters == {"params_path": "params.yaml", "datasets": None}
        assert dep.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]


@pytest.mark.slow
def test_the_deploy_command_registers_them_from_the_checkout(
    server: Server, deployed: dict[str, UUID]
) -> None:
    """`mammoflow deploy` (flows/ is the checkout's, run as `python -m flows.deploy`)."""
    res = subprocess.run(
        [sys.executable, "-m", "mammoflow", "deploy", "--pool", POOL, "--json"],
        cwd=ROOT,
        env={**server.env, "PREFECT_API_URL": server.api_url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["deployments"] == {name: str(uid) for name, uid in deployed.items()}


def test_scheduler_creates_scheduled_runs(server: Server, deployed: dict[str, UUID]) -> None:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    def scheduled(name: str) -> list[Any]:
        with _client() as client:
            runs: list[Any] = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed[name]])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
            )
        return [r for r in runs if r.auto_scheduled]

    deadline = time.monotonic() + 60
    while True:
        nightly = scheduled("mammoflow-data/nightly-validation")
        weekly = scheduled("mammoflow-pipeline/weekly-retrain")
        if nightly and weekly:
            break
        assert time.monotonic() < deadline, "the scheduler created no runs within 60 s"
        time.sleep(1)
    now = datetime.now(UTC)
    for run in nightly:
        start = run.expected_start_time.astimezone(UTC)
        assert (start.hour, start.minute) == (2, 0) and start > now
    for run in weekly:
        start = run.expected_start_time.astimezone(UTC)
        assert (start.isoweekday(), start.hour, start.minute) == (7, 3, 0) and start > now


@pytest.mark.slow
def test_triggered_data_run_completes_on_a_process_worker(
    server: Server, deployed: dict[str, UUID], tmp_path: Path
) -> None:
    from prefect.deployments import run_deployment

    project = tmp_path / "project"
    params = tiny_project(project)
    run = run_deployment(
        "mammoflow-data/nightly-validation",
        parameters={"params_path": str(params), "datasets": ["sample_mias"]},
        timeout=0,
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once"],
            cwd=tmp_path,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        worker.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish within 300 s:\n{_tail(log)}")
    finally:
        stop_process_tree(worker, grace=15.0)
    with _client() as client:
        final = client.read_flow_run(run.id)
    assert final.state is not None and final.state.is_completed(), _tail(log)
    assert (project / "data" / "processed" / "sample_mias" / "manifest.parquet").is_file()
    assert (project / "metrics" / "validation" / "sample_mias.json").is_file()
    assert not (project / "data" / "processed" / "sample_cmmd").exists()


def _task_runs(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r for r in runs}


def _site_project(tmp_path: Path, log_models: str = "final") -> tuple[Path, Path]:
    """A site's MIAS export in a folder (``acquire: local``) and a project checkout that
    studies it with one tiny backbone; returns (params.yaml, the source folder)."""
    import shutil

    from mammoflow.data.sample import make_sample

    make_sample(tmp_path / "gen", seed=20240601, mias_patients=12, cmmd_patients=2, size=64)
    source = tmp_path / "hospital"  # a site's export: new films arrive here between runs
    shutil.copytree(tmp_path / "gen" / "mias", source)
    raw = tiny_params(
        ["site"], split={"k_folds": 2, "test_size": 0.2}, bootstrap=10, log_models=log_models
    )
    raw["datasets"]["site"] = {"kind": "mias", "acquire": "local", "source": str(source)}
    raw["ingest"]["min_size"] = 64  # the films are 64 px
    return dvc_project(tmp_path / "project", raw), source


def _parents(project: Path) -> list[Any]:
    """The project's MLflow parent runs, newest first."""
    from tests.helpers import mlflow_client

    client = mlflow_client(project)
    return list(
        client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string="tags.`mammoflow.role` = 'parent'",
            order_by=["attributes.start_time DESC"],
        )
    )


def _in_dvc_store(store: Path, md5: str) -> bool:
    """Whether a DVC cache or local remote holds the object ``md5`` (``….dir`` for a folder)."""
    return (store / "files" / "md5" / md5[:2] / md5[2:]).is_file()


@pytest.mark.slow
def test_weekly_retrain_runs_through_dvc_and_keeps_every_data_version(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weekly-retrain flow three times on a site's source folder: (1) every stage runs
    through DVC, the data a run trained on is in the DVC cache and the remote, `dvc status` is
    clean; (2) nothing changed: DVC skips every stage, nothing is trained or pushed; (3) one
    film re-exported: acquire sees it, the model is retrained on the new data version, and
    both versions stay fetchable from the remote."""
    import shutil

    from flows.pipeline import pipeline_flow

    from tests.helpers import dvc_add_hash

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
    params, source = _site_project(tmp_path)
    project, remote = params.parent, tmp_path / "dvc-remote"
    processed = project / "data" / "processed" / "site"

    first = pipeline_flow(str(params))
    order = [r["stage"] for r in first["stages"]]
    assert order[:6] == [
        f"{s}@site" for s in ("source", "acquire", "ingest", "validate", "convert", "split")
    ]
    assert order[6:] == ["train@site-vgg16", "evaluate@site", "explain_check@site", "report"]
    assert "train@site-vgg16" in first["changed"] and first["pushed"]["pushed"] > 0
    assert dvc_status(project) == {}  # dvc.lock describes the workspace: DVC saw the run
    tags = _parents(project)[0].data.tags
    assert tags["dvc_data_location"] == "remote"  # marked after the flow's push
    week1 = tags["dvc_data_hash"]
    assert week1 == dvc_add_hash(processed)
    assert _in_dvc_store(project / ".dvc" / "cache", week1) and _in_dvc_store(remote, week1)
    lock = (project / "dvc.lock").read_bytes()
    n_runs = len(_parents(project))

    again = pipeline_flow(str(params))  # nothing changed
    assert again["changed"] == [] and again["pushed"] is None
    skipped = [r["stage"] for r in again["stages"] if r["outcome"] == "skipped"]
    assert skipped == order[1:]  # all but the source check, which always looks
    assert len(_parents(project)) == n_runs  # no training
    assert (project / "dvc.lock").read_bytes() == lock

    replace_film(source / "mdb003.pgm")
    third = pipeline_flow(str(params))
    assert {"acquire@site", "convert@site", "train@site-vgg16"} <= set(third["changed"])
    week2 = _parents(project)[0].data.tags["dvc_data_hash"]
    assert week2 != week1 and week2 == dvc_add_hash(processed)
    assert _in_dvc_store(remote, week1) and _in_dvc_store(remote, week2)  # both kept
    assert dvc_status(project) == {}

    # the working data and the DVC cache gone: week 1's champion still reproduces, its data
    # fetched from the remote by the hash its run logged
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    res = subprocess.run(
        [str(BIN / "mammoflow"), "reproduce", "models:/mammoflow-site/1"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "verdict: identical" in out, out[-6000:]
    assert week1 in out

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client() as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="-site"))
            )
        }
    assert {"comparison-site", "mlflow-site", "report-site"} <= keys


def _flow_in_subprocess(project: Path, env: dict[str, str], flow: str) -> subprocess.Popen[str]:
    script = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        f"from flows.pipeline import {flow}\n{flow}('params.yaml')\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_flow_runs_at_once_on_one_checkout(server: Server, tmp_path: Path) -> None:
    """Two data flows started together on one checkout: one waits on DVC's repo lock, both
    finish, and dvc.lock describes the workspace."""
    params = tiny_project(tmp_path / "project", datasets=["sample_mias"])
    project = params.parent
    env = {**server.env, "PREFECT_API_URL": server.api_url}
    procs = [_flow_in_subprocess(project, env, "data_flow") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    assert dvc_status(project, ["convert@sample_mias"]) == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert {"acquire@sample_mias", "convert@sample_mias"} <= set(lock)


@pytest.mark.slow
def test_bad_input_is_not_retried(server: Server, tmp_path: Path) -> None:
    """A missing source is a missing prerequisite: the stage fails once, with its message."""
    from flows.pipeline import data_flow

    params, source = _site_project(tmp_path)
    source.rename(source.with_name("moved"))
    state = data_flow(str(params), ["site"], return_state=True)
    assert state.is_failed()
    assert "does not exist" in str(state.message) and str(source) in str(state.message)
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["source@site"].run_count == 1
    assert "acquire@site" not in runs


@pytest.mark.slow
def test_transient_io_error_is_retried(server: Server, tmp_path: Path) -> None:
    """A stage whose command exits 75 (EX_TEMPFAIL: transient I/O) is retried and completes."""
    from flows.pipeline import data_flow

    params = tiny_project(tmp_path / "project", datasets=["sample_mias"])
    project = params.parent
    marker = tmp_path / "failed-once"
    wrapper = project / "bin" / "mammoflow"
    real = wrapper.with_name("mammoflow-real")
    wrapper.rename(real)
    wrapper.write_text(  # the project's CLI entry fails its first `acquire`, as a stale NFS would
        "#!/bin/sh\n"
        f'if [ "$1" = acquire ] && [ ! -e {marker} ]; then\n'
        f"  touch {marker}; echo 'stale file handle' >&2; exit 75\nfi\n"
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    state = data_flow(str(params), return_state=True)
    assert state.is_completed(), state.message
    assert marker.is_file()
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["acquire@sample_mias"].run_count == 2
    assert runs["convert@sample_mias"].state.is_completed()


def test_every_retrying_task_retries_only_transient_errors() -> None:
    """The flows' tasks that retry share one decorator, so one rule (errors.is_transient)."""
    from flows.pipeline import push, run_stage, run_training_stage, transient_io_error

    for task in (run_stage, run_training_stage, push):
        assert task.retries >= 1 and task.retry_condition_fn is transient_io_error, task.name


@pytest.mark.slow  # the module's Prefect server; the flow itself takes a few seconds
def test_a_missing_prerequisite_fails_at_once_a_transient_error_is_retried(
    server: Server, tmp_path: Path
) -> None:
    """On a real Prefect server, with the flows' own retry decorator: FileNotFoundError (a
    missing prerequisite) fails on its first run with its message; ESTALE (a stale NFS handle)
    is retried and the task completes."""
    import errno

    from flows.pipeline import retrying_task
    from prefect import flow

    calls: list[str] = []
    missing = tmp_path / "data" / "raw" / "site"

    @retrying_task(task_run_name="{kind}", delays=0)
    def touch_files(kind: str) -> str:
        calls.append(kind)
        if kind == "missing":
            raise FileNotFoundError(f"{missing}: raw data missing; run `mammoflow acquire` first")
        if calls.count(kind) == 1:
            raise OSError(errno.ESTALE, "Stale file handle", str(missing))
        return "read"

    @flow(name="retry-rule")
    def retry_rule() -> tuple[str, Any]:
        return touch_files("stale"), touch_files("missing", return_state=True)

    state = retry_rule(return_state=True)
    stale, failed = state.result()
    assert stale == "read"
    assert failed.is_failed() and "raw data missing" in str(failed.message)
    assert calls == ["stale", "stale", "missing"]
    runs = _task_runs(state.state_details.flow_run_id)
    assert (runs["stale"].run_count, runs["missing"].run_count) == (2, 1)


def test_a_backbone_subset_is_refused_with_the_experiment_to_run(tmp_path: Path) -> None:
    """Flow parameters mean the same in every stage: a backbone subset would train two and
    report four, so it is refused, naming the DVC experiment that runs it."""
    from flows.pipeline import plan

    from mammoflow.config import ConfigError

    params = tiny_project(tmp_path / "project", datasets=["sample_mias"])
    cfg_backbones = yaml.safe_load(params.read_text())["model"]["backbones"]
    with pytest.raises(ConfigError, match=r"dvc exp run -S 'model.backbones=\[vgg16\]'"):
        plan.fn(str(params), backbones=["vgg16"])
    assert plan.fn(str(params))["backbones"] == cfg_backbones
    with pytest.raises(ConfigError, match=r"not in pipeline\.datasets"):
        plan.fn(str(params), datasets=["mias"])
