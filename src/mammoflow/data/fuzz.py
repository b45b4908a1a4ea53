"""Fuzzed raw inputs: seeded mutations of real-format seeds, and the contract each case must meet.

The seeds are the embedded sample's DICOMs (native 12/16-bit, MONOCHROME1/2, window and rescale
tags, plus JPEG 2000 lossless copies where the openjpeg encoder is installed; no JPEG-LS encoder
ships in the venv, so there is no JPEG-LS seed) and real MIAS PGMs. :func:`mutate` turns one seed
into one malformed file from a seeded generator (same case → same bytes).

:func:`run_case` feeds the file through the real entry points, ``ingest_cmmd`` /
``ingest_mias`` (quarantine, then fail mode) and ``convert_dataset`` for what ingestion accepted,
and checks the contract: the file is accepted and converted, or it ends as a per-file reason
in ``quarantine.json`` whose name :func:`reason_name` knows, and fail mode raises an
:class:`IngestError` naming it and writes nothing. Anything else raised is a crash.
``benchmarks/fuzz_inputs.py`` runs the cases in a worker process with a per-case timeout and a
memory limit; ``tests/unit/test_fuzz.py`` runs a short version.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as dicom_config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import JPEG2000Lossless

from mammoflow.config import ConvertConfig
from mammoflow.data.cmmd import ingest_cmmd
from mammoflow.data.convert import ConvertError, convert_dataset
from mammoflow.data.quarantine import IngestError
from mammoflow.data.manifest import MANIFEST_NAME
from mammoflow.data.mias import ingest_mias
from mammoflow.data.pgm import parse_header
from mammoflow.data.sample import make_sample

Rng = np.random.Generator

#: Reason names for quarantine messages, first match wins (``reason_name``). A message none of
#: them matches is reported as ``unnamed`` (a finding: the reader's message must say why).
REASON_PATTERNS: tuple[tuple[str, str], ...] = (
    ("pixel_limit", r"above the limit of"),
    ("codestream_size_mismatch", r"compressed pixel data declares"),
    ("bad_presentation_lut", r"Presentation LUT Shape"),
    ("burned_in_annotation", r"BurnedInAnnotation"),
    ("not_dicom", r"not a DICOM file"),
    ("unreadable_dicom", r"cannot read the DICOM file|malformed DICOM"),
    ("not_an_image", r"not an image"),
    ("not_greyscale", r"is not greyscale"),
    ("too_small", r"short side below the minimum"),
    ("multi_frame", r"expected one 2-D greyscale frame"),
    ("bad_pixel_format", r"pixel format|BitsAllocated|BitsStored|HighBit|PixelRepresentation"),
    ("undecodable_pixels", r"cannot decode the pixel data"),
    ("bad_windowing", r"invalid windowing"),
    ("bad_voi_lut", r"VOI LUT"),
    ("bad_rescale", r"Rescale"),
    ("no_patient_id", r"no PatientID"),
    ("no_laterality", r"no ImageLaterality or Laterality"),
    ("no_clinical_row", r"no clinical row"),
    ("not_mammography", r"is not MG"),
    ("pgm_truncated", r"truncated PGM|header ends before"),
    ("pgm_bad_magic", r"wrong magic number|must be followed by whitespace"),
    ("pgm_bad_maxval", r"maxval"),
    ("pgm_bad_header", r"bad PGM header"),
    ("pgm_trailing_bytes", r"unexpected bytes after"),
    ("pgm_pixel_above_maxval", r"exceeds the header's maxval"),
    ("duplicate", r"duplicate image"),
)
_REASONS = [(name, re.compile(pattern)) for name, pattern in REASON_PATTERNS]


def reason_name(reason: str) -> str:
    """The short name of a quarantine reason (``'pgm_truncated'`` …), ``'unnamed'`` if none."""
    for name, pattern in _REASONS:
        if pattern.search(reason):
            return name
    return "unnamed"


# ------------------------------------------------------------------------------ seeds


@dataclass(frozen=True)
class Seeds:
    """Seed files in memory: DICOM bytes (patient, side known) and PGM bytes (image ID)."""

    dicoms: tuple[tuple[str, bytes], ...]  # (label of the seed, bytes)
    pgms: tuple[tuple[str, bytes], ...]  # (image ID mdbNNN, bytes)
    clinical_csv: str  # a clinical table labelling every seed patient's both sides


def _j2k_copy(data: bytes) -> bytes | None:
    """The same DICOM re-encoded JPEG 2000 lossless, or ``None`` without an encoder."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.compress(JPEG2000Lossless)
    except (RuntimeError, ImportError, ValueError):
        return None
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _real_pgms(archive: Path | None, count: int) -> list[tuple[str, bytes]]:
    """The first ``count`` PGMs of the MIAS archive (none when it is absent)."""
    found: list[tuple[str, bytes]] = []
    if archive is None or not archive.is_file():
        return found
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            name = Path(member.name).name
            if member.isfile() and re.fullmatch(r"mdb\d{3}\.pgm", name):
                handle = tar.extractfile(member)
                if handle is not None:
                    found.append((name[:-4], handle.read()))
            if len(found) >= count:
                break
    return found


def make_seeds(work: Path, mias_archive: Path | None, pgm_count: int = 4) -> Seeds:
    """Generate the sample (small) and read the real PGMs; the sample's PGMs stand in without
    the archive."""
    sample = make_sample(work / "sample", seed=7, mias_patients=2, cmmd_patients=3, size=256)
    dicoms: list[tuple[str, bytes]] = []
    for path in sorted(sample.cmmd_dir.rglob("*.dcm")):
        data = path.read_bytes()
        dicoms.append((f"native:{path.parent.parent.parent.name}/{path.name}", data))
        j2k = _j2k_copy(data)
        if j2k is not None:
            dicoms.append((f"j2k:{path.parent.parent.parent.name}/{path.name}", j2k))
    pgms = _real_pgms(mias_archive, pgm_count)
    if not pgms:
        pgms = [(p.stem, p.read_bytes()) for p in sorted(sample.mias_dir.glob("*.pgm"))]
    patients = sorted({pydicom.dcmread(io.BytesIO(d)).PatientID for _, d in dicoms})
    rows = ["ID1,LeftRight,Age,number,abnormality,classification,subtype"]
    for patient in [*patients, "FUZZ-0000"]:
        for side in ("L", "R"):
            rows.append(f"{patient},{side},50,1,mass,Benign,")
    shutil.rmtree(work / "sample", ignore_errors=True)
    return Seeds(tuple(dicoms), tuple(pgms), "\n".join(rows) + "\n")


# ------------------------------------------------------------------------------ mutations


def _load(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


def _save(ds: Dataset) -> bytes:
    out = io.BytesIO()
    saved = dicom_config.settings.writing_validation_mode
    dicom_config.settings.writing_validation_mode = dicom_config.IGNORE
    try:
        ds.save_as(out, enforce_file_format=False, implicit_vr=None)
    finally:
        dicom_config.settings.writing_validation_mode = saved
    return out.getvalue()


def _pick(rng: Rng, values: list[Any]) -> Any:
    return values[int(rng.integers(len(values)))]


def _set(ds: Dataset, keyword: str, vr: str, value: Any) -> None:
    """Set an element; a text value pydicom would refuse to hold is written raw (a reader meets
    the malformed value when it converts it)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert tag is not None, keyword
    try:
        ds[tag] = DataElement(tag, vr, value)
    except (ValueError, TypeError, OverflowError):
        raw = str(value).encode("latin-1", "replace")
        raw += b" " * (len(raw) % 2)
        ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)


def d_truncate_file(data: bytes, rng: Rng) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def d_truncate_pixels(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    pixels = ds.PixelData
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = list(generate_frames(pixels))
        frame = frames[0][: int(rng.integers(0, len(frames[0])))]
        ds.PixelData = encapsulate([frame]) if frame else b""
    else:
        keep = int(rng.integers(0, len(pixels)))
        ds.PixelData = pixels[: keep - keep % 2]
    return _save(ds)


def d_bits(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    field = _pick(rng, ["BitsAllocated", "BitsStored", "HighBit", "all"])
    values = [0, 1, 7, 8, 11, 12, 15, 16, 17, 31, 32, 33, 64, 255, 65535]
    for name in ["BitsAllocated", "BitsStored", "HighBit"] if field == "all" else [field]:
        _set(ds, name, "US", _pick(rng, values))
    return _save(ds)


def d_pixel_representation(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    current = int(ds.get("PixelRepresentation", 0) or 0)
    _set(ds, "PixelRepresentation", "US", _pick(rng, [1 - current, 1 - current, 2, 65535]))
    return _save(ds)


def d_bomb(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    rows, cols = _pick(rng, [(60000, 60000), (65535, 65535), (1, 60000), (60000, 1), (0, 0)])
    _set(ds, "Rows", "US", rows)
    _set(ds, "Columns", "US", cols)
    if rng.random() < 0.3:
        _set(ds, "NumberOfFrames", "IS", str(_pick(rng, [0, 2, 1000, 2**31 - 1])))
    return _save(ds)


def d_window(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    width = _pick(rng, ["0", "-1", "-1e9", "0.5", "1e308", "nan", "inf", "abc", "", "1\\0"])
    center = _pick(rng, ["2048", "-1e308", "nan", "x", "1e400"])
    _set(ds, "WindowWidth", "DS", width)
    _set(ds, "WindowCenter", "DS", center)
    if rng.random() < 0.4:
        func = _pick(rng, ["SIGMOID", "LINEAR_EXACT", "LINEAR", "BOGUS", ""])
        _set(ds, "VOILUTFunction", "CS", func)
    return _save(ds)


def d_voi_lut(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    item = Dataset()
    entries = int(_pick(rng, [0, 1, 4, 256, 4096, 65535]))
    first = int(_pick(rng, [0, -1, 65535, 2048]))
    bits = int(_pick(rng, [0, 1, 8, 12, 16, 17, 32]))
    if rng.random() < 0.8:
        item.add_new(0x00283002, "US", [entries, first & 0xFFFF, bits])
    else:
        item.add_new(0x00283002, "US", [entries])  # one value instead of three
    length = int(_pick(rng, [0, 1, 3, max(entries, 1), 2 * max(entries, 1)]))
    if rng.random() < 0.9:
        raw = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
        item.add_new(0x00283006, "OW", raw + (b"\0" if len(raw) % 2 else b""))
    ds.VOILUTSequence = DicomSequence([item] if rng.random() < 0.9 else [])
    return _save(ds)


def d_broken_j2k(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:  # native pixels declared as J2K
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([ds.PixelData])
        return _save(ds)
    frame = bytearray(next(generate_frames(ds.PixelData)))
    how = _pick(rng, ["flip", "truncate", "garbage", "header"])
    if how == "flip":
        for _ in range(int(rng.integers(1, 50))):
            frame[int(rng.integers(0, len(frame)))] ^= 1 << int(rng.integers(0, 8))
    elif how == "truncate":
        frame = frame[: int(rng.integers(0, len(frame)))]
    elif how == "garbage":
        frame = bytearray(rng.integers(0, 256, size=len(frame), dtype=np.uint8).tobytes())
    else:  # the SIZ marker's image size: a bomb inside the codestream
        siz = frame.find(b"\xff\x51")
        if siz >= 0:
            frame[siz + 6 : siz + 14] = (60000).to_bytes(4, "big") * 2
    ds.PixelData = encapsulate([bytes(frame)]) if frame else b""
    return _save(ds)


def d_patient_id(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    value: Any = _pick(
        rng,
        [
            b"\xff\xfe\xc3\x28\x80",
            "Müller-Ñ".encode("latin-1"),
            "病人".encode(),
            "A" * 10_000,
            "",
            "\x00\x01\x1b[31m",
            "../../etc/passwd",
        ],
    )
    _set(ds, "PatientID", "LO", value)
    if rng.random() < 0.5:
        _set(ds, "SpecificCharacterSet", "CS", _pick(rng, ["ISO_IR 100", "ISO_IR 192", "BOGUS"]))
    return _save(ds)


def d_laterality(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    for keyword in ("ImageLaterality", "Laterality"):
        if keyword in ds:
            del ds[keyword]
    if rng.random() < 0.5:
        _set(ds, "ImageLaterality", "CS", _pick(rng, ["X", "B", "left breast", "\u00e9"]))
    return _save(ds)


def d_photometric(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    _set(ds, "PhotometricInterpretation", "CS", _pick(rng, ["RGB", "MONOCHROME3", "", "PALETTE"]))
    if rng.random() < 0.3:
        _set(ds, "SamplesPerPixel", "US", _pick(rng, [0, 3, 4]))
    return _save(ds)


def d_rescale(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    _set(ds, "RescaleSlope", "DS", _pick(rng, ["0", "-1", "1e308", "nan", "inf", "abc"]))
    _set(ds, "RescaleIntercept", "DS", _pick(rng, ["0", "-1e308", "nan", "1e20"]))
    return _save(ds)


def d_presentation(data: bytes, rng: Rng) -> bytes:
    ds = _load(data)
    if rng.random() < 0.5:
        _set(ds, "PresentationLUTShape", "CS", _pick(rng, ["INVERSE", "IDENTITY", "BOGUS"]))
    else:
        _set(ds, "BurnedInAnnotation", "CS", _pick(rng, ["YES", "NO", "yes", ""]))
    return _save(ds)


def d_flip_bytes(data: bytes, rng: Rng) -> bytes:
    out = bytearray(data)
    end = min(len(out), 2048) if rng.random() < 0.8 else len(out)  # mostly the header
    for _ in range(int(rng.integers(1, 20))):
        out[int(rng.integers(0, end))] = int(rng.integers(0, 256))
    return bytes(out)


DICOM_MUTATIONS: dict[str, Callable[[bytes, Rng], bytes]] = {
    "truncate_file": d_truncate_file,
    "truncate_pixels": d_truncate_pixels,
    "bits": d_bits,
    "pixel_representation": d_pixel_representation,
    "bomb": d_bomb,
    "window": d_window,
    "voi_lut": d_voi_lut,
    "broken_j2k": d_broken_j2k,
    "patient_id": d_patient_id,
    "laterality": d_laterality,
    "photometric": d_photometric,
    "rescale": d_rescale,
    "presentation": d_presentation,
    "flip_bytes": d_flip_bytes,
}


def _pgm_parts(data: bytes) -> tuple[list[bytes], bytes]:
    """The header ``[magic, width, height, maxval]`` (as bytes) and the raster (seeds only)."""
    width, height, maxval, offset = parse_header(data)
    return [data[:2], *(str(v).encode() for v in (width, height, maxval))], data[offset:]


def _pgm(magic: bytes, width: Any, height: Any, maxval: Any, raster: bytes) -> bytes:
    return magic + f"\n{width} {height}\n{maxval}\n".encode("ascii") + raster


def p_maxval(data: bytes, rng: Rng) -> bytes:
    (magic, w, h, _), raster = _pgm_parts(data)
    value = _pick(rng, [0, 70000, 65535, 256, 100, 1, -1, "abc", "99999999999999999999"])
    return _pgm(magic, w.decode(), h.decode(), value, raster)


def p_header_lie(data: bytes, rng: Rng) -> bytes:
    (magic, w, h, m), raster = _pgm_parts(data)
    width, height = int(w), int(h)
    choice = _pick(rng, ["bigger", "smaller", "bomb", "zero", "huge_digits", "swap"])
    if choice == "bigger":
        width += int(rng.integers(1, 100))
    elif choice == "smaller":
        height -= int(rng.integers(1, height))
    elif choice == "bomb":
        width, height = 60000, 60000
    elif choice == "zero":
        width = 0
    elif choice == "huge_digits":
        return _pgm(magic, "9" * 40, height, m.decode(), raster)
    else:
        width, height = height + 1, width - 1
    return _pgm(magic, width, height, m.decode(), raster)


def p_truncate(data: bytes, rng: Rng) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def p_trailing(data: bytes, rng: Rng) -> bytes:
    return data + rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()


def p_magic(data: bytes, rng: Rng) -> bytes:
    return _pick(rng, [b"P2", b"P6", b"\x00\x00", b"P5P", b"GIF8"]) + data[2:]


def p_flip_bytes(data: bytes, rng: Rng) -> bytes:
    out = bytearray(data)
    end = 24 if rng.random() < 0.7 else len(out)
    for _ in range(int(rng.integers(1, 6))):
        out[int(rng.integers(0, min(end, len(out))))] = int(rng.integers(0, 256))
    return bytes(out)


def p_comment(data: bytes, rng: Rng) -> bytes:
    (magic, w, h, m), raster = _pgm_parts(data)
    comment = _pick(rng, [b"# x\n", b"#" + b"y" * 100_000 + b"\n", b"#\xff\xfe\r", b"# no end"])
    return magic + b"\n" + comment + w + b" " + h + b"\n" + m + b"\n" + raster


PGM_MUTATIONS: dict[str, Callable[[bytes, Rng], bytes]] = {
    "maxval": p_maxval,
    "header_lie": p_header_lie,
    "truncate": p_truncate,
    "trailing": p_trailing,
    "magic": p_magic,
    "flip_bytes": p_flip_bytes,
    "comment": p_comment,
}


@dataclass(frozen=True)
class Case:
    """One fuzz case: which kind, seed and mutation, and the generator's seed."""

    index: int
    kind: str  # "dicom" | "pgm"
    seed: int  # index into the seeds of that kind
    mutation: str
    rng_seed: int


def plan_cases(seeds: Seeds, n: int, master_seed: int = 0) -> list[Case]:
    """``n`` cases, DICOM and PGM mutations taken in turn, seeds and mutations drawn."""
    rng = np.random.default_rng(master_seed)
    cases = []
    for i in range(n):
        kind = "dicom" if i % 3 != 2 else "pgm"
        names = list(DICOM_MUTATIONS if kind == "dicom" else PGM_MUTATIONS)
        count = len(seeds.dicoms if kind == "dicom" else seeds.pgms)
        cases.append(
            Case(
                i,
                kind,
                int(rng.integers(count)),
                names[int(rng.integers(len(names)))],
                int(rng.integers(2**31)),
            )
        )
    return cases


def mutate(seeds: Seeds, case: Case) -> bytes:
    """The malformed file of ``case`` (deterministic)."""
    rng = np.random.default_rng([case.rng_seed, case.index])
    if case.kind == "dicom":
        return DICOM_MUTATIONS[case.mutation](seeds.dicoms[case.seed][1], rng)
    return PGM_MUTATIONS[case.mutation](seeds.pgms[case.seed][1], rng)


# ------------------------------------------------------------------------------ one case


@dataclass(frozen=True)
class Outcome:
    """How a case ended: ``accepted``, ``quarantined`` (with a reason name) or ``crash``."""

    status: str
    reason: str = ""  # reason name for quarantined, exception for crash
    detail: str = ""


class ContractBroken(AssertionError):
    """The readers ended a case in a way the contract forbids (a crash by another name)."""


def _tree(work: Path, seeds: Seeds, case: Case, data: bytes) -> tuple[Path, str]:
    """Write the case's source tree; return it and the mutated file's path as ingest stores it."""
    source = work / "source"
    shutil.rmtree(source, ignore_errors=True)
    if case.kind == "dicom":
        folder = source / "CMMD" / "FUZZ" / "study" / "series"
        folder.mkdir(parents=True)
        (folder / "1-1.dcm").write_bytes(data)
        companion = seeds.dicoms[(case.seed + 1) % len(seeds.dicoms)][1]
        (folder / "1-2.dcm").write_bytes(companion)
        (work / "clinical.csv").write_text(seeds.clinical_csv, encoding="utf-8")
        return source, "CMMD/FUZZ/study/series/1-1.dcm"
    source.mkdir(parents=True)
    image_id = seeds.pgms[case.seed][0]
    other = seeds.pgms[(case.seed + 1) % len(seeds.pgms)]
    if other[0] == image_id:  # one seed only: the companion gets its own ID
        other = ("mdb999", other[1])
    (source / f"{image_id}.pgm").write_bytes(data)
    (source / f"{other[0]}.pgm").write_bytes(other[1])
    rows = "".join(f"{i} G NORM\n" for i in sorted({image_id, other[0]}))
    (source / "Info.txt").write_text("MIAS fuzz\n" + rows, encoding="latin-1")
    return source, str(source / f"{image_id}.pgm")


def _ingest(case: Case, work: Path, source: Path, out: Path, policy: str) -> Any:
    if case.kind == "dicom":
        return ingest_cmmd(
            source, work / "clinical.csv", out, on_bad_file=policy, min_size=64  # type: ignore[arg-type]
        )
    return ingest_mias(source, out, on_bad_file=policy)  # type: ignore[arg-type]


def _check_fail_mode(case: Case, work: Path, source: Path, stored: str) -> None:
    out = work / "out_fail"
    try:
        _ingest(case, work, source, out, "fail")
    except IngestError as exc:
        if stored not in str(exc):
            raise ContractBroken(f"fail mode's error does not name the file: {exc}") from None
        if (out / MANIFEST_NAME).exists():
            raise ContractBroken("fail mode raised but wrote a manifest") from None
        return
    raise ContractBroken("fail mode accepted a file that quarantine mode refused")


def _check_convert(work: Path, source: Path, out: Path, frame: Any) -> Outcome:
    cfg = ConvertConfig(size=64, bit_depth=8, crop_to_breast=False, workers=1)
    conv = work / "converted"
    raw_files = {str(p): source / str(p) for p in frame["raw_path"]}  # CMMD paths are relative
    image_ids = [str(i) for i in frame["image_id"]]
    try:
        convert_dataset(out / MANIFEST_NAME, conv, cfg, progress=False, raw_files=raw_files)
    except ConvertError as exc:
        for failure in exc.failures:
            if (conv / "images" / f"{failure.image_id}.png").exists():
                raise ContractBroken(f"a PNG was left for failed {failure.image_id}") from None
        reason = exc.failures[0].reason
        return Outcome("convert_refused", reason_name(reason), reason[:300])
    from mammoflow.data.readers import load_png

    for image_id in image_ids:
        png = load_png(conv / "images" / f"{image_id}.png")
        if png.shape != (64, 64) or not np.isfinite(png).all():
            raise ContractBroken(f"converted PNG of {image_id} is {png.shape} or not finite")
    return Outcome("accepted")


def _judge(case: Case, work: Path, source: Path, stored: str) -> Outcome:
    out = work / "out"
    result = _ingest(case, work, source, out, "quarantine")
    report = json.loads((out / "quarantine.json").read_text(encoding="utf-8"))
    reasons = [b["reason"] for b in report["bad"] if b["path"] == stored]
    in_manifest = stored in set(result.frame["raw_path"].astype(str))
    if reasons and in_manifest:
        raise ContractBroken(f"{stored} is both quarantined and in the manifest")
    if reasons:
        _check_fail_mode(case, work, source, stored)
        name = reason_name(reasons[0])
        return Outcome("quarantined", name, reasons[0][:300])
    if not in_manifest:
        raise ContractBroken(f"{stored} is neither in the manifest nor quarantined")
    return _check_convert(work, source, out, result.frame)


def run_case(seeds: Seeds, case: Case, work: Path) -> Outcome:
    """Run one case through ingest (quarantine and fail) and convert; never raises."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        data = mutate(seeds, case)
    except Exception as exc:  # a mutation that cannot be built is skipped, not a finding
        return Outcome("skipped", type(exc).__name__, str(exc)[:200])
    try:
        source, stored = _tree(work, seeds, case, data)
        return _judge(case, work, source, stored)
    except MemoryError:
        return Outcome("crash", "MemoryError", "unbounded allocation")
    except Exception as exc:
        tb = traceback.format_exc(limit=-3)
        return Outcome("crash", type(exc).__name__, f"{str(exc)[:300]}\n{tb[-1500:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed(seeds: Seeds, case: Case, work: Path) -> tuple[Outcome, float]:
    """:func:`run_case` and its seconds."""
    start = time.perf_counter()
    outcome = run_case(seeds, case, work)
    return outcome, time.perf_counter() - start
