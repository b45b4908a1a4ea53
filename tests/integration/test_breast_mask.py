"""The breast mask, chosen on the 322 real MIAS films (read with the project's PGM reader).

Two rules used to look for the breast: a tolerance threshold (a pixel is breast when it lies
more than 2 % of the range above the minimum) and Otsu's threshold on a block-averaged copy,
opened, largest component (:func:`mammoflow.data.images.breast_mask`). A film passes when the
mask covers every annotated lesion centre of Info.txt (origin bottom-left, so the row is
``height - y``) and leaves out the film background: no mask pixel in the 32 columns at the edge
opposite the chest wall (the chest wall is on the brighter half). The mini-MIAS films have
their labels painted out in black; what stays around the breast is grey film, noise and
scanner edges. Measured: Otsu passes on 318 films, the tolerance rule on 220. Lesion centres:
Otsu covers 109 of 111 films, the tolerance rule 110 (both miss mdb212, Otsu also mdb214: two
calcifications whose coordinates fall on grey film background); the tolerance mask is hundreds
of background specks per film, Otsu's one region.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from scipy import ndimage

from mammoflow.data import images
from mammoflow.data.mias import INFO_NAME, MiasImageInfo, parse_info_lenient
from mammoflow.data.pgm import parse_pgm
from mammoflow.data.readers import pgm_to_unit

ARCHIVE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mias" / "all-mias.tar.gz"
)
BAND = 32

pytestmark = pytest.mark.integration


def tolerance_mask(img: np.ndarray, tolerance: float = 0.02) -> np.ndarray:
    """The rejected rule (the former ``transforms.breast_mask``), kept as the baseline."""
    low, high = float(img.min()), float(img.max())
    return np.asarray(img > low + tolerance * (high - low))


@pytest.fixture(scope="module")
def films() -> list[tuple[str, np.ndarray, MiasImageInfo]]:
    if not ARCHIVE.is_file():
        pytest.skip(f"real MIAS archive not found at {ARCHIVE} (../shared/data/mias)")
    pixels: dict[str, np.ndarray] = {}
    info_text = ""
    with tarfile.open(ARCHIVE, "r:gz") as tar:
        for member in tar:
            name = PurePosixPath(member.name).name
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is None:
                continue
            if name == INFO_NAME:
                info_text = handle.read().decode("latin-1")
            elif name.endswith(".pgm"):
                pixels[name[:-4]] = pgm_to_unit(parse_pgm(handle.read(), name))
    info, problems = parse_info_lenient(info_text)
    assert problems == []
    assert len(pixels) == len(info) == 322
    return [(image_id, pixels[image_id], info[image_id]) for image_id in sorted(info)]


def _has_centre(info: MiasImageInfo) -> bool:
    return any(les.x is not None for les in info.lesions)


def _passes(img: np.ndarray, info: MiasImageInfo, mask: np.ndarray) -> tuple[bool, bool]:
    """(covers every lesion centre, leaves the far background band out)."""
    height, width = img.shape
    chest_left = img[:, : width // 2].mean() > img[:, width // 2 :].mean()
    far = mask[:, width - BAND :] if chest_left else mask[:, :BAND]
    centres = [
        (min(height - 1, height - les.y), les.x)
        for les in info.lesions
        if les.x is not None and les.y is not None
    ]
    return all(mask[r, c] for r, c in centres), not far.any()


def test_the_otsu_breast_mask_beats_the_tolerance_rule(
    films: list[tuple[str, np.ndarray, MiasImageInfo]],
) -> None:
    passed = {"otsu": 0, "tolerance": 0}
    covered = {"otsu": 0, "tolerance": 0}
    regions: dict[str, list[int]] = {"otsu": [], "tolerance": []}
    failures: list[str] = []
    with_centres = sum(_has_centre(info) for _, _, info in films)
    for image_id, img, info in films:
        for rule, mask in (("otsu", images.breast_mask(img)), ("tolerance", tolerance_mask(img))):
            covers, clean = _passes(img, info, mask)
            covered[rule] += covers and _has_centre(info)
            passed[rule] += covers and clean
            regions[rule].append(ndimage.label(mask, structure=np.ones((3, 3), bool))[1])
            if rule == "otsu" and not (covers and clean):
                failures.append(image_id)
    assert with_centres == 111
    assert passed["otsu"] > passed["tolerance"], (passed, failures)
    assert passed["otsu"] >= 316, (passed, failures)  # measured: 318 (otsu) vs 220 (tolerance)
    assert covered["otsu"] >= 109, covered  # measured: 109 (otsu) vs 110 (tolerance) of 111
    assert set(regions["otsu"]) == {1}  # one region on every film
    assert np.median(regions["tolerance"]) > 100  # background specks


def test_the_breast_mask_bbox_and_minmax_agree_on_real_films(
    films: list[tuple[str, np.ndarray, MiasImageInfo]],
) -> None:
    for _, img, _ in films[::40]:
        mask = images.breast_mask(img)
        rows, cols = np.nonzero(mask)
        top, left, bottom, right = images.breast_bbox(img, margin=0.0)
        assert (top, left, bottom, right) == (
            rows.min(),
            cols.min(),
            rows.max() + 1,
            cols.max() + 1,
        )
        scaled = images.minmax_over_breast(img)
        assert scaled[mask].max() == 1.0 and scaled.min() == 0.0
