"""The served model under load: a bounded closed-loop benchmark of `mammoflow serve` on 127.0.0.1.

With no argument it starts ``mammoflow serve --dataset sample_mias`` (the champion in this
project's ``mlflow.db``; ``--tracking`` names another store, ``--model`` another model), waits
for ``/ping``, and POSTs real payloads to ``/invocations`` from 1, 4 and 16 concurrent clients,
``--seconds`` each: a converted sample PNG (the convert stage's 512 px canvas) and a DICOM of a
sample film (12-bit MONOCHROME2, the sample's own DICOM writer), alternately. Each client sends
its next request when the previous answer arrives (closed loop), so the load is bounded; a
level stops by itself after ``--seconds`` (requests in flight finish and count). The server is
stopped at the end — also on Ctrl-C or SIGTERM — and the port is checked free.

Figures per level: requests/s, p50/p95/p99 latency (ms, successful requests), errors (non-200
answers, answers without predictions, connection errors). The server's RSS is the sum over its
process tree (the wrapper, ``mlflow models serve``, uvicorn and its workers), after warm-up and
at the end. The last line printed is one JSON object.

Usage: ``.venv/bin/python benchmarks/bench_serving.py [--seconds 30] [--model URI] [--port P]
[--tracking URI] [--workers N] [--format file|tensor] [--clients 1,4,16]``
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from machine import cpu_model, simd

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TARGET_P50_MS = 150.0  # at 1 client, on 2 cores, the sample model
TARGET_SCALING = 1.5  # requests/s at 4 clients over 1 client
#: RSS growth allowed between warm-up and the end: 10% of the warm server, at least 150 MB (each
#: uvicorn worker's thread pool grows to 6 threads at 16 clients, each with its malloc arena).
RSS_BOUND_FRACTION, RSS_BOUND_MIN_MB = 0.10, 150.0
REQUEST_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- payloads


def payloads(fmt: str, dataset: str, work: Path) -> dict[str, bytes]:
    """``{"png": body, "dicom": body}``: one converted sample PNG and one DICOM of a film.

    The films come from ``mammoflow sample`` with params.yaml's seed and size; the PNG is what
    the convert stage writes for the first film, the DICOM wraps the second film's pixels.
    """
    from mammoflow.config import load_config
    from mammoflow.data.convert import encode_png, prepare_image
    from mammoflow.data.readers import load_raw
    from mammoflow.data.sample import make_sample
    from mammoflow.serving.predict import request_body
    from mammoflow.serving.serve import file_body

    cfg = load_config(ROOT / "params.yaml").for_dataset(dataset)
    s = cfg.sample
    films = sorted(make_sample(work / "sample", s.seed, 2, 2, s.size).mias_dir.glob("*.pgm"))
    conv = cfg.convert
    png = work / "film.png"
    png.write_bytes(
        encode_png(
            prepare_image(load_raw(films[0]), conv.size, conv.bit_depth, conv.crop_to_breast)
        )
    )
    dcm = work / "film.dcm"
    dcm.write_bytes(dicom_of(films[1]))
    files = {"png": png, "dicom": dcm}
    if fmt == "tensor":
        return {k: json.dumps(request_body([p], cfg, dataset)).encode() for k, p in files.items()}
    return {k: json.dumps(file_body([p])).encode() for k, p in files.items()}


def dicom_of(film: Path) -> bytes:
    """A sample film as the sample's DICOM writer stores it (12-bit MONOCHROME2, MG)."""
    from pydicom.uid import generate_uid

    from mammoflow.data.readers import load_raw
    from mammoflow.data.sample import mammogram_dicom

    return mammogram_dicom(
        seed=1,
        image=load_raw(film),
        encoding=0,
        special=0,
        patient="BENCH-0001",
        side="L",
        view="CC",
        number=1,
        study_uid=generate_uid(entropy_srcs=["bench-serving", "study"]),
        series_uid=generate_uid(entropy_srcs=["bench-serving", "series"]),
    )


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts connections on ``port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def start_server(args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    """``mammoflow serve`` in its own session, output to ``log``."""
    cmd = [sys.executable, "-m", "mammoflow", "serve", "--dataset", args.dataset]
    cmd += ["--port", str(args.port), "--format", args.format, "--workers", str(args.workers)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ)
    if args.tracking:
        env["MLFLOW_TRACKING_URI"] = args.tracking
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> float:
    """Seconds until ``/ping`` answers 200; SystemExit with the log's tail if the server dies."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /ping within {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    """The last lines of the server's log."""
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def tree(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The server's processes: the wrapper and everything it started."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_mb(procs: list[psutil.Process]) -> float:
    """Resident memory summed over ``procs`` (MB)."""
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 1e6


def stop_server(proc: subprocess.Popen[bytes], port: int) -> bool:
    """SIGTERM the wrapper (it stops its server), SIGKILL any leftover; True when the port is free."""
    procs = tree(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    _gone, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:  # the wrapper failed to stop them: do not leave them on the port
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not listening(port)


# --------------------------------------------------------------------------- the load


@dataclass
class Level:
    """What the clients of one level saw."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seconds: float | None, error: str = "") -> None:
        """One finished request: its latency, or the error."""
        with self.lock:
            if seconds is None:
                self.errors += 1
                if len(self.first_errors) < 3:
                    self.first_errors.append(error[:300])
            else:
                self.latencies.append(seconds)


def post(conn: http.client.HTTPConnection, body: bytes) -> str:
    """POST one body; "" when the answer is 200 with predictions, else what went wrong."""
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        return f"HTTP {resp.status}: {data[:300]!r}"
    preds = json.loads(data).get("predictions")
    return "" if preds else f"no predictions in {data[:200]!r}"


def client(port: int, bodies: list[bytes], offset: int, deadline: float, level: Level) -> None:
    """Send requests back to back until ``deadline`` (closed loop, keep-alive connection)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    i = offset
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            problem = post(conn, bodies[i % len(bodies)])
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        level.record(None if problem else time.perf_counter() - t0, problem)
        i += 1
    conn.close()


def run_level(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``; requests/s and latency percentiles."""
    level = Level(clients)
    start = time.monotonic()
    threads = [
        threading.Thread(target=client, args=(port, bodies, k, start + seconds, level), daemon=True)
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = np.asarray(level.latencies) * 1000.0
    pct = np.percentile(lat, [50, 95, 99]) if lat.size else [float("nan")] * 3
    return {
        "clients": clients,
        "requests": int(lat.size),
        "rps": round(lat.size / wall, 2),
        "p50_ms": round(float(pct[0]), 1),
        "p95_ms": round(float(pct[1]), 1),
        "p99_ms": round(float(pct[2]), 1),
        "errors": level.errors,
        **({"first_errors": level.first_errors} if level.first_errors else {}),
    }


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """CPU model, cores this process may use, SIMD level, load average now."""
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "simd": simd(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }


def verdict(levels: list[dict[str, Any]], rss: tuple[float, float]) -> dict[str, Any]:
    """The issue's targets, each with its figure and whether it is met."""
    by = {lv["clients"]: lv for lv in levels}
    out: dict[str, Any] = {}
    if 1 in by:
        out["p50_ms_1_client"] = {"max": TARGET_P50_MS, "met": by[1]["p50_ms"] <= TARGET_P50_MS}
    if 1 in by and 4 in by and by[1]["rps"] > 0:
        ratio = by[4]["rps"] / by[1]["rps"]
        out["rps_4_over_1"] = {"value": round(ratio, 2), "min": TARGET_SCALING}
        out["rps_4_over_1"]["met"] = ratio >= TARGET_SCALING
    bound = max(RSS_BOUND_MIN_MB, RSS_BOUND_FRACTION * rss[0])
    growth = rss[1] - rss[0]
    out["rss_growth_mb"] = {"value": round(growth, 1), "max": round(bound, 1)}
    out["rss_growth_mb"]["met"] = growth <= bound
    out["errors"] = {"value": sum(lv["errors"] for lv in levels), "max": 0}
    out["errors"]["met"] = out["errors"]["value"] == 0
    return out


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start the server, warm it up, run every level, stop it; the JSON report."""
    bodies = payloads(args.format, args.dataset, work)
    info = machine()
    log = work / "serve.log"
    proc = start_server(args, log)
    port_free = False
    try:
        ready_s = wait_healthy(proc, args.port, log, args.start_timeout)
        warm = Level(0)
        client(args.port, list(bodies.values()), 0, time.monotonic() + 2.0, warm)
        if warm.errors:
            raise SystemExit(f"warm-up requests failed: {warm.first_errors}\n{tail(log)}")
        rss_start = rss_mb(tree(proc))
        levels = []
        for n in args.clients:
            result = run_level(args.port, list(bodies.values()), n, args.seconds)
            result["rss_mb"] = round(rss_mb(tree(proc)), 1)
            print(
                f"{n:>3} client(s): {result['rps']:.2f} req/s, p50 {result['p50_ms']} ms, "
                f"p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, "
                f"{result['errors']} error(s), server RSS {result['rss_mb']} MB",
                flush=True,
            )
            levels.append(result)
        rss_end = rss_mb(tree(proc))
    finally:
        port_free = stop_server(proc, args.port)
    info["load_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "errors": sum(lv["errors"] for lv in levels),
        "levels": levels,
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
        "targets": verdict(levels, (rss_start, rss_end)),
        "server": {
            "format": args.format,
            "workers": args.workers,
            "model": args.model or f"models:/mammoflow-{args.dataset}@champion",
            "payload_bytes": {k: len(v) for k, v in bodies.items()},
            "seconds_to_ready": round(ready_s, 1),
            "port_free_after": port_free,
        },
        "seconds_per_level": args.seconds,
        "machine": info,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="per level (default 30)")
    p.add_argument("--model", default=None, help="model URI (default the dataset's champion)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default a free one)")
    p.add_argument("--tracking", default=None, help="MLflow tracking URI (default ./mlflow.db)")
    p.add_argument("--dataset", default="sample_mias")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    p.add_argument("--format", choices=("file", "tensor"), default="file")
    p.add_argument("--clients", default="1,4,16", help="comma-separated levels")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /ping")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.seconds <= 0 or not args.clients or min(args.clients) < 1:
        p.error("--seconds must be > 0 and --clients positive integers")
    args.port = args.port or free_port()
    if listening(args.port):
        p.error(f"port {args.port} is in use; pass a free --port")
    return args


def main() -> None:
    """Run the benchmark; the last line is its JSON report."""
    args = parse_args()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM, and SIGINT even where a shell started us ignoring it (a background job), stop
    # the server on the way out (measure's finally), as Ctrl-C does
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, interrupted)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
            report = measure(args, Path(tmp))
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): the server was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
