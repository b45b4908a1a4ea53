"""MLflow overhead of the sample study: the share of wall time spent inside MLflow calls.

The one-time creation of a fresh SQLite store (schema migrations) is reported apart as
``store_init_s``; every later process (each DVC train stage) opens an existing store.

Prints one JSON object. Runs the real train stage (K folds + held-out test) on the embedded
sample in a temporary project with a fresh SQLite store; every MLflow call goes through
``mammoflow.tracking.Tracker``, which times itself.

    .venv/bin/python benchmarks/bench_tracking.py [--backbone vgg16] [--log-models final]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the study once per backbone and print the overhead."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="sample_mias")
    parser.add_argument("--backbone", action="append", default=None)
    parser.add_argument("--log-models", default="final", choices=["all", "final", "none"])
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from mammoflow.config import parse_config
    from mammoflow.data.acquire import acquire_stage
    from mammoflow.data.convert import convert_stage
    from mammoflow.data.ingest import ingest_stage
    from mammoflow.data.split import split_stage
    from mammoflow.paths import Layout
    from mammoflow.tracking import Tracker
    from mammoflow.training.train import run_study

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["log_models"] = args.log_models
    backbones = args.backbone or ["vgg16"]
    raw["model"]["backbones"] = backbones
    cfg = parse_config(raw)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        acquire_stage(cfg, args.dataset, layout)
        ingest_stage(cfg, args.dataset, layout)
        convert_stage(cfg, args.dataset, layout, progress=False)
        split_stage(cfg, args.dataset, layout)
        t0 = time.perf_counter()
        Tracker(root=layout.root).experiment_id(args.dataset)  # creates the SQLite store once
        store_init = time.perf_counter() - t0
        for backbone in backbones:
            tracker = Tracker(root=layout.root)
            t0 = time.perf_counter()
            run_study(cfg, args.dataset, backbone, layout=layout, tracker=tracker)
            wall = time.perf_counter() - t0
            runs.append(
                {
                    "backbone": backbone,
                    "wall_s": round(wall, 2),
                    "mlflow_s": round(tracker.seconds, 2),
                    "fraction": round(tracker.seconds / wall, 4),
                }
            )
    wall = sum(r["wall_s"] for r in runs)
    spent = sum(r["mlflow_s"] for r in runs)
    print(
        json.dumps(
            {
                "benchmark": "tracking",
                "dataset": args.dataset,
                "log_models": args.log_models,
                "folds": cfg.split.k_folds,
                "epochs": cfg.train.epochs,
                "runs": runs,
                "mlflow_overhead_fraction": round(spent / wall, 4),
                "store_init_s": round(store_init, 2),
                "cpu_count": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
                "python": sys.version.split()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
