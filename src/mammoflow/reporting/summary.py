"""What a finished pipeline run shows a person outside the terminal (the Prefect UI's artifacts):
the comparison table, links to the MLflow runs and the study report, the validation summary.

Everything is read back from the stages' DVC outputs (metrics/, reports/); nothing is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mammoflow.paths import Layout

# The MLflow UI of the embedded SQLite store (`make ui`); a tracking server is its own UI.
LOCAL_UI = "http://127.0.0.1:5000"


def _read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}"


def comparison_rows(layout: Layout, dataset: str, backbones: list[str]) -> list[dict[str, str]]:
    """One row per trained backbone of ``dataset``: CV and test macro-F1 (with its CI), AUC,
    ECE before → after temperature scaling, whether it is the champion, its MLflow run."""
    champion = _read(layout.champion(dataset)).get("best")
    rows: list[dict[str, str]] = []
    for backbone in backbones:
        m = _read(layout.metrics(dataset, backbone))
        if not m:
            continue
        cv, test, ci = m.get("cv", {}), m.get("test", {}), m.get("test_ci", {}).get("f1_macro", {})
        cal = m.get("calibration", {})
        rows.append(
            {
                "backbone": backbone + (" (champion)" if backbone == champion else ""),
                "cv_f1_macro_%": f"{_pct(cv.get('f1_macro_mean'))} ± {_pct(cv.get('f1_macro_std'))}",
                "test_f1_macro_%": f"{_pct(test.get('f1_macro'))} "
                f"[{_pct(ci.get('low'))}, {_pct(ci.get('high'))}]",
                "test_auc_%": _pct(test.get("roc_auc")),
                "ece_%": f"{_pct(cal.get('test_raw', {}).get('ece'))} → "
                f"{_pct(cal.get('test_calibrated', {}).get('ece'))}",
                "mlflow_run": str(m.get("mlflow_parent_run_id", "")),
            }
        )
    return rows


def mlflow_ui(tracking_uri: str) -> str:
    """The MLflow UI's address for ``tracking_uri``: the server itself, or `make ui`'s."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def run_link(ui: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI address of an experiment (machine-learning view) or of one of its runs."""
    base = f"{ui}/#/experiments/{experiment_id}"
    return f"{base}/runs/{run_id}" if run_id else f"{base}?workflowType=machine_learning"


def validation_markdown(layout: Layout, datasets: list[str]) -> str:
    """The Great Expectations outcome per dataset, as a markdown table."""
    lines = [
        "| dataset | images | expectations | failed | result |",
        "|---|---|---|---|---|",
    ]
    for dataset in datasets:
        v = _read(layout.validation_metrics(dataset))
        if not v:
            lines.append(f"| {dataset} | – | – | – | not validated |")
            continue
        verdict = "passed" if v.get("success") else "**failed**"
        lines.append(
            f"| {dataset} | {v.get('images')} | {v.get('expectations')} | {v.get('failed')} "
            f"| {verdict} |"
        )
    docs = ", ".join(f"`{layout.validation(d)}`" for d in datasets)
    return "\n".join(lines) + f"\n\nData Docs: {docs}"
