"""Figures and the paper-style comparison (markdown, HTML), from plain numbers.

Figure functions are pure (arrays in, matplotlib figure out); the comparison is built from the
per-backbone summaries (the train stage's metrics JSON or MLflow parent runs).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PAPER_METRICS = (
    ("accuracy", "Accuracy"),
    ("precision_macro", "Precision"),
    ("recall_macro", "Recall"),
    ("f1_macro", "F1"),
)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def classification_report_text(y: np.ndarray, prob: np.ndarray, class_names: Sequence[str]) -> str:
    """scikit-learn's per-class precision / recall / F1 table of one evaluation."""
    from sklearn.metrics import classification_report

    return str(
        classification_report(
            y,
            np.asarray(prob).argmax(axis=1),
            labels=list(range(len(class_names))),
            target_names=list(class_names),
            zero_division=0,
            digits=3,
        )
    )


def confusion_figure(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> Any:
    """Confusion matrix heat map with counts."""
    from mammoflow.evaluation.metrics import confusion_matrix

    plt = _plt()
    cm = confusion_matrix(y_true, np.asarray(y_prob).argmax(axis=1), len(class_names))
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center")
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> Any:
    """ROC curve of the malignant class (the last) against the rest."""
    from mammoflow.evaluation.metrics import binary_roc_auc, roc_points

    plt = _plt()
    pts = roc_points(y_true, y_prob)
    prob = np.asarray(y_prob)
    auc = binary_roc_auc(np.asarray(y_true) == prob.shape[1] - 1, prob[:, -1])
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=100)
    ax.plot([p["fpr"] for p in pts], [p["tpr"] for p in pts], label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({class_names[-1]})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def curves_figure(history: Mapping[str, Sequence[float]]) -> Any:
    """Training curves: loss and accuracy per epoch, train and validation."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3), dpi=100)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return fig


def folds_figure(fold_metrics: Mapping[int, Mapping[str, float]], title: str) -> Any:
    """The paper's four metrics per fold, as points, with the mean."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for x, (key, _label) in enumerate(PAPER_METRICS):
        vals = [m[key] for m in fold_metrics.values() if key in m and math.isfinite(m[key])]
        ax.scatter([x] * len(vals), vals, alpha=0.6)
        if vals:
            ax.hlines(float(np.mean(vals)), x - 0.25, x + 0.25, colors="k")
    ax.set_xticks(range(len(PAPER_METRICS)), [lbl for _, lbl in PAPER_METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title}: validation folds")
    fig.tight_layout()
    return fig


def comparison_figure(rows: Sequence[Mapping[str, Any]], dataset: str) -> Any:
    """Bars of CV mean ± std of the paper's metrics, one group per backbone."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        means = [row["cv"].get(f"{k}_mean", math.nan) for k, _ in PAPER_METRICS]
        stds = [row["cv"].get(f"{k}_std", 0.0) for k, _ in PAPER_METRICS]
        xs = np.arange(len(PAPER_METRICS)) + i * width
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=row["backbone"])
    ax.set_xticks(
        np.arange(len(PAPER_METRICS)) + 0.4 - width / 2, [lbl for _, lbl in PAPER_METRICS]
    )
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{dataset}: {len(rows)} backbones, K-fold mean ± std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _pct(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The paper's Tables 2–3 layout: per backbone, CV mean ± std and test value [95 % CI]."""
    header = ["Backbone"] + [lbl for _, lbl in PAPER_METRICS] + ["Test F1 [95% CI]", "Test AUC"]
    out = [header]
    for row in rows:
        cells = [row["backbone"]]
        for key, _ in PAPER_METRICS:
            cells.append(
                f"{_pct(row['cv'].get(f'{key}_mean'))} ± {_pct(row['cv'].get(f'{key}_std'))}"
            )
        ci = row.get("test_ci", {}).get("f1_macro", {})
        cells.append(
            f"{_pct(row['test'].get('f1_macro'))} [{_pct(ci.get('low'))}, {_pct(ci.get('high'))}]"
        )
        cells.append(_pct(row["test"].get("roc_auc")))
        out.append(cells)
    return out


#: The run params a settings line reads (MLflow parent-run params, or the resolved config).
SETTING_KEYS = (
    "model.weights",
    "model.input_size",
    "train.epochs",
    "train.batch_size",
    "train.learning_rate",
    "split.k_folds",
)


def _one_or_each(values: Mapping[str, str]) -> str:
    """``v`` when every backbone has the same value, else ``b1 v1, b2 v2``."""
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{b} {v}" for b, v in values.items())


def _size(backbone: str, value: Any) -> str:
    from mammoflow.models.backbones import input_size_for

    native = value is None or str(value).strip().lower() in ("none", "null", "")
    return f"{input_size_for(backbone, None if native else int(value))} px"


def settings_line(params: Mapping[str, Mapping[str, Any]]) -> str:
    """What a dataset's runs were trained with, for the table header.

    Args:
        params: per backbone, its run params (``model.weights``, ``model.input_size``, …);
            ``model.input_size`` None / "None" means the backbone's native size.

    Returns:
        e.g. ``weights: none, 80 px — a demo, not transfer learning (random initialisation);
        epochs 10, batch 16, lr 0.0001, folds 5``.
    """
    if not params:
        return "settings: unknown (no run params)"

    def each(key: str) -> str:
        return _one_or_each({b: str(p.get(key, "?")) for b, p in params.items()})

    weights = each("model.weights")
    sizes = _one_or_each({b: _size(b, p.get("model.input_size")) for b, p in params.items()})
    label = ""
    if all(str(p.get("model.weights", "")).lower() == "none" for p in params.values()):
        label = " — a demo, not transfer learning (random initialisation)"
    elif all(str(p.get("model.weights", "")).lower() == "imagenet" for p in params.values()):
        label = " — ImageNet transfer learning"
    return (
        f"weights: {weights}, {sizes}{label}; epochs {each('train.epochs')}, "
        f"batch {each('train.batch_size')}, lr {each('train.learning_rate')}, "
        f"folds {each('split.k_folds')}"
    )


def markdown(
    tables: Mapping[str, list[list[str]]],
    notes: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
) -> str:
    """The comparison as markdown, one table per dataset, each under its settings line."""
    from mammoflow.templates import render

    return render("comparison.md.j2", tables=tables, notes=notes, settings=settings or {})


def figure_png(fig: Any) -> bytes:
    """Render a figure to PNG bytes (and close it)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def html_report(
    tables: Mapping[str, list[list[str]]],
    figures: Mapping[str, bytes],
    notes: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
) -> str:
    """A self-contained HTML page with the tables (each under its settings) and the figures."""
    from mammoflow.templates import render

    return render(
        "comparison.html.j2",
        tables=tables,
        figures={name: base64.b64encode(png).decode() for name, png in figures.items()},
        notes=notes,
        settings=settings or {},
    )


def console_table(dataset: str, table: list[list[str]], settings: str | None = None) -> Any:
    """A rich table for the terminal; its title says what the runs used (``settings``)."""
    from rich.table import Table

    title = f"{dataset} — validation mean ± std (%), test [95% CI]"
    t = Table(title=f"{title}\nSettings used: {settings}" if settings else title)
    for i, col in enumerate(table[0]):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in table[1:]:
        t.add_row(*row)
    return t
