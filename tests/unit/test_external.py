"""external.py's pure parts: the label check, the shift's CI, the evidence; the vendor sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mammoflow.data.pgm import read_pgm
from mammoflow.data.sample import make_sample, make_vendor_sample
from mammoflow.evaluation.external import ExternalError, Scored, check_labels, shift_ci

CLASSES = ("normal", "benign", "malignant")


def _scored(seed: int, n: int, skill: float) -> Scored:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + skill * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Scored([f"i{k}" for k in range(n)], [f"p{k // 2}" for k in range(n)], y, prob)


def test_label_spaces_must_match_and_the_error_names_both() -> None:
    check_labels(CLASSES, CLASSES, "m", "d")
    with pytest.raises(ExternalError, match=r"model m predicts \['normal'.*dataset d is labelled"):
        check_labels(CLASSES, ("benign", "malignant"), "m", "d")


def test_shift_ci_finds_a_real_drop_and_not_a_null_one() -> None:
    own = _scored(0, 200, skill=1.5)
    worse = shift_ci(_scored(1, 200, skill=0.0), own, CLASSES, n=200)
    f1 = worse["f1_macro"]
    assert f1["delta"] == pytest.approx(f1["external"] - f1["own"])
    assert f1["high"] < 0  # a model at chance on the new site: the CI excludes no change
    same = shift_ci(_scored(2, 200, skill=1.5), own, CLASSES, n=200)["f1_macro"]
    assert same["low"] < 0 < same["high"]


def test_vendor_sample_is_seeded_12_bit_and_unlike_the_standard_one(tmp_path: Path) -> None:
    files, labels = make_vendor_sample(tmp_path / "a", seed=7, patients=3, size=64)
    again, _ = make_vendor_sample(tmp_path / "b", seed=7, patients=3, size=64)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]
    assert set(labels.values()) <= set(CLASSES) and len(labels) == 6
    vendor = read_pgm(tmp_path / "a" / "mias" / "mdb001.pgm")
    standard_dir = make_sample(tmp_path / "s", 7, 3, 2, 64).mias_dir
    standard = read_pgm(standard_dir / "mdb001.pgm")
    assert vendor.maxval == 4095 and standard.maxval == 255
    background = vendor.pixels[:4, :4] / 4095  # the raised detector floor of vendor_b
    assert background.mean() > 2 * (standard.pixels[:4, :4] / 255).mean()


def test_the_page_escapes_hostile_names() -> None:
    import pandas as pd

    from mammoflow.evaluation.external import evidence, render

    ext, own = _scored(3, 24, skill=1.0), _scored(4, 24, skill=1.0)
    factors = pd.DataFrame({"view": ["CC", "MLO"] * 12}, index=pd.Index(ext.ids, name="image_id"))
    ev = evidence(ext, own, CLASSES, factors, n=20, ci=0.95, seed=0)
    hostile = "<script>alert(1)</script>"
    ev |= {
        "dataset": hostile,
        "model_uri": "models:/m@champion",
        "model": f"m{hostile}",
        "source_dataset": "sample_mias",
        "temperature": None,
        "own_test_grouping": "patient bootstrap",
        "class_names": list(CLASSES),
        "ci_level": 0.95,
        "mlflow_run_id": "r1",
    }
    page = render(ev, ext)
    assert "<script" not in page
    assert "<h1>External validation: &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in page
    assert "(T = –)" in page and "<h4>external</h4>" in page
