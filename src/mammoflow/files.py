"""Atomic file writes and content hashes: the bottom of the import graph.

Every output the pipeline writes goes through a temp file and a rename, so a reader (DVC, a
second worker, a crash) never sees half a file. This module imports nothing from the project.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temp file beside it, fsynced and renamed into
    place when the block ends without error, so readers never see half a file.

    A full disk (``ENOSPC``/``EDQUOT``) raises an ``OSError`` with the same errno naming
    ``path``; the temporary file is removed on every error.

    Args:
        path: Destination; its parent folders are created.
        mode: Permission bits (``0o600`` for a file holding credentials); default what the
            umask gives a new file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp's 0600 would make outputs private to root
        os.fchmod(fd, 0o666 & ~_UMASK if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: say which file, and that
            raise OSError(  # nothing half-written stays behind
                exc.errno,
                f"no space left on the device while writing {path}; the partial temporary file "
                f"was removed and {path.name} keeps its earlier content, if any: free space "
                "there and rerun",
            ) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`, which takes ``mode``)."""
    with atomic_file(path, mode) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Atomically write UTF-8 text (``mode`` as in :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON (sorted keys, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by ``None`` (and NumPy scalars by Python numbers), so that
    the JSON written or logged is strict JSON (DVC metrics, MLflow artifacts)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating | np.integer):
        return finite_json(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj
