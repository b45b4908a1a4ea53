"""The MLflow layout. Only this module talks to MLflow.

* Store: ``MLFLOW_TRACKING_URI`` when set (a team server), else SQLite at ``./mlflow.db`` with
  artifacts under ``./mlartifacts/`` — no server needed.
  A server is probed first (:func:`check_server`): down or unable to reach its database, it
  is a :class:`TrackingUnavailable` error within seconds, not minutes of MLflow retries.
  Once it answered, a call that finds it unreachable (killed, restarting) is retried with
  backoff for ``$MAMMOFLOW_TRACKING_RETRY_S`` (120 s), then :class:`TrackingUnreachable`
  (transient: exit 75); creating a run is safe to repeat (a lost answer creates no twin).
* One experiment per dataset, ``mammoflow-<dataset>``.
* Per pipeline execution one parent run per backbone (named after it), and under it one nested
  run per fold (``fold-1`` … ``fold-k``) and one for the held-out test evaluation (``test``).
  Run IDs are passed explicitly; nothing relies on the ambient active run or ``MLFLOW_RUN_ID``.
* Resume: a parent carries the hash of (params, data hash, split hash); re-running the same
  configuration reopens it and skips its FINISHED children. A crash marks runs FAILED; a child
  left RUNNING by a killed process is marked FAILED when the configuration runs next.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mammoflow.reporting.card import CardFacts

log = logging.getLogger(__name__)

TAG_ROLE = "mammoflow.role"  # parent | fold | test
TAG_KEY = "mammoflow.config_hash"
TAG_BACKBONE = "mammoflow.backbone"
TAG_FOLD = "mammoflow.fold"
TAG_DATASET = "mammoflow.dataset"
MODEL_NAME = "model"
TAG_STUDY = "mammoflow.study"  # Optuna study name (tuning runs)
TAG_TRIAL = "mammoflow.trial"  # Optuna trial number
TAG_TRIAL_STATE = "mammoflow.trial_state"  # complete | pruned | failed
TAG_TEMPERATURE = "mammoflow.temperature"  # temperature scaling of the test model (calibration)
TAG_SELECTION = "mammoflow.selection_metric"  # on a version: the rule it was promoted under
TAG_PROMOTION = "mammoflow.promotion"  # on a version: when, by whom and why it got its alias
TAG_DISPLACED = "mammoflow.displaced"  # on a version: when and by whom it lost `champion`
TAG_EXTERNAL_PREFIX = "mammoflow.external."  # on a version: external dataset → its run id
LOCK_SUFFIX = ".promotion-lock"  # registered model used as a cross-process mutex
LOCK_LEASE_S = 120.0  # a lock older than this is a dead holder's: broken (a promotion takes ~1 s)
LOCK_WAIT_S = 300.0
CALIBRATION_FILE = "calibration.json"  # its sidecar on the test run (see calibration.py)
# MLflow 3's UI opens an experiment by its kind: without it, on the GenAI traces overview
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: lineage tags of a parent run (see mammoflow.lineage), copied onto its registered versions
TAG_DATA = "dvc_data_hash"
TAG_SPLIT = "dvc_split_hash"
TAG_REMOTE = "dvc_remote"
TAG_LOCATION = "dvc_data_location"
TAG_LINEAGE_WARNING = "lineage_warning"
LINEAGE_TAGS = (
    "git_commit",
    "git_dirty",
    TAG_DATA,
    TAG_SPLIT,
    TAG_REMOTE,
    TAG_LOCATION,
    TAG_LINEAGE_WARNING,
)
SOURCE_PREFIX = "mlflow.source."  # mlflow.source.name / .type / .git.commit: the Source column
_BATCH = 100  # MLflow log_batch accepts at most 100 params / tags and 1000 metrics per call


#: appended to the study experiment's name (``mammoflow reproduce`` sets ``-reproduce``)
EXPERIMENT_SUFFIX_ENV = "MAMMOFLOW_EXPERIMENT_SUFFIX"


def experiment_name(dataset: str) -> str:
    """``mammoflow-<dataset>`` (plus ``$MAMMOFLOW_EXPERIMENT_SUFFIX``)."""
    return f"mammoflow-{dataset}{os.environ.get(EXPERIMENT_SUFFIX_ENV, '')}"


def tuning_experiment_name(dataset: str) -> str:
    """``mammoflow-<dataset>-tuning``: Optuna studies, kept apart from the training runs."""
    return f"mammoflow-{dataset}-tuning"


def registered_model_name(dataset: str) -> str:
    """The registry name of a dataset's champion model."""
    return f"mammoflow-{dataset}"


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


@dataclass
class Tracker:
    """An MLflow client bound to one store; every call names its run explicitly."""

    root: Path = field(default_factory=Path)
    uri: str = ""
    seconds: float = 0.0  # wall time spent inside MLflow calls (for the overhead benchmark)
    _client: Any = None
    _retry: _Retry | None = None  # a tracking server's calls: retried while it is unreachable

    def __post_init__(self) -> None:
        _quiet_mlflow()
        self.uri = self.uri or tracking_uri(self.root)
        t0 = time.perf_counter()
        client = None
        if self.uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            self._retry = _Retry(self.uri, retry_seconds())
            check_server(self.uri)  # fail fast, not after minutes of retries
            client = _RetryingClient(_mlflow_client(self.uri), self._retry)
        self._client = client or _mlflow_client(self.uri)
        self.seconds += time.perf_counter() - t0

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` (MLflow's fluent API, outside the client) retried like the client's calls."""
        return self._retry.call(what, fn) if self._retry is not None else fn()

    @property
    def client(self) -> Any:
        """The underlying ``MlflowClient``."""
        return self._client

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the time spent in the block as tracking overhead."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ experiments and runs

    def _experiment(self, name: str, tags: Mapping[str, str]) -> str:
        """Get (restoring a deleted one) or create the experiment ``name``."""
        with self.timed():
            exp = self._client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self._client.restore_experiment(exp.experiment_id)
                if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
                    self._client.set_experiment_tag(
                        exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
                    )
                return str(exp.experiment_id)
            return str(
                self._client.create_experiment(
                    name,
                    artifact_location=artifact_root(self.root),
                    tags={**tags, TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                )
            )

    def experiment_id(self, dataset: str) -> str:
        """Get or create the dataset's experiment."""
        return self._experiment(experiment_name(dataset), {TAG_DATASET: dataset})

    def suffixed_experiment_id(self, dataset: str, suffix: str) -> str:
        """Get or create ``mammoflow-<dataset><suffix>`` (``mammoflow reproduce``'s runs)."""
        return self._experiment(experiment_name(dataset) + suffix, {TAG_DATASET: dataset})

    def open_parent(
        self,
        experiment_id: str,
        backbone: str,
        config_hash: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> tuple[str, bool]:
        """Reopen the parent run of this configuration, or create it.

        Returns:
            ``(run_id, resumed)``.
        """
        with self.timed():
            runs = self._client.search_runs(
                [experiment_id],
                filter_string=(
                    f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_KEY}` = '{config_hash}' "
                    f"and tags.`{TAG_BACKBONE}` = '{backbone}'"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                run_id = str(runs[0].info.run_id)
                self._client.update_run(run_id, status="RUNNING")
                self._log_tags(run_id, tags)
                return run_id, True
            run = self._client.create_run(
                experiment_id,
                run_name=backbone,
                tags={TAG_ROLE: "parent", TAG_KEY: config_hash, TAG_BACKBONE: backbone, **tags},
            )
            run_id = str(run.info.run_id)
            self._log_params(run_id, params)
            return run_id, False

    def children(self, experiment_id: str, parent_id: str) -> dict[str, Any]:
        """The parent's child runs by name (``fold-1`` … ``test``), newest first wins."""
        with self.timed():
            runs = self._client.search_runs(
                [experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
            )
        return {r.info.run_name: r for r in runs}

    def fail_stale_children(self, experiment_id: str, parent_id: str) -> list[str]:
        """Mark children left RUNNING (their process died) as FAILED; return their names."""
        stale = [
            r
            for r in self.children(experiment_id, parent_id).values()
            if r.info.status == "RUNNING"
        ]
        with self.timed():
            for run in stale:
                self._client.set_terminated(run.info.run_id, status="FAILED")
        return [r.info.run_name for r in stale]

    def start_child(
        self,
        experiment_id: str,
        parent_id: str,
        name: str,
        role: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> str:
        """Create a nested run under ``parent_id`` and log its params."""
        with self.timed():
            run = self._client.create_run(
                experiment_id,
                run_name=name,
                tags={"mlflow.parentRunId": parent_id, TAG_ROLE: role, **tags},
            )
        run_id = str(run.info.run_id)
        self._log_params(run_id, params)
        return run_id

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a run (FINISHED, FAILED or KILLED)."""
        with self.timed():
            self._client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def run_guard(self, run_id: str) -> Iterator[None]:
        """FINISHED when the block completes; FAILED (then re-raise) on any error or interrupt."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.end(run_id, "FAILED")
            raise
        self.end(run_id, "FINISHED")

    # ------------------------------------------------------------------ tuning (Optuna)

    def tuning_experiment_id(self, dataset: str) -> str:
        """Get or create the dataset's tuning experiment (``mammoflow-<dataset>-tuning``)."""
        return self._experiment(
            tuning_experiment_name(dataset), {TAG_DATASET: dataset, TAG_ROLE: "tuning"}
        )

    def open_study_parent(
        self,
        experiment_id: str,
        study_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        run_id: str | None = None,
    ) -> tuple[str, bool]:
        """Reopen the parent run of an Optuna study, or create it.

        A study is identified by its storage and name, so the caller passes the parent it
        recorded in the study (``run_id``); it is reopened if this store has it, else a new
        parent is created. Trials of the study (from any worker or invocation) are nested under
        it with :meth:`start_child` (role ``trial``). Returns ``(run_id, resumed)``.
        """
        from mlflow.exceptions import MlflowException

        with self.timed():
            if run_id:
                try:
                    run = self._client.get_run(run_id)
                except MlflowException:
                    run = None
                if (
                    run is not None
                    and run.info.lifecycle_stage == "active"
                    and run.info.experiment_id == experiment_id
                ):
                    self._client.update_run(run_id, status="RUNNING")
                    self._log_tags(run_id, tags)
                    return run_id, True
            run = self._client.create_run(
                experiment_id,
                run_name=study_name,
                tags={TAG_ROLE: "study", TAG_STUDY: study_name, **tags},
            )
            new_id = str(run.info.run_id)
            self._log_params(new_id, params)
            return new_id, False

    # ------------------------------------------------------------------ logging

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        with self.timed():
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(run_id, params=items[i : i + _BATCH], synchronous=True)

    def _log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in sorted(tags.items())]
        with self.timed():
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(run_id, tags=items[i : i + _BATCH], synchronous=True)

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int = 0, prefix: str = ""
    ) -> None:
        """Log finite scalar metrics in batches (NaN values are skipped, not logged)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(prefix + k), float(v), now, step)
            for k, v in sorted(metrics.items())
            if v is not None and math.isfinite(float(v))
        ]
        with self.timed():
            for i in range(0, len(items), 1000):
                self._client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True)

    def log_history(self, run_id: str, history: Mapping[str, Sequence[float]]) -> None:
        """Per-epoch curves (``loss``, ``val_loss`` …) as stepped metrics, in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"epoch_{name}", float(v), now, step)
            for name, values in sorted(history.items())
            for step, v in enumerate(values)
            if math.isfinite(float(v))
        ]
        with self.timed():
            for i in range(0, len(items), 1000):
                self._client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags in batches."""
        self._log_tags(run_id, tags)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image artifact (and close it)."""
        import matplotlib.pyplot as plt

        with self.timed():
            self._client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Log a text artifact."""
        with self.timed():
            self._client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """Log a JSON artifact."""
        with self.timed():
            self._client.log_dict(run_id, obj, artifact_file)

    def log_model(
        self, run_id: str, model: Any, input_example: Any, source_run_id: str | None = None
    ) -> str:
        """Log a Keras model (Keras 3 flavor, ``.keras`` format) with signature and example.

        The full model is built from stock Keras layers only, so it loads without MammoFlow's
        code and ``mlflow models predict`` / ``serve`` work anywhere. The model is attached to ``run_id`` explicitly (no active run).
        Returns the model URI, also set as the run's ``mammoflow.model_uri`` tag.
        ``source_run_id`` (default ``run_id``) is the run MLflow names as the model's source: the
        runs table's Models column and the registered version point there.
        """
        import mlflow
        import mlflow.keras
        from mlflow.models import Model

        _patch_keras_input_example()
        import numpy as np
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        output = np.asarray(model(input_example, training=False))  # no predict(): no retrace
        # any image size: the model resizes itself, so height and width stay variable (-1)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 1))]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, int(output.shape[-1])))]),
        )
        with self.timed(), _use_store(self.uri):
            run = self._client.get_run(run_id)
            logged = self._client.create_logged_model(
                run.info.experiment_id, name=MODEL_NAME, source_run_id=source_run_id or run_id
            )

            def upload() -> Any:  # into the one logged model: a retry overwrites its files
                # Keras' export prints its whole signature to stdout; keep the output readable.
                with contextlib.redirect_stdout(io.StringIO()):
                    return Model.log(
                        artifact_path=None,
                        name=MODEL_NAME,
                        flavor=mlflow.keras,
                        run_id=run_id,
                        model_id=logged.model_id,
                        model=model,
                        signature=signature,
                        input_example=input_example,
                        save_exported_model=False,
                        pip_requirements=_pip_requirements(),
                    )

            info = self._call("log_model", upload)
            self._client.set_tag(run_id, "mammoflow.model_uri", info.model_uri)
        return str(info.model_uri)

    # ------------------------------------------------------------------ reading back

    def load_json_artifact(self, run_id: str, path: str) -> Any:
        """Download and parse a JSON artifact of a run."""
        from mlflow.artifacts import download_artifacts

        with self.timed(), tempfile.TemporaryDirectory() as tmp:
            local = self._call(
                f"download of {path}",
                lambda: download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self.uri
                ),
            )
            return json.loads(Path(local).read_text(encoding="utf-8"))

    def parents(self, dataset: str) -> list[Any]:
        """Latest FINISHED parent run per backbone of ``dataset``."""
        with self.timed():
            exp = self._client.get_experiment_by_name(experiment_name(dataset))
            if exp is None:
                return []
            runs = self._client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{TAG_ROLE}` = 'parent' and attributes.status = 'FINISHED'",
                order_by=["attributes.end_time DESC"],
                max_results=1000,
            )
        latest: dict[str, Any] = {}
        for run in runs:
            latest.setdefault(run.data.tags.get(TAG_BACKBONE, run.info.run_name), run)
        return list(latest.values())

    def study_rows(self, dataset: str, wanted: Mapping[str, str | None]) -> list[dict[str, Any]]:
        """Comparison rows from parent runs: the given run per backbone, else the latest.

        Each row: ``backbone``, ``run_id``, ``cv`` (``*_mean``/``*_std``), ``test`` and
        ``test_ci`` (``{metric: {low, high}}``).
        """
        latest = {r.data.tags.get(TAG_BACKBONE): r for r in self.parents(dataset)}
        rows = []
        from mlflow.exceptions import MlflowException

        for backbone, run_id in wanted.items():
            run = None
            if run_id:
                with self.timed(), contextlib.suppress(MlflowException):
                    run = self._client.get_run(run_id)  # absent if it was logged to another store
            run = run or latest.get(backbone)
            if run is None:
                continue
            m = dict(run.data.metrics)
            cv = {k: v for k, v in m.items() if k.endswith(("_mean", "_std"))}
            test = {
                k.removeprefix("test_"): v
                for k, v in m.items()
                if k.startswith("test_") and "_ci_" not in k
            }
            ci: dict[str, dict[str, float]] = {}
            for k, v in m.items():
                if k.startswith("test_") and "_ci_" in k:
                    name, side = k.removeprefix("test_").rsplit("_ci_", 1)
                    ci.setdefault(name, {})[side] = v
            rows.append(
                {
                    "backbone": backbone,
                    "run_id": run.info.run_id,
                    "cv": cv,
                    "test": test,
                    "test_ci": ci,
                }
            )
        return rows

    # ------------------------------------------------------------------ serving

    def load_serving_model(self, uri: str) -> ServingModel:
        """Load any MLflow model URI (``models:/…``, ``runs:/…``, a path) as a Keras model.

        Raises:
            ValueError: the URI names nothing in this store (the message quotes it).
        """
        import mlflow
        import mlflow.keras
        from mlflow.exceptions import MlflowException

        with self.timed(), _use_store(self.uri):
            try:
                name, version = _registry_version(self._client, uri)
                model = mlflow.keras.load_model(uri)
            except (MlflowException, OSError) as exc:
                raise ValueError(
                    f"cannot load model {uri!r} from {self.uri}: {_short_reason(exc)}; "
                    "train and evaluate the dataset first (`make run`), or pass --model"
                ) from None
        return ServingModel(model=model, uri=uri, name=name, version=version)

    def model_source(self, uri: str) -> ModelSource:
        """The test run, training dataset and registry entry behind a model URI.

        Raises:
            ValueError: a URI that names no registered version or run of this store.
        """
        from mlflow.exceptions import MlflowException

        try:
            with self.timed():
                name, version = _registry_version(self._client, uri)
                if name and version:
                    run_id = self._client.get_model_version(name, version).tags["run_id"]
                elif uri.startswith("runs:/"):
                    run_id = uri.removeprefix("runs:/").split("/", 1)[0]
                else:
                    raise ValueError("use models:/<name>@<alias>, models:/<name>/<n> or runs:/")
                run = self._client.get_run(run_id)
        except (MlflowException, KeyError) as exc:
            raise ValueError(
                f"model {uri!r} names no registered version or run in {self.uri}: "
                f"{_short_reason(exc) if isinstance(exc, MlflowException) else exc}"
            ) from None
        dataset = run.data.tags.get(TAG_DATASET, "")
        if not dataset:
            raise ValueError(f"model {uri!r}: its run {run_id} has no {TAG_DATASET} tag")
        return ModelSource(uri, dataset, run_id, run.info.experiment_id, name, version)

    def open_external(self, source: ModelSource, dataset: str) -> str:
        """A RUNNING ``external`` run in the model's experiment; tags name the model."""
        tags = {
            TAG_ROLE: "external",
            TAG_DATASET: source.dataset,
            "mammoflow.external_dataset": dataset,
            "mammoflow.model_uri": source.uri,
            "mammoflow.model_test_run": source.test_run_id,
            "mammoflow.registered_model": source.name,
            "mammoflow.registered_version": source.version,
            "mlflow.source.name": "mammoflow external",
        }
        with self.timed():
            run = self._client.create_run(
                source.experiment_id, run_name=f"external-{dataset}", tags=tags
            )
        return str(run.info.run_id)

    def log_external(
        self,
        run_id: str,
        source: ModelSource,
        dataset: str,
        metrics: Mapping[str, float],
        evidence: Any,
        page: str,
    ) -> None:
        """Fill and finish the external run, linked both ways to the model.

        The run shows the logged model as an output; the registered version gets
        ``mammoflow.external.<dataset>`` = the run id (what its model card reads).
        """
        with self.run_guard(run_id):
            self.log_metrics(run_id, {k: v for k, v in metrics.items() if math.isfinite(v)})
            self.log_dict(run_id, _finite_json(evidence), "external.json")
            self.log_text(run_id, page, "report.html")
            model_uri = self.run_tags_params(source.test_run_id)[0].get("mammoflow.model_uri", "")
            self.link_model(run_id, model_uri)
            if source.name and source.version:
                with self.timed():
                    self._client.set_model_version_tag(
                        source.name, source.version, f"{TAG_EXTERNAL_PREFIX}{dataset}", run_id
                    )

    def model_uri_of(self, run_id: str) -> str:
        """The model URI a run logged (its ``mammoflow.model_uri`` tag).

        Raises:
            ValueError: the run logged no model.
        """
        with self.timed():
            uri = self._client.get_run(run_id).data.tags.get("mammoflow.model_uri")
        if not uri:
            raise ValueError(
                f"run {run_id} has no logged model; set tracking.log_models to 'final' and rerun"
            )
        return str(uri)

    def log_pointing_game(
        self, test_run_id: str, rate: Mapping[str, float], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Log the Grad-CAM pointing game on a test run and its parent.

        Metrics ``pointing_game_hit_rate`` / ``_ci_low`` / ``_ci_high`` / ``_n`` on both runs;
        the per-image peaks and hits as ``pointing_game.json`` on the test run.
        """
        metrics = {
            "pointing_game_hit_rate": rate["hit_rate"],
            "pointing_game_hit_rate_ci_low": rate["low"],
            "pointing_game_hit_rate_ci_high": rate["high"],
            "pointing_game_n": rate["n"],
        }
        for key in ("chance", "outside_breast"):  # its chance level, the shortcut signal
            if key in rate:
                metrics[f"pointing_game_{key}"] = rate[key]
        with self.timed():
            parent = self._client.get_run(test_run_id).data.tags.get("mlflow.parentRunId")
        for run_id in (test_run_id, parent) if parent else (test_run_id,):
            self.log_metrics(run_id, metrics)
        self.log_dict(test_run_id, {"rate": dict(rate), "images": list(rows)}, "pointing_game.json")

    # ------------------------------------------------------------------ registry

    def promote(
        self, dataset: str, run_id: str, metric: str, value: float, higher_is_better: bool = True
    ) -> dict[str, Any]:
        """Register the test run's model as ``champion`` of ``mammoflow-<dataset>``.

        The previous champion becomes ``challenger`` — unless the new model is worse, in which
        case the new version becomes ``challenger`` and the champion stays. A champion without a
        finite ``metric`` tag (promoted under another rule) is not compared against: it stays,
        the new version becomes ``challenger`` and the result carries a ``warning`` saying so.

        The read-compare-write runs under :func:`registry_lock`, so two processes promoting for
        one dataset at once end with the better one ``champion`` whatever the interleaving. Each
        decision is written on the versions as tags (``mammoflow.promotion``, and
        ``mammoflow.displaced`` on a champion that lost its alias): the registry's history.
        """
        from mlflow.exceptions import MlflowException

        name = registered_model_name(dataset)
        with self.timed(), registry_lock(self._client, name) as holder:
            with contextlib.suppress(MlflowException):  # already there: nothing to create
                self._client.create_registered_model(
                    name, description=f"Best MammoFlow backbone on {dataset}"
                )
            current = None
            with contextlib.suppress(MlflowException):
                current = self._client.get_model_version_by_alias(name, "champion")
            if current is not None and current.tags.get("run_id") == run_id:
                return {"name": name, "version": current.version, "alias": "champion", "new": False}
            version = self._register(name, run_id, metric, value)
            old = None if current is None else _tag_float(current.tags.get(metric))
            alias, reason, warning = promotion_decision(
                metric,
                value,
                None if current is None else str(current.version),
                old,
                higher_is_better,
            )
            stamp = f"{_utc_now()} by {holder}"
            if alias == "champion" and current is not None:
                self._client.set_registered_model_alias(name, "challenger", current.version)
                self._client.set_model_version_tag(
                    name,
                    current.version,
                    TAG_DISPLACED,
                    f"{stamp}: champion → challenger, beaten by v{version} ({reason})",
                )
            self._client.set_registered_model_alias(name, alias, version)
            self._client.set_model_version_tag(
                name, version, TAG_PROMOTION, f"{stamp}: {alias} ({reason})"
            )
        out = {"name": name, "version": version, "alias": alias, "new": True, "reason": reason}
        if warning:
            log.warning("%s", warning)
            out["warning"] = warning
        return out

    def _register(self, name: str, run_id: str, metric: str, value: float) -> Any:
        """A new version of ``name`` from ``run_id``'s logged model, tagged with the metric."""
        import mlflow

        run_tags = self._client.get_run(run_id).data.tags
        model_uri = run_tags.get("mammoflow.model_uri")
        if not model_uri:
            raise ValueError(
                f"run {run_id} has no logged model to register; set tracking.log_models "
                "to 'all' or 'final' and rerun"
            )
        extra = {k: run_tags[k] for k in (TAG_TEMPERATURE,) if k in run_tags}
        extra |= self._lineage_of(run_tags.get("mlflow.parentRunId", run_id))
        tags = {metric: f"{value:.6f}", "run_id": run_id, TAG_SELECTION: metric, **extra}
        with _use_store(self.uri):  # register_model resolves runs:/ URIs with it
            return mlflow.register_model(model_uri, name, tags=tags).version

    def _lineage_of(self, parent_id: str) -> dict[str, str]:
        """The parent run's lineage tags (commit, data hashes, where the data is), for a version."""
        tags = self._client.get_run(parent_id).data.tags
        return {k: tags[k] for k in LINEAGE_TAGS if k in tags}

    def write_model_cards(self, dataset: str) -> dict[str, str]:
        """Write the card of every registered version with an alias (champion, challenger).

        Returns ``{alias: version}`` of the cards written.
        """
        from mammoflow.reporting.card import description, model_card

        written: dict[str, str] = {}
        for alias in ("champion", "challenger"):
            facts = self.card_facts(dataset, alias)
            if facts is None:
                continue
            self.set_model_card(facts, model_card(facts), description(facts))
            written[alias] = facts.version
        return written

    def card_facts(self, dataset: str, alias: str) -> CardFacts | None:
        """What the model card of ``mammoflow-<dataset>@<alias>`` is written from, or None."""
        from mlflow.exceptions import MlflowException

        from mammoflow.reporting.card import CardFacts

        name = registered_model_name(dataset)
        with self.timed():
            try:
                mv = self._client.get_model_version_by_alias(name, alias)
            except MlflowException:
                return None
            test = self._client.get_run(mv.tags["run_id"])
            parent_id = test.data.tags.get("mlflow.parentRunId", test.info.run_id)
            parent = self._client.get_run(parent_id)
        subgroups = ""
        with contextlib.suppress(Exception):
            from mlflow.artifacts import load_text

            with self.timed():
                subgroups = load_text(f"runs:/{parent_id}/subgroups.md")
        return CardFacts(
            name=name,
            version=str(mv.version),
            alias=alias,
            dataset=dataset,
            backbone=test.data.tags.get(TAG_BACKBONE, "?"),
            test_run_id=test.info.run_id,
            parent_run_id=parent_id,
            params=dict(test.data.params),
            tags={**parent.data.tags, **test.data.tags},
            metrics=dict(parent.data.metrics),
            subgroups_md=subgroups,
            selection_metric=mv.tags.get(TAG_SELECTION, ""),
            external=self._external_metrics(mv.tags),
        )

    def _external_metrics(self, version_tags: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """External dataset → its run's metrics, for the version's ``mammoflow.external.*``."""
        from mlflow.exceptions import MlflowException

        out: dict[str, dict[str, Any]] = {}
        for key, run_id in sorted(version_tags.items()):
            if key.startswith(TAG_EXTERNAL_PREFIX):
                with self.timed(), contextlib.suppress(MlflowException):
                    metrics = dict(self._client.get_run(run_id).data.metrics)
                    out[key.removeprefix(TAG_EXTERNAL_PREFIX)] = {"run": run_id, **metrics}
        return out

    def log_dataset_input(
        self, run_id: str, frame: Any, source: str, digest: str, name: str, context: str
    ) -> None:
        """The runs table's Dataset column: ``frame`` as an MLflow dataset input of ``run_id``.

        Args:
            frame: the manifest (its schema and row count are logged, not its rows).
            source: where it lives (the manifest's path).
            digest: the DVC hash of the data (MLflow keeps at most 36 characters).
            name: the dataset's name in the UI.
            context: the input's ``mlflow.data.context`` (the split hash goes here).
        """
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import Dataset, DatasetInput, InputTag

        plain = frame.drop(columns=[c for c in ("extras",) if c in frame.columns])
        with warnings.catch_warnings():  # the integer-columns hint is about model signatures
            warnings.simplefilter("ignore", UserWarning)
            entity = from_pandas(plain, source=source, name=name)._to_mlflow_entity()
        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type=entity.source_type,
            source=entity.source,
            schema=entity.schema,
            profile=entity.profile,
        )
        tags = [InputTag("mlflow.data.context", context[:500])]
        with self.timed():
            self._client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    def log_dvc_input(self, run_id: str, source: str, digest: str, name: str, context: str) -> None:
        """A data version as an MLflow ``MetaDataset`` input of ``run_id`` (no rows, no schema):
        ``source`` names where DVC fetches it from, ``digest`` is DVC's md5 (36 characters)."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        entity = MetaDataset(  # type: ignore[abstract]  # profile is a property there
            HTTPDatasetSource(source), name=name, digest=digest[:36]
        )
        tags = [InputTag("mlflow.data.context", context[:500])]
        with self.timed():
            self._client.log_inputs(
                run_id, datasets=[DatasetInput(entity._to_mlflow_entity(), tags)]
            )

    def link_model(self, run_id: str, model_uri: str) -> None:
        """Show a logged model (``models:/<model id>``) as an output of ``run_id`` too."""
        from mlflow.entities import LoggedModelOutput

        if not model_uri.startswith("models:/m-"):
            return
        with self.timed():
            self._client.log_outputs(run_id, [LoggedModelOutput(model_uri.split("/")[1], 0)])

    def run_tags_params(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """``(tags, params)`` of a run; empty when the run is not in this store."""
        from mlflow.exceptions import MlflowException

        with self.timed():
            try:
                run = self._client.get_run(run_id)
            except MlflowException:
                return {}, {}
        return dict(run.data.tags), dict(run.data.params)

    def set_model_card(self, facts: CardFacts, card: str, description: str) -> None:
        """The card as the version's description and as ``model_card.md`` on its test run."""
        with self.timed():
            self._client.update_model_version(facts.name, facts.version, description=description)
        self.log_text(facts.test_run_id, card, "model_card.md")


@dataclass(frozen=True)
class ModelSource:
    """Where a model URI comes from: its test run, its training dataset, its registry entry."""

    uri: str
    dataset: str  # the dataset it was trained on
    test_run_id: str
    experiment_id: str
    name: str = ""  # registered model name ("" for a run / logged-model URI)
    version: str = ""

    @property
    def label(self) -> str:
        """``name vN``, or the URI for an unregistered model."""
        return f"{self.name} v{self.version}" if self.name and self.version else self.uri


@dataclass(frozen=True)
class ServingModel:
    """A logged Keras model loaded for scoring, with where it came from."""

    model: Any
    uri: str
    name: str  # registered model name ("" for a run or path URI)
    version: str  # registry version ("" for a run or path URI)


class PromotionLockedError(RuntimeError):
    """Another process holds the promotion lock of a registered model for too long."""


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _tag_float(raw: str | None) -> float | None:
    """A version tag as a finite float; None when missing, unparsable or NaN."""
    try:
        v = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def promotion_decision(
    metric: str,
    value: float,
    champion: str | None,
    champion_value: float | None,
    higher_is_better: bool = True,
) -> tuple[str, str, str | None]:
    """``(alias of the new version, reason, warning)``: the selection rule, pure.

    Args:
        metric: the selection metric (``tracking.registry_metric``).
        value: the new version's value of it.
        champion: the current champion's version, None when there is none.
        champion_value: its value of ``metric``; None when it has none (never compared).
    """
    if champion is None:
        return "champion", f"first champion, {metric} {value:.4f}", None
    if champion_value is None:
        warning = (
            f"champion v{champion} has no {metric} tag (promoted under another rule), so the new "
            "model was not compared with it: the champion is kept and the new version is "
            "challenger; compare them by hand and move the alias with "
            "`mlflow` / MlflowClient.set_registered_model_alias if the new one should serve"
        )
        return "challenger", f"not compared: v{champion} has no {metric}", warning
    if not math.isfinite(value):
        return "challenger", f"{metric} is not a number", None
    worse = (value < champion_value) if higher_is_better else (value > champion_value)
    versus = f"{metric} {value:.4f} vs v{champion}'s {champion_value:.4f}"
    return ("challenger", versus, None) if worse else ("champion", versus, None)


@contextlib.contextmanager
def registry_lock(
    client: Any,
    name: str,
    *,
    lease_s: float = LOCK_LEASE_S,
    wait_s: float = LOCK_WAIT_S,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """Cross-process, cross-machine mutual exclusion on registered model ``name``.

    The lock is a registered model ``<name>.promotion-lock``: creating a registered model is
    atomic in every MLflow store — the name is the primary key of the SQL stores (SQLite here,
    the team's PostgreSQL), and a tracking server forwards the unique-key failure as
    ``RESOURCE_ALREADY_EXISTS`` — so exactly one caller creates it; it deletes it when done.
    It needs nothing beyond the MLflow client that the promotion already uses (no file lock,
    which would not reach another machine; no database credentials on the clients). A lock past
    its lease (its holder died) is broken with a warning. Yields the holder's id.

    Raises:
        PromotionLockedError: the lock stayed held (and unexpired) for ``wait_s`` seconds.
    """
    import socket
    import uuid

    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": holder, "expires": f"{time.time() + lease_s:.3f}"},
                description=f"MammoFlow promotion lock of {name} (deleted when released)",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if _break_stale(client, lock):
            continue
        if time.monotonic() > deadline:
            raise PromotionLockedError(
                f"registered model {lock!r} (the promotion lock of {name}) stayed held for "
                f"{wait_s:.0f} s; another promotion is running, or delete it if none is"
            )
        time.sleep(poll_s)
    try:
        yield holder
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("holder") == holder:
                client.delete_registered_model(lock)


def _break_stale(client: Any, lock: str) -> bool:
    """Delete ``lock`` if its lease ran out; True when it is gone (deleted here or released)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException:
        return True  # released between our create and this read: try again
    expires = _tag_float(tags.get("expires"))
    if expires is not None and expires > time.time():
        return False
    log.warning("breaking the stale promotion lock %s of %s", lock, tags.get("holder", "?"))
    with contextlib.suppress(MlflowException):
        client.delete_registered_model(lock)
    return True


def _registry_version(client: Any, uri: str) -> tuple[str, str]:
    """``(name, version)`` of a ``models:/name@alias`` or ``models:/name/version`` URI."""
    if not uri.startswith("models:/"):
        return "", ""
    ref = uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.partition("/")
    if version.isdigit() or not version:
        return name, version
    return name, ""  # an m-<id> logged model or a stage name: no single version to report


def _finite_json(obj: Any) -> Any:
    """NaN / inf → None, so a logged JSON artifact is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_json(v) for v in obj]
    return obj


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


def _param_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _pip_requirements() -> list[str]:
    """Minimal serving requirements (avoids MLflow exporting the whole project lock)."""
    from importlib.metadata import version

    reqs = []
    for pkg in ("tensorflow", "keras", "numpy"):
        with contextlib.suppress(Exception):
            reqs.append(f"{pkg}=={version(pkg)}")
    return reqs


_PATCHED = False


def _patch_keras_input_example() -> None:
    """Work around mlflow/mlflow#16183 (open): the Keras flavor writes input_example.json
    before creating the model folder. Create the folder first; behaviour is otherwise unchanged."""
    global _PATCHED
    if _PATCHED:
        return
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model: Any, input_example: Any, path: str, *a: Any, **k: Any) -> Any:
        Path(path).mkdir(parents=True, exist_ok=True)
        return original(mlflow_model, input_example, path, *a, **k)

    keras_save._save_example = save_example
    _PATCHED = True


def config_hash(params: Mapping[str, Any], data_hash: str, split_hash: str) -> str:
    """sha256 over the resolved params, the data hash and the split hash (resume key)."""
    text = json.dumps(
        {"params": dict(params), "data": data_hash, "split": split_hash},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- one study


@dataclass(frozen=True)
class Evaluation:
    """One set of predictions to log: ids, true labels, probabilities and their metrics."""

    ids: list[str]
    y_true: Any
    prob: Any
    metrics: Mapping[str, float]
    class_names: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """The ``predictions.json`` artifact."""
        return {
            "image_id": list(self.ids),
            "y_true": [int(v) for v in self.y_true],
            "prob": [[float(p) for p in row] for row in self.prob],
        }


@dataclass
class StudyRun:
    """One (dataset, backbone) study in MLflow: a parent run with ``fold-k`` and ``test`` children.

    Open it with :meth:`open` (reopens the parent of the same configuration key and marks children
    left RUNNING by a killed process FAILED); :meth:`finished` lists the children to reuse.
    Every method names its run explicitly; nothing uses MLflow's ambient active run.
    """

    tracker: Tracker
    experiment_id: str
    parent_id: str
    dataset: str
    backbone: str
    child_params: dict[str, Any]
    reopened: bool = False
    stale: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)  # mlflow.source.* tags for children

    @classmethod
    def open(
        cls,
        tracker: Tracker,
        *,
        dataset: str,
        backbone: str,
        key: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> StudyRun:
        """Reopen or create the parent run of configuration ``key``."""
        exp_id = tracker.experiment_id(dataset)
        parent_id, reopened = tracker.open_parent(
            exp_id, backbone, key, {TAG_DATASET: dataset, **tags}, params
        )
        stale = tracker.fail_stale_children(exp_id, parent_id) if reopened else []
        if stale:
            log.warning("runs %s were left RUNNING by a killed process; marked FAILED", stale)
        return cls(
            tracker,
            exp_id,
            parent_id,
            dataset,
            backbone,
            {**params, "backbone": backbone},
            reopened,
            stale,
            {k: v for k, v in tags.items() if k.startswith(SOURCE_PREFIX)},
        )

    @staticmethod
    def finished_names(tracker: Tracker, dataset: str, backbone: str, key: str) -> set[str]:
        """Names of the FINISHED children of configuration ``key`` (read-only; for planning)."""
        with tracker.timed():
            exp = tracker.client.get_experiment_by_name(experiment_name(dataset))
            if exp is None:
                return set()
            runs = tracker.client.search_runs(
                [exp.experiment_id],
                filter_string=(
                    f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_KEY}` = '{key}' "
                    f"and tags.`{TAG_BACKBONE}` = '{backbone}'"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        if not runs:
            return set()
        children = tracker.children(exp.experiment_id, runs[0].info.run_id)
        return {name for name, run in children.items() if run.info.status == "FINISHED"}

    def finished(self) -> dict[str, Any]:
        """FINISHED children by name (``fold-k``, ``test``): their work is reused."""
        children = self.tracker.children(self.experiment_id, self.parent_id)
        return {name: run for name, run in children.items() if run.info.status == "FINISHED"}

    def reused_fold(self, run: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """``(validation metrics, predictions record)`` of a FINISHED fold run."""
        metrics = {
            k.removeprefix("val_"): v for k, v in run.data.metrics.items() if k.startswith("val_")
        }
        return metrics, self.tracker.load_json_artifact(run.info.run_id, "predictions.json")

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """The parent: FINISHED when the block completes, FAILED on any error or interrupt."""
        return self.tracker.run_guard(self.parent_id)

    def _child(
        self, name: str, role: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        base = {TAG_BACKBONE: self.backbone, TAG_DATASET: self.dataset, **self.source}
        return self.tracker.start_child(
            self.experiment_id,
            self.parent_id,
            name,
            role,
            {**base, **tags},
            {**self.child_params, **params},
        )

    def _evaluation(self, run_id: str, ev: Evaluation, prefix: str) -> None:
        from mammoflow.reporting.figures import (
            classification_report_text,
            confusion_figure,
            roc_figure,
        )

        t = self.tracker
        t.log_metrics(run_id, ev.metrics, prefix=prefix)
        t.log_dict(run_id, ev.record(), "predictions.json")
        text = classification_report_text(ev.y_true, ev.prob, ev.class_names)
        t.log_text(run_id, text, "classification_report.txt")
        t.log_figure(
            run_id, confusion_figure(ev.y_true, ev.prob, ev.class_names), "confusion_matrix.png"
        )
        t.log_figure(run_id, roc_figure(ev.y_true, ev.prob, ev.class_names), "roc_curve.png")

    def start_fold(self, fold: int) -> str:
        """Child ``fold-<k>``, RUNNING while the fold trains (a crash then leaves it FAILED)."""
        return self._child(f"fold-{fold}", "fold", {TAG_FOLD: str(fold)}, {"fold": fold})

    def start_test(self, mode: str) -> str:
        """Child ``test``, RUNNING while the refit model trains."""
        return self._child("test", "test", {"mammoflow.test_model": mode}, {"test_model": mode})

    def log_fold(
        self,
        fold: int,
        ev: Evaluation,
        history: Mapping[str, Sequence[float]],
        timing: Mapping[str, float],
        model: Any | None = None,
        example: Any | None = None,
        run_id: str | None = None,
    ) -> str:
        """A finished fold into child ``fold-<k>`` (``run_id`` from :meth:`start_fold`, else a new
        one): validation metrics, curves, predictions, model; the run ends FINISHED."""
        from mammoflow.reporting.figures import curves_figure

        run_id = run_id or self.start_fold(fold)
        with self.tracker.run_guard(run_id):
            self.tracker.log_history(run_id, history)
            self.tracker.log_metrics(run_id, timing, prefix="time_")
            self._evaluation(run_id, ev, "val_")
            self.tracker.log_figure(run_id, curves_figure(history), "training_curves.png")
            if model is not None:
                self.tracker.log_model(run_id, model, example)
        return run_id

    def log_test(
        self,
        ev: Evaluation,
        mode: str,
        history: Mapping[str, Sequence[float]] | None = None,
        model: Any | None = None,
        example: Any | None = None,
        run_id: str | None = None,
    ) -> str:
        """The held-out test into child ``test`` (``run_id`` from :meth:`start_test`, else a new
        one): metrics, predictions and the serving model; the run ends FINISHED."""
        run_id = run_id or self.start_test(mode)
        with self.tracker.run_guard(run_id):
            if history:
                self.tracker.log_history(run_id, history)
            self._evaluation(run_id, ev, "test_")
            if model is not None:
                # the backbone's parent row shows the model and its registered version
                uri = self.tracker.log_model(run_id, model, example, source_run_id=self.parent_id)
                self.tracker.link_model(self.parent_id, uri)
        return run_id

    def log_dataset(
        self, frame: Any, source: str, data_hash: str, split_hash: str, group_by: str
    ) -> None:
        """The manifest as the parent's dataset input: DVC hash as digest, split in context."""
        self.tracker.log_dataset_input(
            self.parent_id,
            frame,
            source,
            data_hash,
            name=f"{self.dataset}-manifest",
            context=f"{group_by}-level split {split_hash[:16]}",
        )

    def log_dvc_data(self, source: str, digest: str, location: str) -> None:
        """The DVC data version as the parent's dataset input: ``source`` (the remote's object,
        see :func:`mammoflow.lineage.dataset_source`), the DVC hash as ``digest``, where it was
        found (``dvc_data_location``) as context."""
        self.tracker.log_dvc_input(
            self.parent_id, source, digest, name=f"{self.dataset}-dvc", context=f"dvc: {location}"
        )

    def finish(
        self,
        cv: Mapping[str, float],
        test: Mapping[str, float],
        ci: Mapping[str, Mapping[str, float]],
        fold_figure: Any,
        reused_folds: Sequence[int],
    ) -> None:
        """Aggregates on the parent: CV mean/std, test metrics with CIs, the fold spread figure."""
        t = self.tracker
        t.log_metrics(self.parent_id, cv)
        t.log_metrics(self.parent_id, test, prefix="test_")
        t.log_metrics(
            self.parent_id,
            {f"test_{m}_ci_{side}": v[side] for m, v in ci.items() for side in ("low", "high")},
        )
        t.log_figure(self.parent_id, fold_figure, "fold_metrics.png")
        t.set_tags(self.parent_id, {"resumed_folds": json.dumps(list(reused_folds))})

    def log_calibration(
        self, test_run_id: str, metrics: Mapping[str, float], sidecar: Any, figure: Any
    ) -> None:
        """Calibration of the test model, raw and temperature-scaled.

        Metrics (``test_ece``, ``test_calibrated_ece``, CIs, ``temperature``) go on the parent
        and the test run; the test run also carries the temperature as tag
        ``mammoflow.temperature`` (copied onto the registered version by :meth:`Tracker.promote`)
        and the sidecar ``calibration.json``; the reliability diagram goes on the parent.
        """
        t = self.tracker
        temperature = f"{float(metrics['temperature']):.6g}"
        for run_id in (self.parent_id, test_run_id):
            t.log_metrics(run_id, metrics)
            t.set_tags(run_id, {TAG_TEMPERATURE: temperature})
        t.log_dict(test_run_id, _finite_json(sidecar), CALIBRATION_FILE)
        t.log_figure(self.parent_id, figure, "reliability_diagram.png")

    def log_subgroups(self, tables: Mapping[str, Any], markdown: str) -> None:
        """Metrics per subgroup on the parent: ``subgroups.json`` and ``subgroups.md``."""
        self.tracker.log_dict(self.parent_id, _finite_json(tables), "subgroups.json")
        self.tracker.log_text(self.parent_id, markdown, "subgroups.md")


def audit_experiment_name(dataset: str) -> str:
    """``mammoflow-<dataset>-audit``: the leakage audit's studies, apart from the training runs."""
    return f"mammoflow-{dataset}-audit"


@dataclass
class AuditTracker(Tracker):
    """A :class:`Tracker` whose studies go to the dataset's audit experiment."""

    def experiment_id(self, dataset: str) -> str:
        """Get or create ``mammoflow-<dataset>-audit``."""
        return self._experiment(audit_experiment_name(dataset), {TAG_DATASET: dataset})

    def log_audit(self, dataset: str, backbone: str, audit: Mapping[str, Any], text: str) -> str:
        """One ``audit`` run with both results: image-level, patient-level and inflation metrics
        (with CIs), the split checks, ``audit.json`` and the printed summary. Returns its id."""
        exp = self.experiment_id(dataset)
        with self.timed():
            run = self._client.create_run(
                exp,
                run_name=f"audit-{backbone}",
                tags={TAG_ROLE: "audit", TAG_DATASET: dataset, TAG_BACKBONE: backbone},
            )
        run_id = str(run.info.run_id)
        with self.run_guard(run_id):
            self._log_params(
                run_id, {k: audit[k] for k in ("backbone", "seed", "k_folds", "epochs", "ci")}
            )
            metrics: dict[str, float] = {}
            for m, v in audit["inflation"].items():
                metrics |= {f"image_{m}": v["image"], f"patient_{m}": v["patient"]}
                metrics |= {f"inflation_{m}": v["inflation"]}
                metrics |= {f"inflation_{m}_ci_low": v["low"], f"inflation_{m}_ci_high": v["high"]}
            for group_by, checks in audit["checks"].items():
                metrics |= {
                    f"{group_by}_{k}": float(v)
                    for k, v in checks.items()
                    if isinstance(v, int | float) and k != "near_duplicate_bits"
                }
            self.log_metrics(run_id, metrics)
            self.log_dict(run_id, _finite_json(dict(audit)), "audit.json")
            self.log_text(run_id, text, "audit.txt")
        return run_id
