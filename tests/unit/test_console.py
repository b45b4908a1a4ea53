"""What the commands say: step lines, progress in a log, the one entry wrapper (exit codes,
SIGTERM). CliRunner's streams are not a TTY, as in a log or under DVC."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mammoflow import console
from mammoflow.cli import app
from tests.helpers import scratch_params

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project with the sample at 64 px (acquire → split take seconds)."""
    scratch_params(
        tmp_path,
        sample={"mias_patients": 16, "cmmd_patients": 6, "size": 64},
        convert={"size": 64, "workers": 1},
        split={"k_folds": 2},
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow  # ~10 s: four data stages of the small sample
def test_stage_commands_print_one_step_line_and_json_only_when_asked(project: Path) -> None:
    for args, line in (
        (["acquire", "sample_mias"], "acquire sample_mias: 33 files in data/raw/sample_mias ("),
        (["ingest", "dataset", "sample_mias"], "ingest sample_mias: 32 images of 16 patients ("),
        (["convert", "sample_mias"], "convert sample_mias: 32 images converted, 0 unchanged ("),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.stdout == ""  # no JSON dump: the result is the step line, on stderr
        (said,) = result.stderr.splitlines()
        assert said.startswith(line) and said.endswith(" s)"), said
    result = runner.invoke(app, ["split", "sample_mias", "--json"])
    assert result.exit_code == 0, result.output
    last = result.stdout.splitlines()[-1]
    assert result.stdout.strip() == last  # one line of JSON, nothing else on stdout
    assert json.loads(last)["dataset"] == "sample_mias"
    assert result.stderr.startswith("split sample_mias: fold1 ")


def test_progress_in_a_log_is_a_line_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with console.progress("features", 4, every=3600) as bar:  # a short job says nothing
        bar.advance(4)
    assert capsys.readouterr().err == ""
    with console.progress("features", every=0) as bar:
        bar.update(1, 4)
        bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["features: 1/4 (25%)", "features: 2/4 (50%)"]
    assert "left" in lines[0]
    with console.progress("off", 4, enabled=False) as bar:
        bar.advance(4)
    assert capsys.readouterr().err == ""


def test_progress_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(console.EVERY_ENV, "5")
    assert console.every_s() == 5.0
    monkeypatch.setenv(console.EVERY_ENV, "soon")
    with pytest.raises(ValueError, match="MAMMOFLOW_PROGRESS_S='soon': expected seconds"):
        console.every_s()


def test_heartbeat_only_when_nothing_else_was_said(capsys: pytest.CaptureFixture[str]) -> None:
    with console.heartbeat("train x", every=0.2):
        time.sleep(0.7)
    beats = capsys.readouterr().err.splitlines()
    assert beats and all(b.startswith("train x: still running (") for b in beats), beats
    with console.heartbeat("train x", every=0.5):
        for _ in range(6):
            console.say("epoch")
            time.sleep(0.1)
    assert "still running" not in capsys.readouterr().err


def _app(failure: BaseException | None, cleaned: list[str]) -> typer.Typer:
    tiny = typer.Typer()

    @tiny.command()
    @console.entry
    def work(sigterm: bool = False) -> None:
        try:
            if sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this
            if failure is not None:
                raise failure
        finally:
            cleaned.append("finally")  # where MLflow's run guard marks a run FAILED

    return tiny


@pytest.mark.parametrize(
    ("failure", "code", "label"),
    [
        (FileNotFoundError("data/raw/x: raw data missing; run acquire first"), 2, "error"),
        (ValueError("unknown dataset 'x'"), 2, "error"),
        (OSError(errno.ESTALE, "Stale file handle"), 75, "transient error"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "I/O error"),
    ],
)
def test_entry_maps_errors_to_exit_codes(failure: BaseException, code: int, label: str) -> None:
    cleaned: list[str] = []
    result = runner.invoke(_app(failure, cleaned), [])
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(f"{label}") and str(failure) in result.stderr
    assert "Traceback" not in result.output and cleaned == ["finally"]


def test_entry_turns_sigterm_into_a_clean_stop() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned: list[str] = []
    started = time.monotonic()
    result = runner.invoke(_app(None, cleaned), ["--sigterm"])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert time.monotonic() - started < 4 and cleaned == ["finally"]
    assert "stopped: signal 15" in result.stderr
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the command


def test_an_unexpected_error_keeps_its_traceback() -> None:
    result = runner.invoke(_app(KeyError("bug"), []), [])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_training_commands_take_the_study_options(project: Path) -> None:
    """train, tune and audit take --set / --weights like study, as the dataset's own keys."""
    from mammoflow.cli import _options_config
    from mammoflow.config import load_config

    params = project / "params.yaml"
    assert _options_config(params, "sample_mias", None, None) == load_config(params)
    cfg = _options_config(params, "sample_mias", "imagenet", ["train.epochs=1", "split.k_folds=2"])
    own = cfg.for_dataset("sample_mias")
    assert (own.model.weights, own.model.input_size, own.train.epochs) == ("imagenet", 80, 1)
    assert cfg.split.k_folds == 2 and cfg.for_dataset("mias").train.epochs != 1
    for command in (["train"], ["tune", "--backbone", "vgg16"], ["audit"]):
        result = runner.invoke(
            app, [*command, "--dataset", "sample_mias", "--set", "train.epochs=0"]
        )
        assert result.exit_code == 2, result.output
        assert "'datasets.sample_mias.train.epochs': bad value 0" in result.output
