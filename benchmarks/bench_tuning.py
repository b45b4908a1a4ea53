"""Tuning-speed benchmark: prints one JSON object with ``trials_per_min``.

Builds the embedded sample dataset (``sample_mias`` with params.yaml's sample / convert / split /
model / train settings) in a temporary project, then runs an Optuna study of ``--n-trials``
trials with params.yaml's ``tune`` section (seeded TPE, median pruner, SQLite storage, MLflow
into the temporary project) through :func:`mammoflow.tuning.runner.run_tuning`.

* ``trials_per_min``: finished (complete + pruned) trials per minute of the whole optimisation,
  feature extraction for each new trainable-layers N included.
* ``trials_per_min_steady``: the same without the first trial of each N (the ones that build
  the backbone and extract or load its prefix features), i.e. the rate once caches are warm.
* ``--naive``: one trial (the best params, every fold) trained end to end on images (feature
  cache off), against a warm cached complete trial: ``naive_trial_s``, ``ratio_naive_over_cached``.
* ``--quick``: the integration test's tiny project (12 women, 64 px, 3 folds, 32 px input,
  2 epochs) instead of params.yaml's settings.

Usage: ``.venv/bin/python benchmarks/bench_tuning.py [--n-trials 12] [--quick] [--naive]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASET = "sample_mias"


def project_params(backbone: str, quick: bool) -> dict[str, Any]:
    """params.yaml narrowed to one dataset and backbone (``quick``: the test-sized project)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["pipeline"]["datasets"] = [DATASET]
    raw["model"]["backbones"] = [backbone]
    raw["tracking"]["log_models"] = "none"
    if quick:
        raw["sample"].update({"mias_patients": 12, "size": 64})
        raw["convert"].update({"size": 64, "workers": 1})
        raw["split"].update({"k_folds": 3, "test_size": 0.2})
        raw["model"].update({"input_size": 32})
        raw["datasets"][DATASET]["model"].pop("input_size", None)  # the sample's own 80 px
        raw["train"].update({"epochs": 2, "batch_size": 8})
        raw["tune"]["space"].update({"batch_size": [8], "head_units": [16, 32, 64]})
    return raw


def build(root: Path, raw: dict[str, Any]) -> float:
    """Acquire → ingest → convert → split the sample into ``root``; seconds."""
    from mammoflow.config import parse_config
    from mammoflow.data.acquire import acquire_stage
    from mammoflow.data.convert import convert_stage
    from mammoflow.data.ingest import ingest_stage
    from mammoflow.data.split import split_stage
    from mammoflow.paths import Layout

    cfg = parse_config(raw)
    layout = Layout(root)
    t0 = time.perf_counter()
    acquire_stage(cfg, DATASET, layout)
    ingest_stage(cfg, DATASET, layout)
    convert_stage(cfg, DATASET, layout, progress=False)
    split_stage(cfg, DATASET, layout)
    return time.perf_counter() - t0


def trial_stats(summary: dict[str, Any], storage: str) -> dict[str, Any]:
    """Per-trial durations from the study; the steady rate skips each N's first trial."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    done = [
        t
        for t in study.trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and t.datetime_start is not None
        and t.datetime_complete is not None
    ]
    seconds = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in done}
    first_of_n: dict[int, int] = {}
    for t in sorted(done, key=lambda t: t.number):
        first_of_n.setdefault(int(t.params["trainable_layers"]), t.number)
    steady = [s for n, s in seconds.items() if n not in first_of_n.values()]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 2) if values else None

    warm = [t for t in done if t.number not in first_of_n.values()]
    complete = [seconds[t.number] for t in warm if t.state == TrialState.COMPLETE]
    pruned = [seconds[t.number] for t in warm if t.state == TrialState.PRUNED]
    return {
        "trial_s": {
            "complete_warm_mean": mean(complete),
            "pruned_warm_mean": mean(pruned),
            "first_of_each_n_mean": mean([seconds[n] for n in first_of_n.values()]),
            "steady_mean": mean(steady),
        },
        "trainable_layers_sampled": sorted(first_of_n),
        "trials_per_min_steady": round(60.0 * len(steady) / sum(steady), 2) if steady else None,
    }


def naive_trial(root: Path, raw: dict[str, Any], params: dict[str, Any]) -> float:
    """Seconds of one full trial (all folds) trained end to end on images, no feature cache."""
    import optuna

    from mammoflow.config import parse_config
    from mammoflow.paths import Layout
    from mammoflow.tuning.objective import Objective

    naive = dict(raw)
    naive["train"] = {**raw["train"], "feature_cache": False}
    objective = Objective(parse_config(naive), DATASET, raw["model"]["backbones"][0], Layout(root))
    t0 = time.perf_counter()
    objective(optuna.trial.FixedTrial(params))
    return time.perf_counter() - t0


def main() -> None:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--quick", action="store_true", help="the tiny test-sized project")
    parser.add_argument("--naive", action="store_true", help="also time one uncached trial")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import optuna
    import tensorflow as tf

    from mammoflow.config import parse_config
    from mammoflow.paths import Layout
    from mammoflow.tuning.runner import run_tuning
    from mammoflow.tuning.storage import STORAGE_ENV, resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for key in ("MLFLOW_TRACKING_URI", STORAGE_ENV):  # everything stays in the temp project
        os.environ.pop(key, None)
    raw = project_params(args.backbone, args.quick)
    cfg = parse_config(raw)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "optuna": optuna.__version__,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "settings": {
            "dataset": DATASET,
            "backbone": args.backbone,
            "quick": args.quick,
            "n_trials": args.n_trials,
            "k_folds": cfg.split.k_folds,
            "epochs": cfg.train.epochs,
            "input_size": cfg.for_dataset(DATASET).model.input_size,
            "pruner": cfg.tune.pruner,
            "space_trainable_layers": cfg.tune.space.trainable_layers,
        },
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mammoflow-bench-tune-") as tmp:
        root = Path(tmp)
        result["build_s"] = round(build(root, raw), 2)
        from mammoflow.data.manifest import read_manifest

        result["settings"]["images"] = len(read_manifest(Layout(root).processed(DATASET)))
        summary = run_tuning(cfg, DATASET, args.backbone, args.n_trials, 1, Layout(root))
        result["trials_per_min"] = summary["trials_per_min"]
        result["optimize_s"] = summary["seconds"]["optimize"]
        result["trials"] = summary["trials"]
        result["best_value"] = round(summary["best_value"], 4)
        result["best_params"] = summary["best_params"]
        result.update(trial_stats(summary, resolve_storage(cfg.tune.storage, root)))
        result["feature_cache_entries"] = len(list((root / ".cache" / "features").glob("*.npy")))
        if args.naive:
            naive_s = naive_trial(root, raw, summary["best_params"])
            result["naive_trial_s"] = round(naive_s, 2)
            steady = result["trial_s"]["complete_warm_mean"]
            if steady:
                result["ratio_naive_over_cached"] = round(naive_s / steady, 2)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
