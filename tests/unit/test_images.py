"""The pure image module: intensity transforms, the breast mask, geometry."""

from __future__ import annotations

import numpy as np
import pytest

from mammoflow.data import images


def _film(label: bool = True) -> np.ndarray:
    """A 200×150 film: a breast against the left edge with a dark hole, a bright label."""
    img = np.zeros((200, 150), np.float32)
    img[40:160, 0:90] = 0.6
    img[90:100, 30:40] = 0.05  # fatty patch inside the breast
    if label:
        img[5:9, 140:146] = 1.0
    return img


# ------------------------------------------------------------------------------ intensity


def test_invert() -> None:
    np.testing.assert_allclose(images.invert(np.array([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])
    assert images.invert(np.zeros(2)).dtype == np.float32


def test_minmax_over_breast_spans_background_to_breast() -> None:
    arr = np.array([[0.0, 0.0, 100.0, 150.0, 200.0]])
    np.testing.assert_allclose(images.minmax_over_breast(arr), [[0, 0, 0.5, 0.75, 1.0]])
    high = np.array([[1000.0, 1000.0, 100.0, 550.0, 200.0]])  # raw MONOCHROME1: air is high
    np.testing.assert_allclose(images.minmax_over_breast(high, "high"), [[1, 1, 0, 0.5, 1 / 9]])
    assert images.minmax_over_breast(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]
    assert images.minmax_over_breast(np.zeros((0, 3))).shape == (0, 3)


def test_minmax_over_breast_ignores_a_bright_label() -> None:
    film = _film()
    film[100:110, 50:60] = 0.8  # the breast's brightest patch
    out = images.minmax_over_breast(film)
    assert out[105, 55] == 1.0 and out[6, 142] == 1.0  # the label is clipped to the breast's top
    np.testing.assert_allclose(out[60, 20], 0.75)  # 0.6 / 0.8, not 0.6 / 1.0
    assert out[0, 100] == 0.0


# ------------------------------------------------------------------------------ the breast


def test_breast_mask_is_one_region_without_label_or_holes() -> None:
    mask = images.breast_mask(_film())
    assert mask[40:160, 0:90].all()  # the whole breast, the fatty patch included
    assert not mask[5:9, 140:146].any()  # not the label
    assert mask.sum() == 120 * 90


def test_breast_mask_high_background_and_blocks() -> None:
    film = _film(label=False)
    np.testing.assert_array_equal(
        images.breast_mask(1.0 - film, "high"), images.breast_mask(film, "low")
    )
    big = np.kron(film, np.ones((4, 4), np.float32))  # 800×600: block-averaged by 4
    assert big.shape == (800, 600)
    mask = images.breast_mask(big, max_side=200)
    assert mask[160:640, 0:360].all() and mask.sum() == 480 * 360


def test_breast_mask_of_a_blank_image_is_empty() -> None:
    assert not images.breast_mask(np.zeros((10, 10), np.float32)).any()
    assert not images.breast_mask(np.full((10, 10), 0.4, np.float32)).any()


def test_breast_mask_rejects_bad_arguments() -> None:
    with pytest.raises(images.ImageError, match=r"background must be 'low' or 'high', got 'dark'"):
        images.breast_mask(_film(), "dark")  # type: ignore[arg-type]
    with pytest.raises(images.ImageError, match=r"must be 2-D \(rows, cols\), got shape \(3,\)"):
        images.breast_mask(np.zeros(3))
    with pytest.raises(images.ImageError, match=r"max_side must be >= 1, got 0"):
        images.breast_mask(_film(), max_side=0)


def test_breast_bbox_finds_the_largest_region() -> None:
    top, left, bottom, right = images.breast_bbox(_film(), margin=0.0)
    assert (top, left, bottom, right) == (40, 0, 160, 90)
    assert images.breast_bbox(np.zeros((10, 10), np.float32)) == (0, 0, 10, 10)
    assert images.breast_bbox(_film(), margin=0.05) == (30, 0, 170, 98)


# ------------------------------------------------------------------------------ geometry


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    img = np.ones((100, 50), np.float32)
    out = images.letterbox(img, 64)
    assert out.shape == (64, 64)
    cols = np.nonzero(out.max(axis=0) > 0.5)[0]
    assert out[:, :16].max() == 0 and out[:, 48:].max() == 0  # black side bars
    assert (cols.min(), cols.max()) == (16, 47)  # 32 columns wide: aspect 2:1 kept
    assert np.allclose(out[:, 17:47], 1.0, atol=1e-3)
    assert images.fit_size(1024, 700, 512) == (512, 350)


def test_resize_is_antialiased() -> None:
    checker = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    small = images.resize_to_fit(checker, 32)
    assert np.allclose(small, 0.5, atol=0.05)  # no aliasing moiré


def test_geometry_rejects_bad_values() -> None:
    img = np.ones((10, 20), np.float32)
    with pytest.raises(images.ImageError, match=r"bounding box \(0, 0, 11, 5\) does not fit"):
        images.crop(img, (0, 0, 11, 5))
    with pytest.raises(images.ImageError, match=r"target size must be >= 1, got 0"):
        images.fit_size(10, 20, 0)
    with pytest.raises(images.ImageError, match=r"image 10x20 is larger than the 16x16 canvas"):
        images.pad_to_square(img, 16)
    with pytest.raises(images.ImageError, match=r"bit_depth must be 8 or 16, got 12"):
        images.quantize(img, 12)
    assert images.crop(img, (2, 3, 5, 9)).shape == (3, 6)
    assert images.quantize(np.array([[0.0, 0.5, 1.2]], np.float32), 8).tolist() == [[0, 128, 255]]
