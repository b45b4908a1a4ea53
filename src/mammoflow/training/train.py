"""The train stage: plan → fold tasks → aggregate → test, for one backbone on one dataset.

* plan: :func:`~mammoflow.training.inputs.load_inputs` (frame, splits, folds, identity) and the cached
  frozen-prefix features (:func:`~mammoflow.training.inputs.load_features`, extracted once per key);
* fold tasks: :func:`~mammoflow.training.fit.fold_task` is the unit of work — features and split rows in, a
  :class:`~mammoflow.training.fit.FoldResult` out, nothing else touched. Run here one after the other
  on one compiled trainer or, when ``MAMMOFLOW_DASK_ADDRESS`` names a Dask scheduler, one task
  per fold on that cluster (:func:`fan_out` → :func:`remote_fold_task`, each worker reading the
  shared feature cache this stage extracted once). Where a fold runs does not change its
  numbers, so the address is an execution setting: not in params, not in the resume key;
* aggregate: CV mean/std over the folds;
* test: ``evaluate.test_model`` — ``ensemble`` averages the K fold models' probabilities on the
  held-out test set (no sixth fit), ``refit`` trains fold 0 on every CV row.

MLflow goes through :class:`~mammoflow.tracking.StudyRun` only. Re-running the same
configuration (params + data hash + split hash) reuses the folds that FINISHED in MLflow.
The DVC outputs (metrics JSON, plots data, predictions, the head) come from the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mammoflow.config import Config
from mammoflow.console import duration, say
from mammoflow.files import atomic_write_bytes, atomic_write_json, atomic_write_text, finite_json
from mammoflow.paths import Layout
from mammoflow.provenance import device, git_state, packages, versions
from mammoflow.tracking.lineage import data_lineage, dataset_source
from mammoflow.training.inputs import StudyInputs, load_features, load_inputs

if TYPE_CHECKING:
    from mammoflow.models.build import BackboneModel
    from mammoflow.models.features import FeatureSet, ImageSet
    from mammoflow.tracking import Evaluation, StudyRun, Tracker
    from mammoflow.training.fit import FoldResult, FoldTrainer, TrainEvent

log = logging.getLogger(__name__)

#: parent-run tag prefix: a fold trained again because its cached weights were missing
TAG_RETRAINED = "mammoflow.retrained_fold."
#: largest |Δp| between a retrained fold's and its logged validation predictions called a match
RETRAIN_TOLERANCE = 1e-5


class RetrainedFoldWarning(UserWarning):
    """A reused fold's weights were missing and it was trained again for the served model."""


#: Scheduler address (``tcp://host:8786``) of a Dask cluster to run the fold tasks on; unset = here.
DASK_ADDRESS_ENV = "MAMMOFLOW_DASK_ADDRESS"


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
    test_model: str = "refit"
    resumed_folds: list[int] = field(default_factory=list)
    trained_folds: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # calibration.json (sidecar)
    subgroups: dict[str, Any] = field(default_factory=dict)  # {"test" | "out-of-fold": rows}

    def summary(self) -> dict[str, Any]:
        """The DVC metrics JSON of this backbone."""
        return {
            "dataset": self.dataset,
            "backbone": self.backbone,
            "folds": len(self.fold_metrics),
            "test_model": self.test_model,
            "cv": self.cv,
            "test": self.test,
            "test_ci": self.test_ci,
            "mlflow_parent_run_id": self.parent_run_id,
            "mlflow_test_run_id": self.test_run_id,
            "calibration": {
                k: self.calibration.get(k)
                for k in ("temperature", "test_raw", "test_calibrated", "n_fit")
            },
        }


@dataclass
class FoldOutcome:
    """A fold as the aggregate sees it: trained now, or reused from a FINISHED MLflow run."""

    fold: int
    metrics: dict[str, float]
    val: dict[str, Any]  # predictions record
    test: dict[str, Any]  # predictions record on the held-out test set
    weights: list[np.ndarray] | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    reused: bool = False


# ----------------------------------------------------------------------------- fold tasks


def remote_fold_task(
    cfg: Config, dataset: str, backbone: str, fold: int, layout: Layout | None = None
) -> FoldResult:
    """:func:`fold_task` in a process of its own (a Dask worker): inputs from the shared cache.

    Returns the portable result (weights, no Keras model).
    """
    from mammoflow.training.fit import fold_task

    layout = layout or Layout()
    inp = load_inputs(cfg, dataset, backbone, layout)
    bb, data = load_features(inp, layout)
    res = fold_task(inp, bb, data, fold).portable()
    _save_weights(layout.fold_weights(inp.key, backbone, fold), res.weights)
    return res


def dask_address(address: str | None = None) -> str | None:
    """The Dask scheduler the fold tasks go to: ``address``, else ``$MAMMOFLOW_DASK_ADDRESS``."""
    return address or os.environ.get(DASK_ADDRESS_ENV) or None


def fan_out(
    cfg: Config, inp: StudyInputs, folds: Sequence[int], layout: Layout, address: str
) -> dict[int, FoldResult]:
    """Run fold tasks ``folds`` on the Dask cluster at ``address``: one task per fold.

    Each worker loads the inputs and reads the feature cache this process extracted (the
    project folder must be on a file system the workers share, at the same path); it returns
    a portable result. Results come back by fold number, in the order the stage logs them.
    """
    from distributed import Client

    if not folds:
        return {}
    root = Layout(layout.root.resolve())  # workers may start in another folder
    log.info("%s/%s: %d fold tasks on Dask at %s", inp.dataset, inp.backbone, len(folds), address)
    with Client(address, set_as_default=False) as client:
        futures = {
            f: client.submit(
                remote_fold_task,
                cfg,
                inp.dataset,
                inp.backbone,
                f,
                root,
                key=f"fold-{inp.dataset}-{inp.backbone}-{f}-{inp.key[:12]}",
                pure=False,
            )
            for f in folds
        }
        return {f: fut.result() for f, fut in futures.items()}


# ----------------------------------------------------------------------------- the study


@dataclass
class _Context:
    """What the steps of one study share."""

    inp: StudyInputs
    bb: BackboneModel
    data: FeatureSet | ImageSet
    run: StudyRun
    layout: Layout
    computed: Mapping[int, FoldResult]
    progress: bool
    trainer: FoldTrainer | None = None
    example: np.ndarray | None = None
    eta: _Eta | None = None

    def result(self, fold: int) -> FoldResult:
        """Fold ``fold``'s result: handed in (Dask), else trained here on the shared trainer."""
        if fold in self.computed:
            return self.computed[fold]
        from mammoflow.training.fit import FoldTrainer, fold_task

        if self.trainer is None:
            cfg = self.inp.cfg
            self.trainer = FoldTrainer(
                self.data,
                self.bb,
                model_cfg=cfg.model,
                train_cfg=cfg.train,
                n_classes=self.inp.n_classes,
            )
        res = fold_task(
            self.inp,
            self.bb,
            self.data,
            fold,
            trainer=self.trainer,
            progress=self.eta.event if self.eta else None,
        )
        _save_weights(self.layout.fold_weights(self.inp.key, self.bb.name, fold), res.weights)
        return res

    def evaluation(self, ids: Sequence[str], y: np.ndarray, prob: np.ndarray) -> Evaluation:
        from mammoflow.evaluation.metrics import compute_metrics
        from mammoflow.tracking import Evaluation

        m = compute_metrics(y, prob, self.inp.class_names)
        return Evaluation(list(ids), y, prob, m, self.inp.class_names)

    def heads(self, weights: Sequence[Sequence[np.ndarray]]) -> list[Any]:
        """Trained tails + heads rebuilt from their weights (one per fold, or the refit one)."""
        from mammoflow.training.fit import tail_head_from_weights

        return [
            tail_head_from_weights(
                self.bb,
                w,
                model_cfg=self.inp.cfg.model,
                n_classes=self.inp.n_classes,
                name=f"{self.bb.name}_fold_{i}",
            )
            for i, w in enumerate(weights, start=1)
        ]

    def serving(self, heads: list[Any], temperature: float | None = None) -> Any:
        """The full serving model of one (refit) or several (ensemble) trained tails + heads.

        With ``temperature`` it returns calibrated probabilities (T applied to each member).
        """
        from mammoflow.models.build import ensemble_model

        return ensemble_model(self.bb, heads, temperature)


def run_study(
    cfg: Config,
    dataset: str,
    backbone: str,
    *,
    layout: Layout | None = None,
    tracker: Tracker | None = None,
    progress: bool = False,
    computed: Mapping[int, FoldResult] | None = None,
    dask: str | None = None,
) -> StudyResult:
    """Train and evaluate ``backbone`` on ``dataset``; log it to MLflow; write the DVC outputs.

    Args:
        cfg: the configuration.
        dataset / backbone: what to study.
        layout: project layout.
        tracker: MLflow tracker (default: the project's store).
        progress: progress bar for extraction, one line per epoch with an ETA.
        computed: fold results already computed elsewhere, by fold number.
        dask: Dask scheduler address for the fold tasks (default ``$MAMMOFLOW_DASK_ADDRESS``;
            none: the folds train here, one after the other).
    """
    from mammoflow.tracking import TAG_DATA, TAG_LOCATION, StudyRun, Tracker

    t_start = time.perf_counter()
    layout = layout or Layout()
    inp = load_inputs(cfg, dataset, backbone, layout)
    bb, data = load_features(inp, layout, progress=progress)
    t_features = time.perf_counter() - t_start
    tracker = tracker or Tracker(root=layout.root)
    tags = _tags(inp, bb, layout)
    run = StudyRun.open(
        tracker,
        dataset=dataset,
        backbone=backbone,
        key=inp.key,
        tags=tags,
        params=inp.params,
    )
    manifest = layout.processed(dataset) / "manifest.parquet"
    run.log_dataset(inp.frame, str(manifest), inp.data_hash, inp.split_hash, inp.cfg.split.group_by)
    run.log_dvc_data(dataset_source(tags), tags[TAG_DATA], tags[TAG_LOCATION])
    ctx = _Context(inp, bb, data, run, layout, computed or {}, progress)
    ctx.example = _raw_example(inp.frame)
    with run.guard():
        finished = run.finished()
        address = dask_address(dask)
        if address:
            todo = [f for f in _todo(inp, finished) if f not in ctx.computed]
            ctx.computed = {**ctx.computed, **fan_out(cfg, inp, todo, layout, address)}
        if progress:
            ctx.eta = _Eta(backbone, inp.cfg.train.epochs, _fold_count(inp, finished))
        folds = {f: _cv_fold(ctx, f, finished.get(f"fold-{f}")) for f in inp.folds}
        temperature = _temperature(folds, inp.n_classes)  # before the served model is built
        test_run_id, test_rec, histories = _test(ctx, folds, finished.get("test"), temperature)
        result = _aggregate(ctx, folds, test_rec, test_run_id, temperature)
    result.seconds = {"features": t_features, "total": time.perf_counter() - t_start}
    histories.update({f: o.history for f, o in folds.items() if o.history})
    write_outputs(result, layout, folds, test_rec, histories)
    return result


def _todo(inp: StudyInputs, finished: Mapping[str, Any]) -> list[int]:
    """The fold tasks a study still has to run: unfinished CV folds, and 0 for a pending refit."""
    todo = [f for f in inp.folds if f"fold-{f}" not in finished]
    if inp.cfg.evaluate.test_model == "refit" and "test" not in finished:
        todo.append(0)
    return todo


def _fold_count(inp: StudyInputs, finished: Mapping[str, Any]) -> int:
    return len(_todo(inp, finished))


def _cv_fold(ctx: _Context, fold: int, done: Any | None) -> FoldOutcome:
    """Fold ``fold``: reused from its FINISHED run, else trained (or handed in) and logged."""
    if done is not None:
        metrics, val_rec = ctx.run.reused_fold(done)
        test_rec = ctx.run.tracker.load_json_artifact(done.info.run_id, "test_predictions.json")
        history = ctx.run.tracker.load_history(done)  # the learning curves, as logged
        return FoldOutcome(fold, metrics, val_rec, test_rec, history=history, reused=True)
    run_id = ctx.run.start_fold(fold)  # RUNNING in the UI while it trains; FAILED on a crash
    res = _failed_on_error(ctx, run_id, lambda: ctx.result(fold))
    val = ctx.evaluation(res.val_ids, res.val_true, res.val_prob)
    test = ctx.evaluation(res.test_ids, res.test_true, res.test_prob)
    model = None
    if ctx.inp.cfg.tracking.log_models == "all":
        model = ctx.serving(ctx.heads([res.weights]))
    ctx.run.tracker.log_dict(run_id, test.record(), "test_predictions.json")
    figures = _figures(val, res.history)
    ctx.run.log_fold(
        fold, val, res.history, res.timing, model, ctx.example, run_id=run_id, artifacts=figures
    )
    return FoldOutcome(
        fold, dict(val.metrics), val.record(), test.record(), res.weights, res.history
    )


def _figures(
    ev: Evaluation, history: Mapping[str, Sequence[float]] | None = None
) -> dict[str, Any]:
    """An evaluation's artifacts for its run, in logging order: the classification report,
    confusion matrix and ROC curve (and a fold's training curves)."""
    from mammoflow.reporting import figures as fg

    out: dict[str, Any] = {
        "classification_report.txt": fg.classification_report_text(
            ev.y_true, ev.prob, ev.class_names
        ),
        "confusion_matrix.png": fg.confusion_figure(ev.y_true, ev.prob, ev.class_names),
        "roc_curve.png": fg.roc_figure(ev.y_true, ev.prob, ev.class_names),
    }
    if history is not None:
        out["training_curves.png"] = fg.curves_figure(history)
    return out


def _failed_on_error(ctx: _Context, run_id: str, train: Callable[[], FoldResult]) -> FoldResult:
    """``train()``; on any error or interrupt (SIGTERM) the run ends FAILED first."""
    try:
        return train()
    except BaseException:
        with contextlib.suppress(Exception):
            ctx.run.tracker.end(run_id, "FAILED")
        raise


def _temperature(folds: Mapping[int, FoldOutcome], n_classes: int) -> float:
    """T fitted on the folds' out-of-fold validation predictions (calibration.py)."""
    from mammoflow.evaluation.calibration import fit_temperature

    _, val_y, val_p = _oof(folds, n_classes)
    return fit_temperature(val_y, val_p)


def _test(
    ctx: _Context, folds: Mapping[int, FoldOutcome], done: Any | None, temperature: float
) -> tuple[str, dict[str, Any], dict[int, dict[str, list[float]]]]:
    """The held-out test: ``(run id, predictions record, {0: refit history})``.

    The predictions record holds the raw probabilities (what the study's metrics describe);
    the logged serving model applies ``temperature`` (calibrated probabilities where served).
    """
    if done is not None:
        run_id = done.info.run_id
        return run_id, ctx.run.tracker.load_json_artifact(run_id, "predictions.json"), {}
    mode = ctx.inp.cfg.evaluate.test_model
    log_model = ctx.inp.cfg.tracking.log_models in ("all", "final")
    if mode == "refit":
        run_id = ctx.run.start_test(mode)
        res = _failed_on_error(ctx, run_id, lambda: ctx.result(0))
        ev = ctx.evaluation(res.test_ids, res.test_true, res.test_prob)
        heads = ctx.heads([res.weights])  # one rebuild serves the logged model and head.keras
        model = ctx.serving(heads, temperature) if log_model else None
        figures = _figures(ev)
        ctx.run.log_test(
            ev, mode, res.history, model, ctx.example, run_id=run_id, artifacts=figures
        )
        _save_head(ctx, heads)
        return run_id, ev.record(), {0: res.history}
    first = folds[min(folds)].test
    prob = np.mean([np.asarray(o.test["prob"], np.float32) for o in folds.values()], axis=0)
    ev = ctx.evaluation(first["image_id"], np.asarray(first["y_true"], np.int64), prob)
    heads = ctx.heads([_fold_weights(ctx, o) for o in folds.values()]) if log_model else []
    model = ctx.serving(heads, temperature) if heads else None
    run_id = ctx.run.log_test(ev, mode, None, model, ctx.example, artifacts=_figures(ev))
    if heads:
        _save_head(ctx, heads)
    return run_id, ev.record(), {}


def _fold_weights(ctx: _Context, outcome: FoldOutcome) -> list[np.ndarray]:
    """A fold's trained weights: in memory, from the local fold cache, else trained again."""
    if outcome.weights is not None:
        return outcome.weights
    path = ctx.layout.fold_weights(ctx.inp.key, ctx.bb.name, outcome.fold)
    if path.is_file():
        with np.load(path) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]
    res = ctx.result(outcome.fold)
    note = _retrained_note(outcome, res.val_ids, res.val_prob)
    warnings.warn(
        f"fold {outcome.fold}'s weights were not in the fold cache ({path}): it was trained "
        f"again for the served model; {note}",
        RetrainedFoldWarning,
        stacklevel=2,
    )
    ctx.run.tracker.set_tags(ctx.run.parent_id, {f"{TAG_RETRAINED}{outcome.fold}": note})
    return res.weights


def _retrained_note(outcome: FoldOutcome, ids: Sequence[str], prob: np.ndarray) -> str:
    """How a fold trained again compares with its logged run, on the same validation images."""
    logged = dict(zip(outcome.val.get("image_id", []), outcome.val.get("prob", []), strict=False))
    if not ids or set(ids) != set(logged):
        return "its validation images differ from the logged run's: not comparable"
    delta = float(np.max(np.abs(np.asarray([logged[i] for i in ids], np.float64) - prob)))
    if delta <= RETRAIN_TOLERANCE:
        return f"its validation predictions match the logged run's (max |dp| {delta:.1e})"
    return (
        f"its validation predictions DIFFER from the logged run's (max |dp| {delta:.3g}): the "
        "served ensemble's member is not the logged fold"
    )


def _aggregate(
    ctx: _Context,
    folds: Mapping[int, FoldOutcome],
    test_rec: Mapping[str, Any],
    test_run_id: str,
    temperature: float,
) -> StudyResult:
    """CV mean/std, test metrics with patient-bootstrap CIs, logged on the parent run."""
    from mammoflow.evaluation import metrics as mt
    from mammoflow.reporting.figures import folds_figure

    inp, cfg = ctx.inp, ctx.inp.cfg
    ids, y, prob = _from_record(test_rec, inp.n_classes)
    test = mt.compute_metrics(y, prob, inp.class_names)
    patients = inp.patients()
    ci = mt.bootstrap_ci(
        y,
        prob,
        [patients[i] for i in ids],
        inp.class_names,
        n=max(cfg.evaluate.bootstrap, 1),
        ci=cfg.evaluate.ci,
        seed=cfg.train.seed,
    )
    fold_metrics = {f: o.metrics for f, o in sorted(folds.items())}
    cv = mt.aggregate(list(fold_metrics.values()))
    reused = [f for f, o in sorted(folds.items()) if o.reused]
    ctx.run.finish(cv, test, ci, folds_figure(fold_metrics, inp.backbone), reused)
    calibration = _calibrate(
        ctx, folds, (ids, y, prob), [patients[i] for i in ids], test_run_id, temperature
    )
    subgroups = _subgroups(ctx, folds, (ids, y, prob))
    return StudyResult(
        dataset=inp.dataset,
        backbone=inp.backbone,
        class_names=inp.class_names,
        fold_metrics=fold_metrics,
        cv=cv,
        test=test,
        test_ci=ci,
        parent_run_id=ctx.run.parent_id,
        test_run_id=test_run_id,
        test_model=cfg.evaluate.test_model,
        resumed_folds=reused,
        trained_folds=[f for f, o in sorted(folds.items()) if not o.reused],
        calibration=calibration,
        subgroups=subgroups,
    )


def _oof(
    folds: Mapping[int, FoldOutcome], n_classes: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The out-of-fold validation predictions of every fold, concatenated."""
    recs = [_from_record(o.val, n_classes) for _, o in sorted(folds.items())]
    if not recs:
        return [], np.zeros(0, np.int64), np.zeros((0, n_classes), np.float32)
    ids = [i for r in recs for i in r[0]]
    return ids, np.concatenate([r[1] for r in recs]), np.concatenate([r[2] for r in recs])


def _subgroups(
    ctx: _Context,
    folds: Mapping[int, FoldOutcome],
    test: tuple[list[str], np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Test and out-of-fold metrics per subgroup (counts, CIs, small flag), logged."""
    from mammoflow.evaluation import subgroups as sg

    inp, cfg = ctx.inp, ctx.inp.cfg
    factors = sg.factor_frame(inp.frame, cfg.dataset(inp.dataset).kind)
    boot: dict[str, Any] = {
        "n": max(cfg.evaluate.bootstrap, 1),
        "ci": cfg.evaluate.ci,
        "seed": cfg.train.seed,
    }
    patients = inp.patients()
    tables = {
        name: sg.subgroup_rows(*data, factors, patients, inp.class_names, **boot)
        for name, data in (("test", test), ("out-of-fold", _oof(folds, inp.n_classes)))
    }
    ctx.run.log_subgroups(tables, sg.subgroup_markdown(tables, ci=cfg.evaluate.ci))
    return tables


def _calibrate(
    ctx: _Context,
    folds: Mapping[int, FoldOutcome],
    test: tuple[list[str], np.ndarray, np.ndarray],
    groups: Sequence[str],
    test_run_id: str,
    temperature: float,
) -> dict[str, Any]:
    """Temperature fitted on the out-of-fold validation predictions, applied to the test as the
    served model applies it: to each fold model of an ensemble before the mean."""
    from mammoflow.evaluation import calibration as cal

    cfg = ctx.inp.cfg
    ids, y, prob = test
    _, val_y, val_p = _oof(folds, ctx.inp.n_classes)
    members = None
    if cfg.evaluate.test_model == "ensemble":
        members = []
        for f, o in sorted(folds.items()):
            m_ids, _, m_prob = _from_record(o.test, ctx.inp.n_classes)
            if m_ids != ids:
                raise ValueError(f"fold {f}'s test predictions are not of the ensemble's rows")
            members.append(m_prob)
    res = cal.calibrate(
        val_y,
        val_p,
        y,
        prob,
        groups,
        n=max(cfg.evaluate.bootstrap, 1),
        ci=cfg.evaluate.ci,
        seed=cfg.train.seed,
        test_members=members,
        temperature=temperature,
    )
    figure = cal.reliability_figure(
        res.bins, f"{ctx.inp.backbone}: test (T = {res.temperature:.2f})"
    )
    ctx.run.log_calibration(test_run_id, res.metrics(), res.to_dict(), figure)
    return res.to_dict()


def _tags(inp: StudyInputs, bb: BackboneModel, layout: Layout) -> dict[str, str]:
    return {
        "split_hash": inp.split_hash,
        "dvc_data_hash": inp.data_hash,
        **data_lineage(inp.dataset, layout.root),
        "mammoflow.packages": json.dumps(packages(), sort_keys=True),
        "weights_source": bb.weights.source,
        "weights_sha256": bb.weights.sha256,
        "precision": inp.precision,
        "device": device(),
        "seed": str(inp.cfg.train.seed),
        **git_state(layout.root),
        **versions(),
        **_source(layout),
    }


def _source(layout: Layout) -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column and the git commit)."""
    commit = git_state(layout.root)["git_commit"]
    tags = {"mlflow.source.name": "mammoflow train", "mlflow.source.type": "LOCAL"}
    return tags | ({"mlflow.source.git.commit": commit} if commit != "unknown" else {})


class _Eta:
    """Progress lines with the time left for this backbone's fold tasks.

    One line when a fold ends, and one per epoch when epochs are slow (at most every
    ``every_s`` seconds), so a real study shows its ETA and the sample's log stays short.
    """

    def __init__(self, backbone: str, epochs: int, folds: int, every_s: float = 10.0) -> None:
        self.backbone, self.total, self.every_s = backbone, max(epochs * folds, 1), every_s
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def event(self, event: TrainEvent) -> None:
        if event.kind != "epoch_end":
            return
        self.done += 1
        now = time.perf_counter()
        fold_end = event.epoch == event.epochs
        if not fold_end and now - self.last < self.every_s:
            return
        self.last = now
        left = (now - self.t0) / self.done * max(self.total - self.done, 0)
        loss = event.logs.get("loss", math.nan)
        val = event.logs.get("val_accuracy")
        name = "refit" if event.fold == 0 else f"fold {event.fold}"
        extra = f" val_acc {val:.3f}" if val is not None else ""
        say(
            f"  {self.backbone} {name} epoch {event.epoch}/{event.epochs} loss {loss:.4f}{extra}"
            f"  ETA {duration(left)}"
        )


# ----------------------------------------------------------------------------- outputs


def _from_record(
    rec: Mapping[str, Any], n_classes: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    prob = np.asarray(rec["prob"], np.float32).reshape(-1, n_classes)
    return list(rec["image_id"]), np.asarray(rec["y_true"], np.int64), prob


def _save_weights(path: Path, weights: Sequence[np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, *weights)  # stored as arr_0, arr_1, …
    atomic_write_bytes(path, buf.getvalue())


def _save_head(ctx: _Context, heads: list[Any]) -> None:
    """``models/<dataset>/<backbone>/head.keras``: the test model on cached features."""
    from mammoflow.models.build import ensemble_head

    models = ctx.layout.models(ctx.inp.dataset, ctx.inp.backbone)
    models.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(dir=models) as tmp:
        path = Path(tmp) / "head.keras"
        ensemble_head(ctx.bb, heads).save(path)
        path.replace(models / "head.keras")


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


def write_outputs(
    result: StudyResult,
    layout: Layout,
    folds: Mapping[int, FoldOutcome],
    test_rec: Mapping[str, Any],
    histories: Mapping[int, Mapping[str, list[float]]],
) -> None:
    """DVC outputs of the train stage: metrics JSON, plots data, predictions, histories."""
    from mammoflow.evaluation import metrics as mt
    from mammoflow.reporting import dvc_views

    ds, bbn = result.dataset, result.backbone
    detail = finite_json(result.summary())
    atomic_write_json(layout.metrics(ds, bbn), detail)
    atomic_write_json(layout.summary(ds, bbn), dvc_views.summary_row(detail))
    _, y, prob = _from_record(test_rec, len(result.class_names))
    plots = layout.plots(ds, bbn)
    atomic_write_json(
        plots / "confusion.json", mt.confusion_rows(y, prob.argmax(axis=1), result.class_names)
    )
    atomic_write_json(plots / "roc.json", finite_json(mt.roc_points(y, prob)))
    curves = dvc_views.plot_data(y, prob, result.calibration or {}, histories)
    for name, rows in curves.items():
        atomic_write_json(plots / name, finite_json(rows))
    models = layout.models(ds, bbn)
    atomic_write_json(
        models / "predictions.json",
        {
            "test": dict(test_rec),
            "folds": {str(k): o.val for k, o in folds.items()},
            "fold_test": {str(k): o.test for k, o in folds.items()},
        },
    )
    atomic_write_json(models / "history.json", {str(k): dict(v) for k, v in histories.items()})
    if result.calibration:
        atomic_write_json(models / "calibration.json", finite_json(result.calibration))
    if result.subgroups:
        from mammoflow.evaluation.subgroups import subgroup_markdown

        atomic_write_json(models / "subgroups.json", finite_json(result.subgroups))
        atomic_write_text(models / "subgroups.md", subgroup_markdown(result.subgroups))
    atomic_write_text(models / "README.txt", _models_readme(result))


def _models_readme(result: StudyResult) -> str:
    head = (
        "the mean of the K fold tails + heads"
        if result.test_model == "ensemble"
        else "the tail + head trained on every CV row"
    )
    return (
        f"{result.dataset} / {result.backbone}\n"
        f"head.keras: the test model ({result.test_model}): {head} (input: cached prefix "
        "features; written when tracking.log_models logs a model)\n"
        "predictions.json: the test model's held-out test predictions ('test'), each fold "
        "model's validation ('folds') and test ('fold_test') predictions\n"
        "history.json: per-epoch curves (fold 0 = the refit model)\n"
        "calibration.json: temperature fitted on the out-of-fold validation predictions "
        "(applied as softmax(log p / T) to each member, then averaged; the registered model "
        "does it itself), test ECE raw and calibrated\n"
        "subgroups.json / .md: test and out-of-fold metrics per subgroup with counts and CIs\n"
        f"MLflow parent run: {result.parent_run_id} (full serving models are in MLflow)\n"
    )


def _check_backbone(cfg: Config, dataset: str, backbone: str) -> None:
    cfg.dataset(dataset)
    if backbone not in cfg.model.backbones:
        raise ValueError(
            f"backbone {backbone!r} is not in model.backbones {cfg.model.backbones!r}; add it there"
        )


def train_stage(
    cfg: Config,
    dataset: str,
    backbone: str,
    layout: Layout | None = None,
    progress: bool = False,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """K-fold training of one backbone on one dataset, tracked in MLflow (resumable).

    With ``dask_address`` or ``$MAMMOFLOW_DASK_ADDRESS`` set, the features are extracted here
    once and the fold tasks run on that Dask cluster, one task per fold (same numbers).
    """

    _check_backbone(cfg, dataset, backbone)
    result = run_study(
        cfg,
        dataset,
        backbone,
        layout=layout,
        progress=progress,
        dask=dask_address,
    )
    return {
        "dataset": dataset,
        "backbone": backbone,
        "trained_folds": result.trained_folds,
        "resumed_folds": result.resumed_folds,
        "test_model": result.test_model,
        "cv_f1_macro_mean": result.cv.get("f1_macro_mean"),
        "test_f1_macro": result.test.get("f1_macro"),
        "fold_metrics": result.fold_metrics,
        "parent_run_id": result.parent_run_id,
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
    }
