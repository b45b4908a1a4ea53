"""Scale benchmark: the train loop on synthetic feature caches of growing size; one JSON line.

For each N (``--sizes``, default 1000,10000,50000) a feature cache with the VGG16 tail's input
shape (the cut of ``model.trainable_layers`` at 224 px: 14×14×512) is written to disk in
``--dtype`` (float16 by default, as the pipeline stores it), memory-mapped, and the real
:class:`~mammoflow.training.fit.FoldTrainer` trains on it under ``MAMMOFLOW_MEMORY_BUDGET_MB``
(``--budget-mb``): in memory when the cache fits the budget as float32, else streamed in chunks.
A full epoch for N ≤ ``--full-up-to`` (10,000), else ``--batches`` batches (300) of rows drawn at
random across the whole file; ``--batches`` also caps the smaller sizes when given explicitly.

Per N: ``s_per_image_epoch`` (seconds per image of the timed epoch), ``tail_efficiency`` (the tail's
conv GFLOP/s over a bare TensorFlow conv forward + backward of the same shapes, measured in the
same run, before and after), ``peak_rss_mb`` (peak RssAnon from /proc/self/status, sampled every
20 ms during the epoch: memory the process owns, not the page cache's pages of the memory map),
``disk_bytes`` and the path taken. Free disk is checked first: a size that does not fit is
skipped with a message. The synthetic caches are deleted afterwards. A manual benchmark, never
part of ``make test``.

Usage: ``.venv/bin/python benchmarks/bench_scale.py [--sizes 1000,10000] [--batches 40]``
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import _conv_flops, _tail_convs, ceiling
from machine import cpu_model
from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.models import build
from mammoflow.models.features import FeatureSet, write_cache
from mammoflow.training.fit import FoldTrainer

BLOCK = 256  # rows generated at a time


def rss_anon_mb() -> float:
    """RssAnon of this process in MB (anonymous memory: excludes file-backed mapped pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return math.nan


class PeakRss:
    """Sample :func:`rss_anon_mb` in a thread; ``peak`` is the highest value seen."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.peak, self._stop = every_s, rss_anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def synthetic_rows(n: int, shape: tuple[int, ...], seed: int) -> Iterator[np.ndarray]:
    """ReLU-like float32 features, ``BLOCK`` rows at a time (a few random blocks, rescaled)."""
    rng = np.random.default_rng(seed)
    base = [np.maximum(rng.normal(0, 1, (BLOCK, *shape)), 0).astype(np.float32) for _ in range(4)]
    for i, lo in enumerate(range(0, n, BLOCK)):
        yield base[i % 4][: min(BLOCK, n - lo)] * np.float32(1 + (i % 7) / 7)


def one_size(n: int, bb: Any, work: Path, args: argparse.Namespace, ceil: float) -> dict[str, Any]:
    """Write the cache of ``n`` rows, train on it, delete it; the figures of this size."""
    shape = tuple(bb.feature_shape)
    row_bytes = int(np.prod(shape)) * np.dtype(args.dtype).itemsize
    need = n * row_bytes + (64 << 20)
    free = shutil.disk_usage(work).free
    if need * 1.1 > free:
        msg = f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free in {work}"
        print(f"N={n}: skipped, {msg}", flush=True)
        return {"n": n, "skipped": msg}
    path = work / f"scale-{n}.npy"
    t0 = time.perf_counter()
    write_cache(path, synthetic_rows(n, shape, n), (n, *shape), args.dtype)
    write_s = time.perf_counter() - t0
    try:
        return {"n": n, "write_s": round(write_s, 1)} | train_on(path, n, bb, args, ceil)
    finally:
        path.unlink(missing_ok=True)


def train_on(path: Path, n: int, bb: Any, args: argparse.Namespace, ceil: float) -> dict[str, Any]:
    """Time one (partial) epoch of the real trainer on the cache at ``path``."""
    feats = FeatureSet(tuple(f"i{i}" for i in range(n)), np.load(path, mmap_mode="r"))
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, precision="float32", seed=42)
    base = rss_anon_mb()
    trainer = FoldTrainer(
        feats,
        bb,
        model_cfg=ModelConfig(),
        train_cfg=cfg,
        n_classes=3,
        memory_budget=args.budget_mb << 20,
    )
    rng = np.random.default_rng(0)
    full = n <= args.full_up_to and not args.batches_given
    rows = (
        rng.permutation(n)
        if full
        else rng.choice(n, size=min(n, args.batches * args.batch_size), replace=False)
    ).astype(np.int32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, len(rows))]
    w = np.ones(len(rows), np.float32)
    warm = rows[: args.batch_size]
    trainer._run_epoch(warm, y[: len(warm)], w[: len(warm)])[0].numpy()  # trace, not timed
    with PeakRss() as rss:
        t0 = time.perf_counter()
        trainer._run_epoch(rows, y, w)[0].numpy()
        seconds = time.perf_counter() - t0
    tail = _conv_flops(_tail_convs(bb)) * len(rows) / seconds / 1e9
    out = {
        "path": "streamed" if trainer.chunk else "memory",
        "chunk_rows": trainer.chunk,
        "images_timed": len(rows),
        "full_epoch": full,
        "epoch_s": round(seconds, 1),
        "s_per_image_epoch": round(seconds / len(rows), 5),
        "tail_gflops_per_s": round(tail, 1),
        "tail_efficiency": round(tail / ceil, 3),
        "rss_before_mb": round(base),
        "peak_rss_mb": round(rss.peak),
        "disk_bytes": path.stat().st_size,
    }
    print(f"N={n}: {json.dumps(out)}", flush=True)
    del trainer, feats
    gc.collect()  # the next size starts from the same resident baseline
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated N")
    parser.add_argument("--batches", type=int, default=None, help="batches per timed epoch")
    parser.add_argument("--full-up-to", type=int, default=10000, help="full epochs up to this N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budget-mb", type=int, default=2048, help="MAMMOFLOW_MEMORY_BUDGET_MB")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the caches' folder")
    args = parser.parse_args()
    args.batches_given = args.batches is not None
    args.batches = args.batches or 300
    logging.basicConfig(level=logging.WARNING)
    import tensorflow as tf

    load_start = os.getloadavg()[0]
    bb = build.load_backbone("vgg16", weights="none", trainable_layers=3, precision="float32")
    convs = _tail_convs(bb)
    ceil_before = ceiling(convs, "float32", args.batch_size)
    Path(".cache").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mammoflow-scale-", dir=args.work or ".cache"))
    try:  # each size deletes its own cache; the folder goes too, even on Ctrl-C
        sizes = [
            one_size(int(n), bb, work, args, ceil_before)
            for n in args.sizes.split(",")
            if n.strip()
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ceil_after = ceiling(convs, "float32", args.batch_size)
    ceil = max(ceil_before, ceil_after)
    for s in sizes:  # against the better of the two ceilings (drift shows as their spread)
        if "tail_gflops_per_s" in s:
            s["tail_efficiency"] = round(s["tail_gflops_per_s"] / ceil, 3)
    first = next((s for s in sizes if "s_per_image_epoch" in s), None)
    for s in sizes:
        if first is not None and "s_per_image_epoch" in s:
            s["time_vs_first"] = round(s["s_per_image_epoch"] / first["s_per_image_epoch"], 3)
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "load_avg_1m_at_start": round(load_start, 2),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "feature_shape": list(bb.feature_shape),
        "dtype": args.dtype,
        "budget_mb": args.budget_mb,
        "batch_size": args.batch_size,
        "ceiling_gflops_per_s_runs": [round(ceil_before, 1), round(ceil_after, 1)],
        "sizes": sizes,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
