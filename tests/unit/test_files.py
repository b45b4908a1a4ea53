"""files.py: strict JSON out of NaN/inf and NumPy scalars."""

from __future__ import annotations

import json
import math

import numpy as np

from mammoflow.files import atomic_write_json, finite_json


def test_finite_json_makes_strict_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    obj = {
        "auc": math.nan,
        "f1": np.float32(0.5),
        "n": np.int64(3),
        "ci": (0.1, math.inf, -math.inf),
        "folds": [{"ece": np.float64("nan")}],
        1: "int key",
    }
    clean = finite_json(obj)
    assert clean == {
        "auc": None,
        "f1": 0.5,
        "n": 3,
        "ci": [0.1, None, None],
        "folds": [{"ece": None}],
        "1": "int key",
    }
    path = tmp_path / "m.json"
    atomic_write_json(path, clean)
    assert json.loads(path.read_text(), parse_constant=lambda c: 1 / 0) == clean
