"""Training-speed benchmark: prints one JSON object.

* ``extract_img_per_s``: frozen-prefix forward throughput per backbone at its native input size,
  float32 and mixed_bfloat16 (random grey images, weights none).
* ``small_study``: 64 images, 2 folds, 2 epochs, VGG16 at 224 px, run twice side by side:
  the naive way (full model fit per fold, float32, no cache) and the MammoFlow way (cached
  bf16 prefix features, tail + head training), with ``ratio_naive_over_mammoflow``.
* ``--full``: the full MIAS study (322 real images from ../shared/data/mias/all-mias.tar.gz,
  4 backbones, 5 folds, 10 epochs, weights none) → ``full_mias_study_s``.

Usage: ``.venv/bin/python benchmarks/bench_training.py [--full] [--n-extract 32]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from PIL import Image

from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.data.manifest import sha256_file
from mammoflow.metrics import aggregate, compute_metrics
from mammoflow.models import build
from mammoflow.models.backbones import PAPER_BACKBONES
from mammoflow.models.features import (
    cached_features,
    cpu_supports_bf16,
    extract_features,
    prepare_inputs,
    resolve_precision,
)
from mammoflow.split import make_splits
from mammoflow.train import train_folds

MIAS_ARCHIVE = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mias" / "all-mias.tar.gz"
)
CLASSES = ("normal", "benign", "malignant")


def bench_extraction(n_images: int, batch_size: int) -> dict[str, dict[str, float]]:
    """img/s of the frozen prefix (N=3) per backbone and precision, after one warm-up batch."""
    out: dict[str, dict[str, float]] = {}
    for name in PAPER_BACKBONES:
        out[name] = {}
        for precision in ("float32", "mixed_bfloat16"):
            bb = build.load_backbone(name, trainable_layers=3, precision=precision)
            rng = np.random.default_rng(0)
            size = bb.input_size
            images = rng.uniform(0, 255, (n_images, size, size, 1)).astype(np.float32)
            extract_features(bb, images[:batch_size], batch_size=batch_size)  # warm-up / trace
            t0 = time.perf_counter()
            extract_features(bb, images, batch_size=batch_size)
            out[name][precision] = round(n_images / (time.perf_counter() - t0), 2)
    return out


def synthetic_pngs(root: Path, n: int, size: int = 256, seed: int = 0) -> pd.DataFrame:
    """``n`` grey PNGs, 3 classes, 2 images per patient (like MIAS pairs)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = (i // 2) % 3
        img = np.clip(rng.normal(60 + 60 * label, 30, (size, size)), 0, 255).astype(np.uint8)
        path = root / f"s{i:03d}.png"
        Image.fromarray(img).save(path)
        rows.append(
            {
                "image_id": f"s{i:03d}",
                "patient_id": f"p{i // 2:03d}",
                "label": CLASSES[label],
                "label_index": label,
                "converted_path": str(path),
                "converted_sha256": sha256_file(path),
            }
        )
    return pd.DataFrame(rows)


def small_study(work: Path) -> dict[str, Any]:
    """The naive way vs the MammoFlow way on the same 64 images, splits and settings."""
    frame = synthetic_pngs(work / "small", 64)
    splits = make_splits(frame, test_size=0.0, k_folds=2, seed=0)
    model_cfg = ModelConfig(trainable_layers=3, head_units=512, dropout=0.5)
    base_cfg = TrainConfig(epochs=2, batch_size=16, precision="float32", seed=1)

    t0 = time.perf_counter()
    bb = build.load_backbone("vgg16", trainable_layers=3, precision="float32")
    images = prepare_inputs(frame, bb, dataset="small", feature_cache=False)
    naive = train_folds(images, splits, bb, model_cfg=model_cfg, train_cfg=base_cfg, n_classes=3)
    naive_s = time.perf_counter() - t0

    precision = resolve_precision("auto")
    cfg = base_cfg.model_copy(update={"precision": precision})
    cache = work / "cache"
    t1 = time.perf_counter()
    bbm = build.load_backbone("vgg16", trainable_layers=3, precision=precision)
    feats = cached_features(frame, bbm, dataset="small", cache_dir=cache)
    ours = train_folds(feats, splits, bbm, model_cfg=model_cfg, train_cfg=cfg, n_classes=3)
    ours_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    warm = cached_features(frame, bbm, dataset="small", cache_dir=cache)
    train_folds(warm, splits, bbm, model_cfg=model_cfg, train_cfg=cfg, n_classes=3)
    warm_s = time.perf_counter() - t2
    return {
        "images": len(frame),
        "folds": 2,
        "epochs": 2,
        "backbone": "vgg16",
        "naive_s": round(naive_s, 2),
        "naive_fit_s": round(sum(r.timing["fit_s"] for r in naive), 2),
        "mammoflow_precision": precision,
        "mammoflow_s": round(ours_s, 2),
        "mammoflow_extract_s": round(feats.seconds, 2),
        "mammoflow_fit_s": round(sum(r.timing["fit_s"] for r in ours), 2),
        "mammoflow_warm_cache_s": round(warm_s, 2),
        "cache_hit_on_rerun": warm.hit,
        "ratio_naive_over_mammoflow": round(naive_s / ours_s, 2),
    }


def mias_frame(archive: Path, out: Path, size: int = 512) -> pd.DataFrame:
    """Decode the real MIAS PGMs into ``size`` px 8-bit PNGs; labels per image, malignant wins."""
    out.mkdir(parents=True, exist_ok=True)
    severity: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            name = Path(member.name).name
            if name == "Info.txt":
                for line in fh.read().decode("latin-1").splitlines():
                    parts = line.split()
                    if len(parts) >= 3 and parts[0].startswith("mdb") and parts[0][3:].isdigit():
                        lab = 0 if parts[2] == "NORM" else (2 if parts[3:4] == ["M"] else 1)
                        severity[parts[0]] = max(severity.get(parts[0], 0), lab)
            elif name.endswith(".pgm"):
                img = Image.open(fh)
                img.load()
                img.convert("L").resize((size, size), Image.Resampling.BILINEAR).save(
                    out / f"{name[:-4]}.png"
                )
    rows = []
    for image_id, lab in sorted(severity.items()):
        path = out / f"{image_id}.png"
        number = int(image_id[3:])
        rows.append(
            {
                "image_id": image_id,
                "patient_id": f"mias{(number + 1) // 2:03d}",
                "label": CLASSES[lab],
                "label_index": lab,
                "converted_path": str(path),
                "converted_sha256": sha256_file(path),
            }
        )
    return pd.DataFrame(rows)


def full_mias(work: Path) -> dict[str, Any]:
    """4 backbones x 5 folds x 10 epochs on the 322 real MIAS images (weights none)."""
    t0 = time.perf_counter()
    frame = mias_frame(MIAS_ARCHIVE.resolve(), work / "mias_png")
    convert_s = time.perf_counter() - t0
    splits = make_splits(frame, test_size=0.1, k_folds=5, seed=42)
    precision = resolve_precision("auto")
    model_cfg = ModelConfig(trainable_layers=3)
    train_cfg = TrainConfig(epochs=10, batch_size=16, precision=precision, seed=42)
    per_backbone: dict[str, Any] = {}
    t1 = time.perf_counter()
    for name in PAPER_BACKBONES:
        tb = time.perf_counter()
        bb = build.load_backbone(name, trainable_layers=3, precision=precision)
        feats = cached_features(frame, bb, dataset="mias", cache_dir=work / "cache")
        results = train_folds(
            feats, splits, bb, model_cfg=model_cfg, train_cfg=train_cfg, n_classes=3
        )
        folds = [compute_metrics(r.val_true, r.val_prob, CLASSES) for r in results]
        agg = aggregate(folds)
        per_backbone[name] = {
            "seconds": round(time.perf_counter() - tb, 1),
            "extract_s": round(feats.seconds, 1),
            "fit_s": round(sum(r.timing["fit_s"] for r in results), 1),
            "val_balanced_accuracy_mean": round(agg["balanced_accuracy_mean"], 3),
        }
    return {
        "images": len(frame),
        "class_counts": {c: int((frame["label"] == c).sum()) for c in CLASSES},
        "precision": precision,
        "convert_s": round(convert_s, 1),
        "per_backbone": per_backbone,
        "full_mias_study_s": round(time.perf_counter() - t1, 1),
    }


def main() -> None:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run the full MIAS study")
    parser.add_argument("--n-extract", type=int, default=32, help="images per extraction timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-extract", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import tensorflow as tf

    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_bf16": cpu_supports_bf16(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "batch_size": args.batch_size,
    }
    t0 = time.perf_counter()
    if not args.skip_extract:
        result["extract_img_per_s"] = bench_extraction(args.n_extract, args.batch_size)
        result["extract_images"] = args.n_extract
    with tempfile.TemporaryDirectory(prefix="mammoflow-bench-") as tmp:
        result["small_study"] = small_study(Path(tmp))
        if args.full:
            result["full_mias"] = full_mias(Path(tmp))
            result["full_mias_study_s"] = result["full_mias"]["full_mias_study_s"]
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
