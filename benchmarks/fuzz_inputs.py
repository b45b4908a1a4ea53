"""Fuzz the raw-image readers: N malformed DICOMs and PGMs through ingest and convert.

Seeds: the embedded sample's DICOMs (native and JPEG 2000) and real MIAS PGMs from the archive.
Each case runs in a long-lived worker process (in-process for speed) with an address-space
limit (an unbounded allocation fails there instead of taking the machine) and a per-case timeout
(a hang kills and restarts the worker). See :mod:`mammoflow.data.fuzz` for the contract.

    .venv/bin/python benchmarks/fuzz_inputs.py [--cases 2000] [--seed 0] [--timeout 30]

The last line is one JSON object: cases, crashes, hangs, accepted, quarantined by reason,
convert_refused by reason, peak RSS (MiB, the largest of the workers and this process).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mammoflow.data.fuzz import Case, Seeds, make_seeds, plan_cases, timed

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / "../shared/data/mias/all-mias.tar.gz"
#: Address-space limit of the worker: far above what one 4096² image needs, far below a
#: decoded 60000² bomb (7.2 GB at 16 bits).
WORKER_MEMORY_BYTES = 6 * 1024**3


def _worker(conn: Connection, seeds: Seeds, work: str, memory: int) -> None:
    """Run the cases the parent sends until it sends ``None``."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns on every malformed value; outcomes count
    while (case := conn.recv()) is not None:
        outcome, seconds = timed(seeds, case, Path(work) / f"case{case.index}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send((outcome, seconds, rss))


class Pool:
    """One worker process, restarted after a hang or a death."""

    def __init__(self, seeds: Seeds, work: Path, memory: int) -> None:
        self.seeds, self.work, self.memory = seeds, work, memory
        self.ctx = mp.get_context("fork")
        self.proc: Any = None
        self.conn: Connection | None = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(
            target=_worker, args=(child, self.seeds, str(self.work), self.memory), daemon=True
        )
        self.proc.start()
        self.conn = parent

    def run(self, case: Case, timeout: float) -> tuple[str, Any, float, float]:
        """``('ok', outcome, s, rss)``, ``('hang', None, s, 0)`` or ``('died', exitcode, s, 0)``."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        assert self.conn is not None
        start = time.perf_counter()
        self.conn.send(case)
        try:
            ready = self.conn.poll(timeout)
            if ready:
                outcome, seconds, rss = self.conn.recv()
                return "ok", outcome, seconds, rss
        except EOFError:
            pass
        elapsed = time.perf_counter() - start
        alive = self.proc.is_alive()
        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.proc, self.restarts = None, self.restarts + 1
        return ("hang", None, elapsed, 0.0) if alive else ("died", code, elapsed, 0.0)

    def close(self) -> None:
        if self.proc is not None and self.conn is not None:
            self.conn.send(None)
            self.proc.join(10)


def run(n: int, seed: int, timeout: float, archive: Path | None) -> dict[str, Any]:
    """Run ``n`` cases; return the summary (crash details under ``findings``)."""
    with tempfile.TemporaryDirectory(prefix="mammoflow-fuzz-") as tmp:
        seeds = make_seeds(Path(tmp), archive)
        cases = plan_cases(seeds, n, seed)
        pool = Pool(seeds, Path(tmp), WORKER_MEMORY_BYTES)
        counts: Counter[str] = Counter()
        quarantined: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        findings: list[dict[str, Any]] = []
        slowest, peak_worker = 0.0, 0.0
        start = time.perf_counter()
        for case in cases:
            state, outcome, seconds, rss = pool.run(case, timeout)
            slowest, peak_worker = max(slowest, seconds), max(peak_worker, rss)
            where = {"case": case.index, "kind": case.kind, "mutation": case.mutation}
            if state == "hang":
                counts["hangs"] += 1
                findings.append({**where, "hang_s": round(seconds, 1)})
            elif state == "died":
                counts["crashes"] += 1
                findings.append({**where, "died": outcome})
            elif outcome.status == "crash":
                counts["crashes"] += 1
                findings.append({**where, "error": outcome.reason, "detail": outcome.detail})
            elif outcome.status == "quarantined":
                quarantined[outcome.reason] += 1
            elif outcome.status == "convert_refused":
                refused[outcome.reason] += 1
            else:
                counts[outcome.status] += 1
        pool.close()
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "cases": n,
        "crashes": counts["crashes"],
        "hangs": counts["hangs"],
        "accepted": counts["accepted"],
        "skipped": counts["skipped"],
        "quarantined": dict(sorted(quarantined.items())),
        "convert_refused": dict(sorted(refused.items())),
        "unnamed": quarantined.get("unnamed", 0) + refused.get("unnamed", 0),
        "peak_rss_mb": round(max(peak_worker, self_rss), 1),
        "worker_restarts": pool.restarts,
        "slowest_case_s": round(slowest, 2),
        "seconds": round(time.perf_counter() - start, 1),
        "seeds": {"dicom": len(seeds.dicoms), "pgm": len(seeds.pgms)},
        "timeout_s": timeout,
        "findings": findings[:50],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-case seconds")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    args = parser.parse_args(argv)
    archive = args.archive if args.archive.is_file() else None
    if archive is None:
        print(f"MIAS archive {args.archive} absent: sample PGMs are the seeds", file=sys.stderr)
    summary = run(args.cases, args.seed, args.timeout, archive)
    for finding in summary.pop("findings"):
        print(json.dumps(finding), file=sys.stderr)
    summary["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(summary))
    return 1 if summary["crashes"] or summary["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
