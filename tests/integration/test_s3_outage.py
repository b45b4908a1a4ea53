"""The S3 server stopped in the middle of `dvc push` and of an MLflow artifact upload.

On a throw-away team stack (infra/local/stack.py, default configuration: MLflow with basic
auth, artifacts proxied to SeaweedFS): SeaweedFS is stopped once the first objects of an upload
have landed. The upload must fail with a clear error, no object in the bucket may hold content
other than what its key promises (DVC: the md5 in the key; MLflow: the file of that name), and
the retry, with S3 back, must complete with every object whole.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from infra.local import stack as stack_mod

from mammoflow import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STACK_OVERRIDES = {"stop_timeout_s": 10}  # the `stack` fixture (conftest.py)

DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture(scope="module")
def stack_env(stack: stack_mod.Stack) -> Iterator[dict[str, str]]:
    """This process on the stack, as `source stack.env` does (MLflow credentials included)."""
    env = stack.env()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the outage fails at once
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        yield env


def _objects(bucket: str, prefix: str) -> list[str]:
    pages = (
        storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", []) or []]


def _wait_for_objects(bucket: str, prefix: str, count: int, busy: Any, limit_s: float) -> int:
    """Poll until ``count`` objects exist under ``prefix`` (or ``busy()`` turns false)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and busy():
        found = len(_objects(bucket, prefix))
        if found >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} objects under {prefix} before the upload ended")


def _md5_mismatches(bucket: str, prefix: str) -> list[str]:
    """DVC objects (``files/md5/ab/cdef…``, ``.dir`` for listings) whose bytes hash otherwise."""
    s3 = storage.s3_client()
    bad = []
    for key in _objects(bucket, prefix):
        parts = key.split("/")
        expected = (parts[-2] + parts[-1]).removesuffix(".dir")
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        if hashlib.md5(body).hexdigest() != expected:
            bad.append(key)
    return bad


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)


def test_s3_stopped_during_dvc_push(stack: stack_mod.Stack, stack_env: dict[str, str]) -> None:
    repo = Path(tempfile.mkdtemp(prefix="mammoflow-dvc-outage-"))
    try:
        assert _run(["git", "init", "-q"], repo).returncode == 0
        assert _run([DVC, "init", "-q"], repo).returncode == 0
        data = repo / "data"
        data.mkdir()
        rng = np.random.default_rng(11)
        originals = {
            # 8 MiB each: the push is still going when S3 dies (1 MiB files all landed once
            # between the poll and the stop, the push exiting 0)
            f"part{i:03d}.bin": rng.integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
            for i in range(12)
        }
        for name, content in originals.items():
            (data / name).write_bytes(content)
        assert _run([DVC, "add", "-q", "data"], repo).returncode == 0
        prefix = f"outage-{uuid.uuid4().hex[:8]}"
        storage.configure_dvc_remote(
            repo, stack_mod.DVC_BUCKET, stack_env["MLFLOW_S3_ENDPOINT_URL"], prefix=prefix
        )
        push = subprocess.Popen(
            [DVC, "push", "-j", "1"],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_for_objects(
                stack_mod.DVC_BUCKET, prefix, 2, lambda: push.poll() is None, limit_s=240
            )
            assert stack.stop_service("seaweedfs", crash=True)
            stopped = time.monotonic()
            # DVC goes on with the other files and retries each (s3fs and botocore), so the
            # error comes after every remaining file failed: seconds per file
            output, _ = push.communicate(timeout=600)
            print(f"dvc push ended {time.monotonic() - stopped:.0f} s after S3 died")
        finally:
            if push.poll() is None:
                push.kill()
        assert push.returncode != 0, output
        assert "ERROR" in output and "failed to push" in output.lower(), output
        stack.start_service("seaweedfs")
        stored = _objects(stack_mod.DVC_BUCKET, prefix)
        assert 0 < len(stored) < len(originals) + 1  # some objects, not all of them
        assert _md5_mismatches(stack_mod.DVC_BUCKET, prefix) == []
        retry = _run([DVC, "push"], repo)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert len(_objects(stack_mod.DVC_BUCKET, prefix)) == len(originals) + 1  # + listing
        assert _md5_mismatches(stack_mod.DVC_BUCKET, prefix) == []
        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(data)
        pull = _run([DVC, "pull"], repo)
        assert pull.returncode == 0, pull.stdout + pull.stderr
        for name, content in originals.items():
            assert (data / name).read_bytes() == content
    finally:
        if stack.pid("seaweedfs") is None:
            stack.start_service("seaweedfs")
        shutil.rmtree(repo, ignore_errors=True)


def test_s3_stopped_during_mlflow_artifact_upload(
    stack: stack_mod.Stack, stack_env: dict[str, str], tmp_path: Path
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment(f"s3-outage-{uuid.uuid4().hex[:8]}"))
    run_id = run.info.run_id
    folder = tmp_path / "artifacts"
    folder.mkdir()
    rng = np.random.default_rng(5)
    files = {
        f"blob{i:02d}.bin": rng.integers(0, 256, 1024 * 1024, dtype=np.uint8).tobytes()
        for i in range(40)
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            client.log_artifacts(run_id, str(folder), artifact_path="blobs")
        except BaseException as exc:  # the outage's error, checked below
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        _wait_for_objects(stack_mod.MLFLOW_BUCKET, "", 2, thread.is_alive, limit_s=240)
        assert stack.stop_service("seaweedfs")
        thread.join(300)
    finally:
        if stack.pid("seaweedfs") is None:
            stack.start_service("seaweedfs")
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], MlflowException), errors
    message = str(errors[0])
    assert "artifacts" in message and ("500" in message or "503" in message), message

    def stored() -> dict[str, bytes]:
        s3 = storage.s3_client()
        keys = [k for k in _objects(stack_mod.MLFLOW_BUCKET, "") if run_id in k]
        return {
            k.rsplit("/", 1)[-1]: s3.get_object(Bucket=stack_mod.MLFLOW_BUCKET, Key=k)[
                "Body"
            ].read()
            for k in keys
        }

    partial = stored()
    assert len(partial) < len(files)
    assert [n for n, body in partial.items() if body != files[n]] == []  # no object half-written
    client.log_artifacts(run_id, str(folder), artifact_path="blobs")  # the retry
    listed = {Path(f.path).name for f in client.list_artifacts(run_id, "blobs")}
    assert listed == set(files)
    complete = stored()
    assert complete == files
    client.set_terminated(run_id)
