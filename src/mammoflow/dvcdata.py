"""Every use of DVC's Python internals, in one place (DVC's ``Repo`` API is not a public contract).

* :func:`dvc_hash`: the hash ``dvc add`` / ``dvc.lock`` records for a file or folder (dvc-data);
* :func:`dvc_setup`: a checkout's cache folder and remotes, with relative paths resolved;
* :func:`write_local_config`: that setup as another DVC repo's ``.dvc/config.local``;
* :func:`locate`: whether data versions are in the default remote, the local cache, or nowhere.

Pinned by ``uv.lock`` (dvc 3.67) and tested in tests/unit/test_dvcdata.py against the real DVC.
The command line (``dvc pull``, ``dvc push``) is used everywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ``locate`` answers
IN_REMOTE = "remote"
LOCAL_ONLY = "local cache only"
NOWHERE = "nowhere"
UNKNOWN = "unknown"


def dvc_hash(path: Path) -> str:
    """DVC's md5 of ``path``: ``<md5>.dir`` for a folder, ``<md5>`` for a file; 'unknown' if absent.

    Computed by DVC's own hashing code on the files there now, whoever wrote them.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    if not path.exists():
        return UNKNOWN
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="mammoflow-hash-") as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(path.resolve()), fs, "md5", dry_run=True)
    return str(obj.hash_info.value)


@dataclass(frozen=True)
class DvcSetup:
    """Where a checkout's DVC data lives: its cache folder and remotes (absolute, resolved)."""

    cache_dir: str
    default_remote: str | None = None
    remotes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def remote_url(self) -> str | None:
        """The default remote's URL, or None without one."""
        if self.default_remote is None:
            return None
        return str(self.remotes.get(self.default_remote, {}).get("url", "")) or None


@contextlib.contextmanager
def _repo(root: Path) -> Iterator[Any]:
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        yield repo
    finally:
        repo.close()


def dvc_setup(root: Path) -> DvcSetup | None:
    """The DVC cache and remotes of the checkout at ``root``; None when it is no DVC repo."""
    from dvc.exceptions import NotDvcRepoError

    if not (root / ".dvc").is_dir():
        return None
    try:
        with _repo(root) as repo:
            conf = repo.config
            remotes = {name: dict(sec) for name, sec in conf.get("remote", {}).items()}
            default = conf["core"].get("remote")
            return DvcSetup(str(repo.cache.local_cache_dir), default, remotes)
    except NotDvcRepoError:
        return None


def write_local_config(repo_dir: Path, setup: DvcSetup) -> None:
    """Give the DVC repo at ``repo_dir`` the cache folder and remotes of ``setup``.

    Written as ``.dvc/config.local`` (private to that repo, mode 0600: it may hold remote
    credentials), so its committed ``.dvc/config`` is untouched.
    """
    from configobj import ConfigObj

    conf = ConfigObj(indent_type="    ")
    conf["cache"] = {"dir": setup.cache_dir}
    if setup.default_remote:
        conf["core"] = {"remote": setup.default_remote}
    for name, section in setup.remotes.items():
        conf[f'remote "{name}"'] = {k: _conf_value(v) for k, v in section.items()}
    path = repo_dir / ".dvc" / "config.local"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        conf.write(out)


def _conf_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def locate(root: Path, hashes: Iterable[str]) -> str:
    """Where every one of ``hashes`` (DVC md5s, ``.dir`` ones with all their files) can be fetched.

    :data:`IN_REMOTE` when the default remote holds them all, :data:`LOCAL_ONLY` when only the
    checkout's cache does, :data:`NOWHERE` otherwise; :data:`UNKNOWN` outside a DVC repo or
    for an 'unknown' hash. An unreachable remote counts as not holding them (logged).
    """
    wanted = [h for h in hashes]
    if not wanted or UNKNOWN in wanted or not (root / ".dvc").is_dir():
        return UNKNOWN
    with _repo(root) as repo:
        if repo.config["core"].get("remote"):
            try:
                if _complete(repo.cloud.get_remote_odb(), wanted):
                    return IN_REMOTE
            except Exception as exc:
                log.warning("DVC remote not readable (%s): data counted as not pushed", exc)
        return LOCAL_ONLY if _complete(repo.cache.local, wanted) else NOWHERE


def _complete(odb: Any, hashes: list[str]) -> bool:
    """Whether ``odb`` holds every object of ``hashes`` (a ``.dir`` and each file it lists)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    oids: list[str] = []
    for value in hashes:
        oids.append(value)
        if value.endswith(".dir"):
            if not odb.exists(value):
                return False
            tree = Tree.load(odb, HashInfo("md5", value))
            oids.extend(str(hi.value) for _, _, hi in tree if hi is not None and hi.value)
    return set(odb.oids_exist(oids)) == set(oids)
