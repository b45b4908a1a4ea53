"""subgroups.py: factors from the manifest, per-subgroup counts, CIs and the small flag."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammoflow.evaluation.metrics import compute_metrics
from mammoflow.evaluation.subgroups import factor_frame, subgroup_markdown, subgroup_rows


def _mias_frame() -> pd.DataFrame:
    lesions = [
        [],
        [{"abnormality": "CALC", "severity": "B"}],
        [{"abnormality": "CIRC", "severity": "B"}, {"abnormality": "SPIC", "severity": "M"}],
        [],
    ]
    return pd.DataFrame(
        {
            "image_id": ["m1", "m2", "m3", "m4"],
            "laterality": ["R", "L", "R", "L"],
            "view": ["MLO"] * 4,
            "extras": [
                json.dumps({"tissue": t, "lesions": les})
                for t, les in zip("FGDF", lesions, strict=True)
            ],
        }
    )


def test_mias_factors_malignant_lesion_sets_the_class() -> None:
    f = factor_frame(_mias_frame(), "mias")
    assert list(f.columns) == ["tissue", "abnormality", "laterality"]
    assert f.loc["m3", "abnormality"] == "SPIC"
    assert f["abnormality"].tolist() == ["NORM", "CALC", "SPIC", "NORM"]
    assert f["tissue"].tolist() == ["F", "G", "D", "F"]


def test_cmmd_factors_and_unknown_kind() -> None:
    frame = pd.DataFrame(
        {
            "image_id": ["c1", "c2"],
            "laterality": ["L", "R"],
            "view": ["CC", "MLO"],
            "extras": [
                json.dumps({"abnormality": "mass", "age_band": "40-49"}),
                json.dumps({"abnormality": None}),
            ],
        }
    )
    f = factor_frame(frame, "cmmd")
    assert f.loc["c2"].tolist() == ["unknown", "MLO", "R", "unknown"]
    with pytest.raises(ValueError, match="'hospital'"):
        factor_frame(frame, "hospital")


def test_rows_count_flag_and_match_the_metrics_of_the_subset() -> None:
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"i{k}" for k in range(n)]
    factors = pd.DataFrame({"side": ["L"] * 32 + ["R"] * 8}, index=pd.Index(ids))
    y = rng.integers(0, 2, n)
    prob = rng.dirichlet([1, 1], n)
    patients = {i: f"p{k // 2}" for k, i in enumerate(ids)}
    rows = subgroup_rows(ids, y, prob, factors, patients, ("benign", "malignant"), n=50)
    assert [(r["value"], r["n"], r["patients"], r["small"]) for r in rows] == [
        ("L", 32, 16, False),
        ("R", 8, 4, True),
    ]
    expected = compute_metrics(y[:32], prob[:32], ("benign", "malignant"))
    m = rows[0]["metrics"]["balanced_accuracy"]
    assert m["point"] == pytest.approx(expected["balanced_accuracy"])
    assert m["low"] <= m["point"] <= m["high"]
    text = subgroup_markdown({"test": rows})
    assert "| side | R ⚠ | 8 | 4 |" in text and "fewer than 10 images" in text
