"""One backbone's study on one dataset: K folds + the held-out test, tracked and resumable.

This is the `train` stage. It composes the pure pieces (split, features, train, metrics) and the
tracking layout: per fold it trains the tail + head on cached frozen features, logs the fold to
MLflow, and finally trains on all CV rows to evaluate the held-out test set with patient-level
bootstrap confidence intervals. It writes the DVC outputs (metrics JSON, plots data, the final
head model and the predictions) from the same numbers that go to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mammoflow.config import Config
from mammoflow.data.manifest import CLASSES, atomic_write_json, atomic_write_text, read_manifest
from mammoflow.paths import Layout

log = logging.getLogger(__name__)

#: Prefixes of the params that define a backbone's study (the resume key).
STUDY_PARAM_PREFIXES = ("convert.", "split.", "model.", "train.", "evaluate.", "tracking.")


@dataclass
class StudyResult:
    """What one backbone's study produced (all plain data)."""

    dataset: str
    backbone: str
    class_names: tuple[str, ...]
    fold_metrics: dict[int, dict[str, float]]
    cv: dict[str, float]
    test: dict[str, float]
    test_ci: dict[str, dict[str, float]]
    parent_run_id: str
    test_run_id: str
    resumed_folds: list[int] = field(default_factory=list)
    trained_folds: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The DVC metrics JSON of this backbone."""
        return {
            "dataset": self.dataset,
            "backbone": self.backbone,
            "folds": len(self.fold_metrics),
            "cv": self.cv,
            "test": self.test,
            "test_ci": self.test_ci,
            "mlflow_parent_run_id": self.parent_run_id,
            "mlflow_test_run_id": self.test_run_id,
        }


def study_params(cfg: Config, dataset: str) -> dict[str, Any]:
    """The flattened params that define a study of ``dataset`` (backbone list excluded)."""
    flat = cfg.flat()
    out = {
        k: v
        for k, v in flat.items()
        if k.startswith(STUDY_PARAM_PREFIXES) and k != "model.backbones"
    }
    ds = cfg.dataset(dataset)
    out["dataset.name"] = dataset
    out["dataset.kind"] = ds.kind
    return out


def dvc_data_hash(dataset: str, root: Path = Path()) -> str:
    """The DVC hash of ``data/processed/<dataset>`` from dvc.lock ('unknown' outside DVC)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return "unknown"
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    stage = stages.get(f"convert@{dataset}", {})
    for out in stage.get("outs", []):
        if out.get("path") == f"data/processed/{dataset}":
            return str(out.get("md5", "unknown"))
    return "unknown"


def git_state(root: Path = Path()) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git)."""

    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip()

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else f"CPU ({platform.processor() or platform.machine()})"


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"tensorflow_version": tf.__version__, "keras_version": keras.__version__}


def _predictions_record(ids: list[str], y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    return {
        "image_id": list(ids),
        "y_true": [int(v) for v in y],
        "prob": [[float(p) for p in row] for row in prob],
    }


def _from_record(
    rec: Mapping[str, Any], n_classes: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    prob = np.asarray(rec["prob"], np.float32).reshape(-1, n_classes)
    return list(rec["image_id"]), np.asarray(rec["y_true"], np.int64), prob


def _classification_report(y: np.ndarray, prob: np.ndarray, class_names: tuple[str, ...]) -> str:
    from sklearn.metrics import classification_report

    return str(
        classification_report(
            y,
            prob.argmax(axis=1),
            labels=list(range(len(class_names))),
            target_names=list(class_names),
            zero_division=0,
            digits=3,
        )
    )


def _raw_example(frame: pd.DataFrame, size: int = 96) -> np.ndarray:
    """One converted image, shrunk, as a raw grey batch ``(1, h, w, 1)`` in [0, 255].

    The logged model resizes any input itself; a small example keeps the JSON artifacts small.
    """
    from PIL import Image

    with Image.open(frame["converted_path"].iloc[0]) as im:
        arr = np.asarray(im, dtype=np.float32)
    if arr.max() > 255:  # 16-bit PNG
        arr = arr / 257.0
    small = Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32)[None, ..., None]


def _log_evaluation(
    tracker: Any, run_id: str, y: np.ndarray, prob: np.ndarray, class_names: tuple[str, ...]
) -> None:
    """Classification report, confusion matrix and ROC curve of one evaluation, to its run."""
    from mammoflow.report import confusion_figure, roc_figure

    tracker.log_text(
        run_id, _classification_report(y, prob, class_names), "classification_report.txt"
    )
    tracker.log_figure(run_id, confusion_figure(y, prob, class_names), "confusion_matrix.png")
    tracker.log_figure(run_id, roc_figure(y, prob, class_names), "roc_curve.png")


ProgressFactory = Callable[[str], AbstractContextManager[Any]]


def run_study(
    cfg: Config,
    dataset: str,
    backbone: str,
    *,
    layout: Layout | None = None,
    tracker: Any | None = None,
    progress: bool = False,
) -> StudyResult:
    """Train and evaluate ``backbone`` on ``dataset``; log it to MLflow; write DVC outputs.

    Re-running the same configuration (params + data hash + split hash) reuses the folds that
    already FINISHED in MLflow and trains only the rest.
    """
    import time

    from mammoflow import metrics as mt
    from mammoflow.models.build import load_backbone
    from mammoflow.models.features import prepare_inputs, resolve_precision, rich_progress
    from mammoflow.report import curves_figure, folds_figure
    from mammoflow.split import read_splits, split_hash
    from mammoflow.tracking import TAG_BACKBONE, TAG_DATASET, TAG_FOLD, Tracker, config_hash
    from mammoflow.train import TrainEvent, train_final, train_folds

    t_start = time.perf_counter()
    layout = layout or Layout()
    if cfg.tune.use_best:
        from mammoflow.tune import apply_best, best_params_path

        cfg = apply_best(cfg, dataset, backbone, best_params_path(dataset, backbone, layout))
    kind = cfg.dataset(dataset).kind
    class_names = CLASSES[kind]
    n_classes = len(class_names)
    frame = read_manifest(layout.processed(dataset))
    if frame["converted_path"].isna().any():
        raise ValueError(
            f"{layout.processed(dataset)}: manifest has unconverted images; run convert"
        )
    splits = read_splits(layout.splits(dataset))
    s_hash = split_hash(splits)
    d_hash = dvc_data_hash(dataset, layout.root)
    params = study_params(cfg, dataset)
    key = config_hash(params, d_hash, s_hash)
    patients = dict(zip(frame["image_id"], frame["patient_id"], strict=True))

    # ---- model and cached features
    precision = resolve_precision(cfg.train.precision)
    bb = load_backbone(
        backbone,
        weights=cfg.model.weights,
        trainable_layers=cfg.model.trainable_layers,
        input_size=cfg.model.input_size,
        precision=precision,
    )
    bar: AbstractContextManager[Any] = (
        rich_progress(f"{dataset}/{backbone} features") if progress else nullcontext(None)
    )
    t0 = time.perf_counter()
    with bar as on_batch:
        inputs = prepare_inputs(
            frame,
            bb,
            dataset=dataset,
            feature_cache=cfg.train.feature_cache,
            augment=cfg.train.augment,
            cache_dir=layout.features(),
            batch_size=cfg.train.batch_size,
            progress=on_batch,
        )
    t_features = time.perf_counter() - t0

    # ---- tracking: parent run for this configuration
    tracker = tracker or Tracker(root=layout.root)
    exp_id = tracker.experiment_id(dataset)
    tags = {
        TAG_DATASET: dataset,
        "split_hash": s_hash,
        "dvc_data_hash": d_hash,
        "weights_source": bb.weights.source,
        "weights_sha256": bb.weights.sha256,
        "precision": precision,
        "device": _device(),
        "seed": str(cfg.train.seed),
        **git_state(layout.root),
        **_versions(),
    }
    parent_id, resumed = tracker.open_parent(exp_id, backbone, key, tags, params)
    stale = tracker.fail_stale_children(exp_id, parent_id) if resumed else []
    if stale:
        log.warning("runs %s were left RUNNING by a killed process; marked FAILED", stale)
    done = {
        name: run
        for name, run in tracker.children(exp_id, parent_id).items()
        if run.info.status == "FINISHED"
    }

    def on_event(event: TrainEvent) -> None:
        if progress and event.kind == "epoch_end":
            loss = event.logs.get("loss", math.nan)
            print(
                f"  {backbone} fold {event.fold} epoch {event.epoch}/{event.epochs} "
                f"loss {loss:.4f}",
                flush=True,
            )

    log_models = cfg.tracking.log_models
    example = _raw_example(frame)
    fold_metrics: dict[int, dict[str, float]] = {}
    fold_predictions: dict[int, dict[str, Any]] = {}
    histories: dict[int, dict[str, list[float]]] = {}
    resumed_folds: list[int] = []
    trained_folds: list[int] = []
    child_params = {**params, "backbone": backbone, "precision": precision}
    with tracker.run_guard(parent_id):
        folds = sorted(int(f) for f in splits.loc[splits["split"] == "cv", "fold"].unique())
        for fold in folds:
            name = f"fold-{fold}"
            if name in done:
                run_id = done[name].info.run_id
                fold_metrics[fold] = {
                    k.removeprefix("val_"): v
                    for k, v in done[name].data.metrics.items()
                    if k.startswith("val_")
                }
                fold_predictions[fold] = tracker.load_json_artifact(run_id, "predictions.json")
                resumed_folds.append(fold)
                continue
            run_id = tracker.start_child(
                exp_id,
                parent_id,
                name,
                "fold",
                {TAG_FOLD: str(fold), TAG_BACKBONE: backbone, TAG_DATASET: dataset},
                {**child_params, "fold": fold},
            )
            with tracker.run_guard(run_id):
                (res,) = train_folds(
                    inputs,
                    splits,
                    bb,
                    model_cfg=cfg.model,
                    train_cfg=cfg.train,
                    n_classes=n_classes,
                    folds=[fold],
                    progress=on_event,
                )
                m = mt.compute_metrics(res.val_true, res.val_prob, class_names)
                fold_metrics[fold] = m
                histories[fold] = res.history
                fold_predictions[fold] = _predictions_record(
                    res.val_ids, res.val_true, res.val_prob
                )
                tracker.log_history(run_id, res.history)
                tracker.log_metrics(run_id, m, prefix="val_")
                tracker.log_metrics(run_id, res.timing, prefix="time_")
                tracker.log_dict(run_id, fold_predictions[fold], "predictions.json")
                _log_evaluation(tracker, run_id, res.val_true, res.val_prob, class_names)
                tracker.log_figure(run_id, curves_figure(res.history), "training_curves.png")
                if log_models == "all":
                    from mammoflow.models.build import full_model

                    tracker.log_model(run_id, full_model(bb, res.model), example)
            trained_folds.append(fold)

        # ---- held-out test: a model on every CV row
        if "test" in done:
            test_run_id = done["test"].info.run_id
            test_rec = tracker.load_json_artifact(test_run_id, "predictions.json")
            final_model = None
        else:
            test_run_id = tracker.start_child(
                exp_id,
                parent_id,
                "test",
                "test",
                {TAG_BACKBONE: backbone, TAG_DATASET: dataset},
                child_params,
            )
            with tracker.run_guard(test_run_id):
                res = train_final(
                    inputs,
                    splits,
                    bb,
                    model_cfg=cfg.model,
                    train_cfg=cfg.train,
                    n_classes=n_classes,
                    progress=on_event,
                )
                final_model = res.model
                histories[0] = res.history
                test_rec = _predictions_record(res.test_ids, res.test_true, res.test_prob)
                tracker.log_history(test_run_id, res.history)
                tracker.log_dict(test_run_id, test_rec, "predictions.json")
                tm = mt.compute_metrics(res.test_true, res.test_prob, class_names)
                tracker.log_metrics(test_run_id, tm, prefix="test_")
                _log_evaluation(tracker, test_run_id, res.test_true, res.test_prob, class_names)
                if log_models in ("all", "final"):
                    from mammoflow.models.build import full_model

                    tracker.log_model(test_run_id, full_model(bb, res.model), example)

        test_ids, test_true, test_prob = _from_record(test_rec, n_classes)
        test_metrics = mt.compute_metrics(test_true, test_prob, class_names)
        ci = mt.bootstrap_ci(
            test_true,
            test_prob,
            [patients[i] for i in test_ids],
            class_names,
            n=max(cfg.evaluate.bootstrap, 1),
            ci=cfg.evaluate.ci,
            seed=cfg.train.seed,
        )
        cv = mt.aggregate([fold_metrics[f] for f in sorted(fold_metrics)])
        tracker.log_metrics(parent_id, cv)
        tracker.log_metrics(parent_id, test_metrics, prefix="test_")
        tracker.log_metrics(
            parent_id,
            {f"test_{m}_ci_{side}": v[side] for m, v in ci.items() for side in ("low", "high")},
        )
        tracker.log_figure(parent_id, folds_figure(fold_metrics, backbone), "fold_metrics.png")
        tracker.set_tags(parent_id, {"resumed_folds": json.dumps(resumed_folds)})

    result = StudyResult(
        dataset=dataset,
        backbone=backbone,
        class_names=class_names,
        fold_metrics=fold_metrics,
        cv=cv,
        test=test_metrics,
        test_ci=ci,
        parent_run_id=parent_id,
        test_run_id=test_run_id,
        resumed_folds=resumed_folds,
        trained_folds=trained_folds,
        seconds={"features": t_features, "total": time.perf_counter() - t_start},
    )
    write_outputs(result, layout, fold_predictions, test_rec, histories, final_model)
    return result


def write_outputs(
    result: StudyResult,
    layout: Layout,
    fold_predictions: Mapping[int, Mapping[str, Any]],
    test_rec: Mapping[str, Any],
    histories: Mapping[int, Mapping[str, list[float]]],
    final_model: Any | None,
) -> None:
    """DVC outputs of the train stage: metrics JSON, plots data, predictions, final head."""
    from mammoflow import metrics as mt

    ds, bbn = result.dataset, result.backbone
    atomic_write_json(layout.metrics(ds, bbn), _finite(result.summary()))
    n = len(result.class_names)
    _, y, prob = _from_record(test_rec, n)
    plots = layout.plots(ds, bbn)
    atomic_write_json(
        plots / "confusion.json",
        mt.confusion_rows(y, prob.argmax(axis=1), result.class_names),
    )
    atomic_write_json(plots / "roc.json", _finite(mt.roc_points(y, prob)))
    models = layout.models(ds, bbn)
    atomic_write_json(
        models / "predictions.json",
        {"test": dict(test_rec), "folds": {str(k): dict(v) for k, v in fold_predictions.items()}},
    )
    atomic_write_json(models / "history.json", {str(k): dict(v) for k, v in histories.items()})
    if final_model is not None:
        import tempfile

        with tempfile.TemporaryDirectory(dir=models) as tmp:
            path = Path(tmp) / "head.keras"
            final_model.save(path)
            path.replace(models / "head.keras")
    atomic_write_text(models / "README.txt", _models_readme(result))


def _models_readme(result: StudyResult) -> str:
    return (
        f"{result.dataset} / {result.backbone}\n"
        "head.keras: the tail + head trained on every CV row (input: cached prefix features)\n"
        "predictions.json: per-fold validation and held-out test predictions\n"
        "history.json: per-epoch curves (fold 0 = the final model)\n"
        f"MLflow parent run: {result.parent_run_id} (full serving models are in MLflow)\n"
    )


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is strict (DVC metrics)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
