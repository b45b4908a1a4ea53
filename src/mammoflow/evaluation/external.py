"""External validation: a registered model on a labelled dataset it never trained on.

``mammoflow external --model MODEL_URI --dataset D`` brings ``D`` through the training's own
readers, acceptance rules and conversion (acquire → ingest → validate → convert), scores every
converted image with the model, and reports the study's test evidence for it: metrics with
patient-bootstrap CIs, calibration before and after the model's temperature, subgroups, a
confusion matrix, and the shift from the model's own held-out test (Δ with a CI from two
independent patient bootstraps). Logged as an ``external`` run in the model's experiment, linked
to the registered version (tag ``mammoflow.external.<D>``), in its model card, and written to
``reports/<D>/external.json`` and ``reports/<D>/report.html``.

Discrimination and the shift use the raw probabilities (the numbers the model's own test
reports); calibration shows raw and calibrated (what the registered model serves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mammoflow.config import Config
from mammoflow.paths import Layout

if TYPE_CHECKING:
    import pandas as pd

    from mammoflow.tracking import ModelSource

SHIFT_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")


class ExternalError(ValueError):
    """The external dataset cannot be scored with this model (the message says why)."""


@dataclass(frozen=True)
class Scored:
    """One labelled set of predictions: ids, patients, truth, raw and calibrated probabilities."""

    ids: list[str]
    groups: list[str]
    y: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray | None = None


def check_labels(
    model_classes: Sequence[str], data_classes: Sequence[str], model: str, dataset: str
) -> None:
    """Refuse a dataset whose label space is not the model's (names both).

    Raises:
        ExternalError: the classes differ (names, order or number).
    """
    if tuple(model_classes) != tuple(data_classes):
        raise ExternalError(
            f"label spaces differ: model {model} predicts {list(model_classes)} but dataset "
            f"{dataset} is labelled {list(data_classes)}; validate on a dataset of the same kind"
        )


def shift_ci(
    ext: Scored,
    own: Scored,
    class_names: Sequence[str],
    *,
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Δ = external − own test per metric, with a percentile CI of two independent patient
    bootstraps (each set resampled by its own patients).

    Returns:
        ``{metric: {"external", "own", "delta", "low", "high", "n_valid"}}``.
    """
    from mammoflow.evaluation.metrics import compute_metrics, patient_rows, percentile_interval

    def metric(s: Scored, idx: np.ndarray | None = None) -> dict[str, float]:
        y, p = (s.y, s.raw) if idx is None else (s.y[idx], s.raw[idx])
        return compute_metrics(y, p, class_names)

    rng = np.random.default_rng(seed)
    rows = [patient_rows(np.asarray(s.groups)) for s in (ext, own)]
    deltas: dict[str, list[float]] = {m: [] for m in SHIFT_METRICS}
    for _ in range(max(n, 1)):
        picks = [np.concatenate([r[i] for i in rng.integers(0, len(r), size=len(r))]) for r in rows]
        a, b = metric(ext, picks[0]), metric(own, picks[1])
        for m in SHIFT_METRICS:
            deltas[m].append(a[m] - b[m])
    pe, po = metric(ext), metric(own)
    out: dict[str, dict[str, float]] = {}
    for m in SHIFT_METRICS:
        low, high, valid = percentile_interval(deltas[m], ci)
        out[m] = {
            "external": pe[m],
            "own": po[m],
            "delta": pe[m] - po[m],
            "low": low,
            "high": high,
            "n_valid": float(valid),
        }
    return out


def evidence(
    ext: Scored,
    own: Scored | None,
    class_names: Sequence[str],
    factors: Any,
    *,
    n: int,
    ci: float,
    seed: int,
) -> dict[str, Any]:
    """The study's test evidence for an external set (pure): metrics, CIs, calibration,
    confusion, subgroups and the shift from the model's own test."""
    from mammoflow.evaluation import calibration as cal
    from mammoflow.evaluation import metrics as mt
    from mammoflow.evaluation.subgroups import subgroup_rows

    boot: dict[str, Any] = {"n": max(n, 1), "ci": ci, "seed": seed}
    out: dict[str, Any] = {
        "n_images": len(ext.ids),
        "n_patients": len(set(ext.groups)),
        "metrics": mt.compute_metrics(ext.y, ext.raw, class_names),
        "ci": mt.bootstrap_ci(ext.y, ext.raw, ext.groups, class_names, **boot),
        "confusion": mt.confusion_rows(ext.y, ext.raw.argmax(axis=1), class_names),
        "calibration": {
            "raw": cal.calibration_metrics(ext.y, ext.raw),
            "raw_ci": cal.bootstrap_calibration_ci(ext.y, ext.raw, ext.groups, **boot),
            "reliability": {"raw": cal.reliability_bins(ext.y, ext.raw)},
        },
        "subgroups": subgroup_rows(
            ext.ids,
            ext.y,
            ext.raw,
            factors,
            dict(zip(ext.ids, ext.groups, strict=True)),
            class_names,
            **boot,
        ),
    }
    if ext.calibrated is not None:
        c = out["calibration"]
        c["calibrated"] = cal.calibration_metrics(ext.y, ext.calibrated)
        c["calibrated_ci"] = cal.bootstrap_calibration_ci(ext.y, ext.calibrated, ext.groups, **boot)
        c["reliability"]["calibrated"] = cal.reliability_bins(ext.y, ext.calibrated)
    if own is not None:
        out["shift"] = shift_ci(ext, own, class_names, **boot)
        out["own_n_images"] = len(own.ids)
    return out


def flat_metrics(ev: Mapping[str, Any]) -> dict[str, float]:
    """The evidence as MLflow metrics: ``external_<m>``, CIs, ECE, ``shift_<m>`` with CIs."""
    out: dict[str, float] = {"external_n_images": float(ev["n_images"])}
    for m, v in ev["metrics"].items():
        out[f"external_{m}"] = float(v)
    for m, c in ev["ci"].items():
        out[f"external_{m}_ci_low"], out[f"external_{m}_ci_high"] = c["low"], c["high"]
    cal = ev["calibration"]
    for kind in ("raw", "calibrated"):
        if kind in cal:
            prefix = "external_ece" if kind == "raw" else "external_calibrated_ece"
            out[prefix] = cal[kind]["ece"]
            out[f"{prefix}_ci_low"] = cal[f"{kind}_ci"]["ece"]["low"]
            out[f"{prefix}_ci_high"] = cal[f"{kind}_ci"]["ece"]["high"]
    for m, s in ev.get("shift", {}).items():
        out[f"shift_{m}"], out[f"shift_{m}_ci_low"], out[f"shift_{m}_ci_high"] = (
            s["delta"],
            s["low"],
            s["high"],
        )
    return out


# ----------------------------------------------------------------------------- the command


def score(model: Any, paths: Sequence[str], size: int, batch: int = 16) -> np.ndarray:
    """The model's probabilities of the converted PNGs (as training loaded them)."""
    from mammoflow.models.features import load_images

    parts = []
    for start in range(0, len(paths), batch):
        x = load_images(paths[start : start + batch], size)
        parts.append(np.asarray(model.predict(x, batch_size=len(x), verbose=0), np.float64))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def _prepare(cfg: Config, dataset: str, layout: Layout) -> Any:
    """Acquire → ingest → validate → convert ``dataset``: the training's readers and rules."""
    from mammoflow.data.acquire import acquire_stage
    from mammoflow.data.convert import convert_stage
    from mammoflow.data.ingest import ingest_stage
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.validate import validate_stage

    for step in (acquire_stage, ingest_stage, validate_stage):
        step(cfg, dataset, layout)
    convert_stage(cfg, dataset, layout, progress=False)
    return read_manifest(layout.processed(dataset))


def _own_test(source: ModelSource, layout: Layout, tracker: Any) -> tuple[Scored, str]:
    """The model's own held-out test predictions (raw), grouped by patient where the source
    manifest is here, else by image (said in the returned note)."""
    from mammoflow.data.manifest import read_manifest

    rec = tracker.load_json_artifact(source.test_run_id, "predictions.json")
    ids = [str(i) for i in rec["image_id"]]
    manifest = layout.processed(source.dataset) / "manifest.parquet"
    note = "patient bootstrap"
    if manifest.is_file():
        frame = read_manifest(manifest)
        patients = dict(zip(frame["image_id"].astype(str), frame["patient_id"], strict=True))
        groups = [str(patients.get(i, i)) for i in ids]
    else:
        groups, note = ids, f"image bootstrap ({manifest} not here: patients unknown)"
    y = np.asarray(rec["y_true"], np.int64)
    prob = np.asarray(rec["prob"], np.float64).reshape(len(ids), -1)
    return Scored(ids, groups, y, prob), note


def _score_frame(model: Any, frame: pd.DataFrame, size: int) -> tuple[Scored, float | None]:
    """The served model's probabilities on the dataset's converted images (and, for a
    temperature-scaled model, the uncalibrated ones as ``raw``); the temperature."""
    from mammoflow.models.build import model_temperature, with_temperature

    paths = [str(p) for p in frame["converted_path"]]
    t = model_temperature(model)
    served = score(model, paths, size)
    raw = score(with_temperature(model, 1.0), paths, size) if t else served
    scored = Scored(
        [str(i) for i in frame["image_id"]],
        [str(p) for p in frame["patient_id"]],
        frame["label_index"].to_numpy(np.int64),
        raw,
        served if t else None,
    )
    return scored, t


def run_external(
    cfg: Config, model_uri: str, dataset: str, layout: Layout | None = None
) -> dict[str, Any]:
    """Validate ``model_uri`` on ``dataset`` end to end; log, link, report. Returns a summary.

    Raises:
        ExternalError: the label spaces differ, or the model trained on ``dataset`` itself.
        ValueError: the model URI names nothing in the store.
    """
    from mammoflow.data.manifest import CLASSES
    from mammoflow.evaluation.subgroups import factor_frame
    from mammoflow.files import atomic_write_json, atomic_write_text, finite_json
    from mammoflow.tracking import Tracker

    layout = layout or Layout()
    cfg = cfg.for_dataset(dataset)
    tracker = Tracker(root=layout.root)
    source = tracker.model_source(model_uri)
    if source.dataset == dataset:
        raise ExternalError(
            f"model {model_uri} was trained on {dataset}: external validation needs a dataset "
            "the model never saw"
        )
    classes = CLASSES[cfg.dataset(dataset).kind]
    check_labels(CLASSES[cfg.dataset(source.dataset).kind], classes, model_uri, dataset)
    frame = _prepare(cfg, dataset, layout)
    model = tracker.load_serving_model(model_uri).model
    ext, t = _score_frame(model, frame, cfg.convert.size)
    own, own_note = _own_test(source, layout, tracker)
    ev = evidence(
        ext,
        own,
        classes,
        factor_frame(frame, cfg.dataset(dataset).kind),
        n=cfg.evaluate.bootstrap,
        ci=cfg.evaluate.ci,
        seed=cfg.train.seed,
    )
    ev |= {
        "dataset": dataset,
        "model_uri": model_uri,
        "model": source.label,
        "source_dataset": source.dataset,
        "temperature": t,
        "own_test_grouping": own_note,
        "class_names": list(classes),
        "ci_level": cfg.evaluate.ci,
    }
    run_id = tracker.open_external(source, dataset)
    ev["mlflow_run_id"] = run_id
    try:
        page = render(ev, ext)
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    tracker.log_external(run_id, source, dataset, flat_metrics(ev), ev, page)
    out_dir = layout.reports() / dataset
    atomic_write_json(out_dir / "external.json", finite_json(ev))
    atomic_write_text(out_dir / "report.html", page)
    if source.name:
        tracker.write_model_cards(source.dataset)
    return {
        "dataset": dataset,
        "model": source.label,
        "images": ev["n_images"],
        "f1_macro": ev["metrics"]["f1_macro"],
        "shift_f1_macro": ev.get("shift", {}).get("f1_macro", {}).get("delta"),
        "mlflow_run_id": run_id,
        "report": str(out_dir / "report.html"),
    }


# ----------------------------------------------------------------------------- the page


def render(ev: Mapping[str, Any], ext: Scored) -> str:
    """``reports/<D>/report.html`` of an external validation (``templates/external.html.j2``)."""
    from mammoflow.evaluation.calibration import reliability_figure
    from mammoflow.reporting import figures as report
    from mammoflow.reporting.report import (
        _LABELS,
        _ci_cell,
        _fmt,
        _png,
        _subgroup_header,
        _subgroup_tables,
    )
    from mammoflow.templates import render as render_template

    names = ev["class_names"]
    rows = [
        [_LABELS[k], _ci_cell(ev["metrics"].get(k), ev["ci"].get(k)) + " %"]
        for k in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
    ]
    shift = [
        [_LABELS.get(m, m), _fmt(s["own"]), _fmt(s["external"]), _ci_cell(s["delta"], s)]
        for m, s in ev.get("shift", {}).items()
    ]
    cal = ev["calibration"]
    cal_rows = [
        [kind, _ci_cell(cal[kind]["ece"], cal[f"{kind}_ci"]["ece"], pct=False)]
        for kind in ("raw", "calibrated")
        if kind in cal
    ]
    t = _fmt(ev.get("temperature"), False)
    figures = [
        ("confusion (raw arg-max)", _png(report.confusion_figure(ext.y, ext.raw, names))),
        ("reliability", _png(reliability_figure(cal["reliability"], f"T = {t}"))),
    ]
    return render_template(
        "external.html.j2",
        **{k: str(ev[k]) for k in ("dataset", "model", "model_uri", "source_dataset")},
        n_images=ev["n_images"],
        n_patients=ev["n_patients"],
        run_id=str(ev.get("mlflow_run_id")),
        level=f"{ev['ci_level']:.0%}",
        metric_rows=rows,
        shift_rows=shift,
        own_n_images=ev.get("own_n_images", "?"),
        own_grouping=str(ev.get("own_test_grouping")),
        calibration_rows=cal_rows,
        temperature=t,
        figures=figures,
        subgroups=_subgroup_tables({"external": ev["subgroups"]}),
        subgroup_header=_subgroup_header(),
    )
