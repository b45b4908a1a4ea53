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
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tests.helpers import drain_prefect_workers, free_port, stop_process_tree, tiny_params

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
    """Write the repo's params.yaml with tiny sample sizes into ``folder``; return its path."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, values in TINY.items():
        raw[section].update(values)
    if datasets:
        raw["pipeline"]["datasets"] = datasets
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return params


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
    """With no PREFECT_API_URL the data flow runs (on a temporary server) in a fresh process."""
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
    assert [s["dataset"] for s in summaries] == ["sample_cmmd"]
    assert summaries[0]["converted"] > 0
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


def _fail_once(real: Callable[..., dict[str, Any]], marker: Path) -> Callable[..., Any]:
    def flaky(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if not marker.exists():
            marker.write_text("failed once", encoding="utf-8")
            raise OSError("simulated transient I/O error (stale NFS handle)")
        return real(*args, **kwargs)

    return flaky


@pytest.mark.slow
def test_bad_input_is_not_retried(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import data_flow

    from mammoflow import stages

    params = tiny_project(tmp_path)

    def bad(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ValueError("not a readable tar archive")

    monkeypatch.setattr(stages, "acquire_stage", bad)
    state = data_flow(str(params), ["sample_mias"], return_state=True)
    assert state.is_failed()
    # the flow fails with the stage's own message, not the next stage's "not ready"
    assert "not a readable tar archive" in str(state.message), state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["acquire-sample_mias"].run_count == 1
    assert "ingest-sample_mias" not in runs or not runs["ingest-sample_mias"].state.is_completed()


STAGES = ("acquire", "ingest", "validate", "convert", "split", "train", "evaluate", "compare")


def _fake_stages(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, ...]]) -> None:
    """Replace every stage function by a recorder of (stage, dataset[, backbone])."""
    from mammoflow import stages

    lock = threading.Lock()

    def recorder(stage: str) -> Callable[..., dict[str, Any]]:
        def record(cfg: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            names = tuple(a for a in args if isinstance(a, str))
            with lock:
                calls.append((stage, *names))
            return {"stage": stage, "args": list(names), "thread": threading.current_thread().name}

        return record

    for stage in STAGES:
        monkeypatch.setattr(stages, f"{stage}_stage", recorder(stage))


@pytest.mark.slow
def test_pipeline_flow_sequences_the_stages(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import pipeline_flow

    calls: list[tuple[str, ...]] = []
    _fake_stages(monkeypatch, calls)
    params = tiny_project(tmp_path)
    out = pipeline_flow(str(params), backbones=["vgg16", "resnet50"])
    datasets = ["sample_mias", "sample_cmmd"]
    trains = [("train", d, b) for d in datasets for b in ("vgg16", "resnet50")]
    assert [t["args"] for t in out["train"]] == [list(t[1:]) for t in trains]
    assert [c["args"] for c in out["evaluate"]["champions"]] == [[d] for d in datasets]
    assert out["evaluate"]["report"]["stage"] == "compare"
    order = {c: i for i, c in enumerate(calls)}
    assert len(order) == len(calls) == 4 * 2 + 2 + 4 + 2 + 1
    for d in datasets:
        chain = [("acquire", d), ("ingest", d), ("validate", d), ("convert", d), ("split", d)]
        assert [order[c] for c in chain] == sorted(order[c] for c in chain)
        assert all(order[("convert", d)] < order[("split", x)] for x in datasets)
        assert max(order[t] for t in trains) < order[("evaluate", d)]
    assert max(order[("split", d)] for d in datasets) < min(order[t] for t in trains)
    assert calls[-1] == ("compare",)


@pytest.mark.slow
def test_transient_io_error_is_retried(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError on the first attempt of a task is retried and the run completes."""
    from flows.pipeline import data_flow

    from mammoflow import stages

    calls: list[tuple[str, ...]] = []
    _fake_stages(monkeypatch, calls)
    monkeypatch.setattr(
        stages, "acquire_stage", _fail_once(stages.acquire_stage, tmp_path / "failed")
    )
    state = data_flow(str(tiny_project(tmp_path)), ["sample_mias"], return_state=True)
    assert state.is_completed(), state.message
    assert (tmp_path / "failed").is_file()
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["acquire-sample_mias"].run_count == 2
    assert runs["acquire-sample_mias"].state.is_completed()
    assert runs["convert-sample_mias"].state.is_completed()
    assert [c[0] for c in calls] == ["acquire", "ingest", "validate", "convert"]


@pytest.mark.slow
def test_lineage_tag_is_dvcs_hash_of_the_data_the_flow_used(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weekly-retrain flow (pipeline_flow), run by Prefect, not DVC: one image of the
    hospital's source folder changes between two runs, and each run's MLflow tag
    ``dvc_data_hash`` is what `dvc add` gives for data/processed as that run left it."""
    import shutil

    from flows.pipeline import pipeline_flow

    from mammoflow.data.pgm import read_pgm, write_pgm
    from mammoflow.data.sample import make_sample
    from tests.helpers import dvc_add_hash, mlflow_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
    make_sample(tmp_path / "gen", seed=20240601, mias_patients=12, cmmd_patients=2, size=64)
    source = tmp_path / "hospital"  # a site's export: new films arrive here between runs
    shutil.copytree(tmp_path / "gen" / "mias", source)
    project = tmp_path / "project"
    raw = tiny_params(
        ["site"], split={"k_folds": 2, "test_size": 0.2}, bootstrap=10, log_models="none"
    )
    raw["datasets"]["site"] = {"kind": "mias", "acquire": "local", "source": str(source)}
    raw["ingest"]["min_size"] = 64  # the films are 64 px
    params = project / "params.yaml"
    project.mkdir()
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    processed = project / "data" / "processed" / "site"

    def run_flow() -> tuple[str, str]:
        """(the new parent run's dvc_data_hash tag, `dvc add`'s hash of the folder after it)."""
        pipeline_flow(str(params), datasets=["site"], backbones=["vgg16"])
        client = mlflow_client(project)
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string="tags.`mammoflow.role` = 'parent'",
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].data.tags["dvc_data_hash"], dvc_add_hash(processed)

    tagged, added = run_flow()
    assert tagged == added and tagged.endswith(".dir")

    film = source / "mdb003.pgm"  # one film re-exported: a brighter patch inside the breast
    image = read_pgm(film)
    pixels = image.pixels.copy()
    h, w = pixels.shape
    pixels[h // 3 : h // 2, w // 3 : w // 2] = image.maxval
    write_pgm(film, pixels, image.maxval)

    tagged_again, added_again = run_flow()
    assert added_again != added  # the flow converted the new film
    assert tagged_again == added_again  # and the new run names the data it trained on
