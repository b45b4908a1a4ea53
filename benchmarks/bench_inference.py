"""Inference-speed benchmark: prints one JSON object, per backbone.

For each backbone a serving model of the shape the study registers (``ensemble_model``: one
frozen prefix, ``split.k_folds`` tails + heads, weights ``none`` — speed does not depend on the
values) is scored through :func:`mammoflow.serving.predict.forward` on ``convert.size`` canvases:

* ``predict_images_per_s_batch1`` / ``_batch16``: forward passes of 1 and 16 images.
* ``gradcam_images_per_s``: :func:`mammoflow.explain.gradcam.gradcam_batch` on batches of 16 (the flat
  float32 rebuild is made once, before timing; ``gradcam_setup_s`` is that one-off cost).
* ``prepare_images_per_s`` (once): reading and converting the sample's PGMs (readers + convert).

Settings come from params.yaml as ``--dataset`` (default sample_mias: 80 px) resolves them;
``--input-size`` overrides. Usage:
``.venv/bin/python benchmarks/bench_inference.py [--backbone vgg16] [--images 32]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def serving_model(backbone: str, cfg: Any) -> Any:
    """The registered serving graph of ``backbone`` (random weights), at cfg's size/precision."""
    from mammoflow.models.build import (
        dtype_policy,
        ensemble_model,
        load_backbone,
        trainable_tail_and_head,
    )
    from mammoflow.models.features import resolve_precision

    precision = resolve_precision(cfg.train.precision)
    bb = load_backbone(
        backbone,
        weights="none",
        trainable_layers=cfg.model.trainable_layers,
        input_size=cfg.model.input_size,
        precision=precision,
    )
    heads = [
        trainable_tail_and_head(bb, 3, head_units=cfg.model.head_units, name=f"{backbone}_fold_{k}")
        for k in range(1, cfg.split.k_folds + 1)
    ]
    with dtype_policy(precision):
        return ensemble_model(bb, heads), bb.input_size, precision


def rate(fn: Any, batches: list[np.ndarray]) -> float:
    """Images per second of ``fn`` over ``batches`` (after one warm-up call)."""
    fn(batches[0])
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def bench_backbone(backbone: str, cfg: Any, n_images: int) -> dict[str, Any]:
    """The three rates of one backbone."""
    from mammoflow.explain.gradcam import gradcam_batch
    from mammoflow.serving.predict import forward

    model, size, precision = serving_model(backbone, cfg)
    canvas = cfg.convert.size
    images = np.random.default_rng(0).uniform(0, 255, (n_images, canvas, canvas))
    images = images.astype(np.float32)
    one = [images[i : i + 1] for i in range(min(n_images, 16))]
    sixteen = [images[i : i + 16] for i in range(0, n_images, 16)]
    t0 = time.perf_counter()
    gradcam_batch(model, images[:1], [0])
    setup = time.perf_counter() - t0
    return {
        "input_size": size,
        "precision": precision,
        "folds": cfg.split.k_folds,
        "predict_images_per_s_batch1": round(rate(lambda b: forward(model, b), one), 2),
        "predict_images_per_s_batch16": round(rate(lambda b: forward(model, b), sixteen), 2),
        "gradcam_images_per_s": round(
            rate(lambda b: gradcam_batch(model, b, np.zeros(len(b), int)), sixteen), 2
        ),
        "gradcam_setup_s": round(setup, 2),
    }


def prepare_rate(cfg: Any, dataset: str) -> float:
    """Images per second of reading + converting the embedded sample's PGMs."""
    from mammoflow.data.prepare import acceptance, prepare
    from mammoflow.data.sample import make_sample

    with tempfile.TemporaryDirectory() as tmp:
        s = cfg.sample
        res = make_sample(Path(tmp), s.seed, s.mias_patients, 2, s.size)
        files = sorted(res.mias_dir.glob("*.pgm"))
        rules = acceptance(cfg, dataset)
        start = time.perf_counter()
        for f in files:
            prepare(f, cfg, rules)
        return len(files) / (time.perf_counter() - start)


def main() -> None:
    """Parse the options, run every backbone, print JSON."""
    from mammoflow.config import load_config

    parser = argparse.ArgumentParser(description="predict / Grad-CAM images per second")
    parser.add_argument("--dataset", default="sample_mias")
    parser.add_argument("--backbone", action="append", default=None)
    parser.add_argument("--images", type=int, default=32, help="images per timed pass")
    parser.add_argument("--input-size", type=int, default=None)
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml").for_dataset(args.dataset)
    if args.input_size:
        cfg = cfg.with_overrides({"model.input_size": args.input_size})
    out: dict[str, Any] = {
        "dataset": args.dataset,
        "canvas": cfg.convert.size,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "prepare_images_per_s": round(prepare_rate(cfg, args.dataset), 2),
        "backbones": {
            b: bench_backbone(b, cfg, max(args.images, 16))
            for b in (args.backbone or cfg.model.backbones)
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
