"""DICOM mammogram → ``float32`` pixels in [0, 1], dense tissue bright.

The pixel pipeline follows the DICOM display chain: stored values → Modality LUT (Rescale
Slope/Intercept, pydicom's ``apply_modality_lut``) → VOI (the first VOI LUT Sequence item, else
the first Window Center/Width, else min–max over the breast) → MONOCHROME1 inversion.

Only pseudonymous header fields leave this module: PatientID (in CMMD the dataset's ID such as
``D1-0001``), laterality, view and modality. PatientName, PatientBirthDate, AccessionNumber,
InstitutionName and dates are never read into the result nor put into messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from mammoflow.data import transforms

VoiPath = Literal["lut", "window", "minmax"]

_CC_CODES = {"R-10242", "399162004"}
_MLO_CODES = {"R-10226", "399368009"}
_VIEW_MEANINGS = {"cranio-caudal": "CC", "craniocaudal": "CC", "medio-lateral oblique": "MLO"}
_LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}


class DicomError(ValueError):
    """A DICOM file cannot be turned into a mammogram array; the message says why and how to fix."""


@dataclass(frozen=True)
class DicomImage:
    """A decoded mammogram and its pseudonymous header fields only."""

    pixels: np.ndarray  # 2-D float32 in [0, 1], dense tissue bright
    bits_stored: int
    photometric: str
    transfer_syntax: str
    patient_id: str | None
    laterality: str | None  # "L" | "R" | None
    view: str | None  # "CC" | "MLO" | other ViewPosition code | None
    modality: str | None
    voi: VoiPath = "minmax"


def decoder_hint(transfer_syntax: str) -> str:
    """How to make pydicom decode ``transfer_syntax`` (a UID string)."""
    uid = UID(transfer_syntax) if transfer_syntax else UID("")
    if uid.startswith("1.2.840.10008.1.2.4.9") or uid.startswith("1.2.840.10008.1.2.4.20"):
        return "install pylibjpeg and pylibjpeg-openjpeg (`uv add pylibjpeg pylibjpeg-openjpeg`)"
    if uid.startswith("1.2.840.10008.1.2.4.8"):
        return "install pylibjpeg-libjpeg or pyjpegls (`uv add pylibjpeg pylibjpeg-libjpeg`)"
    if uid.startswith("1.2.840.10008.1.2.4."):
        return "install pylibjpeg and pylibjpeg-libjpeg (`uv add pylibjpeg pylibjpeg-libjpeg`)"
    if uid == "1.2.840.10008.1.2.5":
        return "install pylibjpeg-rle (`uv add pylibjpeg-rle`)"
    return (
        "convert the file to an uncompressed transfer syntax (e.g. `gdcmconv --raw in.dcm "
        "out.dcm` or `dcmdjpeg`) or install a decoder plugin for it"
    )


def describe_syntax(transfer_syntax: str) -> str:
    """``'<uid> (<name>)'`` for messages; ``'unknown (no TransferSyntaxUID)'`` when absent."""
    if not transfer_syntax:
        return "unknown (no TransferSyntaxUID in the file meta)"
    uid = UID(transfer_syntax)
    name = uid.name if uid.name != str(uid) else "unrecognised transfer syntax"
    return f"{uid} ({name})"


def normalise_laterality(value: Any) -> str | None:
    """``'L'``/``'R'`` from a laterality tag value (``L``, ``left``, ``R `` …), else ``None``."""
    text = str(value or "").strip().upper()
    return _LATERALITY.get(text)


def normalise_view(position: Any, code_sequence: Sequence[Any] | None = None) -> str | None:
    """View from ViewPosition, else from the first ViewCodeSequence item (→ ``CC``/``MLO``)."""
    text = str(position or "").strip().upper()
    if text:
        return text
    for item in code_sequence or ():
        code = str(getattr(item, "CodeValue", "") or "").strip()
        meaning = str(getattr(item, "CodeMeaning", "") or "").strip().lower()
        if code in _CC_CODES:
            return "CC"
        if code in _MLO_CODES:
            return "MLO"
        return _VIEW_MEANINGS.get(meaning)
    return None


def _first(value: Any) -> float:
    """First value of a possibly multi-valued numeric element."""
    if isinstance(value, str | bytes):
        return float(value)
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _lut_entries(item: Dataset) -> np.ndarray:
    """The entries of a VOI LUT Sequence item as an integer array."""
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        entries = int(item.LUTDescriptor[0]) or 65536
        packed = len(data) == entries  # 8-bit entries packed one per byte, else 16-bit words
        return np.frombuffer(bytes(data), dtype=np.uint8 if packed else np.dtype("<u2"))
    if isinstance(data, int | float):
        return np.asarray([data])
    return np.asarray(list(data))


def to_unit_range(
    raw: np.ndarray, ds: Dataset, name: str = "<dataset>"
) -> tuple[np.ndarray, VoiPath]:
    """Stored pixel values → float32 [0, 1], dense tissue bright (pure; ``ds`` is in memory).

    Returns:
        The array and which VOI path was used: ``"lut"``, ``"window"`` or ``"minmax"``.

    Raises:
        DicomError: a window width or VOI function that DICOM does not allow.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    modality = np.asarray(apply_modality_lut(raw, ds))
    values = modality.astype(np.float64)
    voi: VoiPath
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        # a LUT is indexed by integers: round rescaled values instead of passing floats
        lut_input = (
            modality
            if np.issubdtype(modality.dtype, np.integer)
            else np.rint(values).astype(np.int64)
        )
        out = transforms.normalise_lut_output(
            apply_voi_lut(lut_input, ds, index=0, prefer_lut=True), _lut_entries(item)
        )
        voi = "lut"
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR")
        try:
            out = transforms.window(values, center, width, function)
        except ValueError as exc:
            raise DicomError(
                f"{name}: invalid windowing (Window Center {center}, Window Width {width}, "
                f"VOI LUT Function {function!r}): {exc}; fix or remove the window tags"
            ) from None
        voi = "window"
    else:
        background: Literal["low", "high"] = "high" if photometric == "MONOCHROME1" else "low"
        out = transforms.minmax_over_breast(values, background=background)
        voi = "minmax"
    if photometric == "MONOCHROME1":
        out = transforms.invert(out)
    return np.asarray(out, dtype=np.float32), voi


def read_dicom(path: str | Path) -> DicomImage:
    """Read one single-frame greyscale DICOM mammogram.

    Raises:
        DicomError: not DICOM, no pixel data, not greyscale, multi-frame, or undecodable
            (the message names the file, its transfer syntax UID and name, and a fix).
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomError(
            f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
            "check the file or re-export it as DICOM Part 10"
        ) from None
    except (OSError, EOFError) as exc:
        raise DicomError(f"{path}: cannot read the DICOM file: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
    described = describe_syntax(syntax)
    if "PixelData" not in ds:
        raise DicomError(
            f"{path}: no pixel data (transfer syntax {described}); the file holds only a "
            "header (e.g. a structured report or a header-only download): re-download it"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path}: photometric interpretation {photometric or 'missing'!r} is not greyscale; "
            "mammograms must be MONOCHROME1 or MONOCHROME2"
        )
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable data
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DicomError(
            f"{path}: cannot decode the pixel data with transfer syntax {described}: "
            f"{type(exc).__name__}: {detail}; hint: {decoder_hint(syntax)}"
        ) from None
    if raw.ndim != 2:
        raise DicomError(
            f"{path}: pixel array has shape {raw.shape}; expected one 2-D greyscale frame "
            "(split multi-frame files into one image per file)"
        )
    pixels, voi = to_unit_range(raw, ds, str(path))
    return DicomImage(
        pixels=pixels,
        bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
        photometric=photometric,
        transfer_syntax=syntax,
        patient_id=str(ds.get("PatientID", "") or "").strip() or None,
        laterality=normalise_laterality(ds.get("ImageLaterality"))
        or normalise_laterality(ds.get("Laterality")),
        view=normalise_view(ds.get("ViewPosition"), ds.get("ViewCodeSequence")),
        modality=str(ds.get("Modality", "") or "").strip() or None,
        voi=voi,
    )
