"""MIAS: the Info.txt parser and ingestion into the manifest.

Info.txt starts with prose (credits, reference, legend); data rows are recognised by their
grammar, ``mdbNNN BG CLASS [SEVERITY [X Y RADIUS | *NOTE n*]]``, never by line number. An image
with several lesions has several consecutive rows. The image label is decided per image with
**malignant wins**: any malignant lesion → ``malignant``, else any benign lesion → ``benign``,
else ``normal`` (so mdb144, one benign and one malignant lesion, is malignant). Every lesion is
kept in ``extras["lesions"]`` with MIAS's own codes and coordinates, whose origin is the
**bottom-left** corner of the image (``x``, ``y``, ``radius`` are ``None`` when Info.txt gives
none, e.g. widely distributed calcifications).

Films come in pairs per woman: odd numbers are right breasts, even numbers left, and
mdb001 + mdb002 are one woman, so the pseudonymous patient ID is ``mias-P<pair>``
(``mias-P001`` for mdb001/mdb002). All MIAS films are MLO views.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mammoflow.data.quarantine import (
    BadFiles,
    IngestError,
    IngestResult,
    Interface,
    OnBadFile,
    check_policy,
    finish,
    format_bad,
)
from mammoflow.data.manifest import ManifestRow, label_index
from mammoflow.data.pgm import PgmError, parse_pgm
from mammoflow.data.readers import pgm_to_unit, raw_stats
from mammoflow.files import atomic_write_bytes, sha256_bytes

KIND = "mias"
INFO_NAME = "Info.txt"
VIEW = "MLO"

TISSUES: dict[str, str] = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
ABNORMALITIES: dict[str, str] = {
    "CALC": "calcification",
    "CIRC": "well-defined/circumscribed mass",
    "SPIC": "spiculated mass",
    "MISC": "other, ill-defined mass",
    "ARCH": "architectural distortion",
    "ASYM": "asymmetry",
    "NORM": "normal",
}
SEVERITIES: dict[str, str] = {"B": "benign", "M": "malignant"}

_ROW_START = re.compile(r"^\s*(mdb\d{3})(?:\s|$)", re.IGNORECASE)
_IMAGE_NAME = re.compile(r"^(mdb\d{3})\.pgm$", re.IGNORECASE)
_DRIVE = re.compile(r"^[A-Za-z]:")


class InfoError(ValueError):
    """Info.txt has bad rows; the message names each line number and value."""


@dataclass(frozen=True)
class Lesion:
    """One abnormality of one image (MIAS codes; coordinates origin bottom-left)."""

    abnormality: str
    severity: str
    x: int | None = None
    y: int | None = None
    radius: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The lesion as a JSON-ready dict."""
        return {
            "abnormality": self.abnormality,
            "severity": self.severity,
            "x": self.x,
            "y": self.y,
            "radius": self.radius,
        }


@dataclass(frozen=True)
class InfoRow:
    """One parsed data row of Info.txt."""

    line: int
    image_id: str
    tissue: str
    abnormality: str
    severity: str | None
    x: int | None
    y: int | None
    radius: int | None
    text: str


@dataclass(frozen=True)
class MiasImageInfo:
    """All rows of one image, reduced to a label (malignant wins)."""

    image_id: str
    tissue: str
    label: str
    lesions: tuple[Lesion, ...]
    lines: tuple[int, ...]


@dataclass(frozen=True)
class InfoProblem:
    """A bad Info.txt row: its line, the image it names and the message."""

    line: int
    image_id: str
    message: str


def _choices(table: dict[str, str]) -> str:
    return ", ".join(sorted(table))


def parse_row(line: str, line_no: int, name: str = INFO_NAME) -> InfoRow:
    """Parse one data row (a line whose first token is ``mdbNNN``).

    Raises:
        InfoError: unknown tissue, class or severity code, or malformed coordinates.
    """
    text = line.strip()
    tokens = text.split()
    where = f"{name} line {line_no}"
    image_id = tokens[0].lower()
    if len(tokens) < 3:
        raise InfoError(
            f"{where}: row {text!r} is too short; expected 'REFNUM BG CLASS [SEVERITY X Y RADIUS]'"
        )
    tissue, abnormality = tokens[1].upper(), tokens[2].upper()
    if tissue not in TISSUES:
        raise InfoError(
            f"{where}: unknown background tissue code {tokens[1]!r} in row {text!r}; "
            f"expected one of {_choices(TISSUES)}"
        )
    if abnormality not in ABNORMALITIES:
        raise InfoError(
            f"{where}: unknown class code {tokens[2]!r} in row {text!r}; "
            f"expected one of {_choices(ABNORMALITIES)}"
        )
    rest = tokens[3:]
    if abnormality == "NORM":
        if rest:
            raise InfoError(
                f"{where}: a NORM row takes no severity or coordinates, found "
                f"{' '.join(rest)!r} in row {text!r}; remove them or fix the class code"
            )
        return InfoRow(line_no, image_id, tissue, abnormality, None, None, None, None, text)
    if not rest:
        raise InfoError(f"{where}: class {abnormality} needs a severity (B or M) in row {text!r}")
    severity = rest[0].upper()
    if severity not in SEVERITIES:
        raise InfoError(
            f"{where}: unknown severity code {rest[0]!r} in row {text!r}; "
            f"expected one of {_choices(SEVERITIES)}"
        )
    coords = rest[1:]
    if not coords or coords[0].startswith("*"):  # none given, or a note such as "*NOTE 3*"
        return InfoRow(line_no, image_id, tissue, abnormality, severity, None, None, None, text)
    if len(coords) != 3 or not all(c.isdigit() for c in coords):
        raise InfoError(
            f"{where}: coordinates {' '.join(coords)!r} in row {text!r} must be three "
            "non-negative integers X Y RADIUS (or be left out)"
        )
    x, y, radius = (int(c) for c in coords)
    return InfoRow(line_no, image_id, tissue, abnormality, severity, x, y, radius, text)


def _data_lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if _ROW_START.match(line):
            yield number, line


def _reduce(rows: list[InfoRow]) -> MiasImageInfo:
    lesions = tuple(
        Lesion(r.abnormality, r.severity, r.x, r.y, r.radius)
        for r in rows
        if r.severity is not None
    )
    severities = {lesion.severity for lesion in lesions}
    label = "malignant" if "M" in severities else "benign" if "B" in severities else "normal"
    return MiasImageInfo(
        image_id=rows[0].image_id,
        tissue=rows[0].tissue,
        label=label,
        lesions=lesions,
        lines=tuple(r.line for r in rows),
    )


def _check_group(rows: list[InfoRow], name: str) -> str | None:
    """Why the rows of one image contradict each other, or None."""
    first = rows[0]
    for row in rows[1:]:
        where = f"{name} line {row.line}"
        if row.tissue != first.tissue:
            return (
                f"{where}: {row.image_id} has background tissue {row.tissue!r} but "
                f"{first.tissue!r} on line {first.line}; one image has one tissue"
            )
        if row.text.split() == first.text.split() or "NORM" in (row.abnormality, first.abnormality):
            return (
                f"{where}: duplicate image ID {row.image_id} (row {row.text!r} repeats the image "
                f"of line {first.line}); keep one row per lesion and one NORM row per normal image"
            )
    return None


def parse_info_lenient(
    text: str, name: str = INFO_NAME
) -> tuple[dict[str, MiasImageInfo], list[InfoProblem]]:
    """Parse Info.txt, returning the good images and every problem found.

    Rows of one image must be consecutive; an image ID that reappears after other images,
    repeats an identical row, or mixes NORM with lesion rows is a duplicate-ID problem.
    """
    problems: list[InfoProblem] = []
    groups: dict[str, list[InfoRow]] = {}
    bad_ids: set[str] = set()
    previous: str | None = None
    for number, line in _data_lines(text):
        image_id = line.split()[0].lower()
        try:
            row = parse_row(line, number, name)
        except InfoError as exc:
            problems.append(InfoProblem(number, image_id, str(exc)))
            bad_ids.add(image_id)
            previous = image_id
            continue
        if image_id in groups and previous != image_id:
            first = groups[image_id][0].line
            problems.append(
                InfoProblem(
                    number,
                    image_id,
                    f"{name} line {number}: duplicate image ID {image_id} (first on line "
                    f"{first}); rows of one image must be consecutive: remove the duplicate",
                )
            )
            bad_ids.add(image_id)
        groups.setdefault(image_id, []).append(row)
        previous = image_id
    images: dict[str, MiasImageInfo] = {}
    for image_id, rows in groups.items():
        reason = None if image_id in bad_ids else _check_group(rows, name)
        if reason is not None:
            problems.append(InfoProblem(rows[-1].line, image_id, reason))
            bad_ids.add(image_id)
        if image_id not in bad_ids:
            images[image_id] = _reduce(rows)
    problems.sort(key=lambda p: p.line)
    return images, problems


def patient_of(image_id: str) -> tuple[str, str]:
    """Pseudonymous patient ID and laterality of a MIAS film (odd → R, even → L)."""
    number = int(image_id[3:])
    return f"mias-P{(number + 1) // 2:03d}", "R" if number % 2 else "L"


@dataclass
class _Found:
    """One PGM seen in the source."""

    image_id: str
    where: str  # path for messages
    raw_path: str  # path the manifest will hold
    member: str | None = None  # archive member name
    sha256: str = ""
    width: int = 0
    height: int = 0
    bits: int = 0
    mean: float = 0.0
    std: float = 0.0
    error: str | None = None


@dataclass
class _Scan:
    info_text: str | None = None
    info_where: str = INFO_NAME
    found: list[_Found] = field(default_factory=list)
    extra_members: list[str] = field(default_factory=list)  # other safe regular members
    fatal: list[str] = field(default_factory=list)


def _inspect(found: _Found, data: bytes) -> None:
    try:
        image = parse_pgm(data, found.where)
    except PgmError as exc:
        found.error = str(exc).removeprefix(f"{found.where}: ")
        return
    found.sha256 = sha256_bytes(data)
    found.width, found.height, found.bits = image.width, image.height, image.bits
    found.mean, found.std = raw_stats(pgm_to_unit(image))


def _image_id(name: str) -> str | None:
    match = _IMAGE_NAME.match(name)
    return match.group(1).lower() if match else None


def _scan_folder(source: Path, bad: BadFiles) -> _Scan:
    scan = _Scan()
    files = sorted(p for p in source.iterdir() if p.is_file())
    infos = [p for p in files if p.name.lower() == INFO_NAME.lower()]
    if len(infos) > 1:
        scan.fatal.append(f"several Info.txt files in {source}: {[p.name for p in infos]}")
    elif infos:
        scan.info_text = infos[0].read_text(encoding="latin-1")
        scan.info_where = str(infos[0])
    for path in files:
        if path.suffix.lower() != ".pgm":
            continue
        image_id = _image_id(path.name)
        if image_id is None:
            bad.add(path, "PGM file name is not mdbNNN.pgm, so no Info.txt row can describe it")
            continue
        found = _Found(image_id, str(path), str(path))
        _inspect(found, path.read_bytes())
        scan.found.append(found)
    return scan


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why an archive member must not be extracted, or None when it is safe."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return f"unsafe archive member path {name!r} (absolute); not extracted"
    if ".." in parts:
        return f"unsafe archive member path {name!r} (contains '..'); not extracted"
    if not (member.isfile() or member.isdir()):
        return f"archive member {name!r} is a link or special file; not extracted"
    return None


def _scan_archive(source: Path, raw_dir: Path, bad: BadFiles) -> _Scan:
    scan = _Scan()
    infos: list[str] = []
    with tarfile.open(source, "r|*") as archive:
        for member in archive:
            where = f"{source}:{member.name}"
            reason = unsafe_member(member)
            if reason is not None:
                bad.add(where, reason)
                continue
            if member.isdir():
                continue
            base = PurePosixPath(member.name).name
            handle = archive.extractfile(member)
            data = handle.read() if handle is not None else b""
            if base.lower() == INFO_NAME.lower():
                infos.append(member.name)
                scan.info_text = data.decode("latin-1")
                scan.info_where = where
                scan.extra_members.append(member.name)
            elif base.lower().endswith(".pgm"):
                image_id = _image_id(base)
                if image_id is None:
                    bad.add(
                        where,
                        "PGM file name is not mdbNNN.pgm, so no Info.txt row can describe it",
                    )
                    continue
                found = _Found(image_id, where, str(raw_dir / member.name), member.name)
                _inspect(found, data)
                scan.found.append(found)
            else:
                scan.extra_members.append(member.name)
    if len(infos) > 1:
        scan.fatal.append(f"several Info.txt members in {source}: {infos}")
    return scan


def _extract(source: Path, raw_dir: Path, wanted: dict[str, str]) -> None:
    """Extract the members named in ``wanted`` (name → expected sha256 or '') atomically."""
    with tarfile.open(source, "r|*") as archive:
        for member in archive:
            if member.name not in wanted or unsafe_member(member) or not member.isfile():
                continue
            handle = archive.extractfile(member)
            data = handle.read() if handle is not None else b""
            expected = wanted[member.name]
            if expected and sha256_bytes(data) != expected:
                raise IngestError(
                    f"{source}: member {member.name!r} changed while ingesting "
                    "(sha256 differs between reads); rerun the ingest"
                )
            atomic_write_bytes(raw_dir / member.name, data)


def _cross_check(
    scan: _Scan,
    images: dict[str, MiasImageInfo],
    problems: list[InfoProblem],
    missing_where: str,
    bad: BadFiles,
) -> list[_Found]:
    """Match PGMs with Info.txt; record every bad file; return the good PGMs."""
    by_id: dict[str, list[_Found]] = {}
    for found in scan.found:
        by_id.setdefault(found.image_id, []).append(found)
    row_problems: dict[str, list[InfoProblem]] = {}
    for problem in problems:
        row_problems.setdefault(problem.image_id, []).append(problem)
    good: list[_Found] = []
    for image_id, copies in sorted(by_id.items()):
        if len(copies) > 1:
            others = [c.where for c in copies]
            for copy in copies:
                bad.add(copy.where, f"duplicate image ID {image_id}: found as {others}")
            continue
        found = copies[0]
        reasons = [found.error] if found.error is not None else []
        reasons += [problem.message for problem in row_problems.get(image_id, [])]
        if image_id not in images and image_id not in row_problems:
            reasons.append(
                f"no row for {image_id} in {scan.info_where}; add its row or remove the file"
            )
        for reason in reasons:
            bad.add(found.where, reason)
        if not reasons:
            good.append(found)
    for image_id, info in sorted(images.items()):
        if image_id not in by_id:
            bad.add(
                f"{missing_where}{image_id}.pgm",
                f"listed in {scan.info_where} (line {info.lines[0]}) but the file is missing",
            )
    for image_id, plist in sorted(row_problems.items()):
        if image_id not in by_id:
            for problem in plist:
                bad.add(scan.info_where, problem.message)
    return good


def ingest_mias(
    source: Path,
    out_dir: Path,
    dataset: str = "mias",
    on_bad_file: OnBadFile = "fail",
    interface: Interface = "python",
) -> IngestResult:
    """Ingest MIAS from the distributed archive (all-mias.tar.gz) or an extracted folder.

    An archive is safely extracted (no absolute or ``..`` paths, no links) into
    ``out_dir/raw/`` and the manifest's ``raw_path`` points there; for a folder it points at the
    user's files, which are never moved or deleted. Every bad file (bad PGM, image listed in
    Info.txt but missing, PGM without a row, bad row, duplicate ID) is collected first.

    Args:
        source: all-mias.tar.gz (any tar compression) or the folder holding Info.txt and PGMs.
        out_dir: where manifest.parquet, quarantine.json and (for archives) raw/ go.
        dataset: the manifest's ``dataset`` value.
        on_bad_file: "fail" raises :class:`IngestError` listing every bad file and writes nothing;
            "quarantine" writes the good images plus ``out_dir/quarantine.json``.
        interface: the spelling of hints in messages (Python argument, CLI option, params key).

    Raises:
        IngestError: bad files under "fail", or a source without a usable Info.txt.
    """
    policy = check_policy(on_bad_file)
    source, out_dir = Path(source), Path(out_dir)
    raw_dir = out_dir / "raw"
    bad = BadFiles()
    scan, missing_where = _scan(source, raw_dir, bad)
    if scan.info_text is None:
        scan.fatal.append(f"no {INFO_NAME} in {source}; MIAS labels come from Info.txt")
    if scan.fatal:
        raise IngestError(f"MIAS ingest of {source} failed: " + "; ".join(scan.fatal))
    images, problems = parse_info_lenient(scan.info_text or "", scan.info_where)
    if not images and not problems:
        raise IngestError(
            f"{scan.info_where}: no data rows ('mdbNNN BG CLASS ...'); is this the MIAS Info.txt?"
        )
    good = _cross_check(scan, images, problems, missing_where, bad)
    if bad and policy == "fail":
        raise IngestError(format_bad("MIAS", source, sorted(bad.items), interface))
    if source.is_file():
        wanted = {f.member: f.sha256 for f in good if f.member is not None}
        wanted.update({name: "" for name in scan.extra_members})
        _extract(source, raw_dir, wanted)
    bad.items.sort()
    return finish(
        kind=KIND,
        source=source,
        rows=_rows(good, images, dataset),
        bad=bad,
        out_dir=out_dir,
        on_bad_file=policy,
        interface=interface,
    )


def _scan(source: Path, raw_dir: Path, bad: BadFiles) -> tuple[_Scan, str]:
    """Scan a folder or a tar archive; the scan and how a missing file's place is written."""
    if source.is_dir():
        return _scan_folder(source, bad), f"{source}/"
    if source.is_file() and tarfile.is_tarfile(source):
        return _scan_archive(source, raw_dir, bad), f"{source}:"
    raise IngestError(
        f"{source}: not a folder or a tar archive; pass all-mias.tar.gz or the folder "
        "that holds Info.txt and the mdbNNN.pgm files"
    )


def _rows(
    good: Sequence[_Found], images: Mapping[str, MiasImageInfo], dataset: str
) -> list[ManifestRow]:
    """The manifest rows of the accepted films, labelled from their Info.txt rows."""
    rows = []
    for found in good:
        info = images[found.image_id]
        patient_id, laterality = patient_of(found.image_id)
        rows.append(
            ManifestRow(
                image_id=found.image_id,
                patient_id=patient_id,
                dataset=dataset,
                laterality=laterality,
                view=VIEW,
                label=info.label,
                label_index=label_index(KIND, info.label),
                raw_path=found.raw_path,
                raw_sha256=found.sha256,
                width=found.width,
                height=found.height,
                bits=found.bits,
                intensity_mean=found.mean,
                intensity_std=found.std,
                extras={
                    "tissue": info.tissue,
                    "lesions": [lesion.as_dict() for lesion in info.lesions],
                },
            )
        )
    return rows
