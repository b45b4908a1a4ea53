"""DVC's own views read as the study: `dvc metrics show` prints the short summary rows only,
dvc.yaml's top-level plots overlay every backbone from files the train stage declares, and
`dvc plots show` writes a page that needs no network."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra import plots_template

from mammoflow.reporting import dvc_views

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
MAX_COLUMNS = 8  # per backbone: what a terminal shows without wrapping


def _yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def _dvc_json(*args: str) -> Any:
    done = subprocess.run([DVC, *args, "--json"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else key)
    return out


def test_summary_row_copies_the_detail_rounded() -> None:
    detail = json.loads((ROOT / "metrics/sample_mias/resnet50.json").read_text("utf-8"))
    row = dvc_views.summary_row(detail)
    assert tuple(row) == dvc_views.SUMMARY_KEYS
    assert len(row) <= MAX_COLUMNS
    assert row["cv_f1"] == round(detail["cv"]["f1_macro_mean"], 4)
    assert row["cv_f1_std"] == round(detail["cv"]["f1_macro_std"], 4)
    assert row["test_f1"] == round(detail["test"]["f1_macro"], 4)
    assert row["test_f1_lo"] == round(detail["test_ci"]["f1_macro"]["low"], 4)
    assert row["test_f1_hi"] == round(detail["test_ci"]["f1_macro"]["high"], 4)
    assert row["auc"] == round(detail["test"]["roc_auc"], 4)
    assert row["ece"] == round(detail["calibration"]["test_raw"]["ece"], 4)
    assert row["ece_cal"] == round(detail["calibration"]["test_calibrated"]["ece"], 4)


def test_summary_row_names_a_missing_value() -> None:
    detail = {"cv": {"f1_macro_mean": 0.5, "f1_macro_std": 0.1}, "test": {"f1_macro": 0.4}}
    with pytest.raises(KeyError, match=r"test_ci\.f1_macro\.low"):
        dvc_views.summary_row(detail)
    detail["test"]["roc_auc"] = None  # undefined AUC (one class in the test set): shown as '-'
    detail["test_ci"] = {"f1_macro": {"low": 0.3, "high": float("nan")}}
    row = dvc_views.summary_row(detail)
    assert row["auc"] is None and row["test_f1_hi"] is None and row["ece"] is None


def test_learning_rows_average_the_cv_folds() -> None:
    histories = {
        "0": {"loss": [9.0, 9.0, 9.0]},  # the refit model: no validation, not a CV fold
        "1": {"loss": [1.0, 0.5], "val_loss": [2.0, 1.0]},
        "2": {"loss": [3.0], "val_loss": [4.0]},  # stopped early
    }
    rows = dvc_views.learning_rows(histories)
    assert rows == [
        {"epoch": 1, "loss": 2.0, "val_loss": 3.0, "folds": 2},
        {"epoch": 2, "loss": 0.5, "val_loss": 1.0, "folds": 1},
    ]
    assert dvc_views.learning_rows({}) == []


def test_reliability_rows_skip_empty_bins() -> None:
    bins = {
        "raw": [{"count": 3.0, "confidence": 0.9, "accuracy": 0.1}],
        "calibrated": [
            {"count": 0.0, "confidence": float("nan"), "accuracy": float("nan")},
            {"count": 2.0, "confidence": 0.45, "accuracy": 0.5},
        ],
    }
    assert dvc_views.reliability_rows(bins) == [{"confidence": 0.45, "accuracy": 0.5, "count": 2.0}]


def test_dvc_metrics_show_prints_only_the_summary() -> None:
    """Every DVC metric of the project is a summary file with at most MAX_COLUMNS keys, and
    there is one for each dataset × backbone of params.yaml."""
    params = _yaml(ROOT / "params.yaml")
    expected = {
        f"metrics/summary/{d}/{b}.json"
        for d in params["pipeline"]["datasets"]
        for b in params["model"]["backbones"]
    }
    (workspace,) = _dvc_json("metrics", "show").values()  # one revision: the workspace
    shown = workspace["data"]
    assert set(shown) == expected, "only the summaries are DVC metrics (the detail files are outs)"
    columns: set[str] = set()
    for path, entry in shown.items():
        assert "error" not in entry, f"{path}: {entry}"
        keys = set(_flat(entry["data"]))
        assert len(keys) <= MAX_COLUMNS, f"{path}: {sorted(keys)}"
        columns |= keys
    assert columns <= set(dvc_views.SUMMARY_KEYS)


def _train_outs() -> set[str]:
    """The train stage's outs and metrics, ${item.*} as regular-expression wildcards."""
    train = _yaml(ROOT / "dvc.yaml")["stages"]["train"]
    names = [next(iter(o)) if isinstance(o, dict) else o for o in train["outs"] + train["metrics"]]
    return {re.sub(r"\\\$\\\{item\\\.\w+\\\}", r"[^/]+", re.escape(n)) for n in names}


def test_top_level_plots_overlay_every_backbone_from_declared_files() -> None:
    doc = _yaml(ROOT / "dvc.yaml")
    params = _yaml(ROOT / "params.yaml")
    outs = _train_outs()
    backbones = params["model"]["backbones"]
    charts = {next(iter(p)): next(iter(p.values())) for p in doc["plots"]}
    for dataset in params["pipeline"]["datasets"]:
        for curve in ("confusion", "roc", "pr", "reliability", "learning"):
            chart = charts.get(f"{dataset}/{curve}")
            assert chart, f"dvc.yaml plots: no {dataset}/{curve} chart"
            files = list(chart["y"])
            assert files == [f"plots/{dataset}/{b}/{curve}.json" for b in backbones]
            for file in files:
                assert any(re.fullmatch(p, file) for p in outs), f"{file}: not a train out"
                rows = json.loads((ROOT / file).read_text("utf-8"))
                field = chart["y"][file]
                assert rows and all(field in r and chart["x"] in r for r in rows), file
    for curve in dvc_views.PLOT_FILES:
        assert any(re.fullmatch(p, f"plots/d/b/{curve}") for p in outs), curve


def test_offline_template_inlines_dvc_s_scripts() -> None:
    """.dvc/config's page holds vega / vega-lite / vega-embed at the versions dvc-render would
    load from its CDN (after a dvc-render upgrade: `python -m infra.plots_template`)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        configured = repo.config["plots"]["html_template"]
    page = (ROOT / ".dvc" / configured).read_text("utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # no CDN tags added by DVC
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script loads from the network"
    inlined = re.findall(r'data-package="([a-z-]+)@([0-9.]+)"', page)
    assert inlined == plots_template.dvc_versions()


def test_inline_escapes_a_closing_script_tag() -> None:
    page = plots_template.page([("vega", "1", 'x="</script>";\n//# sourceMappingURL=v.js.map\n')])
    assert '<\\/script>"' in page and "sourceMappingURL" not in page
    assert page.count("</script>") == 1


def test_dvc_plots_show_renders_offline(tmp_path: Path) -> None:
    """`dvc plots show` itself: one vega chart per dataset × curve, no network address in a
    script element (the CDN page rendered blank on an air-gapped machine)."""
    done = subprocess.run(
        [DVC, "plots", "show", "-o", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    html = (tmp_path / "index.html").read_text("utf-8")
    assert "cdn.jsdelivr" not in html and not re.search(r"<script[^>]*\bsrc=", html)
    n_datasets = len(_yaml(ROOT / "params.yaml")["pipeline"]["datasets"])
    specs = re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, flags=re.S)
    assert len(specs) == n_datasets * 5, done.stdout + done.stderr
    for spec in specs:
        data = json.loads(spec)["data"]["values"]
        backbones = {row.get("filename") for row in data}
        assert len(backbones) > 1, f"{json.loads(spec)['title']}: the backbones are not overlaid"
