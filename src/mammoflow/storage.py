"""S3 object storage for the team stack: clients, buckets, health checks and the DVC remote.

Everything reads the standard environment, so the same code talks to AWS S3, to the local
SeaweedFS of ``infra/local/stack.py`` or to the MinIO/SeaweedFS of ``infra/docker-compose.yml``:

* credentials: the usual boto3 chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, ...);
* endpoint: the ``endpoint_url`` argument, else ``MAMMOFLOW_S3_ENDPOINT_URL``,
  ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (first set wins),
  else AWS itself.

:func:`check_storage` never raises for a storage problem: it returns a :class:`StorageReport`
whose ``error`` names the endpoint, the bucket and the fix. Credentials are never printed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENDPOINT_ENV_VARS = (
    "MAMMOFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
)
DEFAULT_REGION = "us-east-1"
CHECK_PREFIX = ".mammoflow-check"
STACK_ENV_HINT = "source infra/local/state/stack.env (after `python -m infra.local.stack up`)"


class StorageError(RuntimeError):
    """S3 storage is unusable; the message names the endpoint, the bucket and the fix."""


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the argument, else the first endpoint variable that is set."""
    if endpoint_url:
        return endpoint_url
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _describe_endpoint(endpoint_url: str | None) -> str:
    return endpoint_url or "AWS S3 (no endpoint set)"


def s3_client(
    endpoint_url: str | None = None,
    *,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
    timeout_s: float = 10.0,
    max_attempts: int = 2,
) -> Any:
    """A boto3 S3 client for the configured endpoint (path-style addressing, SigV4).

    Explicit keys override the environment; short timeouts and few retries make a dead
    endpoint fail in seconds rather than minutes.
    """
    session = _session(access_key_id, secret_access_key, region)
    return _client(session, resolve_endpoint(endpoint_url), timeout_s, max_attempts)


def _session(
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
) -> Any:
    import boto3

    return boto3.session.Session(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
    )


def _client(session: Any, endpoint: str | None, timeout_s: float, max_attempts: int) -> Any:
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error", {}) or {}
        code = str(error.get("Code", "") or "")
        if code:
            return code
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status or "")
    return ""


def _explain(exc: BaseException, endpoint: str | None, bucket: str) -> str:
    """One sentence naming what failed, where, and how to fix it."""
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = _describe_endpoint(endpoint)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(for the local stack: {STACK_ENV_HINT})"
        )
    if isinstance(exc, EndpointConnectionError) or type(exc).__name__ in (
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
    ):
        return (
            f"cannot reach the S3 endpoint {where}: is the storage server running? "
            "(`python -m infra.local.stack status`, or `docker compose -f "
            "infra/docker-compose.yml ps`); check MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3"
        )
    code = _error_code(exc)
    if code in ("NoSuchBucket", "404", "NotFound"):
        return (
            f"bucket {bucket!r} does not exist at {where}; create it with "
            f"`python -c \"from mammoflow.storage import ensure_bucket; ensure_bucket('{bucket}')\"` "
            f"(the local stack's `up` creates its buckets) or check the bucket name"
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return (
            f"S3 credentials rejected by {where} ({code}): AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY do not match an identity of this server; use the stack's "
            f"credentials ({STACK_ENV_HINT}) or ask the storage admin"
        )
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        return (
            f"access to bucket {bucket!r} at {where} denied ({code}): the credentials are "
            "valid but lack Read/Write/List on this bucket; grant them in the S3 identity "
            "config (SeaweedFS -s3.config / MinIO policy)"
        )
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"S3 request to {where}, bucket {bucket!r} failed: {message}"


def ensure_bucket(name: str, *, client: Any = None, endpoint_url: str | None = None) -> bool:
    """Create bucket ``name`` if it does not exist; return True when it was created.

    Raises:
        StorageError: the endpoint is unreachable or the credentials cannot create buckets.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = client or s3_client(endpoint_url)
    endpoint = s3.meta.endpoint_url if client is not None else resolve_endpoint(endpoint_url)
    try:
        s3.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(_explain(exc, endpoint, name)) from None
    except BotoCoreError as exc:
        raise StorageError(_explain(exc, endpoint, name)) from None
    try:
        s3.create_bucket(Bucket=name)
    except ClientError as exc:
        if _error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        raise StorageError(
            f"cannot create bucket {name!r} at {_describe_endpoint(endpoint)}: "
            + _explain(exc, endpoint, name)
        ) from None
    except BotoCoreError as exc:
        raise StorageError(_explain(exc, endpoint, name)) from None
    return True


@dataclass(frozen=True)
class CheckStep:
    """One step of :func:`check_storage`."""

    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class StorageReport:
    """The outcome of :func:`check_storage`: ``ok`` or the first ``error`` with its fix."""

    endpoint: str | None
    bucket: str
    prefix: str
    steps: tuple[CheckStep, ...] = field(default_factory=tuple)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> StorageReport:
        """Raise :class:`StorageError` with the error message if the check failed."""
        if self.error is not None:
            raise StorageError(self.error)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "endpoint": _describe_endpoint(self.endpoint),
            "bucket": self.bucket,
            "prefix": self.prefix,
            "error": self.error,
            "steps": [
                {"name": s.name, "ok": s.ok, "detail": s.detail, "seconds": round(s.seconds, 3)}
                for s in self.steps
            ],
        }

    def summary(self) -> str:
        head = f"S3 {_describe_endpoint(self.endpoint)} bucket {self.bucket!r}"
        lines = [f"{head}: {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  [{'ok' if s.ok else 'FAIL'}] {s.name}: {s.detail}" for s in self.steps]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


def check_storage(
    bucket: str,
    prefix: str = "",
    *,
    endpoint_url: str | None = None,
    client: Any = None,
) -> StorageReport:
    """Verify credentials, the bucket and a write → read → delete round trip under ``prefix``.

    Never raises for a storage problem: the report's ``error`` says what failed and how to fix
    it (use :meth:`StorageReport.raise_for_error` to turn it into an exception).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = resolve_endpoint(endpoint_url)
    steps: list[CheckStep] = []
    base = prefix.strip("/")
    key = "/".join(p for p in (base, CHECK_PREFIX, f"{uuid.uuid4().hex}.txt") if p)

    def report(error: str | None = None) -> StorageReport:
        return StorageReport(endpoint, bucket, base, tuple(steps), error)

    start = time.perf_counter()
    try:
        if client is not None:
            s3, endpoint, has_credentials = client, client.meta.endpoint_url, True
        else:
            session = _session()
            has_credentials = session.get_credentials() is not None
            s3 = _client(session, endpoint, 10.0, 2)
    except (BotoCoreError, ValueError) as exc:
        steps.append(CheckStep("client", False, str(exc), time.perf_counter() - start))
        return report(f"cannot build an S3 client for {_describe_endpoint(endpoint)}: {exc}")
    if not has_credentials:
        msg = (
            f"no S3 credentials for {_describe_endpoint(endpoint)}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (for the local stack: {STACK_ENV_HINT})"
        )
        steps.append(CheckStep("credentials", False, "none found", time.perf_counter() - start))
        return report(msg)
    steps.append(CheckStep("credentials", True, "found (not shown)", time.perf_counter() - start))

    body = f"mammoflow storage check {uuid.uuid4().hex}\n".encode()
    actions = (
        ("bucket", lambda: s3.list_objects_v2(Bucket=bucket, MaxKeys=1), "exists and is listable"),
        ("write", lambda: s3.put_object(Bucket=bucket, Key=key, Body=body), f"put {key}"),
        ("read", lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read(), f"got {key}"),
        ("delete", lambda: s3.delete_object(Bucket=bucket, Key=key), f"deleted {key}"),
    )
    written = False
    for name, action, detail in actions:
        t0 = time.perf_counter()
        try:
            result = action()
        except (ClientError, BotoCoreError) as exc:
            message = _explain(exc, endpoint, bucket)
            steps.append(CheckStep(name, False, message, time.perf_counter() - t0))
            if written and name == "read":
                _quiet_delete(s3, bucket, key)
            return report(message)
        if name == "write":
            written = True
        if name == "read" and result != body:
            steps.append(CheckStep(name, False, "content differs", time.perf_counter() - t0))
            _quiet_delete(s3, bucket, key)
            return report(
                f"S3 {_describe_endpoint(endpoint)} bucket {bucket!r}: object {key} read back "
                f"with different content ({len(result)} bytes instead of {len(body)}); "
                "the storage server is corrupting data or a proxy rewrites it"
            )
        steps.append(CheckStep(name, True, detail, time.perf_counter() - t0))
    return report()


def _quiet_delete(s3: Any, bucket: str, key: str) -> None:
    with contextlib.suppress(Exception):  # best effort clean-up of the check object
        s3.delete_object(Bucket=bucket, Key=key)


# ------------------------------------------------------------------------------------ DVC


def configure_dvc_remote(
    repo_dir: str | Path,
    bucket: str,
    endpoint: str,
    *,
    name: str = "team",
    prefix: str = "",
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    default: bool = True,
) -> str:
    """Point a DVC repository at ``s3://bucket/prefix`` on ``endpoint``; return the remote URL.

    Everything goes to ``.dvc/config.local`` (git-ignored by DVC): the remote, its
    ``endpointurl`` and, only if given, the keys. Without keys DVC uses the environment
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``). With ``default`` the remote becomes
    the local default (``dvc remote default --local --unset`` goes back to the committed one).

    Raises:
        StorageError: ``dvc`` failed; the message has its output.
    """
    repo = Path(repo_dir)
    if not (repo / ".dvc").is_dir():
        raise StorageError(f"{repo}: not a DVC repository (no .dvc/); run `dvc init` there first")
    url = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/") + "/"
    add = ["remote", "add", "--local", "--force"]
    if default:
        add.append("--default")
    commands: list[list[str]] = [
        [*add, name, url],
        ["remote", "modify", "--local", name, "endpointurl", endpoint],
    ]
    if access_key_id and secret_access_key:
        commands += [
            ["remote", "modify", "--local", name, "access_key_id", access_key_id],
            ["remote", "modify", "--local", name, "secret_access_key", secret_access_key],
        ]
    from mammoflow.dvc_runner import dvc_command

    dvc = dvc_command()
    for args in commands:
        proc = subprocess.run([*dvc, *args], cwd=repo, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shown = " ".join(a if "secret" not in prev else "***" for prev, a in _pairs(args))
            raise StorageError(
                f"`dvc {shown}` failed in {repo} (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
    return url


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    return list(zip(["", *args[:-1]], args, strict=True))
