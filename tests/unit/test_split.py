"""split.py: grouping, stratification, determinism, errors, hashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammoflow.data.split import SplitError, make_splits, read_splits, split_hash, write_splits

LABELS = ("normal", "benign", "malignant")


def _frame(n_patients: int = 60, seed: int = 0, images_per_patient: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        worst = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
        for i in range(images_per_patient):
            lab = worst if i == 0 else int(rng.integers(0, worst + 1))
            rows.append(
                {
                    "image_id": f"img{p:03d}_{i}",
                    "patient_id": f"P{p:03d}",
                    "label_index": lab,
                    "label": LABELS[lab],
                }
            )
    return pd.DataFrame(rows)


def test_patient_grouping_no_leak() -> None:
    s = make_splits(_frame(), test_size=0.15, k_folds=5, seed=1)
    assert list(s.columns) == ["image_id", "patient_id", "label_index", "split", "fold"]
    per_patient = s.groupby("patient_id").agg(
        splits=("split", "nunique"), folds=("fold", "nunique")
    )
    assert (per_patient["splits"] == 1).all() and (per_patient["folds"] == 1).all()
    assert set(s.loc[s["split"] == "test", "fold"]) == {-1}
    assert set(s.loc[s["split"] == "cv", "fold"]) == {1, 2, 3, 4, 5}
    assert set(s.loc[s["split"] == "test", "label_index"]) == {0, 1, 2}


def test_stratification_within_tolerance() -> None:
    s = make_splits(_frame(120, seed=3), test_size=0.1, k_folds=4, seed=7)
    cv = s[s["split"] == "cv"]
    overall = cv["label_index"].value_counts(normalize=True)
    for _, part in cv.groupby("fold"):
        share = (
            part["label_index"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        )
        assert (share - overall).abs().max() < 0.12


def test_deterministic_and_seed_sensitive() -> None:
    f = _frame()
    a, b = (
        make_splits(f, 0.1, 3, seed=5),
        make_splits(f.sample(frac=1, random_state=2), 0.1, 3, seed=5),
    )
    pd.testing.assert_frame_equal(a, b)
    assert split_hash(a) == split_hash(b)
    assert split_hash(make_splits(f, 0.1, 3, seed=6)) != split_hash(a)


def test_image_mode_is_leaky_image_level() -> None:
    s = make_splits(_frame(), test_size=0.2, k_folds=3, group_by="image", seed=0)
    straddle = s.groupby("patient_id")["fold"].nunique()
    assert (straddle > 1).any()  # the paper's split lets a woman's two images part ways


def test_too_many_folds_names_class_count_and_k() -> None:
    f = _frame(30)
    mal = f.loc[f["label_index"] == 2, "patient_id"].unique()
    f = f[~f["patient_id"].isin(mal[2:])]
    with pytest.raises(
        SplitError, match=r"'malignant' \(label_index 2\) has only 2 patients .*k_folds=5"
    ):
        make_splits(f, test_size=0.0, k_folds=5)


def test_test_set_missing_class_and_bad_params() -> None:
    rows = [
        {"image_id": f"N{p}_{i}", "patient_id": f"N{p}", "label_index": 0, "label": "normal"}
        for p in range(10)
        for i in range(2)
    ]
    for p in range(10):  # benign only as the second image of malignant patients M0..M2
        second = 1 if p < 3 else 2
        rows += [
            {"image_id": f"M{p}_0", "patient_id": f"M{p}", "label_index": 2, "label": "malignant"},
            {
                "image_id": f"M{p}_1",
                "patient_id": f"M{p}",
                "label_index": second,
                "label": LABELS[second],
            },
        ]
    f = pd.DataFrame(rows)
    errors = []
    for seed in range(10):
        try:
            make_splits(f, test_size=0.05, k_folds=2, seed=seed)
        except SplitError as exc:
            errors.append(str(exc))
    assert errors and "no image of class 'benign' (label_index 1)" in errors[0]
    with pytest.raises(SplitError, match="k_folds=1"):
        make_splits(_frame(), k_folds=1)
    with pytest.raises(SplitError, match=r"test_size=1\.5"):
        make_splits(_frame(), test_size=1.5)
    with pytest.raises(SplitError, match="lacks columns"):
        make_splits(pd.DataFrame({"image_id": ["a"]}))


def test_write_read_roundtrip(tmp_path: Path) -> None:
    s = make_splits(_frame(), 0.1, 3)
    h = write_splits(s, tmp_path / "out" / "splits.parquet")
    back = read_splits(tmp_path / "out")
    assert split_hash(back) == h == split_hash(s)
    assert not list((tmp_path / "out").glob("*.tmp"))
