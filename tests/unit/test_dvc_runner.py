"""mammoflow.dvc_runner against a real DVC in a tiny scratch repo (no TensorFlow): what it
reads from DVC's output — ran, skipped, restored, a command's exit code — and the retry rule."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from mammoflow import dvc_runner
from mammoflow.errors import EX_TEMPFAIL, is_transient

DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC repo with a two-stage pipeline whose first command is a shell script."""
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "step.sh").write_text('#!/bin/sh\nexit "${STEP_EXIT:-0}"\n')
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  first:\n"
        "    cmd: sh step.sh && cp in.txt mid.txt\n"
        "    deps: [in.txt, step.sh]\n"
        "    outs: [mid.txt]\n"
        "  second:\n"
        "    cmd: cp mid.txt out.txt\n"
        "    deps: [mid.txt]\n"
        "    outs: [out.txt]\n"
    )
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    return tmp_path


def test_ran_then_skipped_then_restored_from_the_run_cache(repo: Path) -> None:
    assert dvc_runner.repro(repo, "first").outcome == "ran"
    assert dvc_runner.repro(repo, "second").outcome == "ran"
    assert dvc_runner.repro(repo, "first").outcome == "skipped"
    (repo / "mid.txt").unlink()
    (repo / "dvc.lock").unlink()
    assert dvc_runner.repro(repo, "first").outcome == "restored"  # same deps: from the run cache
    assert (repo / "mid.txt").read_text() == "a\n"
    assert dvc_runner.changed_stages(repo, ["first"]) == {}
    assert dvc_runner.stage_list(repo) == ["first", "second"]


def test_a_command_exiting_75_is_transient_others_are_not(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEP_EXIT", str(EX_TEMPFAIL))
    with pytest.raises(dvc_runner.TransientStageError, match="exited with 75") as transient:
        dvc_runner.repro(repo, "first")
    assert is_transient(transient.value)
    monkeypatch.setenv("STEP_EXIT", "2")
    with pytest.raises(dvc_runner.DvcError, match="stage first failed") as bad:
        dvc_runner.repro(repo, "first")
    assert bad.value.exit_code == 2 and not is_transient(bad.value)


def test_push_needs_a_default_remote_and_counts_what_it_sent(repo: Path, tmp_path: Path) -> None:
    dvc_runner.repro(repo, "first")
    with pytest.raises(dvc_runner.DvcError, match="no default DVC remote"):
        dvc_runner.push(repo)
    store = tmp_path / "remote-store"
    subprocess.run([DVC, "remote", "add", "-d", "r", str(store)], cwd=repo, check=True)
    first = dvc_runner.push(repo)
    assert (first.remote, first.url) == ("r", str(store))
    assert first.pushed >= 1
    md5 = hashlib.md5(b"a\n").hexdigest()  # mid.txt's content, now fetchable from the remote
    assert (store / "files" / "md5" / md5[:2] / md5[2:]).read_bytes() == b"a\n"


def test_check_project_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(dvc_runner.DvcError, match=r"dvc\.yaml, \.dvc missing"):
        dvc_runner.check_project(tmp_path)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.ESTALE, "stale file handle"), True),
        (OSError(errno.EIO, "input/output error"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("timed out"), True),
        (requests.ConnectionError("tracking server down"), True),
        (FileNotFoundError(errno.ENOENT, "metrics/site/vgg19.json"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (OSError(errno.ENOSPC, "no space left on device"), False),
        (ValueError("bad params"), False),
    ],
)
def test_only_transient_io_is_worth_a_retry(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_narrate_keeps_the_stages_lines_and_drops_dvc_bookkeeping() -> None:
    """What `mammoflow study` shows of its DVC run: the stages' own step lines and errors."""
    from mammoflow.dvc_runner import narrate

    for line in (
        "Running stage 'convert@mias':",
        "> bin/mammoflow convert mias",
        "Updating lock file 'dvc.lock'",
        "Generating lock file 'dvc.lock'",
        "WARNING: No file hash info found for '/p/data/raw/mias'. It won't be created.",
    ):
        assert narrate(line) is None, line
    kept = "convert mias: 322 images converted, 0 unchanged (1m02s)"
    assert narrate(kept) == kept
    assert narrate("ERROR: failed to reproduce 'train@mias-vgg16'") is not None
    assert narrate("Stage 'split@mias' didn't change, skipping") == "split@mias: unchanged, skipped"
    restored = "Stage 'split@mias' is cached - skipping run, checking out outputs"
    assert narrate(restored) == "split@mias: restored from the run cache"
