"""Benchmark raw → PNG conversion of the real MIAS archive with 1 and 2 workers.

Prints one JSON object: images/s per worker count (cold: every image converted), the speed-up,
whether both runs wrote identical PNG bytes, and an incremental re-run (every image skipped).

    .venv/bin/python benchmarks/bench_convert.py [--archive PATH] [--size 512] [--bit-depth 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mammoflow.config import ConvertConfig
from mammoflow.data.convert import convert_dataset
from mammoflow.data.manifest import ManifestRow, to_frame
from mammoflow.files import sha256_file

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / "../shared/data/mias/all-mias.tar.gz"


def _read_pgm8(path: Path) -> np.ndarray:
    """Tiny P5 reader (comments allowed) for the fallback manifest."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    pos = 2
    while len(tokens) < 3:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    w, h, maxval = (int(t) for t in tokens)
    raster = np.frombuffer(data, np.uint8, w * h, offset=pos + 1).reshape(h, w)
    return raster.astype(np.float32) / maxval


def _fallback_manifest(archive: Path, work: Path) -> pd.DataFrame:
    """Extract the archive and build a minimal manifest (used when ingest_mias is absent)."""
    raw = work / "raw"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pgm")]
        tar.extractall(raw, members=members, filter="data")
    rows = []
    for path in sorted(raw.rglob("mdb*.pgm")):
        img = _read_pgm8(path)
        number = int(path.stem[3:])
        rows.append(
            ManifestRow(
                image_id=path.stem,
                patient_id=f"mias-P{(number + 1) // 2:03d}",
                dataset="mias",
                laterality="R" if number % 2 else "L",
                view="MLO",
                label="normal",
                label_index=0,
                raw_path=path.as_posix(),
                raw_sha256=sha256_file(path),
                width=img.shape[1],
                height=img.shape[0],
                bits=8,
                intensity_mean=float(img.mean()),
                intensity_std=float(img.std()),
            )
        )
    return to_frame(rows)


def _manifest(archive: Path, work: Path) -> tuple[pd.DataFrame, str, float]:
    start = time.perf_counter()
    try:
        from mammoflow.data.mias import ingest_mias
    except ImportError:
        return _fallback_manifest(archive, work), "fallback", time.perf_counter() - start
    result = ingest_mias(archive, work / "ingest", dataset="mias")
    return result.frame, "mammoflow.data.mias.ingest_mias", time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    parser.add_argument("--crop", action="store_true", help="crop to the breast first")
    args = parser.parse_args(argv)
    archive = args.archive.resolve()
    if not archive.is_file():
        print(f"archive {archive} not found; pass --archive", file=sys.stderr)
        return 2

    load_before = os.getloadavg()[0]  # other jobs on the box skew the 2-worker figure
    with tempfile.TemporaryDirectory(prefix="bench_convert.") as tmp:
        work = Path(tmp)
        frame, ingest_with, ingest_s = _manifest(archive, work)
        runs = []
        hashes = []
        for workers in (1, 2):
            cfg = ConvertConfig(
                size=args.size,
                bit_depth=args.bit_depth,
                crop_to_breast=args.crop,
                workers=workers,
            )
            res = convert_dataset(frame, work / f"out{workers}", cfg, progress=False)
            runs.append(
                {
                    "workers": res.workers,
                    "converted": len(res.converted),
                    "seconds": round(res.seconds, 3),
                    "images_per_s": round(len(res.converted) / res.seconds, 2),
                }
            )
            hashes.append(pd.read_parquet(res.manifest_path)["converted_sha256"].tolist())
        again = convert_dataset(frame, work / "out2", cfg, progress=False)
        print(
            json.dumps(
                {
                    "benchmark": "convert",
                    "archive": archive.name,
                    "images": len(frame),
                    "ingest": ingest_with,
                    "ingest_seconds": round(ingest_s, 3),
                    "size": args.size,
                    "bit_depth": args.bit_depth,
                    "crop_to_breast": args.crop,
                    "cpu_count": os.cpu_count(),
                    "load_avg_1m_at_start": round(load_before, 2),
                    "runs": runs,
                    "speedup_2_vs_1": round(runs[1]["images_per_s"] / runs[0]["images_per_s"], 2),
                    "identical_png_bytes_1_vs_2_workers": hashes[0] == hashes[1],
                    "incremental_rerun": {
                        "workers": again.workers,
                        "skipped": len(again.skipped),
                        "converted": len(again.converted),
                        "seconds": round(again.seconds, 3),
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
