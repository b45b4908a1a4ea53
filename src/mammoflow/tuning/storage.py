"""Where a study lives: the Optuna storage URL and the RDB storage with heartbeats.

``tune.storage`` (default ``sqlite:///optuna.db`` under the project root), overridden by
``MAMMOFLOW_OPTUNA_STORAGE`` (the team stack sets a PostgreSQL URL). Several ``--workers`` need a
database server; SQLite serves one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammoflow.tuning.params import TuneError

if TYPE_CHECKING:
    import optuna

STORAGE_ENV = "MAMMOFLOW_OPTUNA_STORAGE"
HEARTBEAT_S = 60  # RDB heartbeat: a trial silent for 3 intervals (killed worker) becomes FAIL


def resolve_storage(
    configured: str, root: Path | str = ".", env: Mapping[str, str] | None = None
) -> str:
    """The SQLAlchemy URL of the Optuna storage.

    ``MAMMOFLOW_OPTUNA_STORAGE`` (in ``env``, default ``os.environ``) wins over ``configured``
    (``tune.storage``). A relative SQLite path is made absolute under ``root`` (the project
    root); ``postgresql://`` / ``postgres://`` get the psycopg 3 driver (``postgresql+psycopg``).
    """
    environ = os.environ if env is None else env
    url = (environ.get(STORAGE_ENV) or configured).strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise TuneError(
            f"storage {url!r} is not a database URL; use e.g. sqlite:///optuna.db or "
            "postgresql://user:password@host:5432/optuna"
        )
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    if scheme == "sqlite" and rest.startswith("/"):
        path = rest[1:]
        if path and path != ":memory:" and not Path(path).is_absolute():
            rest = "/" + str((Path(root) / path).resolve())
    return f"{scheme}://{rest}"


def is_server_storage(url: str) -> bool:
    """True for a database server (PostgreSQL, MySQL …), False for SQLite."""
    return not url.split("://", 1)[0].startswith("sqlite")


def redact_url(url: str) -> str:
    """``url`` with its password masked (safe for logs, MLflow and DVC outputs)."""
    try:
        from sqlalchemy.engine import make_url

        return str(make_url(url).render_as_string(hide_password=True))
    except Exception:
        scheme, sep, rest = url.partition("://")
        creds, at, host = rest.rpartition("@")
        if not at or ":" not in creds:
            return url
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (a killed worker's RUNNING trial becomes FAIL)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if is_server_storage(url):
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    else:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=3 * HEARTBEAT_S,
            **kwargs,
        )
