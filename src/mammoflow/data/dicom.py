"""DICOM mammogram → ``float32`` pixels in [0, 1], dense tissue bright.

The pixel pipeline follows the DICOM display chain: stored values → Modality LUT (Rescale
Slope/Intercept, pydicom's ``apply_modality_lut``) → VOI (the first VOI LUT Sequence item, else
the first Window Center/Width, else min–max over the breast) → MONOCHROME1 inversion.

Before any pixel is decoded, :func:`acceptance_problem` applies the acceptance rules of
ingestion to the header alone: not an image (no Pixel Data, a non-image SOP class, Modality
SR/PR/KO), a quality-control or calibration exposure (ViewPosition FLATFIELD; ImageType or
SeriesDescription naming QC, phantom, flat field or calibration), a FOR PROCESSING (raw detector)
image unless accepted, and a short side below the minimum size. Each rule has its own message
saying what to do.

Only pseudonymous header fields leave this module: PatientID (in CMMD the dataset's ID such as
``D1-0001``), laterality, view and modality. PatientName, PatientBirthDate, AccessionNumber,
InstitutionName and dates are never read into the result nor put into messages.
"""

from __future__ import annotations

import re
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

from mammoflow.data import images

VoiPath = Literal["lut", "window", "minmax"]

_CC_CODES = {"R-10242", "399162004"}
_MLO_CODES = {"R-10226", "399368009"}
_VIEW_MEANINGS = {"cranio-caudal": "CC", "craniocaudal": "CC", "medio-lateral oblique": "MLO"}
_LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}


#: Modalities of DICOM objects that hold no image (structured report, presentation state, key
#: object selection, document).
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC"})
#: SOP class UID prefixes of non-image objects: SR and KO (88.*), presentation states (11.*),
#: waveforms (9.*), raw data and registrations (66*), encapsulated documents (104.*).
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.104.",
)
#: Digital X-Ray, Mammography and Intra-oral X-Ray Image Storage - For Processing.
FOR_PROCESSING_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
    }
)
#: Words marking a quality-control or calibration exposure (matched on whole words, any case,
#: after '_', '-' and '/' become spaces).
_QC_WORDS = re.compile(r"\b(QC|PHANTOM|FLAT ?FIELD|CALIBRATION)\b")
DEFAULT_MIN_SIZE = 256


class DicomError(ValueError):
    """A DICOM file cannot be turned into a mammogram array; the message says why and how to fix."""


@dataclass(frozen=True)
class Acceptance:
    """Which DICOM files ingestion takes as mammograms (the rules beyond "can be decoded").

    The hints name the setting to change in the spelling of the interface in use (params key or
    command-line option).
    """

    min_size: int = DEFAULT_MIN_SIZE  # pixels on the short side
    accept_for_processing: bool = False
    min_size_hint: str = "lower ingest.min_size"
    for_processing_hint: str = "set ingest.accept_for_processing: true"

    def __post_init__(self) -> None:
        if self.min_size < 1:
            raise ValueError(f"min_size must be at least 1 pixel, got {self.min_size!r}")


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
    image_type: str | None = None  # ImageType values joined by "/" (``ORIGINAL/PRIMARY``)


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


def _values(value: Any) -> list[str]:
    """A possibly multi-valued string element as a list of stripped strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str | bytes) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _qc_word(text: str) -> str | None:
    """The QC/calibration word in ``text`` (``'FLAT FIELD'`` …), else ``None``."""
    match = _QC_WORDS.search(re.sub(r"[_\-/\\]+", " ", text.upper()))
    return match.group(1) if match else None


def describe_sop_class(uid: str) -> str:
    """``'<uid> (<name>)'`` of a SOP class for messages; ``'missing'`` when absent."""
    if not uid:
        return "missing"
    sop = UID(uid)
    return f"{sop} ({sop.name})" if sop.name != str(sop) else str(sop)


def not_an_image(ds: Dataset) -> str | None:
    """Why ``ds`` holds no image (no Pixel Data, non-image SOP class or Modality), else ``None``."""
    sop = str(ds.get("SOPClassUID", "") or "").strip()
    modality = str(ds.get("Modality", "") or "").strip().upper()
    no_pixels = "PixelData" not in ds
    if not (
        no_pixels or sop.startswith(NON_IMAGE_SOP_PREFIXES) or modality in NON_IMAGE_MODALITIES
    ):
        return None
    return (
        f"not an image (SOP class {describe_sop_class(sop)}, Modality {modality or 'missing'}"
        f"{', no Pixel Data' if no_pixels else ''}): remove it from the source"
    )


def qc_marker(
    view_position: Any, image_type: Any = None, series_description: Any = None
) -> str | None:
    """Which header value marks a QC/calibration exposure (``"ViewPosition 'FLATFIELD'"``)."""
    view = str(view_position or "").strip()
    if view and _qc_word(view):
        return f"ViewPosition {view!r}"
    types = "/".join(_values(image_type))
    if types and _qc_word(types):
        return f"ImageType {types!r}"
    description = str(series_description or "").strip()
    if description and _qc_word(description):
        return f"SeriesDescription {description!r}"
    return None


def for_processing_marker(ds: Dataset) -> str | None:
    """Which header value marks a FOR PROCESSING (raw detector) image, else ``None``."""
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING":
        return "PresentationIntentType 'FOR PROCESSING'"
    types = _values(ds.get("ImageType"))
    if any(t.upper().replace("_", " ") == "FOR PROCESSING" for t in types):
        return f"ImageType {'/'.join(types)!r}"
    sop = str(ds.get("SOPClassUID", "") or "").strip()
    if sop in FOR_PROCESSING_SOP_CLASSES:
        return f"SOP class {describe_sop_class(sop)}"
    return None


def acceptance_problem(ds: Dataset, rules: Acceptance) -> str | None:
    """The first acceptance rule ``ds``'s header breaks, as a message without the path (pure).

    Rules in order: not an image, QC/calibration, FOR PROCESSING (unless accepted), short side
    below ``rules.min_size``. Pixel data is never decoded here.
    """
    problem = not_an_image(ds)
    if problem:
        return problem
    marker = qc_marker(ds.get("ViewPosition"), ds.get("ImageType"), ds.get("SeriesDescription"))
    if marker:
        return (
            f"quality-control or calibration image ({marker}), not a patient mammogram: "
            "remove it from the source"
        )
    marker = for_processing_marker(ds)
    if marker and not rules.accept_for_processing:
        return (
            f"FOR PROCESSING image ({marker}): raw detector data, not meant for reading; ingest "
            f"the FOR PRESENTATION image of the same view instead, or {rules.for_processing_hint} "
            "to take raw images"
        )
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows and columns and min(rows, columns) < rules.min_size:
        return (
            f"image is {columns}x{rows} pixels, its short side below the minimum of "
            f"{rules.min_size}: a thumbnail or test pattern, not a mammogram; remove it from the "
            f"source, or {rules.min_size_hint} if such small images are intended"
        )
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
        out = images.normalise_lut_output(
            apply_voi_lut(lut_input, ds, index=0, prefer_lut=True), _lut_entries(item)
        )
        voi = "lut"
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR")
        try:
            out = images.window(values, center, width, function)
        except ValueError as exc:
            raise DicomError(
                f"{name}: invalid windowing (Window Center {center}, Window Width {width}, "
                f"VOI LUT Function {function!r}): {exc}; fix or remove the window tags"
            ) from None
        voi = "window"
    else:
        background: images.Background = "high" if photometric == "MONOCHROME1" else "low"
        out = images.minmax_over_breast(values, background=background)
        voi = "minmax"
    if photometric == "MONOCHROME1":
        out = images.invert(out)
    return np.asarray(out, dtype=np.float32), voi


def read_dicom(path: str | Path, rules: Acceptance | None = None) -> DicomImage:
    """Read one single-frame greyscale DICOM mammogram.

    Args:
        path: the file.
        rules: ingestion's acceptance rules, checked on the header before decoding; ``None``
            (conversion of files already accepted) checks only that the file holds an image.

    Raises:
        DicomError: not DICOM, not an image, refused by ``rules``, not greyscale, multi-frame,
            or undecodable (the message names the file, the reason and what to do).
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
    problem = acceptance_problem(ds, rules) if rules is not None else not_an_image(ds)
    if problem:
        raise DicomError(f"{path}: {problem}")
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
        image_type="/".join(_values(ds.get("ImageType"))) or None,
    )
