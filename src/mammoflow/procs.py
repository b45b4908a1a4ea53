"""Run a server as a child process that goes when we go (SIGTERM, SIGINT, or our own exit).

``mammoflow serve`` starts ``mlflow models serve``, which starts uvicorn and its workers. A plain
``subprocess.call`` leaves them all running, still bound to the port, when the wrapper is
stopped. :func:`run_until_stopped` starts the child in its own process group and, on SIGTERM or
SIGINT, stops the whole group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: Seconds the group gets to stop after SIGTERM before SIGKILL.
GRACE_S = 10.0


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; ``False`` when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user: it is still there
        return True
    return True


def stop_group(proc: subprocess.Popen[Any], grace_s: float = GRACE_S) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``grace_s``; reap it."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _signal_group(proc.pid, 0):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
        if proc.poll() is not None and not _signal_group(proc.pid, 0):
            break
    _signal_group(proc.pid, signal.SIGKILL)  # workers that outlived their parent too
    proc.wait()


def run_until_stopped(
    cmd: Sequence[str], env: Mapping[str, str] | None = None, grace_s: float = GRACE_S
) -> int:
    """Run ``cmd`` in its own process group until it exits or we get SIGTERM/SIGINT.

    Returns:
        The child's exit status; ``128 + signal`` when a signal stopped us (the shell's
        convention), after the whole group is gone.
    """
    proc = subprocess.Popen(
        list(cmd), env=dict(env) if env is not None else None, start_new_session=True
    )
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None and not received:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
    finally:
        stop_group(proc, grace_s)  # also when the child exited: its workers may not have
        for signum, old in previous.items():
            signal.signal(signum, old)
    return 128 + received[0] if received else int(proc.returncode)
