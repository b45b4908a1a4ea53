"""The per-dataset study report: ``reports/<dataset>/report.html``, one self-contained page.

:func:`collect` reads what the pipeline already wrote — the train stage's metrics JSON,
predictions, histories, calibration and subgroup files per backbone, the evaluate stage's
champion, the data-validation summary, the audit when one ran — plus the provenance tags of the
MLflow parent runs; :func:`render` turns that plain data into HTML with every figure embedded
(base64 PNG). Nothing in the report is typed by hand: each number comes from those files.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mammoflow.evaluation.calibration import T_BOUNDS
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
        explain=_json(layout.root / "metrics" / "explain" / f"{dataset}.json"),
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


def _img(fig: Any, alt: str) -> str:
    b64 = base64.b64encode(report.figure_png(fig)).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


# ----------------------------------------------------------------------------- HTML


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _test_size(b: BackboneData) -> str:
    rec = b.predictions.get("test", {})
    return f"{len(rec.get('y_true', []))} images"


def _comparison(data: ReportData, base: Mapping[str, Any]) -> str:
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
    note = (
        f"<p class='note'>Values in %. Test: held-out {data.group_by}-level split, "
        f"{base['n']} images; brackets: {data.ci:.0%} patient-bootstrap CI. CV: out-of-fold "
        f"validation over the folds. ROC AUC: malignant vs rest with two classes, else the "
        "one-vs-rest macro mean. ★ champion (see the selection rule above). The baseline "
        "predicts the CV rows' most frequent class for every test image (CI: patient "
        "bootstrap, as the models').</p>"
    )
    return _selection(data) + _table(header, rows) + note


def _code(text: str) -> str:
    """Escape ``text`` for HTML, markdown `code` spans as <code>."""
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _selection(data: ReportData) -> str:
    """The selection rule, the winner's-curse warning if it peeks, the champion's test estimate."""
    from mammoflow.evaluation import champion

    metric = str(data.champion.get("metric") or "")
    if not metric:
        return "<p>No champion chosen yet (run <code>mammoflow evaluate</code>).</p>"
    parts = [f"<p>{_code(champion.rule_text(metric))}</p>"]
    warning = champion.warning_text(metric)
    if warning:
        parts.append(f"<p class='warn'>{_code(warning)}</p>")
    best = {b.name: b for b in data.backbones}.get(str(data.champion.get("best")))
    if best is not None:
        s = best.summary
        f1 = _ci_cell(s["test"].get("f1_macro"), s.get("test_ci", {}).get("f1_macro"))
        acc = _ci_cell(s["test"].get("accuracy"), s.get("test_ci", {}).get("accuracy"))
        kind = "optimistic" if warning else "unbiased"
        parts.append(
            f"<p><b>Champion {html.escape(best.name)}</b> — held-out test ({kind} estimate, "
            f"{_test_size(best)}): F1 (macro) {f1} %, accuracy {acc} %; selection score "
            f"{html.escape(metric)} = {_fmt(data.champion.get('scores', {}).get(best.name))} %."
            "</p>"
        )
    return "".join(parts)


def _paper(data: ReportData) -> str:
    rows = [["Paper (as reported)", PAPER_CLAIM.split(",")[0], "image-level", "as in the paper"]]
    for b in data.backbones:
        s = b.summary
        acc = _ci_cell(s["test"].get("accuracy"), s.get("test_ci", {}).get("accuracy"))
        rows.append([f"Ours: {b.name}", f"{acc} %", f"{data.group_by}-level", _test_size(b)])
    note = (
        "<p class='note'>An image-level split lets images of one woman sit in training and "
        "test; ours keeps each patient on one side. The two are different experiments.</p>"
    )
    return _table(["Source", "Accuracy", "Split", "Test set"], rows) + note


def _calibration(data: ReportData) -> str:
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
    header = [
        "Backbone",
        "ECE raw [CI]",
        "ECE calibrated [CI]",
        "Classwise ECE raw",
        "Classwise ECE calibrated",
        "T",
        "fitted on (OOF images)",
    ]
    return _table(header, rows) + (
        "<p class='note'>Top-label ECE, 15 equal-width bins (Guo et al. 2017); temperature "
        "fitted on the out-of-fold validation predictions (single fold models), applied to "
        "each fold model's test probabilities before the ensemble mean — exactly what the "
        "registered model serves (<code>mammoflow predict --raw</code> for the raw ones). T at the "
        f"search bound ({T_BOUNDS[1]:g}) means the validation predictions carried almost no "
        "information: scaling flattens them towards uniform.</p>"
    )


def _subgroup_html(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    from mammoflow.evaluation.subgroups import METRICS

    parts = []
    order = [k for k in ("test", "out-of-fold") if k in tables]
    for split, rows in ((k, tables[k]) for k in order + sorted(set(tables) - set(order))):
        body = [
            [
                r["factor"],
                r["value"] + (" ⚠" if r["small"] else ""),
                str(r["n"]),
                str(r["patients"]),
                *(_ci_cell(r["metrics"][m]["point"], r["metrics"][m], pct=False) for m in METRICS),
            ]
            for r in rows
        ]
        header = ["Factor", "Value", "n", "Patients", *(_LABELS.get(m, m) for m in METRICS)]
        parts.append(f"<h4>{html.escape(split)}</h4>" + _table(header, body))
    return "".join(parts) + (
        "<p class='note'>⚠ fewer than 10 images: too few to read much into. In a subgroup of "
        "one class ROC AUC is undefined (–) and macro F1 averages in the absent classes' zeros: "
        "read accuracy there.</p>"
    )


def _audit(audit: Mapping[str, Any] | None) -> str:
    if not audit:
        return (
            "<p>No audit yet: <code>mammoflow audit --dataset …</code> writes it to "
            "<code>reports/&lt;dataset&gt;/audit.json</code>.</p>"
        )
    rows = [
        [
            m,
            _fmt(v.get("image"), False),
            _fmt(v.get("patient"), False),
            _ci_cell(v.get("inflation"), v, pct=False),
        ]
        for m, v in audit.get("inflation", {}).items()
    ]
    head = (
        f"<p>{html.escape(str(audit.get('backbone')))}, seed {audit.get('seed')}, "
        f"{audit.get('k_folds')} folds, {audit.get('epochs')} epochs; inflation = image-level "
        f"− patient-level on each split's held-out test, {audit.get('ci', 0.95):.0%} "
        "patient-bootstrap CI.</p>"
    )
    keys = (
        "patients_in_test_and_cv",
        "patients_in_several_folds",
        "exact_duplicates_across",
        "near_duplicates_across",
    )
    checks = audit.get("checks", {})
    check_rows = [[k, *(str(c.get(k)) for c in checks.values())] for k in keys]
    return (
        head
        + _table(["Metric", "image-level", "patient-level", "inflation [CI]"], rows)
        + _table(["Split check", *(f"split by {g}" for g in checks)], check_rows)
        + _near_pairs(checks)
    )


def _near_pairs(checks: Mapping[str, Any]) -> str:
    """The near-duplicate rule and its measured false-positive rate, then every flagged pair
    side by side (thumbnails) for a person to judge."""
    cal = next((c.get("near_duplicate_calibration") for c in checks.values() if c), None)
    note = ""
    if cal:
        note = (
            f"<p class='note'>Near duplicates: {html.escape(str(cal['descriptor']))}, within "
            f"{cal['threshold_bits']} bits. Calibrated on {html.escape(str(cal['data']))}: "
            f"{cal['true_positive_rate']:.1%} of {cal['positives']} known copies (re-encoded, "
            f"resized, re-windowed, cropped) found; {cal['false_positives']} of "
            f"{cal['negatives']} pairs of different women flagged (false-positive rate "
            f"{cal['false_positive_rate']:.1e}).</p>"
        )
    figures = []
    for group, c in checks.items():
        for pair in c.get("near_pairs", []):
            cells = "".join(
                f"<figure>{_thumb(pair[f'path_{s}'])}<figcaption>{html.escape(pair[s])}"
                "</figcaption></figure>"
                for s in ("a", "b")
            )
            figures.append(
                f"<div><p class='note'>split by {html.escape(group)}: {pair['bits']} bits</p>"
                f"<div class='grid'>{cells}</div></div>"
            )
    pairs = "<div class='grid'>" + "".join(figures) + "</div>" if figures else ""
    return note + (pairs or "<p>No near-duplicate pair flagged.</p>")


def _thumb(path: str, side: int = 160) -> str:
    """A small embedded PNG of a converted image (or a note when the file is not here)."""
    import io

    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.convert("L").save(buf, "PNG")
    except OSError:
        return f"<p class='note'>({html.escape(path)} not here)</p>"
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _pointing(explain: Mapping[str, Any] | None, ci: float) -> str:
    if not explain:
        return "<p>Not run (<code>mammoflow explain-check --dataset …</code>).</p>"
    if explain.get("skipped"):
        return f"<p>Skipped: {html.escape(str(explain['skipped']))}.</p>"
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
    header = ["Backbone", "Hit rate % [CI]", "Chance %", "Peak outside the breast %", "Images"]
    return _table(header, rows) + (
        "<p class='note'>Grad-CAM pointing game: share of abnormal test images whose Grad-CAM "
        f"peak falls inside an annotated lesion circle; {ci:.0%} patient-bootstrap CI. Chance: "
        "the mean share of the breast (Otsu mask) inside the circles — what a uniformly random "
        "peak in the breast would score. Peak outside the breast: maps pointing at the film "
        "edge, padding or labels — a shortcut signal, whatever the hit rate.</p>"
    )


def _validation(v: Mapping[str, Any]) -> str:
    if not v:
        return "<p>No validation results (run <code>mammoflow validate</code>).</p>"
    results = v.get("results", [])
    failed = [r for r in results if not r.get("success")]
    stats = v.get("statistics", {})
    head = (
        f"<p>Great Expectations: {len(results) - len(failed)} of {len(results)} checks "
        f"passed on {v.get('rows', '?')} images ({'success' if v.get('success') else 'FAILED'})."
        "</p>"
    )
    rows = [
        [r.get("check", ""), r.get("expectation", ""), str(r.get("unexpected_count"))]
        for r in failed
    ]
    extra = _table(["Failed check", "Expectation", "Unexpected"], rows) if rows else ""
    stat = _table(["Statistic", "Value"], [[k, str(x)] for k, x in stats.items()]) if stats else ""
    return head + extra + stat


def _provenance(data: ReportData) -> str:
    header = ["", *(b.name for b in data.backbones)]
    rows = [
        ["MLflow parent run", *(b.summary.get("mlflow_parent_run_id", "?") for b in data.backbones)]
    ]
    rows += [[t, *(b.tags.get(t, "?") for b in data.backbones)] for t in PROVENANCE_TAGS]
    return _table(header, rows, "small")


def _grid(items: Sequence[tuple[str, Any]]) -> str:
    return (
        "<div class='grid'>"
        + "".join(
            f"<figure>{_img(fig, alt)}<figcaption>{html.escape(alt)}</figcaption></figure>"
            for alt, fig in items
        )
        + "</div>"
    )


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1300px}"
    "table{border-collapse:collapse;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}"
    "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
    "table.small{table-layout:fixed;width:100%}"
    "table.small td{font-size:11px;font-family:monospace;word-break:break-all}"
    ".grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
    "figcaption{font-size:12px;color:#555}.note{font-size:12px;color:#555}"
    ".warn{background:#fff4d6;padding:6px 10px;border-left:4px solid #e0a800}"
    "pre{white-space:pre-wrap;font-size:12px;background:#f8f8f8;padding:8px}"
)


def _figures(data: ReportData) -> dict[str, str]:
    """The per-backbone figure grids, by section title."""
    from mammoflow.evaluation.calibration import reliability_figure

    names, bbs = data.class_names, data.backbones

    def confusion(b: BackboneData) -> Any:
        return report.confusion_figure(*_arrays(b.predictions.get("test", {}), len(names)), names)

    def reliability(b: BackboneData) -> Any:
        t = _fmt(b.calibration.get("temperature"), False)
        return reliability_figure(b.calibration.get("reliability", {}), f"{b.name} (T = {t})")

    return {
        "ROC and precision–recall curves": _grid([("all backbones", curves_figure(data))]),
        "Confusion matrices (test)": _grid([(b.name, confusion(b)) for b in bbs]),
        "Calibration": _calibration(data)
        + _grid([(b.name, reliability(b)) for b in bbs if b.calibration]),
        "Learning curves": _grid([(b.name, learning_figure(b, len(names))) for b in bbs])
        + "<p class='note'>Per-epoch losses are Keras' during training, computed before the "
        "BatchNorm statistics are recalibrated for the final model; ★ = each fold's final "
        "model as used (its out-of-fold validation NLL, unweighted).</p>",
        "Fold spread (validation)": _grid(
            [(b.name, report.folds_figure(fold_metrics(b, names), b.name)) for b in bbs]
        ),
    }


def _subgroup_section(data: ReportData) -> tuple[str, str]:
    by = {b.name: b for b in data.backbones}
    best = by.get(str(data.champion.get("best")), data.backbones[0])
    others = "".join(
        f"<details><summary>{html.escape(b.name)}</summary>{_subgroup_html(b.subgroups)}</details>"
        for b in data.backbones
        if b is not best and b.subgroups
    )
    return f"Subgroups ({best.name}; others below)", _subgroup_html(best.subgroups) + others


def render(data: ReportData, base: Mapping[str, Any]) -> str:
    """The report page (figures embedded) from :func:`collect`'s data and the baseline."""
    sections = [
        ("Comparison beside a majority-class baseline", _comparison(data, base)),
        ("The paper's reported figures beside ours", _paper(data)),
        *_figures(data).items(),
        _subgroup_section(data),
        ("Leakage audit", _audit(data.audit)),
        ("Grad-CAM pointing game", _pointing(data.explain, data.ci)),
        ("Data validation", _validation(data.validation)),
        ("Provenance", _provenance(data)),
    ]
    if data.card:
        card = f"<details><summary>show</summary><pre>{html.escape(data.card)}</pre></details>"
        sections.append(("Model card of the champion", card))
    toc = "".join(
        f"<li><a href='#s{i}'>{html.escape(t)}</a></li>" for i, (t, _) in enumerate(sections)
    )
    body = "".join(f"<h2 id='s{i}'>{html.escape(t)}</h2>{h}" for i, (t, h) in enumerate(sections))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>MammoFlow study: {html.escape(data.dataset)}</title><style>{_CSS}</style>"
        f"</head><body><h1>MammoFlow study: {html.escape(data.dataset)}</h1>"
        f"<p>Settings used: {html.escape(data.settings or 'unknown')}.</p>"
        "<p class='warn'>Research only — not for diagnosis.</p>"
        f"<ul>{toc}</ul>{body}</body></html>"
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
