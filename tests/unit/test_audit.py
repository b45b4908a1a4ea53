"""audit.py: inflation with CIs, dHash near duplicates, split checks (no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammoflow.evaluation.audit import (
    NEAR_DUPLICATE_BITS,
    AuditLayout,
    check_split,
    dhash,
    hamming,
    inflation,
    near_pairs,
    summary_text,
)

CLASSES = ("benign", "malignant")


def _side(seed: int, good: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    prob = np.eye(2)[y] * 0.8 + 0.1 if good else rng.dirichlet([1, 1], 60)
    return y, prob, [f"p{i // 2}" for i in range(60)]


def test_inflation_is_the_difference_with_a_ci() -> None:
    same = _side(0, good=False)
    table = inflation(same, same, CLASSES, n=100)
    assert table["accuracy"]["inflation"] == 0.0
    assert table["accuracy"]["low"] <= 0.0 <= table["accuracy"]["high"]
    leaky = inflation(_side(1, good=True), _side(2, good=False), CLASSES, n=100)
    acc = leaky["accuracy"]
    assert acc["image"] == 1.0 and acc["inflation"] == pytest.approx(1.0 - acc["patient"])
    assert acc["low"] > 0.2
    with pytest.raises(ValueError, match="n=0"):
        inflation(same, same, CLASSES, n=0)


def _film(path: Path, seed: int, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_dhash_finds_a_resized_copy_not_another_film(tmp_path: Path) -> None:
    a = _film(tmp_path / "a.png", 0)
    with Image.open(a) as im:
        im.resize((48, 48)).resize((64, 64)).save(tmp_path / "a_copy.png")
    b = _film(tmp_path / "b.png", 1)
    ha, hc, hb = dhash(a), dhash(tmp_path / "a_copy.png"), dhash(b)
    assert ha.shape == (32,) and ha.dtype == np.uint8
    d = hamming(np.stack([ha]), np.stack([hc, hb]))[0]
    assert d[0] <= NEAR_DUPLICATE_BITS < d[1]
    assert near_pairs(np.stack([ha, hb, hc]), NEAR_DUPLICATE_BITS) == [(0, 2, int(d[0]))]


def test_check_split_counts_patients_and_duplicates_across_partitions(tmp_path: Path) -> None:
    paths = [_film(tmp_path / f"{i}.png", i) for i in range(3)]
    (tmp_path / "3.png").write_bytes(paths[0].read_bytes())  # the same file, another image id
    splits = pd.DataFrame(
        {
            "image_id": ["i0", "i1", "i2", "i3"],
            "patient_id": ["p0", "p0", "p1", "p2"],
            "split": ["test", "cv", "cv", "cv"],
            "fold": [-1, 1, 2, 2],
        }
    )
    frame = pd.DataFrame(
        {
            "image_id": ["i0", "i1", "i2", "i3"],
            "converted_sha256": ["s0", "s1", "s2", "s0"],
            "converted_path": ["0.png", "1.png", "2.png", "3.png"],
        }
    )
    res = check_split(splits, frame, tmp_path)
    assert res["patients_in_test_and_cv"] == 1 and res["examples"]["patients"] == ["p0"]
    assert res["patients_in_several_folds"] == 0
    assert res["exact_duplicates_across"] == 1 and res["examples"]["exact"] == [["i0", "i3"]]
    assert res["near_duplicates_across"] == 1 and res["examples"]["near"][0][:2] == ["i0", "i3"]


def test_audit_layout_moves_only_the_study_outputs(tmp_path: Path) -> None:
    al = AuditLayout(root=tmp_path, out=tmp_path / "a")
    assert al.splits("d") == tmp_path / "a" / "splits" / "d.parquet"
    assert al.metrics("d", "vgg16").parent == tmp_path / "a" / "metrics" / "d"
    assert al.processed("d") == tmp_path / "data" / "processed" / "d"


def test_summary_says_inflation() -> None:
    table = inflation(_side(1, good=True), _side(2, good=False), CLASSES, n=20)
    check = {
        "patients_in_test_and_cv": 3,
        "patients_in_several_folds": 1,
        "exact_duplicates_across": 0,
        "near_duplicates_across": 2,
        "near_duplicate_bits": 24,
    }
    text = summary_text(
        {
            "dataset": "d",
            "backbone": "vgg16",
            "seed": 1,
            "k_folds": 5,
            "epochs": 2,
            "ci": 0.95,
            "inflation": table,
            "checks": {"image": check},
        }
    )
    assert "inflation" in text and "3 patients in test and CV" in text


def test_breast_dhash_ignores_padding_and_tells_women_apart(tmp_path: Path) -> None:
    from mammoflow.data.sample import synth_image
    from mammoflow.evaluation.audit import breast_dhash

    def film(seed: int) -> np.ndarray:
        img = synth_image(np.random.default_rng(seed), (160, 128), "L", [], 0.5)
        return (img * 255).astype(np.uint8)

    a = film(0)
    Image.fromarray(a).save(tmp_path / "a.png")
    moved = np.zeros((200, 200), np.uint8)  # the same film re-padded elsewhere on a canvas
    moved[30:190, 50:178] = a
    Image.fromarray(moved).save(tmp_path / "a_moved.png")
    Image.fromarray(film(1)).save(tmp_path / "b.png")
    ha, hm, hb = (breast_dhash(tmp_path / n) for n in ("a.png", "a_moved.png", "b.png"))
    d = hamming(np.stack([ha]), np.stack([hm, hb]))[0]
    assert d[0] <= NEAR_DUPLICATE_BITS < d[1], d
    whole = hamming(
        np.stack([dhash(tmp_path / "a.png")]), np.stack([dhash(tmp_path / "a_moved.png")])
    )
    assert whole[0, 0] > d[0]  # the whole-film hash moves with the padding
