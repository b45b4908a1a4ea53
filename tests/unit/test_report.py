from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from mammoflow.config import load_config
from mammoflow.provenance import config_hash, dvc_data_hash, study_params
from mammoflow.reporting import figures as report
from mammoflow.tracking import experiment_name, registered_model_name

ROOT = Path(__file__).resolve().parents[2]


def _row(backbone: str, f1: float) -> dict:
    return {
        "backbone": backbone,
        "cv": {
            "accuracy_mean": 0.8,
            "accuracy_std": 0.05,
            "f1_macro_mean": f1,
            "f1_macro_std": 0.1,
            "precision_macro_mean": 0.7,
            "precision_macro_std": 0.02,
            "recall_macro_mean": 0.6,
            "recall_macro_std": math.nan,
        },
        "test": {"f1_macro": 0.5, "roc_auc": 0.9},
        "test_ci": {"f1_macro": {"low": 0.3, "high": 0.7}},
    }


def test_comparison_table_layout() -> None:
    table = report.comparison_table([_row("vgg16", 0.75), _row("resnet50", 0.5)])
    assert table[0] == [
        "Backbone",
        "Accuracy",
        "Precision",
        "Recall",
        "F1",
        "Test F1 [95% CI]",
        "Test AUC",
    ]
    assert table[1] == [
        "vgg16",
        "80.0 ± 5.0",
        "70.0 ± 2.0",
        "60.0 ± –",
        "75.0 ± 10.0",
        "50.0 [30.0, 70.0]",
        "90.0",
    ]


def test_markdown_and_html() -> None:
    tables = {"sample_mias": report.comparison_table([_row("vgg16", 0.75)])}
    md = report.markdown(tables, ["note <b>"])
    assert "## sample_mias" in md and "| vgg16 | 80.0 ± 5.0 |" in md
    png = report.figure_png(report.comparison_figure([_row("vgg16", 0.75)], "sample_mias"))
    assert png.startswith(b"\x89PNG")
    page = report.html_report(tables, {"sample_mias": png}, ["note <b>"])
    assert "note &lt;b&gt;" in page and "data:image/png;base64," in page


def test_figures_render() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    for fig in (
        report.confusion_figure(y, p, ["normal", "benign", "malignant"]),
        report.roc_figure(y, p, ["normal", "benign", "malignant"]),
        report.curves_figure({"loss": [1.0, 0.5], "val_loss": [1.1, 0.9]}),
        report.folds_figure({1: {"accuracy": 0.5, "f1_macro": 0.4}}, "vgg16"),
    ):
        assert report.figure_png(fig).startswith(b"\x89PNG")


def test_study_params_exclude_backbone_list() -> None:
    cfg = load_config(ROOT / "params.yaml")
    params = study_params(cfg, "sample_mias")
    assert "model.backbones" not in params
    assert params["dataset.kind"] == "mias"
    assert "train.epochs" in params and "split.k_folds" in params
    assert not any(k.startswith(("sample.", "ingest.", "datasets.")) for k in params)


def test_config_hash_changes_with_each_input() -> None:
    base = config_hash({"a": 1}, "d1", "s1")
    assert base == config_hash({"a": 1}, "d1", "s1")
    assert (
        len(
            {
                base,
                config_hash({"a": 2}, "d1", "s1"),
                config_hash({"a": 1}, "d2", "s1"),
                config_hash({"a": 1}, "d1", "s2"),
            }
        )
        == 4
    )


def test_names() -> None:
    assert experiment_name("mias") == "mammoflow-mias"
    assert registered_model_name("cmmd") == "mammoflow-cmmd"


def test_dvc_data_hash_is_dvcs_own(tmp_path: Path) -> None:
    """The lineage hash equals what `dvc add` records for the same folder, and follows edits."""
    import subprocess
    import sys

    with pytest.raises(FileNotFoundError, match="run `mammoflow convert x`"):
        dvc_data_hash("x", tmp_path)  # no data: an error naming the fix, not an 'unknown' tag
    folder = tmp_path / "data" / "processed" / "x"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(b"png-a")
    (folder / "manifest.parquet").write_bytes(b"rows")
    dvc = str(Path(sys.executable).parent / "dvc")

    def dvc_add() -> str:
        subprocess.run([dvc, "add", "-q", "data/processed/x"], cwd=tmp_path, check=True)
        return str(yaml.safe_load((folder.parent / "x.dvc").read_text())["outs"][0]["md5"])

    subprocess.run([dvc, "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    first = dvc_data_hash("x", tmp_path)
    assert first.endswith(".dir") and first == dvc_add()
    (folder / "images" / "a.png").write_bytes(b"png-a, changed")
    second = dvc_data_hash("x", tmp_path)
    assert second != first and second == dvc_add()


@pytest.mark.parametrize("bad", [math.nan])
def test_table_handles_missing_values(bad: float) -> None:
    row = _row("vgg19", bad)
    assert report.comparison_table([row])[1][4] == "– ± 10.0"


def _params(weights: str, size: str, epochs: str = "10") -> dict[str, str]:
    """Parent-run params as MLflow stores them (strings; a null size is 'None')."""
    return {
        "model.weights": weights,
        "model.input_size": size,
        "train.epochs": epochs,
        "train.batch_size": "16",
        "train.learning_rate": "0.0001",
        "split.k_folds": "5",
    }


def test_settings_line_labels_the_demo() -> None:
    line = report.settings_line({"vgg16": _params("none", "80"), "resnet50": _params("none", "80")})
    assert line.startswith("weights: none, 80 px — a demo, not transfer learning")
    assert line.endswith("(random initialisation); epochs 10, batch 16, lr 0.0001, folds 5")


def test_settings_line_native_sizes_per_backbone() -> None:
    line = report.settings_line(
        {"vgg16": _params("imagenet", "None"), "inception_v3": _params("imagenet", "None")}
    )
    assert line.startswith("weights: imagenet, vgg16 224 px, inception_v3 299 px — ImageNet")
    one = report.settings_line({"vgg16": _params("none", "None", epochs="1")})
    assert one.startswith("weights: none, 224 px — a demo, not transfer learning")
    assert "epochs 1," in one
    mixed = report.settings_line(
        {"vgg16": _params("none", "80"), "vgg19": _params("imagenet", "80")}
    )
    assert "weights: vgg16 none, vgg19 imagenet, 80 px;" in mixed
    assert "transfer" not in mixed


def test_reports_carry_the_settings_in_each_header() -> None:
    tables = {"sample_mias": report.comparison_table([_row("vgg16", 0.75)])}
    settings = {"sample_mias": report.settings_line({"vgg16": _params("none", "80")})}
    md = report.markdown(tables, ["note"], settings)
    head = md.split("| Backbone")[0]
    assert "## sample_mias" in head and "Settings used: weights: none, 80 px — a demo" in head
    page = report.html_report(tables, {}, ["note"], settings)
    assert page.index("Settings used: weights: none, 80 px") < page.index("<table>")
    title = report.console_table(
        "sample_mias", tables["sample_mias"], settings["sample_mias"]
    ).title
    assert "weights: none, 80 px — a demo, not transfer learning" in str(title)
