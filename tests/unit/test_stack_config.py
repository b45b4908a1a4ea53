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
    assert parsed["postgres"].killasgroup is True  # SIGINT to the postmaster, SIGKILL to all
    assert parsed["postgres"].stopasgroup is False
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


def test_mlflow_auth_is_on_by_default_with_an_opt_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No one in by default: basic-auth on, credentials in stack.env; `--no-mlflow-auth` opts out."""
    monkeypatch.delenv("MAMMOFLOW_STACK_MLFLOW_AUTH", raising=False)
    monkeypatch.setenv("MAMMOFLOW_STACK_PG_OS_USER", pwd.getpwuid(os.geteuid()).pw_name)
    config = stack_mod.StackConfig.load(tmp_path / "state")
    assert config.mlflow_auth
    stack = stack_mod.Stack(config, echo=None)
    env = stack.env()
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert env["MLFLOW_TRACKING_PASSWORD"] == stack.secrets()["mlflow_admin_password"]
    program = stack.programs()["mlflow"]
    assert program.argv[-2:] == ("--app-name", "basic-auth")
    assert "MLFLOW_AUTH_CONFIG_PATH" in program.env
    opted_out = stack_mod.StackConfig.load(tmp_path / "state", mlflow_auth=False)
    assert not opted_out.mlflow_auth
    assert "MLFLOW_TRACKING_PASSWORD" not in stack_mod.Stack(opted_out, echo=None).env()
    parser_seen: dict[str, object] = {}
    monkeypatch.setattr(
        stack_mod.StackConfig,
        "load",
        classmethod(lambda cls, state_dir=None, **o: parser_seen.update(o) or config),
    )
    monkeypatch.setattr(stack_mod.Stack, "up", lambda self: {})
    assert stack_mod.main(["--state-dir", str(tmp_path / "state"), "up", "--no-mlflow-auth"]) == 0
    assert parser_seen["mlflow_auth"] is False
