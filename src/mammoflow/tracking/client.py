"""The base of every tracker: one MLflow client bound to a store, its calls timed and retried."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mammoflow.tracking.retry import _Retry, _RetryingClient, retry_seconds
from mammoflow.tracking.store import (
    HTTP_DEFAULTS,
    _mlflow_client,
    _quiet_mlflow,
    check_server,
    tracking_uri,
)

T = TypeVar("T")


@dataclass
class TrackerBase:
    """An MLflow client bound to one store; every call names its run explicitly.

    The rooms of :class:`~mammoflow.tracking.tracker.Tracker` (runs, records, read-back,
    models, registry, cards) build on it.
    """

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
