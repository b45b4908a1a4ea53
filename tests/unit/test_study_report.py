"""study_report.py: the page from plain data — sections, embedded figures, the baseline."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mammoflow.evaluation.calibration import calibrate
from mammoflow.reporting.report import BackboneData, ReportData, baseline, render

CLASSES = ("benign", "malignant")


def _backbone(name: str, seed: int) -> BackboneData:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 30)
    prob = rng.dirichlet([1, 1], 30)
    ids = [f"i{k}" for k in range(30)]
    rec = {"image_id": ids[:10], "y_true": y[:10].tolist(), "prob": prob[:10].tolist()}
    folds = {
        str(f): {"image_id": ids[a:b], "y_true": y[a:b].tolist(), "prob": prob[a:b].tolist()}
        for f, (a, b) in ((1, (10, 20)), (2, (20, 30)))
    }
    cal = calibrate(y[10:], prob[10:], y[:10], prob[:10], ids[:10], n=20).to_dict()
    row = {"point": 0.5, "low": 0.4, "high": 0.6}
    sub = [
        {
            "factor": "view",
            "value": "CC",
            "n": 4,
            "patients": 2,
            "small": True,
            "metrics": {m: row for m in ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")},
        }
    ]
    return BackboneData(
        name=name,
        summary={
            "cv": {"f1_macro_mean": 0.6, "f1_macro_std": 0.1},
            "test": {"accuracy": 0.7, "f1_macro": 0.65, "roc_auc": 0.8},
            "test_ci": {"accuracy": {"low": 0.5, "high": 0.9}},
            "mlflow_parent_run_id": f"run-{name}",
        },
        predictions={"test": rec, "folds": folds},
        history={"1": {"loss": [1.0, 0.8], "val_loss": [1.1, 0.9]}},
        calibration=cal,
        subgroups={"test": sub, "out-of-fold": sub},
        tags={"dvc_data_hash": "d1.dir", "split_hash": "s1", "git_commit": "abc"},
    )


def test_page_is_self_contained_with_every_section() -> None:
    data = ReportData(
        dataset="toy",
        class_names=CLASSES,
        group_by="patient",
        backbones=[_backbone("vgg16", 0), _backbone("resnet50", 1)],
        champion={"best": "vgg16", "metric": "test_f1_macro"},
        validation={"results": [{"success": True}], "rows": 30, "success": True},
        audit={"inflation": {"accuracy": {"image": 0.9, "patient": 0.7, "inflation": 0.2}}},
        card="# Model card",
        explain={
            "backbones": {
                "vgg16": {
                    "hit_rate": 0.5,
                    "low": 0.2,
                    "high": 0.8,
                    "n": 6.0,
                    "chance": 0.031,
                    "outside_breast": 0.75,
                }
            }
        },
        patients={f"i{k}": f"p{k // 2}" for k in range(30)},
    )
    base = baseline(data, n=20)
    page = render(data, base)
    for title in (
        "majority-class baseline",
        "paper&#39;s reported figures",  # markupsafe's spelling of '
        "ROC and precision–recall",
        "Confusion matrices",
        "Calibration",
        "Learning curves",
        "Fold spread",
        "Subgroups (vgg16",
        "Leakage audit",
        "Grad-CAM pointing game",
        "Data validation",
        "Provenance",
        "Model card",
    ):
        assert title in page, title
    assert "98–99 %" in page and "image-level" in page and "10 images" in page
    assert "vgg16 ★" in page and f"majority class ({base['class']})" in page
    assert "ECE raw" in page and "CC ⚠" in page and "d1.dir" in page
    assert "50.0 [20.0, 80.0]" in page
    assert "Peak outside the breast %" in page and "<td>3.1</td><td>75.0</td>" in page
    images = re.findall(r"src='data:image/png;base64,", page)
    assert len(images) == 1 + 2 * 4  # ROC/PR + per backbone confusion, reliability, curves, folds
    assert "http://" not in page and "https://" not in page
    # selected on the test set: the page says so, and calls the test estimate optimistic
    assert "Warning: selected on the test set" in page and "optimistic estimate" in page


def _data(metric: str) -> ReportData:
    return ReportData(
        dataset="toy",
        class_names=CLASSES,
        group_by="patient",
        backbones=[_backbone("vgg16", 0), _backbone("resnet50", 1)],
        champion={"best": "resnet50", "metric": metric, "scores": {"resnet50": 0.6}},
        validation={},
        patients={f"i{k}": f"p{k // 5}" for k in range(30)},
    )


def test_the_page_states_the_selection_rule_and_the_unbiased_estimate() -> None:
    data = _data("cv_f1_macro_mean")
    page = render(data, baseline(data, n=20))
    assert "chosen on the cross-validated metric <code>cv_f1_macro_mean</code>" in page
    assert "Champion resnet50</b> — held-out test (unbiased estimate, 10 images)" in page
    assert "Warning" not in page and "resnet50 ★" in page


def test_baseline_ci_resamples_patients_not_images() -> None:
    data = _data("cv_f1_macro_mean")
    five = baseline(data, n=200)  # 10 test images of 2 patients (5 images each)
    data.patients = {f"i{k}": f"p{k}" for k in range(30)}  # one image per patient
    each = baseline(data, n=200)
    assert five["groups"] == "patient"
    # two patients: a resample holds 0, 1 or 2 of them → far fewer distinct accuracies
    assert five["ci"]["accuracy"] != each["ci"]["accuracy"]
    data.patients = {}
    with pytest.raises(ValueError, match="not in the converted manifest"):
        baseline(data, n=20)


def test_learning_curves_mark_the_final_model_after_recalibration() -> None:
    from mammoflow.evaluation.calibration import nll
    from mammoflow.reporting.report import learning_figure

    b = _backbone("vgg16", 0)
    fig = learning_figure(b, 2)
    stars = [line for line in fig.axes[0].lines if line.get_marker() == "*"]
    assert len(stars) == 1  # fold 1 has a history; fold 2 has none here
    rec = b.predictions["folds"]["1"]
    expected = nll(np.asarray(rec["y_true"]), np.asarray(rec["prob"]))
    assert stars[0].get_ydata()[0] == pytest.approx(expected)
    assert stars[0].get_label() == "val, final model (after BN recalibration)"


def test_hostile_labels_are_shown_as_text_not_run() -> None:
    """A dataset, backbone or validation label with markup is escaped by the template."""
    hostile = "<script>alert(1)</script>"
    data = _data("cv_f1_macro_mean")
    data.dataset = hostile
    data.backbones[0].name = f"vgg16{hostile}"
    data.validation = {
        "results": [
            {"success": False, "check": hostile, "expectation": "e", "unexpected_count": 1}
        ],
        "rows": 30,
        "success": False,
    }
    page = render(data, baseline(data, n=20))
    assert "<script" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<title>MammoFlow study: {escaped}</title>" in page
    assert f"<td>vgg16{escaped}</td>" in page and f"<td>{escaped}</td>" in page


def test_the_comparison_page_escapes_and_the_markdown_does_not() -> None:
    from mammoflow.reporting.figures import html_report, markdown

    tables = {"<b>ds</b>": [["Backbone", "F1"], ["<i>vgg</i>", "50.0"]]}
    page = html_report(tables, {}, ["a <note>"], {"<b>ds</b>": "weights <w>"})
    assert "<b>" not in page and "<i>" not in page and "<note>" not in page
    assert "<h2>&lt;b&gt;ds&lt;/b&gt;</h2>" in page and "<td>&lt;i&gt;vgg&lt;/i&gt;</td>" in page
    assert "| <i>vgg</i> | 50.0 |" in markdown(tables)  # markdown is not HTML-escaped


def test_a_field_the_template_names_but_nobody_passed_fails_loudly() -> None:
    import jinja2

    from mammoflow.templates import render as render_template

    with pytest.raises(jinja2.UndefinedError, match="min_n"):
        render_template("subgroups.md.j2", tables={}, metrics=(), level="95%")
