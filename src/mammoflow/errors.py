"""Which failures are worth a retry: one rule for the CLI's exit codes and the Prefect flows.

A scheduler retries a stage only when its failure is transient I/O (a stale NFS handle, a
server restarting, a timeout). A missing prerequisite (``FileNotFoundError``), bad input or a
full disk fails at once with its message: retrying cannot fix it.
"""

from __future__ import annotations

import errno

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" — what the CLI exits
# with on a transient error, so a caller that only sees the exit code (DVC, a shell) can tell.
EX_TEMPFAIL = 75

TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)

# Errors about the user's files or the machine, never fixed by trying again.
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is transient I/O: a connection or timeout error, or an ``OSError`` with a
    transient errno. Network libraries raise ``OSError`` subclasses without an errno (requests'
    ``ConnectionError``), which count as transient too."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in TRANSIENT_ERRNOS
    return False
