"""The per-dataset study report: ``reports/<dataset>/report.html``, one self-contained page.

:func:`collect` reads what the pipeline already wrote — the train stage's metrics JSON,
predictions, histories, calibration and subgroup files per backbone, the evaluate stage's
champion, the data-validation summary, the audit when one ran — plus the provenance tags of the
MLflow parent runs; :func:`render` turns that plain data into formatted values and figures
(base64 PNG), laid out by the template ``templates/report.html.j2``. Nothing in the report is
typed by hand: each number comes from those files.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mammoflow.config import Config
from mammoflow.evaluation.calibration import T_BOUNDS
from mammoflow.paths import Layout
from mammoflow.reporting import figures as report
from mammoflow.reporting.card import PAPER_CLAIM

if TYPE_CHECKING:
    from mammoflow.config import Config
    from mammoflow.paths import Layout
    from mammoflow.tracking import Tracker

_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced acc.",
    "f1_macro": "F1 (macro)",
    "roc_auc": "ROC AUC (OvR macro)",
}
PROVENANCE_TAGS = (
    "dvc_data_hash",
    "split_hash",
    "git_commit",
    "git_dirty",
    "weights_source",
    "device",
    "tensorflow_version",
    "keras_version",
)

log = logging.getLogger(__name__)


@dataclass
class BackboneData:
    """One backbone's outputs as the report reads them."""

    name: str
    summary: dict[str, Any]
    predictions: dict[str, Any]
    history: dict[str, dict[str, list[float]]]
    calibration: dict[str, Any]
    subgroups: dict[str, list[dict[str, Any]]]
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class ReportData:
    """Everything :func:`render` needs for one dataset."""

    dataset: str
    class_names: tuple[str, ...]
    group_by: str
    backbones: list[BackboneData]
    champion: dict[str, Any]
    validation: dict[str, Any]
    audit: dict[str, Any] | None = None
    explain: dict[str, Any] | None = None  # metrics/explain/<dataset>.json (pointing game)
    card: str = ""
    settings: str = ""
    ci: float = 0.95
    patients: dict[str, str] = field(default_factory=dict)  # image_id → patient_id


# ----------------------------------------------------------------------------- collect


def _json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def collect(cfg: Config, dataset: str, layout: Layout, tracker: Tracker | None) -> ReportData:
    """Read the pipeline's outputs of ``dataset`` (and the parent runs' tags from MLflow).

    Raises:
        FileNotFoundError: a backbone without its metrics JSON (its train stage has not run).
    """
    from mammoflow.data.manifest import CLASSES

    ds_cfg = cfg.for_dataset(dataset)
    backbones = []
    for name in cfg.model.backbones:
        path = layout.metrics(dataset, name)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; run `mammoflow train --dataset {dataset} --backbone {name}`"
            )
        models = layout.models(dataset, name)
        data = BackboneData(
            name,
            _json(path),
            _json(models / "predictions.json", {}),
            _json(models / "history.json", {}),
            _json(models / "calibration.json", {}),
            _json(models / "subgroups.json", {}),
        )
        if tracker is not None:
            data.tags, data.params = tracker.run_tags_params(data.summary["mlflow_parent_run_id"])
        backbones.append(data)
    champion = _json(layout.champion(dataset), {})
    card = ""
    if tracker is not None and champion.get("registry"):
        from mammoflow.reporting.card import model_card

        facts = tracker.card_facts(dataset, "champion")
        card = model_card(facts) if facts else ""
    return ReportData(
        dataset=dataset,
        class_names=CLASSES[cfg.dataset(dataset).kind],
        group_by=ds_cfg.split.group_by,
        backbones=backbones,
        champion=champion,
        validation=_json(layout.validation(dataset) / "validation.json", {}),
        audit=_json(layout.reports() / dataset / "audit.json"),
        explain=_json(layout.explain_metrics(dataset)),
        card=card,
        settings=report.settings_line({b.name: b.params for b in backbones if b.params}),
        ci=ds_cfg.evaluate.ci,
        patients=_patients(layout, dataset),
    )


def _patients(layout: Layout, dataset: str) -> dict[str, str]:
    """image_id → patient_id from the converted manifest (empty when it is not there)."""
    from mammoflow.data.manifest import read_manifest

    if not (layout.processed(dataset) / "manifest.parquet").is_file():
        return {}
    frame = read_manifest(layout.processed(dataset))
    return dict(zip(frame["image_id"], frame["patient_id"], strict=True))


# ----------------------------------------------------------------------------- numbers


def _arrays(rec: Mapping[str, Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(rec.get("y_true", []), np.int64),
        np.asarray(rec.get("prob", []), np.float64).reshape(-1, k),
    )


def _oof(b: BackboneData, k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [_arrays(r, k) for _, r in sorted(b.predictions.get("folds", {}).items())]
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, k))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def baseline(data: ReportData, seed: int = 0, n: int = 1000) -> dict[str, Any]:
    """The majority class of the CV rows predicted for every test image, with CIs.

    The CIs resample patients, as the backbones' do (``data.patients``).

    Raises:
        ValueError: a test image whose patient is unknown (the manifest does not list it).
    """
    from mammoflow.evaluation.metrics import bootstrap_ci

    k = len(data.class_names)
    first = data.backbones[0]
    y_cv, _ = _oof(first, k)
    rec = first.predictions.get("test", {})
    y, _ = _arrays(rec, k)
    majority = int(np.bincount(y_cv, minlength=k).argmax()) if y_cv.size else 0
    prob = np.tile(np.eye(k)[majority], (y.size, 1))
    ids = [str(i) for i in rec.get("image_id", [])]
    unknown = [i for i in ids if i not in data.patients]
    if unknown:
        raise ValueError(
            f"{data.dataset}: {len(unknown)} test image(s) (e.g. {unknown[0]!r}) are not in the "
            "converted manifest, so the baseline's patient bootstrap cannot group them; rerun "
            f"`mammoflow convert --dataset {data.dataset}` and the train stage"
        )
    groups = [data.patients[i] for i in ids]
    ci = bootstrap_ci(y, prob, groups, data.class_names, n=n, seed=seed)
    return {"class": data.class_names[majority], "ci": ci, "n": int(y.size), "groups": "patient"}


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None or not isinstance(v, int | float) or not math.isfinite(v):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _ci_cell(point: Any, ci: Mapping[str, Any] | None, pct: bool = True) -> str:
    if not ci or _fmt(point, pct) == "–":
        return _fmt(point, pct)
    return f"{_fmt(point, pct)} [{_fmt(ci.get('low'), pct)}, {_fmt(ci.get('high'), pct)}]"


# ----------------------------------------------------------------------------- figures


def curves_figure(data: ReportData, baseline_auc: float = 0.5) -> Any:
    """ROC and precision–recall curves of the malignant class, every backbone in one figure."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    plt = report._plt()
    k = len(data.class_names)
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    prevalence = math.nan
    for b in data.backbones:
        y, prob = _arrays(b.predictions.get("test", {}), k)
        truth = y == k - 1
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, prob[:, -1])
        roc_ax.plot(
            fpr, tpr, label=f"{b.name} (AUC {data.class_names[-1]} vs rest {auc(fpr, tpr):.2f})"
        )
        precision, recall, _ = precision_recall_curve(truth, prob[:, -1])
        pr_ax.plot(recall, precision, label=b.name)
        prevalence = float(truth.mean())
    roc_ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label=f"chance ({baseline_auc:.1f})")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    if math.isfinite(prevalence):
        pr_ax.axhline(prevalence, ls="--", c="grey", lw=0.8, label="prevalence")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision–recall (test)")
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "upper right", fontsize=8)
    fig.suptitle(f"{data.class_names[-1]} vs rest")
    fig.tight_layout()
    return fig


def learning_figure(b: BackboneData, n_classes: int | None = None) -> Any:
    """Loss per epoch of every fold (train solid, validation dashed); fold 0 = refit.

    The per-epoch curves are Keras' during training, before the BatchNorm statistics are
    recalibrated for the final model; so each fold's final model as used — its out-of-fold
    validation NLL, from its predictions — is drawn as a star after the last epoch, labelled.
    """
    from mammoflow.evaluation.calibration import nll

    plt = report._plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    folds = b.predictions.get("folds", {})
    star_label: str | None = "val, final model (after BN recalibration)"
    for i, (fold, hist) in enumerate(sorted(b.history.items())):
        color = colors[i % len(colors)]
        label: str | None = f"fold {fold}"
        for key, style in (("loss", "-"), ("val_loss", "--")):
            values = list(hist.get(key) or [])
            if values:
                ax.plot(range(1, len(values) + 1), values, style, color=color, label=label)
                label = None
        rec = folds.get(str(fold))
        if rec and n_classes and rec.get("y_true"):
            y, prob = _arrays(rec, n_classes)
            epochs = len(hist.get("loss") or [1])
            ax.plot([epochs + 0.15], [nll(y, prob)], "*", ms=10, color=color, label=star_label)
            star_label = None
    ax.set(xlabel="epoch", ylabel="loss", title=f"{b.name}: loss (— train, -- val)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fold_metrics(b: BackboneData, class_names: Sequence[str]) -> dict[int, dict[str, float]]:
    """Each fold's validation metrics, from its predictions."""
    from mammoflow.evaluation.metrics import compute_metrics

    out = {}
    for fold, rec in sorted(b.predictions.get("folds", {}).items(), key=lambda kv: int(kv[0])):
        y, prob = _arrays(rec, len(class_names))
        if y.size:
            out[int(fold)] = compute_metrics(y, prob, class_names)
    return out


def _png(fig: Any) -> str:
    """A figure as base64 PNG text (for a ``data:`` URL)."""
    return base64.b64encode(report.figure_png(fig)).decode()


# ----------------------------------------------------------------------------- page data
# Each function below turns part of ReportData into plain, formatted values; the template
# templates/report.html.j2 lays them out (and escapes them).


def _test_size(b: BackboneData) -> str:
    rec = b.predictions.get("test", {})
    return f"{len(rec.get('y_true', []))} images"


def _comparison(data: ReportData, base: Mapping[str, Any]) -> dict[str, Any]:
    header = ["Model", *(f"Test {_LABELS[k]} [CI]" for k in _KEYS), "CV F1 mean ± std"]
    rows = []
    for b in data.backbones:
        s = b.summary
        star = " ★" if data.champion.get("best") == b.name else ""
        cells = [_ci_cell(s["test"].get(k), s.get("test_ci", {}).get(k)) for k in _KEYS]
        cv = f"{_fmt(s['cv'].get('f1_macro_mean'))} ± {_fmt(s['cv'].get('f1_macro_std'))}"
        rows.append([b.name + star, *cells, cv])
    ci = base["ci"]
    rows.append(
        [
            f"majority class ({base['class']})",
            *(_ci_cell(ci[k]["point"], ci[k]) for k in _KEYS),
            "–",
        ]
    )
    return {"header": header, "rows": rows, "n": base["n"]}


def _selection(data: ReportData) -> dict[str, Any]:
    """The selection rule, the winner's-curse warning if it peeks, the champion's test estimate."""
    from mammoflow.evaluation import champion

    metric = str(data.champion.get("metric") or "")
    if not metric:
        return {"metric": ""}
    warning = champion.warning_text(metric)
    out: dict[str, Any] = {
        "metric": metric,
        "rule": champion.rule_text(metric),
        "warning": warning,
        "champion": None,
    }
    best = {b.name: b for b in data.backbones}.get(str(data.champion.get("best")))
    if best is not None:
        s = best.summary
        out["champion"] = {
            "name": best.name,
            "kind": "optimistic" if warning else "unbiased",
            "test_size": _test_size(best),
            "f1": _ci_cell(s["test"].get("f1_macro"), s.get("test_ci", {}).get("f1_macro")),
            "acc": _ci_cell(s["test"].get("accuracy"), s.get("test_ci", {}).get("accuracy")),
            "score": _fmt(data.champion.get("scores", {}).get(best.name)),
        }
    return out


def _paper(data: ReportData) -> list[list[str]]:
    rows = [["Paper (as reported)", PAPER_CLAIM.split(",")[0], "image-level", "as in the paper"]]
    for b in data.backbones:
        s = b.summary
        acc = _ci_cell(s["test"].get("accuracy"), s.get("test_ci", {}).get("accuracy"))
        rows.append([f"Ours: {b.name}", f"{acc} %", f"{data.group_by}-level", _test_size(b)])
    return rows


def _calibration(data: ReportData) -> list[list[str]]:
    rows = []
    for b in data.backbones:
        c = b.calibration
        if not c:
            continue
        raw, cal = c.get("test_raw", {}), c.get("test_calibrated", {})
        rci, cci = c.get("test_raw_ci", {}), c.get("test_calibrated_ci", {})
        rows.append(
            [
                b.name,
                _ci_cell(raw.get("ece"), rci.get("ece"), pct=False),
                _ci_cell(cal.get("ece"), cci.get("ece"), pct=False),
                _ci_cell(raw.get("classwise_ece"), rci.get("classwise_ece"), pct=False),
                _ci_cell(cal.get("classwise_ece"), cci.get("classwise_ece"), pct=False),
                _fmt(c.get("temperature"), pct=False),
                str(c.get("n_fit", "?")),
            ]
        )
    return rows


def _subgroup_header() -> list[str]:
    from mammoflow.evaluation.subgroups import METRICS

    return ["Factor", "Value", "n", "Patients", *(_LABELS.get(m, m) for m in METRICS)]


def _subgroup_tables(
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[tuple[str, list[list[str]]]]:
    """(split, rows) per split: test, out-of-fold, then any other in name order."""
    from mammoflow.evaluation.subgroups import METRICS

    order = [k for k in ("test", "out-of-fold") if k in tables]
    out = []
    for split in order + sorted(set(tables) - set(order)):
        rows = [
            [
                r["factor"],
                r["value"] + (" ⚠" if r["small"] else ""),
                str(r["n"]),
                str(r["patients"]),
                *(_ci_cell(r["metrics"][m]["point"], r["metrics"][m], pct=False) for m in METRICS),
            ]
            for r in tables[split]
        ]
        out.append((split, rows))
    return out


def _subgroups(data: ReportData) -> dict[str, Any]:
    """The champion's subgroup tables first (the first backbone without one), the others after."""
    by = {b.name: b for b in data.backbones}
    best = by.get(str(data.champion.get("best")), data.backbones[0])
    return {
        "title": f"Subgroups ({best.name}; others below)",
        "champion": _subgroup_tables(best.subgroups),
        "others": [
            (b.name, _subgroup_tables(b.subgroups))
            for b in data.backbones
            if b is not best and b.subgroups
        ],
    }


def _audit(audit: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not audit:
        return None
    rows = [
        [
            m,
            _fmt(v.get("image"), False),
            _fmt(v.get("patient"), False),
            _ci_cell(v.get("inflation"), v, pct=False),
        ]
        for m, v in audit.get("inflation", {}).items()
    ]
    keys = (
        "patients_in_test_and_cv",
        "patients_in_several_folds",
        "exact_duplicates_across",
        "near_duplicates_across",
    )
    checks = audit.get("checks", {})
    return {
        "backbone": str(audit.get("backbone")),
        "seed": audit.get("seed"),
        "k_folds": audit.get("k_folds"),
        "epochs": audit.get("epochs"),
        "ci_level": f"{audit.get('ci', 0.95):.0%}",
        "inflation": rows,
        "groups": [f"split by {g}" for g in checks],
        "checks": [[k, *(str(c.get(k)) for c in checks.values())] for k in keys],
        **_near_pairs(checks),
    }


def _near_pairs(checks: Mapping[str, Any]) -> dict[str, Any]:
    """The near-duplicate rule and its measured false-positive rate, then every flagged pair
    side by side (thumbnails) for a person to judge."""
    cal = next((c.get("near_duplicate_calibration") for c in checks.values() if c), None)
    near = None
    if cal:
        near = {
            **{k: cal[k] for k in ("descriptor", "threshold_bits", "data", "positives")},
            **{k: cal[k] for k in ("false_positives", "negatives")},
            "tpr": f"{cal['true_positive_rate']:.1%}",
            "fpr": f"{cal['false_positive_rate']:.1e}",
        }
    pairs = [
        {
            "group": group,
            "bits": pair["bits"],
            "sides": [
                {"name": pair[s], "path": pair[f"path_{s}"], "thumb": _thumb(pair[f"path_{s}"])}
                for s in ("a", "b")
            ],
        }
        for group, c in checks.items()
        for pair in c.get("near_pairs", [])
    ]
    return {"near": near, "pairs": pairs}


def _thumb(path: str, side: int = 160) -> str | None:
    """A small PNG of a converted image as base64 text (None when the file is not here)."""
    import io

    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.convert("L").save(buf, "PNG")
    except OSError:
        return None
    return base64.b64encode(buf.getvalue()).decode()


def _pointing(explain: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not explain:
        return None
    if explain.get("skipped"):
        return {"skipped": str(explain["skipped"])}
    rows = [
        [
            b,
            _ci_cell(r.get("hit_rate"), r),
            _fmt(r.get("chance")),
            _fmt(r.get("outside_breast")),
            str(int(r.get("n", 0))),
        ]
        for b, r in explain.get("backbones", {}).items()
    ]
    return {"skipped": "", "backbones": rows}


def _validation(v: Mapping[str, Any]) -> dict[str, Any] | None:
    if not v:
        return None
    results = v.get("results", [])
    failed = [r for r in results if not r.get("success")]
    return {
        "passed": len(results) - len(failed),
        "checks": len(results),
        "images": v.get("rows", "?"),
        "status": "success" if v.get("success") else "FAILED",
        "failed": [
            [r.get("check", ""), r.get("expectation", ""), str(r.get("unexpected_count"))]
            for r in failed
        ],
        "statistics": [[k, str(x)] for k, x in v.get("statistics", {}).items()],
    }


def _provenance(data: ReportData) -> dict[str, Any]:
    header = ["", *(b.name for b in data.backbones)]
    rows = [
        ["MLflow parent run", *(b.summary.get("mlflow_parent_run_id", "?") for b in data.backbones)]
    ]
    rows += [[t, *(b.tags.get(t, "?") for b in data.backbones)] for t in PROVENANCE_TAGS]
    return {"header": header, "rows": rows}


def _figures(data: ReportData) -> dict[str, list[tuple[str, str]]]:
    """The figures as (caption, base64 PNG), by kind: one ROC/PR figure, then per backbone."""
    from mammoflow.evaluation.calibration import reliability_figure

    names, bbs = data.class_names, data.backbones

    def confusion(b: BackboneData) -> Any:
        return report.confusion_figure(*_arrays(b.predictions.get("test", {}), len(names)), names)

    def reliability(b: BackboneData) -> Any:
        t = _fmt(b.calibration.get("temperature"), False)
        return reliability_figure(b.calibration.get("reliability", {}), f"{b.name} (T = {t})")

    return {
        "curves": [("all backbones", _png(curves_figure(data)))],
        "confusion": [(b.name, _png(confusion(b))) for b in bbs],
        "reliability": [(b.name, _png(reliability(b))) for b in bbs if b.calibration],
        "learning": [(b.name, _png(learning_figure(b, len(names)))) for b in bbs],
        "folds": [(b.name, _png(report.folds_figure(fold_metrics(b, names), b.name))) for b in bbs],
    }


def render(data: ReportData, base: Mapping[str, Any]) -> str:
    """The report page (figures embedded) from :func:`collect`'s data and the baseline."""
    from mammoflow.templates import render as render_template

    return render_template(
        "report.html.j2",
        dataset=data.dataset,
        settings=data.settings,
        group_by=data.group_by,
        ci_level=f"{data.ci:.0%}",
        comparison=_comparison(data, base),
        selection=_selection(data),
        paper_rows=_paper(data),
        figures=_figures(data),
        calibration_rows=_calibration(data),
        t_bound=f"{T_BOUNDS[1]:g}",
        subgroup_header=_subgroup_header(),
        subgroups=_subgroups(data),
        audit=_audit(data.audit),
        pointing=_pointing(data.explain),
        validation=_validation(data.validation),
        provenance=_provenance(data),
        card=data.card,
    )


def write_report(
    cfg: Config, dataset: str, layout: Layout, tracker: Tracker | None
) -> dict[str, Any]:
    """Collect, render and write ``reports/<dataset>/report.html``; log it on the champion run.

    Returns:
        ``{"dataset", "html", "bytes", "logged_to"}``.
    """
    from mammoflow.files import atomic_write_text

    data = collect(cfg, dataset, layout, tracker)
    ds_cfg = cfg.for_dataset(dataset)
    base = baseline(data, seed=ds_cfg.train.seed, n=max(ds_cfg.evaluate.bootstrap, 1))
    page = render(data, base)
    path = layout.reports() / dataset / "report.html"
    atomic_write_text(path, page)
    logged = None
    best = {b.name: b for b in data.backbones}.get(str(data.champion.get("best")))
    if tracker is not None and best is not None:
        logged = _log_page(tracker, str(best.summary["mlflow_parent_run_id"]), page)
    return {"dataset": dataset, "html": str(path), "bytes": len(page), "logged_to": logged}


def _log_page(tracker: Tracker, run_id: str, page: str) -> str | None:
    """Log the report on the champion's parent run; None (with a warning) when that run is not
    in this tracking store (the metrics file came from another store, e.g. a team server)."""
    missing = tracker.missing_run(run_id)
    if missing is not None:
        log.warning(
            "report.html not logged: run %s is not in %s (%s)", run_id, tracker.uri, missing
        )
        return None
    tracker.log_text(run_id, page, "report.html")
    return run_id


def _settings(cfg: Config, dataset: str, rows: list[dict[str, Any]], runs: list[Any]) -> str:
    """The settings line of ``dataset``: its rows' MLflow run params (else the resolved config)."""
    from mammoflow.reporting import figures as report

    by_id = {run.info.run_id: dict(run.data.params) for run in runs}
    fallback = cfg.for_dataset(dataset).flat()
    params: dict[str, dict[str, Any]] = {}
    missing = False
    for row in rows:
        logged = row.get("params") or by_id.get(row["run_id"])
        missing = missing or not logged
        params[row["backbone"]] = {k: (logged or fallback).get(k) for k in report.SETTING_KEYS}
    line = report.settings_line(params)
    return f"{line} (params.yaml; run params not found)" if missing else line


def report_stage(
    cfg: Config,
    datasets: list[str] | None = None,
    layout: Layout | None = None,
    *,
    write: bool = True,
    name: str = "comparison",
) -> dict[str, Any]:
    """The paper-style comparison from MLflow: reports/<name>.md and .html.

    Each dataset's table is headed by the settings its runs used (weights, input size, epochs).
    """

    from mammoflow.files import atomic_write_text
    from mammoflow.reporting import figures as report
    from mammoflow.tracking import Tracker, metrics_run_id

    layout = layout or Layout()
    tracker = Tracker(root=layout.root)
    names = datasets or list(cfg.pipeline.datasets)
    tables: dict[str, list[list[str]]] = {}
    settings: dict[str, str] = {}
    figures: dict[str, bytes] = {}
    for dataset in names:
        cfg.dataset(dataset)
        wanted: dict[str, str | None] = {}
        for backbone in cfg.model.backbones:
            try:
                wanted[backbone] = metrics_run_id(layout, dataset, backbone, "parent")
            except (FileNotFoundError, ValueError):  # study_rows warns and names the file
                wanted[backbone] = None
        sources = {b: str(layout.metrics(dataset, b)) for b in wanted}
        rows = tracker.study_rows(dataset, wanted, sources)
        if not rows:
            continue
        tables[dataset] = report.comparison_table(rows)
        settings[dataset] = _settings(cfg, dataset, rows, tracker.parents(dataset))
        if write:
            figures[dataset] = report.figure_png(report.comparison_figure(rows, dataset))
    if not tables:
        raise ValueError(f"no finished MLflow runs for {names!r}; run the training first")
    notes = [
        f"Split: {cfg.split.group_by}-level, test {cfg.split.test_size:.0%}, "
        f"{cfg.split.k_folds} folds."
    ]
    md, page = layout.reports() / f"{name}.md", layout.reports() / f"{name}.html"
    studies: dict[str, str] = {}
    if write:
        atomic_write_text(md, report.markdown(tables, notes, settings))
        atomic_write_text(page, report.html_report(tables, figures, notes, settings))

        for dataset in tables:  # reports/<dataset>/report.html, the whole study's evidence
            studies[dataset] = write_report(cfg, dataset, layout, tracker)["html"]
    return {
        "tables": tables,
        "settings": settings,
        "markdown": str(md),
        "html": str(page),
        "studies": studies,
    }
