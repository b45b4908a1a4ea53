"""DVC as the executor of record: run one pipeline stage, push, status — through DVC's CLI.

Whatever starts a stage (a person, `mammoflow study`, a Prefect flow), it runs as
``dvc repro --single-item <stage>``, so dvc.lock is updated, outputs enter the DVC cache and an
unchanged stage is skipped exactly as under a plain ``dvc repro``. DVC's Python ``Repo`` API is
not a public contract (its maintainers point to the CLI), so this module only runs the ``dvc``
command and reads what it prints; it is the one place that knows those messages.

One workspace runs one DVC command at a time. DVC's ``--wait-for-lock`` (DVC ≥ 3.61) waits for
its repo lock, but `dvc repro` lets go of that lock while a stage's command runs and guards the
stage's outputs with a read/write lock that fails at once ("is busy") — so two flow runs on one
checkout would still collide. Every command here that writes (repro, exp run, push, checkout)
therefore first takes an exclusive ``flock`` on ``.dvc/tmp/mammoflow.lock``: a second flow run
waits for the first, whatever started it (tested with two concurrent flows).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mammoflow.errors import EX_TEMPFAIL

# What DVC prints (dvc/stage/run.py, dvc/stage/__init__.py, dvc/stage/cache.py,
# dvc/stage/exceptions.py, dvc/utils/humanize.py); tests/unit/test_dvc_runner.py pins them.
_RAN = re.compile(r"^Running stage '(?P<stage>[^']+)'")
_SKIPPED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '(?P<stage>[^']+)' is cached - skipping run")
_FAILED_CMD = re.compile(r"failed to run: .*, exited with (?P<code>-?\d+)")
_PUSHED = re.compile(r"(?P<n>\d+) files? pushed")

# DVC's bookkeeping between a study's stages, which the stages' own step lines make redundant:
# the command echo, lock-file updates, "Running stage" headers, hash-info warnings about outputs
# an experiment has not made yet.
_BOOKKEEPING = re.compile(
    r"^(> |Running stage '|Updating lock file '|Generating lock file '"
    r"|WARNING: No file hash info found for )"
)

LineSink = Callable[[str], None]


class DvcError(RuntimeError):
    """A DVC command failed; the message carries DVC's own last lines."""

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TransientStageError(OSError):
    """A stage's command failed on a transient I/O error (exit 75): worth a retry."""


@dataclass(frozen=True)
class StageRun:
    """What DVC did with one stage: ``ran`` (its command ran), ``restored`` (from the run
    cache) or ``skipped`` (nothing changed)."""

    stage: str
    outcome: str
    seconds: float
    lines: tuple[str, ...] = field(repr=False, default=())

    @property
    def changed(self) -> bool:
        """Whether the stage's outputs may have changed (it ran or was restored)."""
        return self.outcome != "skipped"


@dataclass(frozen=True)
class PushResult:
    """What `dvc push --run-cache` sent to ``remote`` (its ``url``)."""

    remote: str
    url: str
    pushed: int
    message: str


def dvc_command() -> list[str]:
    """The ``dvc`` of this interpreter's environment (the project's .venv), else on PATH, else
    ``python -m dvc`` (DVC is a dependency, so the module is always there)."""
    beside = Path(sys.executable).with_name("dvc")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def _run(
    args: Sequence[str],
    root: Path,
    *,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    own_group: bool = False,
) -> tuple[int, list[str]]:
    """Run ``dvc --wait-for-lock ARGS`` in ``root``; stream and return its output lines.

    With ``own_group`` DVC runs in its own process group, and an interrupt of ours (SIGTERM
    turned into KeyboardInterrupt by the entry wrapper, or Ctrl-C) stops DVC and the stage it
    runs (SIGTERM, then SIGKILL after a grace period) instead of waiting for them to finish.
    """
    cmd = [*dvc_command(), "--wait-for-lock", *args]
    full_env = {**os.environ, **(env or {})}
    # the stages' `bin/mammoflow` finds this environment's CLI first, as under `make`
    here = str(Path(sys.executable).parent)
    full_env["PATH"] = os.pathsep.join([here, full_env.get("PATH", "")])
    full_env["COLUMNS"] = "100000"  # DVC's console wraps long lines (a remote's URL) otherwise
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=root,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=own_group,
    ) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                lines.append(line)
                if on_line is not None and line.strip():
                    on_line(line)
        except BaseException:
            if own_group:
                from mammoflow.procs import stop_group

                stop_group(proc)
            raise
    return proc.returncode, lines


@contextlib.contextmanager
def workspace_lock(root: Path, on_line: LineSink | None = None) -> Iterator[None]:
    """Hold the checkout's exclusive MammoFlow lock (``.dvc/tmp/mammoflow.lock``), waiting for
    another process that holds it; released when the block ends (or the process dies)."""
    path = root / ".dvc" / "tmp" / "mammoflow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_line is not None:
                on_line(f"waiting for another DVC command in {root} to finish ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_project(root: Path) -> None:
    """Refuse a folder that is not a DVC pipeline project, naming what is missing."""
    missing = [name for name in ("dvc.yaml", ".dvc") if not (root / name).exists()]
    if missing:
        raise DvcError(
            f"{root.resolve()}: not a MammoFlow project ({', '.join(missing)} missing); the "
            "pipeline runs through DVC, so run it from the project checkout (its params.yaml)"
        )


def stage_list(root: Path) -> list[str]:
    """Every stage DVC sees in ``root``'s dvc.yaml (foreach/matrix expanded)."""
    code, lines = _run(["stage", "list", "--name-only"], root)
    if code != 0:
        raise DvcError(_failure("dvc stage list", lines), exit_code=code)
    return [line.strip() for line in lines if line.strip()]


def repro(
    root: Path,
    stage: str,
    *,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
) -> StageRun:
    """Run one stage through DVC (``dvc repro --single-item``); its upstream is the caller's.

    Raises:
        TransientStageError: the stage's command exited with 75 (a transient I/O error).
        DvcError: any other failure, with DVC's message.
    """
    start = time.monotonic()
    with workspace_lock(root, on_line):
        code, lines = _run(["repro", "--single-item", stage], root, env=env, on_line=on_line)
    seconds = time.monotonic() - start
    if code != 0:
        message = _failure(f"stage {stage}", lines)
        status = command_exit_code(lines)
        if status == EX_TEMPFAIL:
            raise TransientStageError(message)
        raise DvcError(message, exit_code=status)
    return StageRun(stage, outcome(stage, lines), seconds, tuple(lines))


def narrate(line: str) -> str | None:
    """What a person watching a stage run needs of one line DVC printed: the stages' own
    lines and DVC's errors as they are, a skipped or restored stage said once, DVC's
    bookkeeping dropped (``None``)."""
    if _BOOKKEEPING.match(line):
        return None
    if match := _SKIPPED.match(line):
        return f"{match['stage']}: unchanged, skipped"
    if match := _RESTORED.match(line):
        return f"{match['stage']}: restored from the run cache"
    return line


def outcome(stage: str, lines: Sequence[str]) -> str:
    """``ran`` | ``restored`` | ``skipped``, from what `dvc repro` printed about ``stage``."""
    for pattern, name in ((_RAN, "ran"), (_RESTORED, "restored"), (_SKIPPED, "skipped")):
        if any((m := pattern.match(line)) and m["stage"] == stage for line in lines):
            return name
    raise DvcError(f"dvc repro printed nothing about stage {stage!r}:\n" + "\n".join(lines[-20:]))


def command_exit_code(lines: Sequence[str]) -> int | None:
    """The exit code of the stage command that failed, as DVC reports it."""
    for line in reversed(lines):
        if match := _FAILED_CMD.search(line):
            return int(match["code"])
    return None


def _failure(what: str, lines: Sequence[str]) -> str:
    """The failure's own lines: the command's errors and DVC's ERROR line, not its banner."""
    kept = [
        line
        for line in lines
        if line.strip() and not line.startswith(("Having any troubles?", "Use `dvc push`"))
    ]
    return f"{what} failed:\n" + "\n".join(kept[-15:])


def default_remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the project's default DVC remote, or None when none is set."""
    code, lines = _run(["remote", "default"], root)
    name = lines[-1].strip() if code == 0 and lines else ""
    if not name or name.startswith("No default remote"):
        return None
    code, lines = _run(["remote", "list"], root)
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return name, _absolute(root, parts[1])
    raise DvcError(f"default DVC remote {name!r} has no url in `dvc remote list`: {lines}")


def _absolute(root: Path, url: str) -> str:
    """A local remote's path as DVC resolves it (relative to .dvc/, where config lives)."""
    if "://" in url or Path(url).is_absolute():
        return url
    return str((root / ".dvc" / url).resolve())


def push(root: Path, *, on_line: LineSink | None = None) -> PushResult:
    """Push the data and the run cache to the default remote; what was sent."""
    remote = default_remote(root)
    if remote is None:
        raise DvcError(
            f"{root.resolve()}: no default DVC remote, so the data this run used is kept in the "
            "local cache only; set one with `dvc remote add -d NAME URL`"
        )
    with workspace_lock(root, on_line):
        code, lines = _run(["push", "--run-cache"], root, on_line=on_line)
    if code != 0:
        raise DvcError(_failure(f"dvc push to {remote[0]} ({remote[1]})", lines), exit_code=code)
    pushed = sum(int(m["n"]) for line in lines if (m := _PUSHED.search(line)))
    message = next((line for line in reversed(lines) if line.strip()), "")
    return PushResult(remote[0], remote[1], pushed, message)


def changed_stages(root: Path, targets: Sequence[str] = ()) -> dict[str, list[object]]:
    """`dvc status --json [TARGETS]`: each stage whose deps, outs, params or command changed
    (all dvc.yaml files of the project, or ``targets`` and their upstream)."""
    import json

    code, lines = _run(["status", "--json", *targets], root)
    if code != 0:
        raise DvcError(_failure("dvc status", lines), exit_code=code)
    text = "\n".join(lines)
    start = text.find("{")
    return dict(json.loads(text[start:])) if start >= 0 else {}


def override(key: str, value: object) -> str:
    """``++KEY=VALUE`` for `dvc exp run -S` (Hydra's grammar: add the key or replace it)."""
    return f"++{key}={_hydra_value(value)}"


def _hydra_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def exp_run(
    root: Path,
    overrides: Sequence[str],
    targets: Sequence[str] = (),
    *,
    on_line: LineSink | None = None,
) -> str:
    """`dvc exp run -S …` in the workspace, which then keeps its params.yaml and dvc.lock.

    The experiment (its params, dvc.lock and metrics) is committed to DVC's experiment history
    (`dvc exp show`); afterwards params.yaml and dvc.lock are put back as they were, and the
    outputs the experiment's checkout removed are checked out again from the cache, so the
    workspace's own pipeline stays as it was. Returns the experiment's name.
    """
    args = ["exp", "run", *(a for o in overrides for a in ("-S", o)), *targets]
    with workspace_lock(root, on_line):  # read what to put back once no other run can change it
        kept = {
            name: (root / name).read_bytes()
            for name in ("params.yaml", "dvc.lock")
            if (root / name).is_file()
        }
        try:
            code, lines = _run(args, root, on_line=on_line, own_group=True)
        finally:
            _restore(root, kept)
    if code != 0:
        raise DvcError(_failure("dvc exp run", lines), exit_code=command_exit_code(lines))
    for line in reversed(lines):
        if line.startswith("Ran experiment(s):"):
            return line.split(":", 1)[1].strip()
    raise DvcError("dvc exp run printed no experiment name:\n" + "\n".join(lines[-10:]))


def _restore(root: Path, kept: Mapping[str, bytes]) -> None:
    """Put ``kept`` files back (atomically), then check out the restored dvc.lock's stages.

    Checkout is given the stage names: a bare `dvc checkout` also deletes the outputs DVC once
    linked but the lock no longer names (the study's own data and metrics).
    """
    import yaml

    from mammoflow.files import atomic_write_bytes

    for name, data in kept.items():
        atomic_write_bytes(root / name, data)
    if "dvc.lock" in kept:
        stages = list((yaml.safe_load(kept["dvc.lock"]) or {}).get("stages") or {})
        if stages:
            _run(["checkout", "--quiet", *stages], root)
