"""Retrying tracking calls while the MLflow server is unreachable, and the errors that say so.

Once a server answered, a call that finds it unreachable (killed, restarting) is retried with
backoff for ``$MAMMOFLOW_TRACKING_RETRY_S`` (120 s), then :class:`TrackingUnreachable`
(transient: exit 75); creating a run is safe to repeat (a lost answer creates no twin).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_STACK_HINT = (
    "check the server with `python -m infra.local.stack status` (the local team stack; "
    "`python -m infra.local.stack up` starts what is down, logs in infra/local/state/logs/) "
    "or the server's own logs, or unset MLFLOW_TRACKING_URI to track into ./mlflow.db"
)


class TrackingUnavailable(ValueError):  # noqa: N818 (the documented name)
    """The MLflow tracking server cannot be reached or cannot serve requests."""


class TrackingUnreachable(TrackingUnavailable, ConnectionError):  # noqa: N818
    """The server did not answer (connection refused or reset, timeout, 502/503/504): transient.

    A :class:`TrackingUnavailable` for callers that catch that, and a ``ConnectionError`` for
    :func:`mammoflow.errors.is_transient`, so the CLI exits 75 and a flow retries the stage.
    """


#: Seconds one tracking call keeps retrying while the server is unreachable (an execution
#: setting: it changes no number, so it is not in params.yaml). 0 = no retry.
RETRY_ENV = "MAMMOFLOW_TRACKING_RETRY_S"
RETRY_DEFAULT_S = 120.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 15.0
_RETRY_STATUS = ("502", "503", "504")
#: on every run a server store creates: finds the run when the answer to its creation was lost
TAG_CREATE_TOKEN = "mammoflow.create_token"

T = TypeVar("T")


def retry_seconds() -> float:
    """``$MAMMOFLOW_TRACKING_RETRY_S`` (default 120).

    Raises:
        ValueError: not a number ≥ 0 (the message names the variable and its value).
    """
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return RETRY_DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{RETRY_ENV}={raw!r}: want the seconds a tracking call keeps retrying while the "
            f"MLflow server is unreachable, a number >= 0 (default {RETRY_DEFAULT_S:.0f})"
        )
    return value


def server_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server did not answer: a refused, reset or broken
    connection, a timeout, or 502/503/504 (a proxy without its server, the server without its
    database) — what waiting can fix. MLflow wraps the ``requests`` error in an
    ``MlflowException`` raised while handling it, so the chain is searched."""
    import requests

    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # a malformed URL never works; a call that already waited its budget is not retried again
        if isinstance(err, requests.exceptions.InvalidURL | TrackingUnreachable):
            return False
        if isinstance(
            err,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.ChunkedEncodingError
            | ConnectionError
            | TimeoutError,
        ):
            return True
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status is not None and str(status) in _RETRY_STATUS:
            return True
        if getattr(err, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
            return True
        # urllib3's "too many 503 error responses", MLflow's "failed with error code 503"
        if re.search(r"(too many|error code) 50[234]\b", str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


@dataclass
class _Retry:
    """Bounded retry of tracking calls while the server at ``uri`` is unreachable.

    Each call gets ``budget_s`` seconds from its start; waits double from 1 s up to 15 s. After
    one call gave up, later calls try once (the run guards marking runs FAILED on the way out
    must not wait again); a call that succeeds ends that.
    """

    uri: str
    budget_s: float
    sleep: Callable[[float], None] = time.sleep
    down: bool = False

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on :func:`server_unreachable` errors; other errors pass at once.

        Raises:
            TrackingUnreachable: still unreachable after the budget; names the server.
        """
        started = time.monotonic()
        delay = BACKOFF_FIRST_S
        tries = 0
        while True:
            tries += 1
            try:
                result = fn()
            except Exception as exc:
                if not server_unreachable(exc):
                    raise
                waited = time.monotonic() - started
                if self.down or waited >= self.budget_s:
                    self.down = True
                    raise TrackingUnreachable(
                        f"the MLflow tracking server {self.uri} (MLFLOW_TRACKING_URI) did not "
                        f"answer {what} for {waited:.0f} s ({tries} tries): {_short_reason(exc)}; "
                        "rerun once it is back (the train stage resumes the folds that "
                        f"finished; {RETRY_ENV}={self.budget_s:.0f} is how long a call waits); "
                        f"{_STACK_HINT}"
                    ) from exc
                pause = min(delay, self.budget_s - waited)
                log.warning(
                    "MLflow tracking server %s unreachable during %s (%s); retry %d in %.0f s "
                    "(waited %.0f of %.0f s)",
                    self.uri,
                    what,
                    _short_reason(exc),
                    tries,
                    pause,
                    waited,
                    self.budget_s,
                )
                self.sleep(pause)
                delay = min(2 * delay, BACKOFF_MAX_S)
                continue
            if tries > 1:
                log.warning(
                    "MLflow tracking server %s answered %s again after %.0f s",
                    self.uri,
                    what,
                    time.monotonic() - started,
                )
            self.down = False
            return result


class _RetryingClient:
    """An ``MlflowClient`` whose public calls go through :meth:`_Retry.call`.

    Repeating a call is harmless for nearly every call (tags and terminal states overwrite, a
    server store drops duplicate metrics and dataset inputs); creating a run or an experiment is
    not — the first try may have created it and only its answer got lost — so those look for
    what the first try made before trying again.
    """

    def __init__(self, client: Any, retry: _Retry) -> None:
        self._inner = client
        self._retry = retry

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._retry.call(name, lambda: attr(*args, **kwargs))

        return call

    def create_run(
        self, experiment_id: str, *args: Any, tags: Mapping[str, Any] | None = None, **kw: Any
    ) -> Any:
        """``create_run`` with a unique tag, by which a retry finds a run the lost try made."""
        token = uuid.uuid4().hex
        tagged = {**(tags or {}), TAG_CREATE_TOKEN: token}
        tries = 0

        def attempt() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1:
                found = self._inner.search_runs(
                    [experiment_id], f"tags.`{TAG_CREATE_TOKEN}` = '{token}'", max_results=1
                )
                if found:
                    return found[0]
            return self._inner.create_run(experiment_id, *args, tags=tagged, **kw)

        return self._retry.call("create_run", attempt)

    def create_experiment(self, name: str, *args: Any, **kw: Any) -> Any:
        """``create_experiment``; a retry first looks the name up (the lost try made it)."""
        tries = 0

        def attempt() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1:
                exp = self._inner.get_experiment_by_name(name)
                if exp is not None:
                    return exp.experiment_id
            return self._inner.create_experiment(name, *args, **kw)

        return self._retry.call("create_experiment", attempt)


def _short_reason(exc: BaseException) -> str:
    """``[Errno 111] Connection refused`` out of requests' nested messages, else the text."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "timed out"
    return text[:300]
