"""The model registry: promotion under a cross-process lock, the selection rule, version URIs.

One registered model per dataset (``mammoflow-<dataset>``) with the aliases ``champion`` and
``challenger``; every decision is written on the versions as tags (the registry's history).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

from mammoflow.tracking.client import TrackerBase
from mammoflow.tracking.store import _use_store
from mammoflow.tracking.tags import (
    LINEAGE_TAGS,
    TAG_DISPLACED,
    TAG_MODEL_URI,
    TAG_PROMOTION,
    TAG_SELECTION,
    TAG_TEMPERATURE,
    registered_model_name,
)

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"  # registered model used as a cross-process mutex
LOCK_LEASE_S = 120.0  # a lock older than this is a dead holder's: broken (a promotion takes ~1 s)
LOCK_WAIT_S = 300.0


class Registry(TrackerBase):
    """Register a test run's model and move the ``champion`` / ``challenger`` aliases."""

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
        model_uri = run_tags.get(TAG_MODEL_URI)
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


def registry_version(client: Any, uri: str) -> tuple[str, str]:
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
