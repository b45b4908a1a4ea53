"""The local team stack (infra/local/stack.py) end to end, on real servers and free ports.

One module-scoped stack (PostgreSQL 15, SeaweedFS S3, MLflow, Prefect) in a temporary state
directory is started through the stack module (the ``stack`` fixture of conftest.py) and torn
down at the end (processes stopped, directory removed). Skipped only where the PostgreSQL server binaries or ``weed`` are absent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from infra.local import stack as stack_mod

from mammoflow import storage
from mammoflow.data.dicom import read_dicom
from mammoflow.data.sample import FAKE_PHI, mammogram_dicom
from tests.helpers import (
    drain_prefect_workers,
    dvc_project,
    scan_bucket,
    stop_process_tree,
    tiny_params,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHI_NEEDLES = [FAKE_PHI["PatientName"], FAKE_PHI["AccessionNumber"], FAKE_PHI["InstitutionName"]]
PYTHON = sys.executable
DVC = str(Path(sys.executable).with_name("dvc"))
PREFECT = str(Path(sys.executable).with_name("prefect"))
SAMPLE = "sample_cmmd"  # DICOM with planted fake PHI in its headers


@pytest.fixture(scope="module")
def stack_env(stack: stack_mod.Stack) -> Iterator[dict[str, str]]:
    """The process environment switched onto the stack, as `source stack.env` would."""
    env = stack.env()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # every MLflow client below authenticates with stack.env's credentials, nothing else
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
        assert env["MLFLOW_TRACKING_PASSWORD"] == stack.secrets()["mlflow_admin_password"]
        yield env


@pytest.fixture(scope="module")
def logged_run(stack: stack_mod.Stack, stack_env: dict[str, str]) -> dict[str, Any]:
    """One MLflow run logged from a DICOM file that carries fake PHI in its header."""
    import mlflow

    work = Path(tempfile.mkdtemp(prefix="mammoflow-run-"))
    try:
        image = np.full((48, 32), 0.5, dtype=np.float32)
        dcm = work / "1-1.dcm"
        dcm.write_bytes(
            mammogram_dicom(
                seed=7,
                image=image,
                encoding=0,
                special=0,
                patient="D1-0001",
                side="L",
                view="CC",
                number=1,
                study_uid="1.2.3.4",  # type: ignore[arg-type]
                series_uid="1.2.3.4.5",  # type: ignore[arg-type]
            )
        )
        decoded = read_dicom(dcm)
        fields = {
            "patient_id": decoded.patient_id,
            "laterality": decoded.laterality,
            "view": decoded.view,
            "modality": decoded.modality,
            "bits_stored": decoded.bits_stored,
        }
        header = work / "header.json"
        header.write_text(json.dumps(fields, indent=2))
        client = mlflow.MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
        exp_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
        run = client.create_run(exp_id, tags={"dataset": "sample_cmmd"})
        for key, value in fields.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "auc", 0.75)
        client.log_artifact(run.info.run_id, str(header), artifact_path="dicom")
        client.set_terminated(run.info.run_id)
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "fields": fields}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- the stack


def test_up_is_idempotent_and_healthy(stack: stack_mod.Stack) -> None:
    first = "\n".join(stack.first_up_lines)  # type: ignore[attr-defined]
    for service in stack_mod.SERVICES:
        assert f"{service}" in first and "started" in first
    lines: list[str] = []
    stack.echo = lines.append
    try:
        stack.up()
    finally:
        stack.echo = lambda _msg: None
    text = "\n".join(lines)
    for service in stack_mod.SERVICES:
        assert f"{service:10s} already running" in text, text
    assert "created" not in text
    assert all(s.healthy for s in stack.status()), [s.line() for s in stack.status()]
    env_file = stack.env_file
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    content = env_file.read_text()
    for key in (
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "MAMMOFLOW_OPTUNA_STORAGE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_S3_ENDPOINT_URL",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert f"export {key}=" in content
    assert stat.S_IMODE((stack.state / "secrets.json").stat().st_mode) == 0o600


def test_prefect_server_uses_postgres(stack: stack_mod.Stack) -> None:
    import urllib.request

    token = base64.b64encode(stack.secrets()["prefect_auth_string"].encode()).decode()
    request = urllib.request.Request(
        f"{stack.config.prefect_api_url}/flows/filter",
        data=b"{}",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert isinstance(json.loads(response.read()), list)
    with stack.connect("prefect") as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'"
        ).fetchone()
    assert tables[0] == 1


# ------------------------------------------------------------------------------- storage


def test_check_storage_passes(stack_env: dict[str, str]) -> None:
    report = storage.check_storage(stack_mod.DVC_BUCKET, "ci")
    assert report.ok, report.summary()
    assert [s.name for s in report.steps] == ["credentials", "bucket", "write", "read", "delete"]
    assert report.endpoint == stack_env["MLFLOW_S3_ENDPOINT_URL"]
    leftovers = storage.s3_client().list_objects_v2(
        Bucket=stack_mod.DVC_BUCKET, Prefix=f"ci/{storage.CHECK_PREFIX}"
    )
    assert leftovers.get("KeyCount", 0) == 0


def test_check_storage_missing_bucket(stack_env: dict[str, str]) -> None:
    report = storage.check_storage("no-such-bucket-mf")
    assert not report.ok
    endpoint = stack_env["MLFLOW_S3_ENDPOINT_URL"]
    assert "bucket 'no-such-bucket-mf' does not exist" in report.error
    assert endpoint in report.error and "ensure_bucket" in report.error
    with pytest.raises(storage.StorageError, match="does not exist"):
        report.raise_for_error()


def test_check_storage_wrong_credentials(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    report = storage.check_storage(stack_mod.DVC_BUCKET)
    assert not report.ok
    assert "credentials rejected" in report.error
    assert stack_env["MLFLOW_S3_ENDPOINT_URL"] in report.error
    assert "not-the-secret" not in report.error
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "UNKNOWNKEY")
    report = storage.check_storage(stack_mod.DVC_BUCKET)
    assert "credentials rejected" in report.error and "InvalidAccessKeyId" in report.error


def test_check_storage_unreachable_endpoint(stack_env: dict[str, str]) -> None:
    dead = f"http://127.0.0.1:{stack_mod.free_port()}"
    report = storage.check_storage(stack_mod.DVC_BUCKET, endpoint_url=dead)
    assert not report.ok
    assert f"cannot reach the S3 endpoint {dead}" in report.error


# ------------------------------------------------------------------------------- DVC


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_dvc_push_pull_round_trip(stack: stack_mod.Stack, stack_env: dict[str, str]) -> None:
    repo = Path(tempfile.mkdtemp(prefix="mammoflow-dvc-"))
    try:
        _run(["git", "init", "-q"], repo)
        _run([DVC, "init", "-q"], repo)
        data = repo / "data"
        data.mkdir()
        rng = np.random.default_rng(3)
        originals = {
            "scan.bin": rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes(),
            "labels.csv": b"image_id,label\nmdb001,normal\n",
        }
        for name, content in originals.items():
            (data / name).write_bytes(content)
        _run([DVC, "add", "-q", "data"], repo)
        committed = (repo / ".dvc" / "config").read_text()
        prefix = f"test-{uuid.uuid4().hex[:8]}"
        url = storage.configure_dvc_remote(
            repo, stack_mod.DVC_BUCKET, stack_env["MLFLOW_S3_ENDPOINT_URL"], prefix=prefix
        )
        assert url == f"s3://{stack_mod.DVC_BUCKET}/{prefix}/"
        local = (repo / ".dvc" / "config.local").read_text()
        assert "endpointurl" in local and "team" in local
        assert (repo / ".dvc" / "config").read_text() == committed  # nothing committable changed
        assert stack_env["AWS_SECRET_ACCESS_KEY"] not in local  # credentials come from the env
        _run([DVC, "push"], repo)
        keys = [
            o["Key"]
            for o in storage.s3_client()
            .list_objects_v2(Bucket=stack_mod.DVC_BUCKET, Prefix=prefix)
            .get("Contents", [])
        ]
        assert len(keys) == 3, keys  # two files + the directory listing
        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(data)
        _run([DVC, "pull"], repo)
        for name, content in originals.items():
            assert (data / name).read_bytes() == content
    finally:
        shutil.rmtree(repo, ignore_errors=True)


# ------------------------------------------------------------------------------- MLflow


def test_mlflow_artifact_in_bucket_and_run_in_postgres(
    stack: stack_mod.Stack, logged_run: dict[str, Any]
) -> None:
    run_id = logged_run["run_id"]
    objects = storage.s3_client().list_objects_v2(Bucket=stack_mod.MLFLOW_BUCKET)
    keys = [o["Key"] for o in objects.get("Contents", [])]
    mine = [k for k in keys if run_id in k]
    assert any(k.endswith("artifacts/dicom/header.json") for k in mine), keys
    with stack.connect("mlflow") as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        params = dict(
            conn.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)).fetchall()
        )
    assert status == ("FINISHED",)
    assert params["patient_id"] == "D1-0001" and params["view"] == "CC"


def test_optuna_two_processes_share_postgres_storage(stack_env: dict[str, str]) -> None:
    import optuna

    storage_url = stack_env["MAMMOFLOW_OPTUNA_STORAGE"]
    name = f"stack-test-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=storage_url, direction="minimize")
    worker = (
        "import sys, optuna\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])\n"
        "study.optimize(lambda t: (t.suggest_float('x', -5, 5) - 2) ** 2, n_trials=6)\n"
    )
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", worker, name, storage_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name=name, storage=storage_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12
    assert study.best_value < 25


def test_mlflow_basic_auth(stack: stack_mod.Stack, stack_env: dict[str, str]) -> None:
    """The default stack's MLflow: 401 without or with wrong credentials, 200 with stack.env's;
    an MlflowClient without credentials is refused too."""
    import mlflow
    from mlflow.exceptions import MlflowException

    url = f"{stack.config.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    # password hashing (PBKDF2) is slow on a busy machine: generous timeouts
    status, _ = stack_mod.http_get(url, timeout=60)
    assert status == 401
    status, _ = stack_mod.http_get(url, timeout=60, auth=("admin", "wrong-password-123"))
    assert status == 401
    password = stack.secrets()["mlflow_admin_password"]
    status, body = stack_mod.http_get(url, timeout=60, auth=("admin", password))
    assert status == 200, body
    assert isinstance(json.loads(body), dict)
    uri = stack_env["MLFLOW_TRACKING_URI"]
    assert mlflow.MlflowClient(uri).search_experiments(max_results=1) is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_USERNAME")
        mp.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(MlflowException, match=r"401|Unauthorized|credentials"):
            mlflow.MlflowClient(uri).create_experiment(f"anonymous-{uuid.uuid4().hex[:8]}")


def test_unauthenticated_requests_are_refused(stack: stack_mod.Stack) -> None:
    """MLflow (basic-auth app), Prefect (auth string) and S3 refuse requests without credentials;
    only the health probes stay open."""
    import urllib.error
    import urllib.request

    cfg = stack.config
    # Prefect: every API route but /health needs Basic <auth string>
    version = f"{cfg.prefect_api_url}/admin/version"
    assert stack_mod.http_get(f"{cfg.prefect_api_url}/health")[0] == 200
    assert stack_mod.http_get(version)[0] == 401
    assert stack_mod.http_get(version, auth=("mammoflow", "wrong-auth-string"))[0] == 401
    user, password = stack.secrets()["prefect_auth_string"].split(":", 1)
    assert stack_mod.http_get(version, auth=(user, password))[0] == 200
    # MLflow: the default stack runs the basic-auth app; only /health stays open
    assert stack_mod.http_get(f"{cfg.mlflow_url}/health")[0] == 200
    search = f"{cfg.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert stack_mod.http_get(search, timeout=60)[0] == 401
    # S3: anonymous list, read and write are refused
    for bucket in stack_mod.BUCKETS:
        assert stack_mod.http_get(f"{cfg.s3_endpoint}/{bucket}?list-type=2")[0] == 403
        assert stack_mod.http_get(f"{cfg.s3_endpoint}/{bucket}/anything")[0] in (403, 404)
        put = urllib.request.Request(
            f"{cfg.s3_endpoint}/{bucket}/anonymous.txt", data=b"x", method="PUT"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(put, timeout=10)
        assert err.value.code == 403
    keys = storage.s3_client(
        endpoint_url=cfg.s3_endpoint,
        access_key_id=stack.secrets()["s3_access_key"],
        secret_access_key=stack.secrets()["s3_secret_key"],
    ).list_objects_v2(Bucket=stack_mod.DVC_BUCKET, Prefix="anonymous")
    assert keys.get("KeyCount", 0) == 0


def _tracked_and_untracked(root: Path) -> list[Path]:
    """Files of the checkout git would see (tracked, or untracked and not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [root / name for name in out.decode().split("\0") if name]


def test_no_credential_in_logs_or_outside_the_state_dir(
    stack: stack_mod.Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = {k: v for k, v in stack.secrets().items() if len(v) >= 12}
    assert "prefect_auth_string" in secrets and "s3_secret_key" in secrets
    assert stack_mod.main(["--state-dir", str(stack.state), "up"]) == 0  # idempotent, prints env
    printed = capsys.readouterr()
    texts = {
        "up output": printed.out + printed.err,
        "echo": "\n".join(stack.first_up_lines),  # type: ignore[attr-defined]
    }
    for log in sorted((stack.state / "logs").glob("*.log")):
        texts[str(log)] = log.read_text(encoding="utf-8", errors="replace")
    for path in _tracked_and_untracked(stack_mod.ROOT):
        if path.is_file() and path.stat().st_size < 2_000_000:
            texts[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    local_dvc = stack_mod.ROOT / ".dvc" / "config.local"
    if local_dvc.is_file():
        texts[str(local_dvc)] = local_dvc.read_text(encoding="utf-8")
    leaks = sorted(
        (where, name)
        for where, text in texts.items()
        for name, value in secrets.items()
        if value in text
    )
    assert leaks == []
    assert "PREFECT_API_AUTH_STRING=***" in printed.out


# ------------------------------------------------------------------------------- the project


def _sample_params() -> dict[str, Any]:
    """params.yaml shrunk to one tiny sample dataset and one small backbone."""
    return tiny_params(
        [SAMPLE], sample={"cmmd_patients": 18}, split={"k_folds": 3, "test_size": 0.2}
    )


def _bucket_keys(bucket: str) -> list[str]:
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", []) or []]


def test_sample_pipeline_on_the_stack(
    stack: stack_mod.Stack,
    stack_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The project's own stages, unchanged, tracked on the stack: only the environment differs."""
    from mlflow import MlflowClient

    from mammoflow.config import parse_config
    from mammoflow.data.acquire import acquire_stage
    from mammoflow.data.convert import convert_stage
    from mammoflow.data.ingest import ingest_stage
    from mammoflow.data.split import split_stage
    from mammoflow.evaluation.evaluate import evaluate_stage
    from mammoflow.paths import Layout
    from mammoflow.tracking import registered_model_name
    from mammoflow.training.train import train_stage

    uri = stack_env["MLFLOW_TRACKING_URI"]
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # stack_env applied it (and restores it)
    raw = _sample_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = parse_config(raw)
    monkeypatch.chdir(tmp_path)
    layout = Layout(tmp_path)
    for stage in (acquire_stage, ingest_stage, convert_stage):
        stage(cfg, SAMPLE, layout)
    split_stage(cfg, SAMPLE, layout)
    trained = train_stage(cfg, SAMPLE, "vgg16", layout)
    champion = evaluate_stage(cfg, SAMPLE, layout)
    parent_id = trained["parent_run_id"]
    assert trained["trained_folds"] == [1, 2, 3]
    # nothing went to the embedded store
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()

    # The runs are rows in the stack's PostgreSQL.
    with stack.connect("mlflow") as conn:
        status = conn.execute(
            "SELECT status FROM runs WHERE run_uuid = %s", (parent_id,)
        ).fetchone()
        children = conn.execute(
            "SELECT r.name, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'mlflow.parentRunId' AND t.value = %s ORDER BY r.name",
            (parent_id,),
        ).fetchall()
    assert status == ("FINISHED",)
    assert children == [(n, "FINISHED") for n in ("fold-1", "fold-2", "fold-3", "test")]

    # The logged model's files are objects in the MLflow bucket (proxied by the server).
    client = MlflowClient(uri)
    summary = json.loads(layout.metrics(SAMPLE, "vgg16").read_text(encoding="utf-8"))
    model_uri = client.get_run(summary["mlflow_test_run_id"]).data.tags["mammoflow.model_uri"]
    model_id = model_uri.rstrip("/").rsplit("/", 1)[-1]
    keys = _bucket_keys(stack_mod.MLFLOW_BUCKET)
    mlmodel = [k for k in keys if model_id in k and k.endswith("/MLmodel")]
    assert mlmodel, (model_uri, keys)
    assert any(model_id in k and k.endswith(".keras") for k in keys), keys

    # The registry (in PostgreSQL too) names the champion.
    version = client.get_model_version_by_alias(registered_model_name(SAMPLE), "champion")
    assert version.version == champion["registry"]["version"]
    assert champion["best"] == "vgg16"


def test_prefect_deployment_runs_through_a_worker_on_the_stack(
    stack: stack_mod.Stack, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """deploy_all on the stack's Prefect server; a process worker runs the triggered data flow."""
    from flows.deploy import deploy_all
    from prefect import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_HOME,
        temporary_settings,
    )

    api_url = stack_env["PREFECT_API_URL"]
    auth = stack_env["PREFECT_API_AUTH_STRING"]  # the stack's API refuses requests without it
    home = tmp_path / "prefect-home"
    home.mkdir()
    raw = yaml.safe_load((stack_mod.ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["sample"].update({"mias_patients": 6, "cmmd_patients": 4, "size": 64})
    raw["convert"].update({"size": 64, "workers": 1})
    params = dvc_project(tmp_path / "project", raw)  # flows run their stages through DVC
    project = params.parent
    pool = f"stack-test-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": auth,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
    }
    log = tmp_path / "worker.log"
    with temporary_settings(
        updates={PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth, PREFECT_HOME: home}
    ):
        ids = deploy_all(
            work_pool=pool,
            project_dir=stack_mod.ROOT,
            params_path=str(params),
            datasets=["sample_mias"],
        )
        assert "mammoflow-data/nightly-validation" in ids
        # sync here (no event loop): a FlowRun, not a coroutine
        run: FlowRun = run_deployment("mammoflow-data/nightly-validation", timeout=0)  # type: ignore[assignment]
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--run-once"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 150
            while True:
                with get_client(sync_client=True) as client:
                    final = client.read_flow_run(run.id)
                if final.state is not None and final.state.is_final():
                    break
                tail = log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, f"{final.state!r} after 150 s:\n{tail}"
                time.sleep(1)
        finally:
            stop_process_tree(worker)
            drain_prefect_workers()
    tail = log.read_text(errors="replace")[-3000:]
    assert final.state.is_completed(), f"{final.state!r}\n{tail}"
    assert final.deployment_id == ids["mammoflow-data/nightly-validation"]
    assert (project / "data" / "processed" / "sample_mias" / "manifest.parquet").is_file()
    assert not (project / "data" / "processed" / "sample_cmmd").exists()
    with stack.connect("prefect") as conn:
        row = conn.execute(
            "SELECT state_type FROM flow_run WHERE id = %s", (str(run.id),)
        ).fetchone()
    assert row is not None and str(row[0]).endswith("COMPLETED")


def _post_json(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST with the MLflow credentials of the environment (stack.env)."""
    import urllib.error
    import urllib.request

    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_postgres_outage_gives_clear_error_then_recovers(
    stack: stack_mod.Stack,
    stack_env: dict[str, str],
    logged_run: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from mammoflow.tracking import Tracker, TrackingUnavailable

    tracking_uri = stack_env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri)
    exp_id = logged_run["experiment_id"]
    assert stack.stop_service("postgres")
    try:
        # The client (retries off here; MLFLOW_HTTP_REQUEST_MAX_RETRIES) names the server, the
        # call and the HTTP status: 503, the server's "temporarily unavailable".
        with pytest.raises(MlflowException) as excinfo:
            client.create_run(exp_id)
        message = str(excinfo.value)
        assert f"{tracking_uri}/api/2.0/mlflow/runs/create" in message, message
        assert "503" in message, message
        # The server's 503 says why: its database is unreachable, and where it should be.
        status, body = _post_json(
            f"{tracking_uri}/api/2.0/mlflow/runs/create", {"experiment_id": exp_id}
        )
        assert status == 503 and body["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert "Connection refused" in body["message"]
        assert f"port {stack.config.pg_port}" in body["message"]
        # The project's Tracker fails at once, with MLflow's own retry defaults (minutes of
        # backoff on a 503) in place: it names the server, the server's reason and the fix.
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable) as unavailable:
            Tracker()
        assert time.monotonic() - started < 30
        text = str(unavailable.value)
        assert tracking_uri in text and "503" in text, text
        assert "TEMPORARILY_UNAVAILABLE" in text and "Connection refused" in text, text
        assert "python -m infra.local.stack status" in text, text
        assert stack.secrets()["pg_password"] not in text
    finally:
        stack.start_service("postgres")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "auc", 0.8)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert Tracker().uri == tracking_uri  # the probe passes again
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"  # setdefault, not override


def test_tracker_fails_fast_when_the_server_is_unreachable(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mammoflow.tracking import Tracker, TrackingUnavailable

    dead = f"http://127.0.0.1:{stack_mod.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="Connection refused") as unavailable:
        Tracker()
    assert time.monotonic() - started < 30
    assert f"cannot reach the MLflow tracking server {dead}" in str(unavailable.value)
    assert "python -m infra.local.stack status" in str(unavailable.value)


# ------------------------------------------------------------------------------- privacy


def _pg_dump(stack: stack_mod.Stack, database: str) -> str:
    bindir = stack_mod.find_pg_bin()
    assert bindir is not None
    env = {**os.environ, "PGPASSWORD": stack.secrets()["pg_password"]}
    proc = subprocess.run(
        [
            str(bindir / "pg_dump"),
            "-h",
            stack.config.host,
            "-p",
            str(stack.config.pg_port),
            "-U",
            stack_mod.PG_ROLE,
            database,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _scan_dump(dump: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n in dump]


def test_no_phi_in_bucket_or_database(
    stack: stack_mod.Stack, stack_env: dict[str, str], logged_run: dict[str, Any]
) -> None:
    import mlflow

    assert scan_bucket(stack_mod.MLFLOW_BUCKET, PHI_NEEDLES) == []
    assert scan_bucket(stack_mod.DVC_BUCKET, PHI_NEEDLES) == []
    assert _scan_dump(_pg_dump(stack, "mlflow"), PHI_NEEDLES) == []

    # The scans do find PHI where it is: plant it once in each place, then remove it.
    planted_key = f"planted/{uuid.uuid4().hex}.txt"
    s3 = storage.s3_client()
    s3.put_object(
        Bucket=stack_mod.MLFLOW_BUCKET,
        Key=planted_key,
        Body=f"PatientName={FAKE_PHI['PatientName']}".encode(),
    )
    client = mlflow.MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    client.set_tag(logged_run["run_id"], "leak", FAKE_PHI["InstitutionName"])
    try:
        hits = scan_bucket(stack_mod.MLFLOW_BUCKET, PHI_NEEDLES)
        assert [(h.key, h.needle) for h in hits] == [(planted_key, FAKE_PHI["PatientName"])]
        assert _scan_dump(_pg_dump(stack, "mlflow"), PHI_NEEDLES) == [FAKE_PHI["InstitutionName"]]
    finally:
        s3.delete_object(Bucket=stack_mod.MLFLOW_BUCKET, Key=planted_key)
        client.delete_tag(logged_run["run_id"], "leak")
    assert _scan_dump(_pg_dump(stack, "mlflow"), PHI_NEEDLES) == []


def test_a_crashed_server_is_restarted(stack: stack_mod.Stack) -> None:
    """supervisord brings MLflow back after a SIGKILL; `status` shows the new process healthy."""
    import signal

    old = stack.pid("mlflow")
    assert old is not None
    os.killpg(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = stack.pid("mlflow")
        if new not in (None, old) and stack._mlflow_ready():
            break
        time.sleep(0.5)
    mlflow = next(s for s in stack.status() if s.name == "mlflow")
    assert mlflow.healthy and mlflow.pid not in (None, old), mlflow.line()
    assert "exited: mlflow (terminated by SIGKILL" in stack.log_file("supervisord").read_text()


def test_down_stops_everything_and_keeps_the_data(
    stack: stack_mod.Stack, logged_run: dict[str, Any]
) -> None:
    """Last: stop everything, check nothing listens, restart the stores, find the old run."""
    stack.down()
    assert all(not s.running for s in stack.status())
    for port in (stack.config.pg_port, stack.config.s3_port, stack.config.mlflow_port):
        # killed worker processes release their sockets a moment after the group is signalled
        deadline = time.monotonic() + 15
        while stack_mod.port_open(stack.config.host, port) and time.monotonic() < deadline:
            time.sleep(0.2)
        listeners = subprocess.run(
            ["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
        ).stdout
        assert not stack_mod.port_open(stack.config.host, port), f"port {port}:\n{listeners}"
    stack.start_service("postgres")
    stack.start_service("seaweedfs")
    run_id = logged_run["run_id"]
    with stack.connect("mlflow") as conn:
        assert conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    keys = [
        o["Key"]
        for o in storage.s3_client()
        .list_objects_v2(Bucket=stack_mod.MLFLOW_BUCKET)
        .get("Contents", [])
    ]
    assert any(run_id in k for k in keys)
