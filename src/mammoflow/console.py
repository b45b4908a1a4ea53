"""What the commands say to people, and the one wrapper every entry point runs in.

- :func:`say` and :func:`step_line`: one line per step on stderr (what, how many, how long);
  results (a table, or the JSON with ``--json``) go to stdout.
- :func:`progress`: a rich bar in a terminal; in a log (no TTY) a plain line at most every
  ``every_s`` seconds, so a long stage shows it is alive without flooding the log.
- :func:`entry`: SIGTERM → :class:`Stopped` (a ``KeyboardInterrupt``, so open MLflow runs end
  FAILED on the way out), and expected errors → one readable message and an exit code chosen by
  :func:`mammoflow.errors.is_transient`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from rich.console import Console

from mammoflow.errors import EX_TEMPFAIL, is_transient

P = ParamSpec("P")
R = TypeVar("R")

#: The narrative (steps, progress, errors): stderr, so stdout carries only the result.
err = Console(stderr=True)
#: The result: the comparison table, or one JSON object with ``--json``.
out = Console()

#: Seconds between two progress lines in a log (no TTY); the environment may change it.
EVERY_S = 30.0
EVERY_ENV = "MAMMOFLOW_PROGRESS_S"

_started: list[float] = [time.monotonic()]  # when the running command began (set by entry)
_said: list[float] = [time.monotonic()]  # when say() last printed (read by heartbeat)


def say(line: str) -> None:
    """One plain line on stderr, never wrapped or marked up (it may land in a log)."""
    err.print(line, highlight=False, markup=False, soft_wrap=True)
    _said[0] = time.monotonic()


def duration(seconds: float) -> str:
    """``4.2 s``, ``3m07s`` or ``1h02m``: short enough for a step line."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def elapsed() -> float:
    """Seconds since the running command started."""
    return time.monotonic() - _started[0]


def step_line(what: str, facts: list[str], seconds: float | None = None) -> str:
    """``what: fact, fact (12.3 s)`` — the one line a command prints for its step."""
    took = f" ({duration(seconds)})" if seconds is not None else ""
    return f"{what}: {', '.join(facts) if facts else 'done'}{took}"


def json_line(data: Mapping[str, Any] | list[Any]) -> str:
    """``data`` as one line of JSON (values JSON cannot hold as strings)."""
    return json.dumps(data, default=str, separators=(", ", ": "))


def finish(
    what: str, facts: list[str], data: Any, as_json: bool, seconds: float | None = None
) -> None:
    """End a command (or one step of it): its step line on stderr, taking ``seconds`` (default:
    since the command started); with ``as_json`` its result as one JSON object on stdout."""
    say(step_line(what, facts, elapsed() if seconds is None else seconds))
    if as_json:
        print(json_line(data), flush=True)


# ----------------------------------------------------------------------------- progress


class Ticker:
    """Progress of ``label`` toward ``total`` (None: unknown until :meth:`update` says)."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total, 0

    def advance(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.update(self.done + n)

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` items of ``total`` (a :data:`~mammoflow.models.features.BatchProgress`)."""
        self.done = done
        if total is not None:
            self.total = total
        self._show()

    def _show(self) -> None:
        """Nothing: progress is off."""


class _Lines(Ticker):
    """Plain lines for a log: at most one every ``every_s`` seconds, none for a short job."""

    def __init__(self, label: str, total: int | None, every_s: float) -> None:
        super().__init__(label, total)
        self.every_s = every_s
        self.t0 = self.last = time.monotonic()

    def _show(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        say(progress_line(self.label, self.done, self.total, now - self.t0))


class _Bar(Ticker):
    """A rich bar in a terminal."""

    def __init__(self, label: str, total: int | None, bar: Any) -> None:
        super().__init__(label, total)
        self.bar, self.task = bar, bar.add_task(label, total=total)

    def _show(self) -> None:
        self.bar.update(self.task, completed=self.done, total=self.total)


def progress_line(label: str, done: int, total: int | None, seconds: float) -> str:
    """``label: 120/322 (37%), 2m10s, about 3m40s left`` (what a log shows of a long job)."""
    if not total:
        return f"{label}: {done} done, {duration(seconds)}"
    left = seconds / done * (total - done) if done else None
    eta = f", about {duration(left)} left" if left is not None else ""
    return f"{label}: {done}/{total} ({done / total:.0%}), {duration(seconds)}{eta}"


def every_s() -> float:
    """Seconds between progress lines in a log: ``$MAMMOFLOW_PROGRESS_S``, else 30."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{EVERY_ENV}={raw!r}: expected seconds between progress lines, e.g. 30")
    return value


@contextlib.contextmanager
def progress(
    label: str, total: int | None = None, *, enabled: bool = True, every: float | None = None
) -> Iterator[Ticker]:
    """Progress of a long job: a rich bar in a terminal, in a log a plain line at most every
    ``every`` seconds (default :func:`every_s`).

    Advance it with ``ticker.advance(n)`` or ``ticker.update(done, total)``. Disabled, it shows
    nothing.
    """
    if not enabled:
        yield Ticker(label, total)
        return
    if not err.is_terminal:
        yield _Lines(label, total, every_s() if every is None else every)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
    times = (TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, *times, console=err, transient=True) as bar:
        yield _Bar(label, total, bar)


@contextlib.contextmanager
def heartbeat(label: str, every: float | None = None) -> Iterator[None]:
    """``label: still running (2m30s)`` whenever nothing was said for ``every`` seconds (default
    :func:`every_s`), so a log shows a long step alive through phases that report no progress
    of their own (the test model, the bootstrap, the MLflow model upload)."""
    interval = every_s() if every is None else every
    stop = threading.Event()
    t0 = _said[0] = time.monotonic()

    def beat() -> None:
        while not stop.wait(min(interval, 1.0)):
            now = time.monotonic()
            if now - _said[0] >= interval:
                say(f"{label}: still running ({duration(now - t0)})")

    thread = threading.Thread(target=beat, name="mammoflow-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------- the entry


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler or `kill` stopping us)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM raises :class:`Stopped`, so ``finally`` blocks and MLflow's run guards run (open
    runs end FAILED, not RUNNING). Returns the function that puts the old handler back; a no-op
    outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_stopped)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def exit_code(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and label of an expected error: 2 bad input or params, 75 (EX_TEMPFAIL)
    transient I/O a scheduler may retry, 1 any other I/O or a failed DVC stage, 128 + signal
    when stopped; ``None`` for an unexpected error (its traceback should show)."""
    from mammoflow.dvc_runner import DvcError

    if isinstance(exc, KeyboardInterrupt):
        return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT), "stopped"
    if is_transient(exc):  # before ValueError: tracking.TrackingUnreachable is one, for old callers
        return EX_TEMPFAIL, "transient error (worth a retry)"
    if isinstance(exc, ValueError | FileNotFoundError):  # ConfigError is a ValueError
        return 2, "error"
    if isinstance(exc, DvcError):  # a stage run through DVC failed: its own lines say why
        return 1, "error"
    if isinstance(exc, OSError):
        return 1, "I/O error"
    return None


def entry(func: Callable[P, R]) -> Callable[P, R]:
    """Run a command: SIGTERM handled as above, its start time kept for its step line, and an
    expected error printed as one readable message with its exit code instead of a traceback."""
    import typer

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _started[0] = time.monotonic()
        restore = interrupt_on_sigterm()
        try:
            return func(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:
            mapped = exit_code(exc)
            if mapped is None:
                raise
            code, label = mapped
            err.print(f"[bold red]{label}:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=code) from None
        finally:
            restore()

    return wrapper
