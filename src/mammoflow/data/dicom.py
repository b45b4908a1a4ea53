"""DICOM mammogram → ``float32`` pixels in [0, 1], dense tissue bright.

The pixel pipeline follows the DICOM display chain: stored values → Modality LUT (Rescale
Slope/Intercept, pydicom's ``apply_modality_lut``) → VOI (the first VOI LUT Sequence item, else
the first Window Center/Width through pydicom's ``apply_windowing``, else min–max over the
breast) → inversion for MONOCHROME1 or Presentation LUT Shape INVERSE.

No pixel is decoded before the declared size is checked against :data:`images.MAX_PIXELS`
(Rows × Columns × frames, and for JPEG/JPEG 2000 the size in the codestream itself), so a
decompression bomb is refused from its header. A malformed header value (unknown VR, a value
that does not parse, a VOI LUT whose descriptor and data disagree) is a :class:`DicomError`
naming the file, never another exception.

Before any pixel is decoded, :func:`acceptance_problem` applies the acceptance rules of
ingestion to the header alone: not an image (no Pixel Data, a non-image SOP class, Modality
SR/PR/KO), a quality-control or calibration exposure (ViewPosition FLATFIELD; ImageType or
SeriesDescription naming QC, phantom, flat field or calibration), a FOR PROCESSING (raw detector)
image unless accepted, text burnt into the pixels (BurnedInAnnotation YES: PHI that no header
rule removes) unless accepted, and a short side below the minimum size. Each rule has its own
message saying what to do.

Only pseudonymous header fields leave this module: PatientID (in CMMD the dataset's ID such as
``D1-0001``), laterality, view and modality. PatientName, PatientBirthDate, AccessionNumber,
InstitutionName and dates are never read into the result nor put into messages.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing
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
    accept_burned_in: bool = False
    burned_in_hint: str = "set ingest.accept_burned_in: true"

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

    Rules in order: not an image, QC/calibration, burned-in annotation and FOR PROCESSING (each
    unless accepted), short side below ``rules.min_size``. Pixel data is never decoded here.
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
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES" and not rules.accept_burned_in:
        return (
            "BurnedInAnnotation YES: text burnt into the pixels may identify the patient and no "
            "header rule removes it; remove the file, or, if the burnt-in text is known to hold "
            f"no identifying data, {rules.burned_in_hint}"
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


#: Exceptions pydicom and numpy raise on malformed header values (an unknown VR, a value that
#: does not parse, a sequence item without its data): turned into a :class:`DicomError`.
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    OverflowError,
    NotImplementedError,
    UnicodeError,
    struct.error,
    BytesLengthException,
)


def _detail(exc: BaseException) -> str:
    """``'<Type>: <first line of the message>'`` (at most 300 characters)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _first(value: Any) -> float:
    """First value of a possibly multi-valued numeric element."""
    if isinstance(value, str | bytes):
        return float(value)
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _lut_entries(item: Dataset, name: str) -> np.ndarray:
    """The entries of a VOI LUT Sequence item, after checking its descriptor and data agree.

    Raises:
        DicomError: no three-valued LUT Descriptor, bits per entry not 8 or 16, no LUT Data, or
            LUT Data whose length is not the descriptor's number of entries.
    """
    descriptor = item.get("LUTDescriptor")
    values = list(descriptor) if isinstance(descriptor, Sequence | list) else []
    data = item.get("LUTData")
    fix = "fix or remove the VOI LUT Sequence"
    if len(values) != 3:
        raise DicomError(f"{name}: malformed VOI LUT: LUT Descriptor {descriptor!r} needs 3 values")
    entries, bits = int(values[0]) or 65536, int(values[2])
    if bits != 8 and not 10 <= bits <= 16:
        raise DicomError(
            f"{name}: malformed VOI LUT: {bits} bits per entry (DICOM allows 8 or 10-16); {fix}"
        )
    if data is None or (isinstance(data, bytes | bytearray) and not data):
        raise DicomError(f"{name}: malformed VOI LUT: the item has no LUT Data; {fix}")
    if isinstance(data, bytes | bytearray):  # OW: 16-bit words whatever the depth (as pydicom)
        count = min(len(data) // 2, entries)
        table = np.frombuffer(bytes(data)[: 2 * count], dtype=np.dtype("<u2"))
    else:
        table = np.asarray([data] if isinstance(data, int | float) else list(data))
    if table.size != entries:
        raise DicomError(
            f"{name}: malformed VOI LUT: the descriptor declares {entries} entries but LUT Data "
            f"holds {table.size}; {fix}"
        )
    return table


def _window(values: np.ndarray, ds: Dataset, name: str) -> np.ndarray:
    """Window Center/Width through pydicom's ``apply_windowing``, scaled to [0, 1].

    pydicom maps to the stored (or rescaled) value range ``[y_min, y_max]``; windowing ±inf
    gives exactly that range, so the [0, 1] scaling uses pydicom's own bounds.
    """
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "") or "LINEAR")
    problem = None if np.isfinite([center, width]).all() else "values must be finite numbers"
    if problem is None:
        try:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
                out = apply_windowing(values, ds)
        except ValueError as exc:
            problem = str(exc)
    if problem is None and not (np.isfinite([low, high]).all() and high != low):
        problem = f"the output range [{low}, {high}] is empty or not finite"
    if problem is not None:
        raise DicomError(
            f"{name}: invalid windowing (Window Center {center}, Window Width {width}, "
            f"VOI LUT Function {function!r}): {problem}; fix or remove the window tags"
        ) from None
    return np.clip((out - low) / (high - low), 0.0, 1.0)


def _inverted(ds: Dataset, photometric: str, name: str) -> bool:
    """Whether display inverts the VOI output: MONOCHROME1, or Presentation LUT Shape INVERSE.

    DX/MG objects pair MONOCHROME1 with INVERSE (both say "low values are white"), so the two
    together mean one inversion, not two.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape not in ("", "IDENTITY", "INVERSE"):
        raise DicomError(
            f"{name}: Presentation LUT Shape {shape!r} is neither IDENTITY nor INVERSE; fix the "
            "tag or remove it"
        )
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def to_unit_range(
    raw: np.ndarray, ds: Dataset, name: str = "<dataset>"
) -> tuple[np.ndarray, VoiPath]:
    """Stored pixel values → float32 [0, 1], dense tissue bright (pure; ``ds`` is in memory).

    Returns:
        The array and which VOI path was used: ``"lut"``, ``"window"`` or ``"minmax"``.

    Raises:
        DicomError: a rescale, window or VOI LUT that DICOM does not allow, or a non-finite
            result.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    invert = _inverted(ds, photometric, name)
    with np.errstate(over="ignore", invalid="ignore"):
        modality = np.asarray(apply_modality_lut(raw, ds))
        values = modality.astype(np.float64)
    if not np.isfinite(values).all() or ("RescaleSlope" in ds and _first(ds.RescaleSlope) == 0):
        raise DicomError(
            f"{name}: invalid Rescale Slope {ds.get('RescaleSlope')!r} / Rescale Intercept "
            f"{ds.get('RescaleIntercept')!r}: the rescaled values are not finite or all equal; "
            "fix or remove the rescale tags"
        )
    voi: VoiPath
    if ds.get("VOILUTSequence"):
        table = _lut_entries(ds.VOILUTSequence[0], name)
        # a LUT is indexed by integers: round rescaled values instead of passing floats
        lut_input = (
            modality
            if np.issubdtype(modality.dtype, np.integer)
            else np.rint(values).astype(np.int64)
        )
        try:
            looked_up = apply_voi_lut(lut_input, ds, index=0, prefer_lut=True)
        except _MALFORMED as exc:
            raise DicomError(
                f"{name}: malformed VOI LUT ({_detail(exc)}); fix or remove the VOI LUT Sequence"
            ) from None
        out, voi = images.normalise_lut_output(looked_up, table), "lut"
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out, voi = _window(values, ds, name), "window"
    else:
        background: images.Background = "high" if photometric == "MONOCHROME1" else "low"
        out, voi = images.minmax_over_breast(values, background=background), "minmax"
    if invert:
        out = images.invert(out)
    result = np.asarray(out, dtype=np.float32)
    if not np.isfinite(result).all():
        raise DicomError(f"{name}: the display chain gave non-finite pixels; check the VOI tags")
    return result, voi


def _read_dataset(path: Path | str, source: Path | BinaryIO | None = None) -> Dataset:
    """``dcmread`` of ``source`` (default the file ``path``) with every failure as a
    :class:`DicomError` naming ``path``."""
    try:
        return pydicom.dcmread(path if source is None else source)
    except InvalidDicomError:
        raise DicomError(
            f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
            "check the file or re-export it as DICOM Part 10"
        ) from None
    except (OSError, EOFError) as exc:
        raise DicomError(f"{path}: cannot read the DICOM file: {exc}") from None
    except _MALFORMED as exc:
        raise DicomError(
            f"{path}: malformed DICOM file ({_detail(exc)}); the file is corrupt: re-export it "
            "from the source"
        ) from None


def _codestream_size(ds: Dataset) -> tuple[int, int] | None:
    """``(rows, columns)`` declared inside the first JPEG 2000 / JPEG(-LS) frame, if any."""
    try:
        frame = next(generate_frames(ds.PixelData))
    except (StopIteration, *_MALFORMED):
        return None  # the decoder will refuse the data with its own message
    siz = frame.find(b"\xff\x51", 0, 256)
    if frame[:2] != b"\xff\xd8" and siz >= 0 and len(frame) >= siz + 22:  # J2K SIZ marker
        x, y, x0, y0 = struct.unpack(">4I", frame[siz + 6 : siz + 22])
        return max(y - y0, 0), max(x - x0, 0)
    from pydicom.pixels.utils import _get_jpg_parameters

    info = _get_jpg_parameters(frame)
    return (int(info["height"]), int(info["width"])) if "height" in info else None


def check_pixel_limit(ds: Dataset, name: str) -> None:
    """Refuse, before decoding, an image larger than :data:`images.MAX_PIXELS` (a bomb).

    Raises:
        DicomError: the header or the codestream declares more pixels than the limit, or a
            codestream size that differs from Rows × Columns.
    """
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    samples = max(int(ds.get("SamplesPerPixel") or 1), 1)
    declared = rows * columns * frames * samples
    where = f"Rows {rows} x Columns {columns} x {frames} frame(s) x {samples} sample(s)"
    inner = None
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))
    compressed = syntax.is_transfer_syntax and syntax.is_compressed  # unknown: decoder refuses
    if declared <= images.MAX_PIXELS and compressed and "PixelData" in ds:
        inner = _codestream_size(ds)
        if inner is not None and inner != (rows, columns):
            raise DicomError(
                f"{name}: the compressed pixel data declares {inner[1]}x{inner[0]} pixels but the "
                f"header {columns}x{rows}; the file is corrupt: re-export it from the source"
            )
    if declared > images.MAX_PIXELS:
        raise DicomError(
            f"{name}: declares {declared:,} pixels ({where}), above the limit of "
            f"{images.MAX_PIXELS:,} (images.MAX_PIXELS); not decoded: a corrupt header or a "
            "decompression bomb, not a mammogram"
        )


def _decode(ds: Dataset, path: Path | str, rules: Acceptance | None) -> DicomImage:
    """Acceptance rules, pixel limit, decoding and the display chain (see :func:`read_dicom`)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
    problem = acceptance_problem(ds, rules) if rules is not None else not_an_image(ds)
    if problem:
        raise DicomError(f"{path}: {problem}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path}: photometric interpretation {photometric or 'missing'!r} is not greyscale; "
            "mammograms must be MONOCHROME1 or MONOCHROME2"
        )
    check_pixel_limit(ds, str(path))
    try:
        raw = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types for undecodable data
        raise DicomError(
            f"{path}: cannot decode the pixel data with transfer syntax "
            f"{describe_syntax(syntax)}: {_detail(exc)}; hint: {decoder_hint(syntax)}"
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


def read_dicom(path: str | Path, rules: Acceptance | None = None) -> DicomImage:
    """Read one single-frame greyscale DICOM mammogram.

    Args:
        path: the file.
        rules: ingestion's acceptance rules, checked on the header before decoding; ``None``
            (conversion of files already accepted) checks only that the file holds an image.

    Raises:
        DicomError: not DICOM, not an image, refused by ``rules``, not greyscale, multi-frame,
            larger than :data:`images.MAX_PIXELS`, a malformed header value, or undecodable
            (the message names the file, the reason and what to do).
    """
    path = Path(path)
    return _checked_decode(_read_dataset(path), path, rules)


def read_dicom_bytes(data: bytes, name: str, rules: Acceptance | None = None) -> DicomImage:
    """:func:`read_dicom` of a file's bytes (a served request); messages start with ``name``."""
    return _checked_decode(_read_dataset(name, io.BytesIO(data)), name, rules)


def _checked_decode(ds: Dataset, path: Path | str, rules: Acceptance | None) -> DicomImage:
    """:func:`_decode` with a malformed header value met on first access as a DicomError."""
    try:
        return _decode(ds, path, rules)
    except DicomError:
        raise
    except _MALFORMED as exc:  # a header value pydicom could not convert, met on first access
        raise DicomError(
            f"{path}: malformed DICOM header ({_detail(exc)}); the file is corrupt: re-export it "
            "from the source"
        ) from None
