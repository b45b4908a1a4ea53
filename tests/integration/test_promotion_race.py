"""Two processes promoting champions of one dataset at once (issue 23, 3e).

Each process registers its model and decides champion / challenger. Without mutual exclusion
the read-compare-write interleaves: both read "no champion" (or the same old one) and the slower
writer's alias wins whatever its score. Here the interleaving is forced: one process holds a
delay between registering its version and writing the aliases (the window), the other starts
inside that window. Afterwards the better model must be ``champion`` and the other
``challenger`` in both orders, and the versions' tags must tell what happened.

Stores: the embedded SQLite store, and — the team's — a real ``mlflow server`` on PostgreSQL,
reached over HTTP (skipped when the PostgreSQL binaries are missing).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra.local import stack as stack_mod

from tests.helpers import free_port, stop_process_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "race_ds"
NAME = f"mammoflow-{DATASET}"
METRIC = "cv_f1_macro_mean"
WINDOW_S = 2.0  # the slow process's pause between registering and writing the aliases
LATE_S = 0.5  # the fast process starts this long after the slow one


def _child(
    uri: str, run_id: str, value: float, pause: float, late: float, go: Any, out: Any
) -> None:
    """One promoting process: waits for the start signal, then promotes ``run_id``."""
    import mlflow

    from mammoflow.tracking import Tracker

    tracker = Tracker(uri=uri)
    register = mlflow.register_model

    def slow_register(*args: Any, **kwargs: Any) -> Any:
        version = register(*args, **kwargs)
        time.sleep(pause)  # the window between reading the champion and writing the aliases
        return version

    mlflow.register_model = slow_register
    go.wait(timeout=120)
    time.sleep(late)
    try:
        out.put((run_id, tracker.promote(DATASET, run_id, METRIC, value)))
    except Exception as exc:  # reported to the test, which fails with it
        out.put((run_id, {"error": repr(exc)}))


def _runs(uri: str) -> tuple[str, str]:
    """Two runs, each with a registrable model directory: (better, worse)."""
    from mammoflow.tracking import Tracker

    tracker = Tracker(uri=uri)
    exp = tracker.experiment_id(DATASET)
    ids = []
    for backbone in ("vgg16", "resnet50"):
        run_id, _ = tracker.open_parent(exp, backbone, f"race-{backbone}", {}, {})
        tracker.log_text(run_id, "flavors: {}\n", "model/MLmodel")
        tracker.set_tags(run_id, {"mammoflow.model_uri": f"runs:/{run_id}/model"})
        ids.append(run_id)
    return ids[0], ids[1]


def _race(uri: str, slow_is_better: bool) -> dict[str, dict[str, Any]]:
    better, worse = _runs(uri)
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    slow, fast = (better, worse) if slow_is_better else (worse, better)
    value = {better: 0.8, worse: 0.6}
    procs = [
        ctx.Process(target=_child, args=(uri, slow, value[slow], WINDOW_S, 0.0, go, out)),
        ctx.Process(target=_child, args=(uri, fast, value[fast], 0.0, LATE_S, go, out)),
    ]
    for p in procs:
        p.start()
    time.sleep(8.0)  # both have imported MLflow and wait on the signal
    go.set()
    results = dict(out.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all("error" not in r for r in results.values()), results
    return {"better": results[better], "worse": results[worse]}


def _check(uri: str, results: dict[str, dict[str, Any]]) -> None:
    from mlflow import MlflowClient

    from mammoflow import tracking

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert str(champion.version) == str(results["better"]["version"]), results
    assert str(challenger.version) == str(results["worse"]["version"]), results
    # the history: the better one's promotion says champion; the worse one says challenger,
    # or — if it was champion for a moment — that the better one displaced it
    assert "champion" in champion.tags[tracking.TAG_PROMOTION]
    lost = challenger.tags.get(tracking.TAG_DISPLACED, "")
    assert challenger.tags[tracking.TAG_PROMOTION].split(": ", 1)[1].startswith("challenger") or (
        f"beaten by v{champion.version}" in lost
    ), challenger.tags
    names = {m.name for m in client.search_registered_models()}
    assert NAME + tracking.LOCK_SUFFIX not in names  # released
    client.delete_registered_model(NAME)
    client.delete_experiment(
        client.get_experiment_by_name(tracking.experiment_name(DATASET)).experiment_id
    )


@pytest.mark.parametrize("slow_is_better", [False, True], ids=["worse-slow", "better-slow"])
def test_concurrent_promotions_on_sqlite(tmp_path: Path, slow_is_better: bool) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _check(uri, _race(uri, slow_is_better))


@pytest.fixture(scope="module")
def postgres_mlflow_server() -> Iterator[str]:
    """A real `mlflow server` on PostgreSQL (the team stack's store), over HTTP."""
    if stack_mod.find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb/postgres) not installed")
    state = Path(tempfile.mkdtemp(prefix="mammoflow-race-pg-"))
    state.chmod(0o755)  # PostgreSQL runs as another user when the tests run as root
    st = stack_mod.Stack(stack_mod.free_port_config(state), echo=lambda _line: None)
    server = None
    try:
        st.start_service("postgres")
        st.ensure_databases()
        port = free_port()
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                st.db_url("mlflow", "postgresql+psycopg"),
                "--artifacts-destination",
                str(state / "artifacts"),
                "--serve-artifacts",
                "--workers",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        yield uri
    finally:
        if server is not None:
            stop_process_tree(server, grace=30)
        st.down()
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.parametrize("slow_is_better", [False, True], ids=["worse-slow", "better-slow"])
def test_concurrent_promotions_on_the_team_postgres_server(
    postgres_mlflow_server: str, slow_is_better: bool
) -> None:
    _check(postgres_mlflow_server, _race(postgres_mlflow_server, slow_is_better))
