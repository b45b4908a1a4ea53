"""The 16-bit feature cache's effect on metrics, on real MIAS; prints one JSON object.

The 322 real MIAS films (../shared/data/mias/all-mias.tar.gz, decoded to 512 px PNGs) through one
backbone's frozen prefix (weights none, seeded), cached once as float32 and once as float16; the
same folds (patient-grouped, the pipeline's split) train on each with the same seed, and the
held-out test set is scored by the fold ensemble. Printed: the features' rounding error and, per
dtype, CV macro-F1 mean, test macro-F1 / accuracy / ROC-AUC and the largest probability
difference between the two.

Usage: ``.venv/bin/python benchmarks/bench_feature_dtype.py [--backbone resnet50] [--epochs 10]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import MIAS_ARCHIVE, mias_frame
from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.data.split import make_splits
from mammoflow.evaluation.metrics import compute_metrics
from mammoflow.models import build
from mammoflow.models.features import cached_features, resolve_precision
from mammoflow.training.fit import train_folds

CLASSES = ("normal", "benign", "malignant")


def study(feats: Any, bb: Any, splits: Any, cfg: TrainConfig) -> dict[str, Any]:
    """K folds on ``feats``; CV and ensemble-test metrics, and the test probabilities."""
    results = train_folds(feats, splits, bb, model_cfg=ModelConfig(), train_cfg=cfg, n_classes=3)
    cv = [compute_metrics(r.val_true, r.val_prob, CLASSES)["f1_macro"] for r in results]
    prob = np.mean([r.test_prob for r in results], axis=0)
    test = compute_metrics(results[0].test_true, prob, CLASSES)
    return {
        "cv_f1_macro_mean": round(float(np.mean(cv)), 4),
        "test_f1_macro": round(float(test["f1_macro"]), 4),
        "test_accuracy": round(float(test["accuracy"]), 4),
        "test_roc_auc": round(float(test["roc_auc"]), 4),
        "_prob": prob,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mammoflow-dtype-") as tmp:
        work = Path(tmp)
        frame = mias_frame(MIAS_ARCHIVE.resolve(), work / "png")
        splits = make_splits(frame, test_size=0.1, k_folds=args.folds, seed=42)
        precision = resolve_precision("float32")
        bb = build.load_backbone(
            args.backbone, weights="none", trainable_layers=3, precision=precision
        )
        cfg = TrainConfig(epochs=args.epochs, precision=precision, seed=42)
        out: dict[str, Any] = {}
        cache = {
            d: cached_features(frame, bb, dataset="mias", cache_dir=work / "c", dtype=d)
            for d in ("float32", "float16")
        }
        f32 = np.asarray(cache["float32"].features)
        f16 = np.asarray(cache["float16"].features, np.float32)
        scale = float(np.abs(f32).max())
        out["feature_max_abs"] = round(scale, 4)
        out["feature_max_rel_error"] = float(
            np.max(np.abs(f16 - f32) / np.maximum(np.abs(f32), 1e-6 * scale))
        )
        for d, feats in cache.items():
            out[d] = study(feats, bb, splits, cfg)
        diff = np.abs(out["float32"].pop("_prob") - out["float16"].pop("_prob"))
        out["test_prob_max_abs_diff"] = round(float(diff.max()), 5)
    result = {
        "backbone": args.backbone,
        "weights": "none",
        "precision": precision,
        "images": len(frame),
        "epochs": args.epochs,
        "folds": args.folds,
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - t0, 1),
        **out,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
