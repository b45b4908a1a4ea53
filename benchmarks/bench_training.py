"""Training-speed benchmark: prints one JSON object.

* ``extract_img_per_s``: frozen-prefix forward throughput per backbone at its native input size,
  float32 and mixed_bfloat16 (random grey images, weights none).
* ``tail``: the VGG16 tail (N = 3) training on the 322 real MIAS films' cached features at
  224 px, beside ``ceiling_gflops_per_s`` — a bare TensorFlow conv forward + backward of the same
  layer shapes, measured in the same run — and their ratio ``tail_efficiency``.
* ``overhead``: ``epoch_overhead_s``, what the fold loop adds per epoch on a sample-sized set
  (80 px) beyond the compiled steps themselves.
* ``small_study``: 64 images, 2 folds, 2 epochs, VGG16 at 224 px, run twice side by side:
  the naive way (full model fit per fold, float32, no cache) and the MammoFlow way (cached
  bf16 prefix features, tail + head training), with ``ratio_naive_over_mammoflow``.
* ``--full``: the real study through the train stage (322 real films from
  ../shared/data/mias/all-mias.tar.gz, 4 backbones × 5 folds × 10 epochs, native sizes, weights
  none), once with ``evaluate.test_model: ensemble`` → ``full_mias_study_s``, once with ``refit``
  (test F1 of the refit model and of the fold ensemble, from the same folds).

Usage: ``.venv/bin/python benchmarks/bench_training.py [--full] [--n-extract 32]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
import yaml
from PIL import Image

from mammoflow.config import Config, ModelConfig, TrainConfig, load_config
from mammoflow.data.acquire import acquire_stage
from mammoflow.data.convert import convert_stage
from mammoflow.data.ingest import ingest_stage
from mammoflow.data.split import make_splits, split_stage
from mammoflow.evaluation.metrics import compute_metrics
from mammoflow.files import sha256_file
from mammoflow.models import build
from mammoflow.models.backbones import PAPER_BACKBONES
from mammoflow.models.features import (
    cached_features,
    cpu_supports_bf16,
    extract_features,
    prepare_inputs,
    resolve_precision,
)
from mammoflow.paths import Layout
from mammoflow.training.fit import FoldTrainer, fold_rows, train_folds
from mammoflow.training.train import train_stage

ROOT = Path(__file__).resolve().parents[1]
MIAS_ARCHIVE = ROOT / ".." / "shared" / "data" / "mias" / "all-mias.tar.gz"
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


def _project(work: Path, overrides: dict[str, Any], dataset: str = "mias") -> Config:
    """A temporary project around the real MIAS archive: params.yaml with ``overrides``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["pipeline"]["datasets"] = [dataset]
    raw["datasets"]["mias"]["source"] = str(MIAS_ARCHIVE.resolve())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw[section][key] = value
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_config(work / "params.yaml")


def _data_stages(cfg: Config, layout: Layout, dataset: str = "mias") -> float:
    t0 = time.perf_counter()
    acquire_stage(cfg, dataset, layout)
    ingest_stage(cfg, dataset, layout)
    convert_stage(cfg, dataset, layout, progress=False)
    split_stage(cfg, dataset, layout)
    return time.perf_counter() - t0


def _ensemble_vs_refit(layout: Layout, backbone: str, dataset: str = "mias") -> dict[str, float]:
    """Test macro-F1 of the refit model and of the mean of the K fold models (same folds)."""
    rec = json.loads((layout.models(dataset, backbone) / "predictions.json").read_text())
    y = np.asarray(rec["test"]["y_true"])
    refit = compute_metrics(y, np.asarray(rec["test"]["prob"]), CLASSES)
    mean = np.mean([np.asarray(v["prob"]) for v in rec["fold_test"].values()], axis=0)
    ens = compute_metrics(y, mean, CLASSES)
    return {
        "test_f1_macro_refit": round(refit["f1_macro"], 3),
        "test_f1_macro_ensemble": round(ens["f1_macro"], 3),
        "test_roc_auc_refit": round(refit["roc_auc"], 3),
        "test_roc_auc_ensemble": round(ens["roc_auc"], 3),
    }


def sample_test_models(work: Path) -> dict[str, Any]:
    """Refit vs ensemble on the embedded sample (its own demo settings), from the same folds."""
    cfg = _project(
        work,
        {"evaluate.test_model": "refit", "tracking.log_models": "none"},
        dataset="sample_mias",
    )
    old = Path.cwd()
    os.chdir(work)
    try:
        _data_stages(cfg, Layout(), "sample_mias")
        out: dict[str, Any] = {}
        for name in ("vgg16", "resnet50"):
            train_stage(cfg, "sample_mias", name, Layout())
            out[name] = _ensemble_vs_refit(Layout(), name, "sample_mias")
    finally:
        os.chdir(old)
    return out


def full_mias(work: Path, test_model: str) -> dict[str, Any]:
    """The real study through the train stage: 322 real MIAS films, 4 backbones × 5 folds ×
    10 epochs at each backbone's native size (weights none: the only ones offline)."""
    cfg = _project(
        work,
        {
            "model.weights": "none",
            "model.input_size": None,
            "model.backbones": list(PAPER_BACKBONES),
            "train.epochs": 10,
            "split.k_folds": 5,
            "evaluate.test_model": test_model,
            "tracking.log_models": "final",
        },
    )
    old = Path.cwd()
    os.chdir(work)
    try:
        layout = Layout()
        data_s = _data_stages(cfg, layout)
        per_backbone: dict[str, Any] = {}
        t1 = time.perf_counter()
        for name in PAPER_BACKBONES:
            tb = time.perf_counter()
            out = train_stage(cfg, "mias", name, layout)
            per_backbone[name] = {
                "seconds": round(time.perf_counter() - tb, 1),
                "features_s": out["seconds"]["features"],
                "cv_f1_macro_mean": round(out["cv_f1_macro_mean"], 3),
                "test_f1_macro": round(out["test_f1_macro"], 3),
            }
            if test_model == "refit":
                per_backbone[name].update(_ensemble_vs_refit(layout, name))
        study_s = time.perf_counter() - t1
    finally:
        os.chdir(old)
    return {
        "test_model": test_model,
        "data_stages_s": round(data_s, 1),
        "per_backbone": per_backbone,
        "study_s": round(study_s, 1),
    }


# ----------------------------------------------------------------------------- efficiency


def _conv_flops(layers: list[tuple[int, int, int, int, int]]) -> float:
    """Training FLOPs per image of a conv stack: forward + weight grad, + input grad except the
    first layer (its input, the cached feature, needs none). Items: (h, w, cin, cout, k)."""
    fwd = [2.0 * h * w * cin * cout * k * k for h, w, cin, cout, k in layers]
    return 3 * sum(fwd) - fwd[0]


def _tail_convs(bb: Any) -> list[tuple[int, int, int, int, int]]:
    convs = []
    for name in bb.plan.tail_layers:
        layer = bb.base.get_layer(name)
        if layer.__class__.__name__ == "Conv2D" and name in bb.plan.trainable:
            h, w, cout = (int(d) for d in layer.output.shape[1:])
            cin = int(layer.input.shape[-1])
            convs.append((h, w, cin, cout, int(layer.kernel_size[0])))
    return convs


def ceiling(convs: list[tuple[int, int, int, int, int]], precision: str, batch: int) -> float:
    """GFLOP/s of a bare conv forward + backward of ``convs`` (TensorFlow ops, no Keras)."""
    import tensorflow as tf

    dt = tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32
    h, w, cin = convs[0][0], convs[0][1], convs[0][2]
    x = tf.random.normal((batch, h, w, cin), dtype=dt)
    ws = [tf.Variable(tf.random.normal((k, k, ci, co), stddev=0.02)) for _, _, ci, co, k in convs]

    @tf.function
    def step(x: Any) -> Any:
        with tf.GradientTape() as tape:
            y = x
            for v in ws:
                y = tf.nn.relu(tf.nn.conv2d(y, tf.cast(v, dt), 1, "SAME"))
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        return tape.gradient(loss, ws)

    step(x)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            grads = step(x)
        _ = [g.numpy() for g in grads]
        best = min(best, (time.perf_counter() - t0) / 5)
    return _conv_flops(convs) * batch / best / 1e9


def tail_efficiency(work: Path, setting: str = "auto", n_epochs: int = 3) -> dict[str, Any]:
    """VGG16 tail training on real MIAS features at 224 px vs the conv ceiling, side by side."""
    frame = mias_frame(MIAS_ARCHIVE.resolve(), work / "mias_png")
    splits = make_splits(frame, test_size=0.1, k_folds=5, seed=42)
    precision = resolve_precision(setting)
    bb = build.load_backbone("vgg16", trainable_layers=3, precision=precision)
    feats = cached_features(frame, bb, dataset="mias", cache_dir=work / "cache")
    cfg = TrainConfig(epochs=n_epochs, batch_size=16, precision=precision, seed=42)
    trainer = FoldTrainer(feats, bb, model_cfg=ModelConfig(), train_cfg=cfg, n_classes=3)
    rows = fold_rows(splits, 1)
    trainer.fit(rows)  # trace
    ids = list(rows.train["image_id"])
    y = rows.train["label_index"].to_numpy()
    onehot = np.eye(3, dtype=np.float32)[y]
    idx, w = trainer.rows(ids), np.ones(len(ids), np.float32)
    convs = _tail_convs(bb)
    ceil = ceiling(convs, precision, 16)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n_epochs):
            trainer._run_epoch(idx, onehot, w)[0].numpy()
        best = min(best, (time.perf_counter() - t0) / n_epochs)
    tail = _conv_flops(convs) * len(ids) / best / 1e9
    ceil2 = ceiling(convs, precision, 16)  # again after: drift shows as a spread
    return {
        "precision": precision,
        "train_images": len(ids),
        "tail_convs": [list(c) for c in convs],
        "tail_epoch_s": round(best, 3),
        "ceiling_gflops_per_s": round(max(ceil, ceil2), 1),
        "ceiling_gflops_per_s_runs": [round(ceil, 1), round(ceil2, 1)],
        "tail_gflops_per_s": round(tail, 1),
        "tail_efficiency": round(tail / max(ceil, ceil2), 3),
        "extract_s": round(feats.seconds, 1),
    }


def epoch_overhead(work: Path) -> dict[str, Any]:
    """Seconds the fold loop adds per epoch on the sample (80 px) beyond the graph's own steps.

    The per-epoch slope of a fit (shuffle, dispatch, validation) minus the time of the same
    steps run back to back in one compiled call.
    """
    frame = synthetic_pngs(work / "sample", 60, size=96)
    splits = make_splits(frame, test_size=0.1, k_folds=5, seed=0)
    precision = resolve_precision("auto")
    bb = build.load_backbone("vgg16", trainable_layers=3, input_size=80, precision=precision)
    feats = cached_features(frame, bb, dataset="sample", cache_dir=work / "cache")
    rows = fold_rows(splits, 1)

    def fit_s(epochs: int) -> tuple[float, FoldTrainer]:
        cfg = TrainConfig(epochs=epochs, batch_size=16, precision=precision, seed=1)
        trainer = FoldTrainer(feats, bb, model_cfg=ModelConfig(), train_cfg=cfg, n_classes=3)
        trainer.fit(rows)  # trace
        return min(trainer.fit(rows).timing["fit_s"] for _ in range(3)), trainer

    (t1, _), (t11, trainer) = fit_s(1), fit_s(11)
    slope = (t11 - t1) / 10
    ids = list(rows.train["image_id"]) * 10
    y = np.eye(3, dtype=np.float32)[np.tile(rows.train["label_index"].to_numpy(), 10)]
    idx, w = trainer.rows(ids), np.ones(len(ids), np.float32)
    trainer._run_epoch(idx, y, w)
    t0 = time.perf_counter()
    trainer._run_epoch(idx, y, w)[0].numpy()
    steps_s = (time.perf_counter() - t0) / 10
    return {
        "train_images": len(rows.train),
        "epoch_s": round(slope, 4),
        "graph_steps_s": round(steps_s, 4),
        "epoch_overhead_s": round(max(slope - steps_s, 0.0), 4),
    }


def main() -> None:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run the full MIAS study")
    parser.add_argument("--n-extract", type=int, default=32, help="images per extraction timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-small", action="store_true", help="skip the naive-vs-cached study")
    parser.add_argument("--precision", default="auto", help="train.precision of the tail timing")
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
        result["tail"] = tail_efficiency(Path(tmp), args.precision)
        result["tail_efficiency"] = result["tail"]["tail_efficiency"]
        result["overhead"] = epoch_overhead(Path(tmp))
        result["epoch_overhead_s"] = result["overhead"]["epoch_overhead_s"]
        if not args.skip_small:
            result["small_study"] = small_study(Path(tmp))
        result["sample_test_models"] = sample_test_models(Path(tmp) / "sample-study")
        if args.full:
            for mode in ("ensemble", "refit"):
                result[f"full_mias_{mode}"] = full_mias(Path(tmp) / f"study-{mode}", mode)
            result["full_mias_study_s"] = result["full_mias_ensemble"]["study_s"]
    result["ceiling_gflops_per_s"] = result["tail"]["ceiling_gflops_per_s"]
    result["tail_gflops_per_s"] = result["tail"]["tail_gflops_per_s"]
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
