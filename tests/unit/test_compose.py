"""infra/docker-compose.yml and its env file: MLflow authentication on unless opted out.

No Docker here: the compose file is read as YAML (merge keys resolved, as compose does), the
mlflow service's start script runs under /bin/sh with `mlflow` on PATH replaced by a script
that prints its arguments, and infra/.env is generated from infra/.env.example.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra.local import stack as stack_mod

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _mlflow_start(tmp_path: Path, env: dict[str, str]) -> tuple[list[str], str, Path]:
    """Run the mlflow service's command as its container would (compose's ``$$`` → ``$``):
    ``(mlflow's arguments, stderr, the auth ini it wrote)``."""
    service = _compose()["services"]["mlflow"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    ini = tmp_path / "mlflow-basic-auth.ini"
    script = (
        service["command"][0].replace("$$", "$").replace("/tmp/mlflow-basic-auth.ini", str(ini))
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    printer = bin_dir / "mlflow"
    printer.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n', encoding="utf-8")
    printer.chmod(0o755)
    proc = subprocess.run(
        ["/bin/sh", "-c", script],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "MLFLOW_AUTH_DATABASE_URI": "postgresql://x",
            **env,
        },
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.splitlines(), proc.stderr, ini


def test_compose_mlflow_has_auth_on_by_default(tmp_path: Path) -> None:
    compose = _compose()
    env = compose["services"]["mlflow"]["environment"]
    assert env["MLFLOW_AUTH"] == "${MLFLOW_AUTH:-true}"
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key].startswith(f"${{{key}:?"), env[key]  # compose refuses to start without
    argv, err, ini = _mlflow_start(tmp_path, {"MLFLOW_AUTH": "true"})
    assert argv[-2:] == ["--app-name", "basic-auth"] and argv[0] == "server", argv
    assert "WARNING" not in err
    assert "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" in (
        ini.read_text(encoding="utf-8")
    )
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600  # it holds the auth database's password
    # every container that tracks (Prefect and Dask workers, ...) is an authenticated client
    clients = {
        name: service["environment"]
        for name, service in compose["services"].items()
        if "MLFLOW_TRACKING_URI" in (service.get("environment") or {})
    }
    assert {"prefect-worker", "dask-worker"} <= set(clients)
    for name, client_env in clients.items():
        assert client_env["MLFLOW_TRACKING_USERNAME"] == "admin", name
        password = client_env["MLFLOW_TRACKING_PASSWORD"]
        assert password.startswith("${MLFLOW_AUTH_ADMIN_PASSWORD:?"), name


def test_compose_mlflow_opt_out_is_explicit_and_loud(tmp_path: Path) -> None:
    argv, err, _ = _mlflow_start(tmp_path, {"MLFLOW_AUTH": "false"})
    assert "--app-name" not in argv and "basic-auth" not in argv, argv
    assert "WARNING: MLflow runs WITHOUT authentication (MLFLOW_AUTH=false)" in err


def test_compose_env_is_generated_private_and_kept(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    assert stack_mod.main(["compose-env", "--out", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "change-me" not in re.sub(r"(?m)^#.*$", "", text)
    shell = subprocess.run(
        ["/bin/sh", "-c", f'set -a; . "{target}"; set +a; env'],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        check=True,
    )
    values = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    assert values["MLFLOW_AUTH"] == "true"
    assert len(values["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12  # MLflow's minimum
    assert values["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert values["MLFLOW_TRACKING_PASSWORD"] == values["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert values["PREFECT_API_AUTH_STRING"].startswith("mammoflow:")
    # a second run keeps the credentials the stack was started with
    assert stack_mod.main(["compose-env", "--out", str(target)]) == 1
    assert target.read_text(encoding="utf-8") == text
    assert stack_mod.main(["compose-env", "--out", str(target), "--force"]) == 0
    assert target.read_text(encoding="utf-8") != text


def test_compose_env_refuses_a_change_me_it_cannot_fill() -> None:
    with pytest.raises(stack_mod.StackError, match="NEW_SECRET=change-me: no generator"):
        stack_mod.compose_env("NEW_SECRET=change-me\n")
