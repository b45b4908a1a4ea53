"""Ingest + convert throughput on synthetic CMMD-shaped DICOM trees of growing size; one JSON line.

For each N (``--sizes``, default 1000,10000) a CMMD-shaped tree of N For Presentation DICOMs of
``--size`` rows (1024 by default; CMMD's real films are 2294 × 1914, a documented downscale) is
written with its clinical sheet: ``--templates`` women are synthesised once with the embedded
sample's generator (:func:`mammoflow.data.sample.make_sample`), then copied as new women (new
PatientID and UIDs in each header, one pixel changed so no two files share pixel data) until N
images exist — synthesising 10,000 films of 1024 px would take the benchmark ≈ 20 min on its own.

Then the pipeline's own code runs on it, timed: :func:`mammoflow.data.cmmd.ingest_cmmd` (every
header read, the acceptance rules, the clinical join) and
:func:`mammoflow.data.convert.convert_dataset` (decode, window, aspect-kept resize to
``convert.size``, PNG, with ``--workers`` processes; 0 = all cores). Per N: images/s of each,
peak resident memory of the process tree (RssAnon of this process plus its worker processes,
sampled every 50 ms: memory they own, not the page cache) and the bytes on disk. Free disk is
checked first (a size that does not fit is skipped with a message); the trees are deleted
afterwards. A manual benchmark, never part of ``make test``.

Usage: ``.venv/bin/python benchmarks/bench_ingest.py [--sizes 1000,10000] [--workers 0]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
from pydicom.uid import generate_uid

from machine import cpu_model
from mammoflow.config import ConvertConfig
from mammoflow.data.cmmd import ingest_cmmd, load_clinical_frame
from mammoflow.data.convert import convert_dataset
from mammoflow.data.sample import CLINICAL_NAME, make_sample

SEED = 20240601


class PeakTreeRss:
    """Peak of RssAnon summed over this process and its descendants, sampled every 50 ms by a
    separate process: a sampling thread here would make the converter's pool ``spawn`` its
    workers instead of forking them (see ``convert._pool_context``), which is not what the
    convert stage does."""

    def __enter__(self) -> PeakTreeRss:
        # self-contained (no numpy/pandas imports): it samples from its first 50 ms
        code = (
            "import os, select, sys\n"
            "def anon(pid):\n"
            "    try:\n"
            "        for line in open(f'/proc/{pid}/status'):\n"
            "            if line.startswith('RssAnon:'):\n"
            "                return int(line.split()[1]) / 1024\n"
            "    except OSError:\n"
            "        pass\n"
            "    return 0.0\n"
            "def kids(pid):\n"
            "    out, todo = [], [pid]\n"
            "    while todo:\n"
            "        p = todo.pop()\n"
            "        try:\n"
            "            tasks = os.listdir(f'/proc/{p}/task')\n"
            "        except OSError:\n"
            "            continue\n"
            "        for t in tasks:\n"
            "            try:\n"
            "                k = [int(x) for x in open(f'/proc/{p}/task/{t}/children').read().split()]\n"
            "            except OSError:\n"
            "                continue\n"
            "            out += k\n"
            "            todo += k\n"
            "    return out\n"
            "pid, me, peak = int(sys.argv[1]), os.getpid(), 0.0\n"
            "while True:\n"
            "    peak = max(peak, anon(pid) + sum(anon(k) for k in kids(pid) if k != me))\n"
            "    if select.select([sys.stdin], [], [], 0.05)[0]:\n"
            "        break\n"
            "print(peak, flush=True)\n"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("stop\n", timeout=60)
        self.peak = float(out.strip() or "nan")


def templates(work: Path, women: int, size: int) -> tuple[list[list[Path]], pd.DataFrame]:
    """``women`` synthesised CMMD women: their DICOM files (per woman) and clinical rows."""
    sample = make_sample(work / "templates", SEED, 2, women, size)
    clinical = load_clinical_frame(sample.clinical_path)
    per_woman: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(sample.cmmd_dir.rglob("*.dcm")):
        per_woman[path.relative_to(sample.cmmd_dir / "CMMD").parts[0]].append(path)
    return [per_woman[w] for w in sorted(per_woman)], clinical


def grow(tree: Path, n: int, women: list[list[Path]], clinical: pd.DataFrame) -> tuple[int, int]:
    """Write a tree of at least ``n`` DICOMs (whole women) copied from ``women`` as new women;
    the files and bytes written."""
    rows, written, index, made = [], 0, 0, 0
    while made < n:
        files = women[index % len(women)]
        source_id = files[0].relative_to(files[0].parents[3]).parts[0]
        index += 1
        patient = f"D{1 + (index - 1) // 9999}-{(index - 1) % 9999 + 1:04d}"
        for row in clinical[clinical["ID1"] == source_id].to_dict("records"):
            rows.append({**row, "ID1": patient})
        study, series = generate_uid(), generate_uid()
        for number, path in enumerate(files, start=1):
            ds = pydicom.dcmread(path)
            ds.PatientID = patient
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            pixels = ds.pixel_array.copy()
            pixels.flat[index % pixels.size] ^= 1  # distinct pixel data in every file
            ds.PixelData = pixels.tobytes()
            out = tree / "CMMD" / patient / "study" / "series" / f"1-{number}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=True)
            written += out.stat().st_size
            made += 1
    pd.DataFrame(rows).to_excel(tree / CLINICAL_NAME, index=False)
    return made, written


def one_size(
    n: int, women: list[list[Path]], clinical: pd.DataFrame, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Grow a tree of ``n`` DICOMs, ingest and convert it; the figures."""
    tree = work / f"n{n}"
    t0 = time.perf_counter()
    n, raw_bytes = grow(tree, n, women, clinical)
    write_s = time.perf_counter() - t0
    with PeakTreeRss() as ingest_rss:
        t0 = time.perf_counter()
        result = ingest_cmmd(
            tree,
            tree / CLINICAL_NAME,
            tree / "interim",
            dataset="bench",
            min_size=min(256, args.size - args.size // 6),  # CMMD-shaped: fewer columns
        )
        ingest_s = time.perf_counter() - t0
    cfg = ConvertConfig(
        size=args.convert_size, bit_depth=8, crop_to_breast=False, workers=args.workers
    )
    with PeakTreeRss() as convert_rss:
        t0 = time.perf_counter()
        raw = {str(r): tree / str(r) for r in result.frame["raw_path"]}  # relative to the tree
        converted = convert_dataset(
            result.manifest_path, tree / "processed", cfg, progress=False, raw_files=raw
        )
        convert_s = time.perf_counter() - t0
    png_bytes = sum(p.stat().st_size for p in (tree / "processed").rglob("*.png"))
    figures = {
        "n": n,
        "images_ingested": len(result.frame),
        "bad": len(result.bad),
        "images_converted": len(converted.converted),
        "convert_workers": converted.workers,
        "write_s": round(write_s, 1),
        "ingest_s": round(ingest_s, 1),
        "ingest_images_per_s": round(n / ingest_s, 1),
        "convert_s": round(convert_s, 1),
        "convert_images_per_s": round(n / convert_s, 1),
        "ingest_peak_rss_mb": round(ingest_rss.peak),
        "convert_peak_rss_mb": round(convert_rss.peak),
        "raw_bytes": raw_bytes,
        "png_bytes": png_bytes,
    }
    print(f"N={n}: {json.dumps(figures)}", flush=True)
    shutil.rmtree(tree)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated N")
    parser.add_argument("--size", type=int, default=1024, help="rows of each DICOM")
    parser.add_argument("--templates", type=int, default=40, help="women synthesised once")
    parser.add_argument("--convert-size", type=int, default=512, help="convert.size")
    parser.add_argument("--workers", type=int, default=0, help="convert.workers (0 = all cores)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the trees")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.work))
    load = os.getloadavg()[0]
    out: dict[str, Any] = {"sizes": [], "skipped": []}
    try:
        t0 = time.perf_counter()
        women, clinical = templates(work, args.templates, args.size)
        synth_s = time.perf_counter() - t0
        per_image = sum((tree_bytes(w) for w in women), 0) / sum(len(w) for w in women)
        for n in sizes:
            need = n * per_image * 1.3  # DICOMs + PNGs + manifests
            free = shutil.disk_usage(work).free
            if need > free * 0.9:
                msg = f"N={n}: needs ≈ {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free; skipped"
                print(msg, file=sys.stderr, flush=True)
                out["skipped"].append({"n": n, "reason": msg})
                continue
            out["sizes"].append(one_size(n, women, clinical, work, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["machine"] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(load, 2),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    out["template_women"] = len(women)
    out["template_synthesis_s_per_image"] = round(synth_s / sum(len(w) for w in women), 3)
    out["dicom_rows"] = args.size
    out["convert_size"] = args.convert_size
    if len(out["sizes"]) > 1:
        first = out["sizes"][0]
        for entry in out["sizes"]:
            entry["convert_rate_vs_first"] = round(
                entry["convert_images_per_s"] / first["convert_images_per_s"], 3
            )
            entry["convert_rss_vs_first"] = round(
                entry["convert_peak_rss_mb"] / max(first["convert_peak_rss_mb"], 1), 3
            )
    print(json.dumps(out))


def tree_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


if __name__ == "__main__":
    main()
