"""Per-backbone rates at CMMD scale and the study they add up to; one JSON line.

Per paper backbone at its native input size (224 px; 299 for InceptionV3), ``weights: none``,
``trainable_layers: 3``, float32 (the AVX2 path; ``--precision`` for others):

* ``extract_s_per_image``: the frozen prefix's forward pass (``extract_features``) on random
  grey images, after a warm-up batch;
* ``epoch_s_per_image``: one training pass of the tail + head per image (the real
  :class:`~mammoflow.training.fit.FoldTrainer` compiled epoch on synthetic features of the tail's input
  shape, ``--tail-rows`` rows in memory);
* ``predict_s_per_image``: the fold model's prediction per image (validation each epoch, BN
  recalibration, the fold's validation and test predictions).

From these it extrapolates — labelled as such, ``"extrapolated": true`` — a study of
``--images`` images (default 3,700, CMMD's size) with ``--folds`` folds × ``--epochs`` epochs
(5 × 10, the paper's) and ``--test-size`` held out (0.1): extraction once per backbone, then per
fold ``epochs × (train + val)`` passes, a BN recalibration over the train rows and the val + test
predictions. ``--subset-folds`` / ``--subset-epochs`` (2, 2) give the same prediction for the
subset that ``mammoflow study`` ran, so the extrapolation can be checked against a measured run.
Fold time on ``W`` Dask workers on separate machines is ``ceil(folds / W)`` folds.

Usage: ``.venv/bin/python benchmarks/bench_cmmd_scale.py [--backbones vgg16,resnet50]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from machine import cpu_model
from mammoflow.config import ModelConfig, TrainConfig
from mammoflow.models import build
from mammoflow.models.backbones import PAPER_BACKBONES
from mammoflow.models.features import FeatureSet, extract_features
from mammoflow.training.fit import FoldTrainer


def rates(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measured seconds per image of extraction, a training pass and a prediction."""
    bb = build.load_backbone(name, weights="none", trainable_layers=3, precision=args.precision)
    rng = np.random.default_rng(0)
    size, batch = bb.input_size, args.batch_size
    images = rng.uniform(0, 255, (args.n_extract, size, size, 1)).astype(np.float32)
    extract_features(bb, images[:batch], batch_size=batch)  # warm-up / trace
    t0 = time.perf_counter()
    extract_features(bb, images, batch_size=batch)
    extract_s = (time.perf_counter() - t0) / args.n_extract
    n = args.tail_rows
    feats = np.maximum(rng.normal(0, 1, (n, *bb.feature_shape)), 0).astype(np.float32)
    ids = tuple(f"i{i}" for i in range(n))
    trainer = FoldTrainer(
        FeatureSet(ids, feats),
        bb,
        model_cfg=ModelConfig(),
        train_cfg=TrainConfig(epochs=1, batch_size=batch, precision=args.precision, seed=42),
        n_classes=2,
    )
    rows = np.arange(n, dtype=np.int32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    w = np.ones(n, np.float32)
    trainer._run_epoch(rows[:batch], y[:batch], w[:batch])[0].numpy()  # trace, not timed
    t0 = time.perf_counter()
    trainer._run_epoch(rows, y, w)[0].numpy()
    epoch_s = (time.perf_counter() - t0) / n
    trainer.predict(list(ids[:batch]))  # trace
    t0 = time.perf_counter()
    trainer.predict(list(ids))
    predict_s = (time.perf_counter() - t0) / n
    out = {
        "input_size": size,
        "feature_shape": list(bb.feature_shape),
        "feature_mb_per_image_float32": round(math.prod(bb.feature_shape) * 4 / 1e6, 3),
        "extract_s_per_image": round(extract_s, 5),
        "epoch_s_per_image": round(epoch_s, 5),
        "predict_s_per_image": round(predict_s, 5),
    }
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out


def study_seconds(r: dict[str, Any], images: int, folds: int, epochs: int, test: float) -> dict:
    """Extraction and fold seconds of a study from per-image rates (an extrapolation)."""
    n_test = round(images * test)
    n_cv = images - n_test
    n_val = n_cv / folds
    n_train = n_cv - n_val
    per_epoch = n_train * r["epoch_s_per_image"] + n_val * r["predict_s_per_image"]
    per_fold = epochs * per_epoch + (n_train + n_val + n_test) * r["predict_s_per_image"]
    extraction = images * r["extract_s_per_image"]
    return {
        "extraction_s": round(extraction),
        "epoch_s": round(per_epoch, 1),
        "fold_s": round(per_fold),
        "study_s": round(extraction + folds * per_fold),
        "study_s_on_workers": {
            str(w): round(extraction + math.ceil(folds / w) * per_fold) for w in (2, 5)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(PAPER_BACKBONES))
    parser.add_argument("--images", type=int, default=3700)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test-size", type=float, default=0.1)
    parser.add_argument("--subset-folds", type=int, default=2)
    parser.add_argument("--subset-epochs", type=int, default=2)
    parser.add_argument("--n-extract", type=int, default=48, help="images per extraction timing")
    parser.add_argument("--tail-rows", type=int, default=320, help="rows per training timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_start = os.getloadavg()[0]
    table: dict[str, Any] = {}
    for name in args.backbones.split(","):
        r = rates(name.strip(), args)
        full = study_seconds(r, args.images, args.folds, args.epochs, args.test_size)
        subset = study_seconds(
            r, args.images, args.subset_folds, args.subset_epochs, args.test_size
        )
        table[name] = {**r, "full": full, "subset": subset}
    print(
        json.dumps(
            {
                "machine": {
                    "cpu": cpu_model(),
                    "cpus": os.cpu_count(),
                    "load_avg_1m_at_start": round(load_start, 2),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                },
                "extrapolated": True,
                "images": args.images,
                "full": {"folds": args.folds, "epochs": args.epochs},
                "subset": {"folds": args.subset_folds, "epochs": args.subset_epochs},
                "precision": args.precision,
                "backbones": table,
                "study_s_all_backbones": sum(t["full"]["study_s"] for t in table.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
