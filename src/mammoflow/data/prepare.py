"""One film as the model is fed: decoded with the training readers, converted as the convert
stage does, scaled to [0, 255], and where the original lies on the model's canvas.

The data layer under scoring (serving/predict, serving/serve) and explanations (explain/), so
that both read the same :class:`Prepared` and :class:`Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from mammoflow.config import Config

if TYPE_CHECKING:
    from mammoflow.config import ConvertConfig
    from mammoflow.data.dicom import Acceptance

#: hex digits of an image id (``i`` + 16 hex of the file's sha256, HMAC-keyed when set)
ID_HEX = 16


@dataclass(frozen=True)
class Geometry:
    """Where the original image lies on the converted square canvas.

    Attributes:
        height, width: the original image's size.
        bbox: the crop ``(top, left, bottom, right)`` taken from it (the whole image unless
            ``convert.crop_to_breast``).
        top, left, fit_h, fit_w: the resized crop's place on the ``size`` x ``size`` canvas.
        size: the canvas side (``convert.size``).
    """

    height: int
    width: int
    bbox: tuple[int, int, int, int]
    top: int
    left: int
    fit_h: int
    fit_w: int
    size: int


@dataclass(frozen=True)
class Prepared:
    """One input ready for the model."""

    path: str
    image_id: str
    pixels: NDArray[np.float32]  # (size, size) in [0, 255], as training fed the model
    original: NDArray[np.float32]  # 2-D [0, 1], the decoded file (for overlays)
    geometry: Geometry


def acceptance(cfg: Config, dataset: str) -> Acceptance:
    """Ingestion's DICOM acceptance rules for ``dataset`` (the sample's own minimum size)."""
    from mammoflow.data.dicom import Acceptance
    from mammoflow.data.raw import min_size

    return Acceptance(
        min_size=min_size(cfg, dataset),
        accept_for_processing=cfg.ingest.accept_for_processing,
        min_size_hint="lower ingest.min_size",
        accept_burned_in=cfg.ingest.accept_burned_in,
    )


def read_image(path: Path, rules: Acceptance | None) -> NDArray[np.float32]:
    """Decode one file as 2-D float32 in [0, 1] with the training readers.

    DICOM goes through ingestion's acceptance ``rules`` (not an image, QC, FOR PROCESSING, too
    small) and the display chain; PGM through :func:`load_raw`; PNG is read as grey.

    Raises:
        ValueError: an unsupported suffix or a file the readers refuse (the reason says why).
    """
    from mammoflow.data.dicom import read_dicom
    from mammoflow.data.readers import DICOM_SUFFIXES, load_png, load_raw

    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path, rules).pixels
    if suffix == ".png":
        return load_png(path)
    return np.asarray(load_raw(path), dtype=np.float32)


def geometry(img: NDArray[np.floating], size: int, crop_to_breast: bool) -> Geometry:
    """Where :func:`convert.prepare_image` puts ``img`` on its ``size`` canvas."""
    from mammoflow.data import images

    height, width = img.shape
    bbox = (
        images.breast_bbox(np.asarray(img, np.float32)) if crop_to_breast else (0, 0, height, width)
    )
    fit_h, fit_w = images.fit_size(bbox[2] - bbox[0], bbox[3] - bbox[1], size)
    return Geometry(
        height=height,
        width=width,
        bbox=(int(bbox[0]), int(bbox[1]), int(bbox[2]), int(bbox[3])),
        top=(size - fit_h) // 2,
        left=(size - fit_w) // 2,
        fit_h=fit_h,
        fit_w=fit_w,
        size=size,
    )


def image_id(path: Path, key: bytes | None) -> str:
    """``i`` + 16 hex digits of the file's sha256 (HMAC-keyed with ``key``): no name leaks."""
    from mammoflow.data.pseudonym import keyed_hex
    from mammoflow.files import sha256_file

    digest = sha256_file(path)
    return "i" + (keyed_hex(key, f"image:{digest}", ID_HEX) if key else digest[:ID_HEX])


def prepare(
    path: Path, cfg: Config, rules: Acceptance | None, key: bytes | None = None
) -> Prepared:
    """Read and convert one file exactly as the convert stage does, scaled to [0, 255]."""
    img = read_image(path, rules)
    conv = cfg.convert
    return Prepared(
        path=str(path),
        image_id=image_id(path, key),
        pixels=model_input(img, conv),
        original=img,
        geometry=geometry(img, conv.size, conv.crop_to_breast),
    )


def model_input(img: NDArray[np.floating], conv: ConvertConfig) -> NDArray[np.float32]:
    """A decoded image as the model is fed: :func:`convert.prepare_image`, in [0, 255]."""
    from mammoflow.data.convert import prepare_image
    from mammoflow.data.images import to_model_range

    return to_model_range(prepare_image(img, conv.size, conv.bit_depth, conv.crop_to_breast))
