"""The team stack's supervisord config, read back by supervisor's own parser (no server runs)."""

from __future__ import annotations

import os
import pwd
import shlex
from pathlib import Path
from typing import Any

import pytest
from infra.local import stack as stack_mod
from supervisor.options import ServerOptions


def _parsed(conf: Path) -> dict[str, Any]:
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return {pc.name: pc for group in options.process_group_configs for pc in group.process_configs}


def test_programs_round_trip_through_supervisors_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as root, PostgreSQL's OS user: this user, so that no system user is created here
    monkeypatch.setenv("MAMMOFLOW_STACK_PG_OS_USER", pwd.getpwuid(os.geteuid()).pw_name)
    state = tmp_path / "state dir"  # a space: every path must survive quoting
    stack = stack_mod.Stack(stack_mod.free_port_config(state, stop_timeout_s=7), echo=None)
    stack._prepare_state()
    programs = stack.programs()
    weird = programs["mlflow"]
    programs["mlflow"] = stack_mod.Program(  # a value with % and spaces, as a password may be
        (*weird.argv, "--gunicorn-opts", "--log-level info"),
        weird.directory,
        env={**weird.env, "MLFLOW_TRACKING_PASSWORD": "50% off, a=b"},
    )
    stack.programs = lambda: programs
    parsed = _parsed(stack._write_supervisord_conf())

    assert sorted(parsed) == sorted(stack_mod.SERVICES)
    for name, program in programs.items():
        config = parsed[name]
        assert shlex.split(config.command) == list(program.argv)
        assert (config.environment or {}) == dict(program.env)
        assert config.directory == str(program.directory)
        assert config.stdout_logfile == str(stack.log_file(name))
        assert config.autostart is False and config.stopwaitsecs == 7
    # servers stop before the stores they write to; PostgreSQL gets its fast-shutdown signal
    assert parsed["mlflow"].priority > parsed["postgres"].priority
    assert parsed["postgres"].stopsignal == 2
    assert parsed["prefect"].killasgroup is True
    # credentials in the services' environment: the config is the owner's only
    assert (state / "supervisord.conf").stat().st_mode & 0o077 == 0


def test_unusable_state_dirs_are_refused(tmp_path: Path) -> None:
    percent = stack_mod.Stack(stack_mod.StackConfig(state_dir=tmp_path / "a%b"), echo=None)
    with pytest.raises(stack_mod.StackError, match=r"contains '%'.*--state-dir"):
        percent._write_supervisord_conf()
    deep = stack_mod.Stack(stack_mod.StackConfig(state_dir=tmp_path / ("d" * 120)), echo=None)
    with pytest.raises(stack_mod.StackError, match="too deep for supervisord's unix socket"):
        deep._write_supervisord_conf()
    with pytest.raises(stack_mod.StackError, match="newlines and quotes are refused"):
        stack_mod.Program(("x",), tmp_path, env={"A": 'say "hi"'}).section("x", tmp_path, 5)
