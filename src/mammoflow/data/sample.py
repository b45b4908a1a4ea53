"""Deterministic synthetic raw datasets in the real MIAS and CMMD formats.

:func:`make_sample` writes, from a seed alone (same seed → byte-identical files):

* ``out_dir/mias/``: ``mdbNNN.pgm`` (P5, 8-bit, ``size × size``; film pairs, odd = right,
  even = left) and an ``Info.txt`` with a prose header and the real row grammar, including a
  multi-lesion image, an image with a benign and a malignant lesion (malignant wins) and an
  abnormal row without coordinates.
* ``out_dir/cmmd/CMMD/<D1-00NN>/<study>/<series>/1-N.dcm``: a CMMD-shaped DICOM tree (Digital
  Mammography X-Ray Image Storage - For Presentation, 12- and 16-bit, MONOCHROME1 and 2, window
  and rescale tags) and ``out_dir/cmmd/CMMD_clinicaldata_revision.xlsx`` with the real columns.
  Fake PatientName / PatientBirthDate / AccessionNumber / InstitutionName values are written
  into the files on purpose, so tests can prove they never reach a manifest.

Images are a breast-shaped bright region with texture on a dark background; benign lesions are
round smooth-edged masses, malignant ones irregular spiculated masses with microcalcifications.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openpyxl
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from mammoflow.data.pgm import write_pgm
from mammoflow.files import atomic_write_bytes, atomic_write_text

MAMMO_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
CLINICAL_NAME = "CMMD_clinicaldata_revision.xlsx"
CLINICAL_COLUMNS = ("ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype")
FAKE_PHI = {
    "PatientName": "SAMPLE^FAKE^NAME",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "FAKEACC0001",
    "InstitutionName": "Synthetic Fake Hospital",
    "StudyDate": "20100718",
}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
_SUBTYPES = ("Luminal A", "Luminal B", "HER2-enriched", "triple negative")

INFO_HEADER = """\
              MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY
                  MiniMammographic Database
                 (synthetic MammoFlow sample)

This file imitates the layout of the MIAS MiniMammographic Database
Info.txt. The images next to it are synthetic: generated from a seed by
MammoFlow, they show no real patient.

=================================================================

INFORMATION:

This file lists the films in the database and provides
appropriate details as follows:

1st column: MIAS database reference number.

2nd column: Character of background tissue:
                F - Fatty
                G - Fatty-glandular
                D - Dense-glandular

3rd column: Class of abnormality present:
                CALC - Calcification
                CIRC - Well-defined/circumscribed masses
                SPIC - Spiculated masses
                MISC - Other, ill-defined masses
                ARCH - Architectural distortion
                ASYM - Asymmetry
                NORM - Normal

4th column: Severity of abnormality;
                B - Benign
                M - Malignant

5th,6th columns: x,y image-coordinates of centre of abnormality.

7th column: Approximate radius (in pixels) of a circle enclosing
            the abnormality.

NOTES
=====
1) The list is arranged in pairs of films, where each pair
   represents the left (even filename numbers) and right mammograms
   (odd filename numbers) of a single patient.

2) Coordinate system origin is the bottom-left corner.

=================================================================
"""


@dataclass(frozen=True)
class SampleResult:
    """What :func:`make_sample` wrote."""

    out_dir: Path
    mias_dir: Path
    cmmd_dir: Path  # the ingest source (holds CMMD/)
    clinical_path: Path
    files: tuple[Path, ...]
    mias_labels: dict[str, str]  # image_id → label
    cmmd_labels: dict[tuple[str, str], str]  # (patient, side) → label


@dataclass(frozen=True)
class _Lesion:
    kind: str  # "benign" | "malignant"
    row: float  # centre, pixel rows from the top
    col: float
    radius: float


# ---------------------------------------------------------------- image synthesis (pure)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise with about ``cells`` cells across (zero mean)."""
    h, w = shape
    grid = rng.standard_normal((cells + 2, cells + 2))
    ys = np.linspace(0, cells, h)
    xs = np.linspace(0, cells, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return np.asarray(top * (1 - wy) + bottom * wy)


def _breast(
    rng: np.random.Generator, shape: tuple[int, int], side: str, density: float
) -> tuple[np.ndarray, np.ndarray]:
    """A breast on a dark background; returns (image in [0, 1], ellipse distance map)."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    chest = w - 1.0 if side == "R" else 0.0  # chest wall on the right for right breasts
    ay = h * rng.uniform(0.40, 0.46)
    ax = w * rng.uniform(0.68, 0.80)
    cy = h * rng.uniform(0.47, 0.53)
    dist = np.sqrt(((rows - cy) / ay) ** 2 + ((cols - chest) / ax) ** 2)
    inside = np.clip((1.0 - dist) / 0.05, 0.0, 1.0)
    texture = 0.6 * _smooth_noise(rng, shape, 6) + 0.4 * _smooth_noise(rng, shape, 18)
    tissue = 0.30 + 0.22 * np.clip(1.0 - dist, 0, 1) + density * (0.10 + 0.06 * texture)
    background = 0.03 + 0.01 * rng.standard_normal(shape)
    image = background * (1 - inside) + tissue * inside
    return image, dist


def _benign(rows: np.ndarray, cols: np.ndarray, lesion: _Lesion) -> np.ndarray:
    r = np.hypot(rows - lesion.row, cols - lesion.col)
    return np.asarray(0.22 / (1.0 + np.exp((r - lesion.radius) / (0.12 * lesion.radius))))


def _malignant(
    rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray, lesion: _Lesion
) -> np.ndarray:
    dy, dx = rows - lesion.row, cols - lesion.col
    r, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    phases = rng.uniform(0, 2 * np.pi, 3)
    edge = lesion.radius * (
        0.8 + 0.22 * np.sin(5 * theta + phases[0]) + 0.14 * np.sin(9 * theta + phases[1])
    )
    out = 0.24 / (1.0 + np.exp((r - edge) / (0.05 * lesion.radius)))
    for angle in rng.uniform(0, 2 * np.pi, int(rng.integers(8, 13))):
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        length = lesion.radius * rng.uniform(1.6, 2.4)
        width = max(lesion.radius * 0.05, 0.7)
        reach = (along > 0) & (along < length)
        out = out + reach * 0.16 * np.exp(-(across**2) / (2 * width**2)) * (1 - along / length)
    for _ in range(int(rng.integers(6, 14))):
        ang, rad = rng.uniform(0, 2 * np.pi), lesion.radius * rng.uniform(0.2, 1.4)
        cy, cx = lesion.row + rad * np.sin(ang), lesion.col + rad * np.cos(ang)
        dot = max(lesion.radius * 0.06, 0.8)
        out = out + 0.45 * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * dot**2))
    return np.asarray(out)


def synth_image(
    rng: np.random.Generator,
    shape: tuple[int, int],
    side: str,
    lesions: list[_Lesion],
    density: float = 0.5,
) -> np.ndarray:
    """A synthetic mammogram in [0, 1] with the given lesions drawn in."""
    image, _ = _breast(rng, shape, side, density)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    for lesion in lesions:
        if lesion.kind == "benign":
            image = image + _benign(rows, cols, lesion)
        else:
            image = image + _malignant(rng, rows, cols, lesion)
    return np.clip(image, 0.0, 1.0)


def _place(rng: np.random.Generator, shape: tuple[int, int], side: str, kind: str) -> _Lesion:
    """A lesion centred well inside the breast."""
    h, w = shape
    row = h * rng.uniform(0.35, 0.65)
    depth = w * rng.uniform(0.22, 0.45)  # distance from the chest wall
    col = w - 1.0 - depth if side == "R" else depth
    radius = min(h, w) * rng.uniform(0.05, 0.08)
    return _Lesion(kind, row, col, radius)


def _balanced(rng: np.random.Generator, n: int, shares: dict[str, float]) -> list[str]:
    names = list(shares)
    counts = [round(n * shares[k]) for k in names[:-1]]
    counts.append(n - sum(counts))
    labels = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    order = rng.permutation(len(labels))
    return [labels[i] for i in order]


# ---------------------------------------------------------------- MIAS


def _info_row(
    image_id: str, tissue: str, code: str, sev: str, lesion: _Lesion | None, h: int
) -> str:
    if lesion is None:
        return f"{image_id} {tissue} {code} {sev}"
    y = h - 1 - round(lesion.row)  # MIAS coordinates: origin bottom-left
    return f"{image_id} {tissue} {code} {sev} {round(lesion.col)} {y} {round(lesion.radius)}"


@dataclass(frozen=True)
class Vendor:
    """How another site's scanner renders the same anatomy: a detector curve, depth and noise.

    The synthetic film in [0, 1] becomes ``offset + (1 - offset) * image ** gamma`` plus
    Gaussian noise of ``noise`` (in [0, 1] units), stored with ``bits`` bits (PGM maxval
    ``2**bits - 1``).
    """

    name: str
    gamma: float
    offset: float
    noise: float
    bits: int

    def render(self, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, int]:
        """``(pixels, maxval)`` of ``image`` as this vendor stores it."""
        curve = self.offset + (1.0 - self.offset) * np.power(np.clip(image, 0, 1), self.gamma)
        noisy = np.clip(curve + self.noise * rng.standard_normal(image.shape), 0.0, 1.0)
        maxval = 2**self.bits - 1
        dtype = np.uint8 if maxval < 256 else np.uint16
        return np.round(noisy * maxval).astype(dtype), maxval


#: the second embedded dataset: MIAS-shaped films from "another vendor" (12-bit, a flatter
#: detector curve with a raised floor, more noise), for external validation
VENDOR_B = Vendor(name="vendor_b", gamma=0.7, offset=0.06, noise=0.02, bits=12)


def make_vendor_sample(
    out_dir: Path, seed: int, patients: int, size: int, vendor: Vendor = VENDOR_B
) -> tuple[list[Path], dict[str, str]]:
    """A MIAS-format folder (PGMs + Info.txt) rendered as ``vendor`` under ``out_dir/mias``.

    Its own stream of the seed (``[seed, 3]``): other women than the standard sample's, same
    seed → byte-identical files. Returns the files and image_id → label.

    Raises:
        ValueError: fewer than 2 patients or a size out of range.
    """
    if patients < 2 or not 32 <= size <= 4096:
        raise ValueError(
            f"make_vendor_sample needs at least 2 patients and a size in 32..4096, got "
            f"patients={patients}, size={size}"
        )
    return _make_mias(np.random.default_rng([seed, 3]), Path(out_dir) / "mias", patients, size, vendor)


def _make_mias(
    rng: np.random.Generator,
    mias_dir: Path,
    patients: int,
    size: int,
    vendor: Vendor | None = None,
) -> tuple[list[Path], dict[str, str]]:
    n = 2 * patients
    labels = _balanced(rng, n, {"normal": 0.4, "benign": 0.3, "malignant": 0.3})
    benign_at = [i for i, lab in enumerate(labels) if lab == "benign"]
    first_benign = benign_at[0] if benign_at else -1
    second_benign = benign_at[1] if len(benign_at) > 1 else -1
    first_malignant = labels.index("malignant") if "malignant" in labels else -1
    rows: list[str] = []
    files: list[Path] = []
    shape = (size, size)
    for index, label in enumerate(labels):
        number = index + 1
        image_id = f"mdb{number:03d}"
        side = "R" if number % 2 else "L"
        tissue = str(rng.choice(["F", "G", "D"]))
        density = {"F": 0.25, "G": 0.5, "D": 0.8}[tissue]
        lesions: list[_Lesion] = []
        if label == "normal":
            rows.append(f"{image_id} {tissue} NORM ")
        elif label == "benign":
            lesion = _place(rng, shape, side, "benign")
            lesions.append(lesion)
            keep_coords = index != second_benign  # one row without coordinates, like mdb059
            rows.append(
                _info_row(image_id, tissue, "CIRC", "B", lesion if keep_coords else None, size)
            )
            if index == first_benign:  # several lesions, several rows (like mdb005)
                extra = _place(rng, shape, side, "benign")
                lesions.append(extra)
                rows.append(_info_row(image_id, tissue, "CIRC", "B", extra, size))
        else:
            if index == first_malignant:  # a benign and a malignant lesion (like mdb144)
                extra = _place(rng, shape, side, "benign")
                lesions.append(extra)
                rows.append(_info_row(image_id, tissue, "MISC", "B", extra, size))
            lesion = _place(rng, shape, side, "malignant")
            lesions.append(lesion)
            rows.append(_info_row(image_id, tissue, "SPIC", "M", lesion, size))
        image = synth_image(rng, shape, side, lesions, density)
        path = mias_dir / f"{image_id}.pgm"
        if vendor is None:
            write_pgm(path, np.round(image * 255).astype(np.uint8), 255)
        else:
            write_pgm(path, *vendor.render(rng, image))
        files.append(path)
    text = INFO_HEADER + "\n" + "\n".join(rows) + "\n\n" + "=" * 65 + "\n"
    info = mias_dir / "Info.txt"
    atomic_write_text(info, text.replace("\n", "\r\n"))  # the real file has CRLF endings
    files.append(info)
    return files, {f"mdb{i + 1:03d}": lab for i, lab in enumerate(labels)}


# ---------------------------------------------------------------- CMMD


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=["mammoflow-sample", str(seed), *map(str, parts)])


def mammogram_dicom(
    *,
    seed: int,
    image: np.ndarray,
    encoding: int,
    special: int,
    patient: str,
    side: str,
    view: str,
    number: int,
    study_uid: UID,
    series_uid: UID,
) -> bytes:
    """One For Presentation mammogram.

    ``encoding``: 0 = 12-bit MONOCHROME2, 1 = 12-bit MONOCHROME1, 2 = 16-bit with Window
    Center/Width, 3 = 12-bit with Rescale Slope/Intercept. ``special`` (the image's index):
    image 1 carries Laterality instead of ImageLaterality, image 2 has no ViewPosition, only
    ViewCodeSequence.
    """
    sop_uid = _uid(seed, patient, side, view, number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid(0, "implementation")
    meta.ImplementationVersionName = "MAMMOFLOW_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMO_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MG"
    ds.PatientID = patient
    for key, value in FAKE_PHI.items():
        setattr(ds, key, value)
    ds.PatientAge = "047Y"
    ds.PatientSex = "F"
    ds.InstanceNumber = number
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    if special == 1:  # laterality only at series level, as some exporters write it
        ds.Laterality = side
    else:
        ds.ImageLaterality = side
    if special != 2:  # one image names its view only through ViewCodeSequence
        ds.ViewPosition = view
    code = Dataset()
    code.CodeValue, code.CodeMeaning = _VIEW_CODES[view]
    code.CodingSchemeDesignator = "SCT"
    ds.ViewCodeSequence = DicomSequence([code])
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if encoding == 2:  # 16-bit stored with a window
        stored = np.round(image * 65535)
        ds.BitsStored, ds.HighBit = 16, 15
        breast = stored[image > 0.1]
        low, high = (float(breast.min()), float(breast.max())) if breast.size else (0.0, 65535.0)
        ds.WindowCenter = f"{(low + high) / 2:.1f}"
        ds.WindowWidth = f"{max(high - low, 2.0):.1f}"
    else:
        ds.BitsStored, ds.HighBit = 12, 11
        stored = np.round(image * 4095)
        if encoding == 1:  # MONOCHROME1: low values white
            stored = 4095 - stored
            ds.PhotometricInterpretation = "MONOCHROME1"
        elif encoding == 3:  # Rescale: value = stored * 2 - 100
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2", "-100", "US"
            stored = np.round((stored + 100) / 2)
    ds.PixelData = stored.astype("<u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _xlsx_bytes(rows: list[tuple[object, ...]]) -> bytes:
    """A deterministic .xlsx (fixed document dates and zip timestamps)."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Sheet1"
    sheet.append(list(CLINICAL_COLUMNS))
    for row in rows:
        sheet.append(list(row))
    raw = io.BytesIO()
    book.save(raw)
    fixed = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(fixed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(
                    rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:)",
                    rb"\g<1>2020-01-01T00:00:00Z\g<3>",
                    data,
                )
            entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o600 << 16
            dst.writestr(entry, data)
    return fixed.getvalue()


def image_shape(kind: str, size: int) -> tuple[int, int]:
    """``(rows, columns)`` of the sample's images of ``kind`` at ``size`` (MIAS square, CMMD
    ``size`` rows by ``size - size // 6`` columns)."""
    if kind == "mias":
        return size, size
    if kind == "cmmd":
        return size, size - size // 6
    raise ValueError(f"unknown dataset kind {kind!r}; expected 'mias' or 'cmmd'")


def _make_cmmd(
    rng: np.random.Generator, seed: int, cmmd_dir: Path, patients: int, size: int
) -> tuple[list[Path], Path, dict[tuple[str, str], str]]:
    shape = image_shape("cmmd", size)
    sides: list[tuple[str, str]] = []
    for index in range(patients):
        patient = f"D1-{index + 1:04d}"
        if index == 0 or index % 5 == 3:
            sides += [(patient, "L"), (patient, "R")]
        else:
            sides.append((patient, str(rng.choice(["L", "R"]))))
    labels = _balanced(rng, len(sides) - 2, {"benign": 0.5, "malignant": 0.5})
    labels = ["benign", "malignant", *labels]  # D1-0001: benign left, malignant right
    clinical: list[tuple[object, ...]] = []
    files: list[Path] = []
    n_images = 2 * len(sides)
    # Pixel encodings shuffled over images (each one present), so none correlates with labels.
    encodings = [int(k) for k in rng.permutation(np.arange(n_images) % 4)]
    image_index = 0
    by_patient: dict[str, list[tuple[str, str]]] = {}
    for (patient, side), label in zip(sides, labels, strict=True):
        by_patient.setdefault(patient, []).append((side, label))
    for patient, entries in by_patient.items():
        age = int(rng.integers(30, 78))
        study_uid, series_uid = _uid(seed, patient, "study"), _uid(seed, patient, "series")
        study = f"07-18-2010-NA-NA-{int(rng.integers(10000, 99999))}"
        series = f"1.000000-NA-{int(rng.integers(10000, 99999))}"
        folder = cmmd_dir / "CMMD" / patient / study / series
        number = 0
        for side, label in sorted(entries):
            kind = "malignant" if label == "malignant" else "benign"
            abnormality = str(rng.choice(["mass", "calcification", "both"]))
            subtype = str(rng.choice(_SUBTYPES)) if label == "malignant" else None
            clinical.append((patient, side, age, 2, abnormality, label.capitalize(), subtype))
            lesion_seed = int(rng.integers(0, 2**31))
            for view in ("CC", "MLO"):
                number += 1
                lesion_rng = np.random.default_rng([lesion_seed, number])
                lesion = _place(lesion_rng, shape, side, kind)
                image = synth_image(rng, shape, side, [lesion], float(rng.uniform(0.3, 0.8)))
                data = mammogram_dicom(
                    seed=seed,
                    image=image,
                    encoding=encodings[image_index],
                    special=image_index,
                    patient=patient,
                    side=side,
                    view=view,
                    number=number,
                    study_uid=study_uid,
                    series_uid=series_uid,
                )
                image_index += 1
                path = folder / f"1-{number}.dcm"
                atomic_write_bytes(path, data)
                files.append(path)
    clinical_path = cmmd_dir / CLINICAL_NAME
    atomic_write_bytes(clinical_path, _xlsx_bytes(clinical))
    files.append(clinical_path)
    return files, clinical_path, dict(zip(sides, labels, strict=True))


def make_sample(
    out_dir: Path, seed: int, mias_patients: int, cmmd_patients: int, size: int
) -> SampleResult:
    """Write the synthetic MIAS folder and CMMD tree under ``out_dir`` (see the module doc).

    Args:
        out_dir: target folder; ``mias/`` and ``cmmd/`` are created inside it.
        seed: the only source of randomness (and of every DICOM UID).
        mias_patients: women in the MIAS sample (two films each), at least 2.
        cmmd_patients: women in the CMMD sample, at least 2.
        size: MIAS images are ``size × size``; CMMD ``size`` rows by ``size - size // 6``.

    Raises:
        ValueError: counts or size out of range.
    """
    if mias_patients < 2 or cmmd_patients < 2:
        raise ValueError(
            f"make_sample needs at least 2 MIAS and 2 CMMD patients, got mias_patients="
            f"{mias_patients}, cmmd_patients={cmmd_patients}"
        )
    if not 32 <= size <= 4096:
        raise ValueError(f"sample image size {size} must be between 32 and 4096 pixels")
    out_dir = Path(out_dir)
    mias_dir, cmmd_dir = out_dir / "mias", out_dir / "cmmd"
    mias_files, mias_labels = _make_mias(
        np.random.default_rng([seed, 1]), mias_dir, mias_patients, size
    )
    cmmd_files, clinical_path, cmmd_labels = _make_cmmd(
        np.random.default_rng([seed, 2]), seed, cmmd_dir, cmmd_patients, size
    )
    return SampleResult(
        out_dir=out_dir,
        mias_dir=mias_dir,
        cmmd_dir=cmmd_dir,
        clinical_path=clinical_path,
        files=tuple(sorted(mias_files + cmmd_files)),
        mias_labels=mias_labels,
        cmmd_labels=cmmd_labels,
    )
