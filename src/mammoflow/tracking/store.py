"""Where runs go: the tracking URI, the artifact root, the MLflow client, the server probe.

``MLFLOW_TRACKING_URI`` when set (a team server), else SQLite at ``./mlflow.db`` with artifacts
under ``./mlartifacts/`` — no server needed. A server is probed first (:func:`check_server`):
down or unable to reach its database, it is a :class:`TrackingUnavailable` error within
seconds, not minutes of MLflow retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mammoflow.tracking.retry import (
    _RETRY_STATUS,
    _STACK_HINT,
    TrackingUnavailable,
    TrackingUnreachable,
    _short_reason,
    server_unreachable,
)

log = logging.getLogger(__name__)


def tracking_uri(root: Path | str = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store under ``root``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def artifact_root(root: Path | str = ".") -> str | None:
    """Artifact location for new experiments: ``./mlartifacts`` for the embedded store.

    With a tracking server the server decides (``--artifacts-destination``), so None.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (Path(root) / "mlartifacts").resolve().as_uri()


class _NoPipVersionWarning(logging.Filter):
    """uv-built environments have no pip; MLflow warns about it on every model it logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to resolve installed pip version" not in record.getMessage()


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    env_log = logging.getLogger("mlflow.utils.environment")
    if not any(isinstance(f, _NoPipVersionWarning) for f in env_log.filters):
        env_log.addFilter(_NoPipVersionWarning())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


# MLflow's own defaults (7 retries with exponential backoff, 120 s per request) turn a dead
# tracking server into minutes of silence; these apply unless the environment sets them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
PROBE_TIMEOUT_S = 10.0  # per probe request (no retries)


def check_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast unless the HTTP tracking server at ``uri`` is up and can reach its store.

    Probes ``GET /health`` (is the server there) and one API call, an experiment search (can it
    reach its database), each once, without retries, within ``timeout`` seconds. Credentials
    (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``) are sent as MLflow sends them.

    Raises:
        TrackingUnavailable: naming ``uri``, the server's reason and where to look;
            :class:`TrackingUnreachable` (transient) when it did not answer or answered
            502/503/504, a plain one (bad input: exit 2) for a wrong URL or 401/403/404.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)

    def request(endpoint: str, method: str, **kwargs: Any) -> Any:
        try:
            return http_request(
                creds,
                endpoint,
                method,
                max_retries=0,
                backoff_factor=0,
                timeout=timeout,
                raise_on_status=False,
                **kwargs,
            )
        except MlflowException as exc:
            # refused / timed out: transient (exit 75, a flow retries); a malformed URL is not
            error = TrackingUnreachable if server_unreachable(exc) else TrackingUnavailable
            raise error(
                f"cannot reach the MLflow tracking server {uri} (MLFLOW_TRACKING_URI): "
                f"{_short_reason(exc)}; {_STACK_HINT}"
            ) from None

    def unavailable(status: int) -> type[TrackingUnavailable]:
        return TrackingUnreachable if str(status) in _RETRY_STATUS else TrackingUnavailable

    health = request("/health", "GET")
    if health.status_code >= 500:  # other answers: the API call below decides
        raise unavailable(health.status_code)(
            f"the MLflow tracking server {uri} is unhealthy: GET /health answered "
            f"{health.status_code} {health.text.strip()[:200]!r}; {_STACK_HINT}"
        )
    endpoint = "/api/2.0/mlflow/experiments/search"
    answer = request(endpoint, "POST", json={"max_results": 1})
    if answer.status_code == 200:
        return
    if answer.status_code == 429:  # up but rate-limiting: MLflow's retries are made for that
        log.warning("MLflow tracking server %s is rate-limiting requests (429)", uri)
        return
    try:
        body = answer.json()
        reason = f"{body.get('error_code', '')}: {body.get('message', '')}".strip(": ")
    except ValueError:
        reason = answer.text.strip()
    reason = reason[:500] or answer.reason
    if answer.status_code in (401, 403):
        fix = "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or _TOKEN) for it"
    elif answer.status_code >= 500:
        fix = f"the server cannot serve requests (is its database up?); {_STACK_HINT}"
    else:
        fix = f"is {uri} an MLflow tracking server? {_STACK_HINT}"
    raise unavailable(answer.status_code)(
        f"the MLflow tracking server {uri} answered {answer.status_code} to {endpoint}: "
        f"{reason}; {fix}"
    )


def _mlflow_client(uri: str) -> Any:
    """``MlflowClient`` of ``uri`` (tracking and registry).

    Raises:
        TrackingUnavailable: MLflow has no store for the URI's scheme (bad input: exit 2).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        raise TrackingUnavailable(
            f"MLFLOW_TRACKING_URI={uri!r}: {exc.message}; use the http(s)://host:port of a "
            "tracking server, or unset MLFLOW_TRACKING_URI to track into ./mlflow.db"
        ) from None


@contextlib.contextmanager
def _use_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (Model.log, register_model, load_model) at ``uri`` in the block.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` set process-wide defaults and write
    ``MLFLOW_TRACKING_URI`` into the environment, which :func:`tracking_uri` reads: a later
    Tracker (another project in a test suite, a long-lived worker) or a plain ``MlflowClient``
    would go to this store. Both the defaults and the environment are restored afterwards.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    # MLflow keeps the defaults in these module globals (None = unset); no public getter
    # tells "unset" from "set to the default", so the private values are saved as they are.
    saved = (
        getattr(tracking_utils, "_tracking_uri", None),
        getattr(registry_utils, "_registry_uri", None),
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = saved[0]
        registry_utils._registry_uri = saved[1]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
