"""pointing.py: the pointing game's chance level and the outside-the-breast share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mammoflow.explain.explain_check import chance_and_outside, lesion_mask


def _film() -> np.ndarray:
    img = np.zeros((200, 160), np.float32)
    img[20:180, 0:100] = 0.6  # the breast: 160 x 100 px against the chest wall
    return img


def test_chance_is_the_share_of_the_breast_inside_the_circles() -> None:
    lesion = {"x": 50.0, "y": 99.0, "radius": 10.0}  # MIAS: y from the bottom → row 100
    chance, outside = chance_and_outside(_film(), [lesion], (100, 50))
    circle = lesion_mask([lesion], (200, 160))
    assert circle[100, 50] and not circle[99 - 10 - 2, 50]
    assert chance == pytest.approx(math.pi * 100 / (160 * 100), rel=0.08)
    assert not outside


def test_a_peak_in_the_background_or_nowhere_is_outside_the_breast() -> None:
    lesion = {"x": 50.0, "y": 99.0, "radius": 10.0}
    assert chance_and_outside(_film(), [lesion], (100, 150))[1]  # beside the breast
    assert chance_and_outside(_film(), [lesion], (5, 50))[1]  # above it (padding, label)
    assert chance_and_outside(_film(), [lesion], None)[1]  # a flat map points nowhere
    far = {"x": 150.0, "y": 10.0, "radius": 5.0}  # a circle off the breast: chance 0
    assert chance_and_outside(_film(), [far], (100, 50))[0] == 0.0
