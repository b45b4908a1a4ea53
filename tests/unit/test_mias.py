"""MIAS: Info.txt grammar, labels (malignant wins), ingestion from folder and archive."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammoflow.data.manifest import COLUMNS, read_manifest
from mammoflow.data.mias import (
    ingest_mias,
    parse_info_lenient,
    patient_of,
)
from mammoflow.data.pgm import encode_pgm, write_pgm
from mammoflow.data.quarantine import IngestError
from mammoflow.data.readers import load_raw, raw_stats
from mammoflow.files import sha256_file

PROSE = """\
              MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY
                  MiniMammographic Database

Thank you for downloading the database. The mdb files are 1024 x 1024.

1st column: MIAS database reference number.
3rd column: Class of abnormality present:
                CALC - Calcification
                NORM - Normal
=================================================================
"""
ROWS = [
    "mdb001 G CIRC B 4 5 2",
    "mdb002 D NORM ",
    "mdb003 F MISC B 1 6 1  ",
    "mdb003 F SPIC M 3 3 2",
    "mdb004 F CALC B",
]
TAIL = "\n=================================================================\n"
FAIL_HEAD = (
    "MIAS ingest of {source} found {n} bad file(s); nothing was written. Fix or remove them, "
    "or rerun with on_bad_file='quarantine' to ingest the rest:\n"
)


def _info(rows: list[str]) -> str:
    return (PROSE + "\n".join(rows) + TAIL).replace("\n", "\r\n")


def _line(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(needle):
            return number
    raise AssertionError(needle)


def _pixels(number: int) -> np.ndarray:
    rng = np.random.default_rng(number)
    arr = rng.integers(40, 220, (8, 8)).astype(np.uint8)
    arr[:, :2] = 0
    return arr


def _folder(root: Path, rows: list[str] = ROWS, images: tuple[int, ...] = (1, 2, 3, 4)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Info.txt").write_text(_info(rows), encoding="latin-1", newline="")
    (root / "README").write_text("synthetic\n")
    for number in images:
        write_pgm(root / f"mdb{number:03d}.pgm", _pixels(number), 255)
    return root


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def prior(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """An out_dir holding a manifest and quarantine.json from an earlier good ingest."""
    out = tmp_path / "out"
    ingest_mias(_folder(tmp_path / "earlier"), out)
    return out, (out / "manifest.parquet").read_bytes(), (out / "quarantine.json").read_bytes()


def _assert_untouched(prior: tuple[Path, bytes, bytes]) -> None:
    out, manifest, quarantine = prior
    assert (out / "manifest.parquet").read_bytes() == manifest
    assert (out / "quarantine.json").read_bytes() == quarantine
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "quarantine.json"]


# ------------------------------------------------------------------ Info.txt


def test_parse_info_grammar_and_malignant_wins() -> None:
    text = _info([*ROWS, "mdb005 D CALC M *NOTE 3* "])
    images, problems = parse_info_lenient(text)
    assert problems == []
    assert sorted(images) == ["mdb001", "mdb002", "mdb003", "mdb004", "mdb005"]
    assert {k: v.label for k, v in images.items()} == {
        "mdb001": "benign",
        "mdb002": "normal",
        "mdb003": "malignant",
        "mdb004": "benign",
        "mdb005": "malignant",
    }
    assert [lesion.as_dict() for lesion in images["mdb003"].lesions] == [
        {"abnormality": "MISC", "severity": "B", "x": 1, "y": 6, "radius": 1},
        {"abnormality": "SPIC", "severity": "M", "x": 3, "y": 3, "radius": 2},
    ]
    assert images["mdb004"].lesions[0].x is None
    assert images["mdb005"].lesions[0].radius is None
    assert images["mdb002"].lesions == () and images["mdb002"].tissue == "D"
    assert images["mdb003"].lines == (_line(text, "mdb003"), _line(text, "mdb003") + 1)


def test_unknown_class_names_line_and_value() -> None:
    text = _info(["mdb001 G CIRX B 4 5 2", "mdb002 D NORM"])
    images, problems = parse_info_lenient(text)
    assert sorted(images) == ["mdb002"]
    line = _line(text, "mdb001")
    assert [p.message for p in problems] == [
        f"Info.txt line {line}: unknown class code 'CIRX' in row 'mdb001 G CIRX B 4 5 2'; "
        "expected one of ARCH, ASYM, CALC, CIRC, MISC, NORM, SPIC"
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "mdb001 G CIRC X 4 5 2",
            "unknown severity code 'X' in row 'mdb001 G CIRC X 4 5 2'; expected one of B, M",
        ),
        (
            "mdb001 Q NORM",
            "unknown background tissue code 'Q' in row 'mdb001 Q NORM'; expected one of D, F, G",
        ),
        (
            "mdb001 G NORM B",
            "a NORM row takes no severity or coordinates, found 'B' in row 'mdb001 G NORM B'; "
            "remove them or fix the class code",
        ),
        (
            "mdb001 G CIRC B 4 five 2",
            "coordinates '4 five 2' in row 'mdb001 G CIRC B 4 five 2' must be three non-negative "
            "integers X Y RADIUS (or be left out)",
        ),
        ("mdb001 G CIRC", "class CIRC needs a severity (B or M) in row 'mdb001 G CIRC'"),
        (
            "mdb001 G",
            "row 'mdb001 G' is too short; expected 'REFNUM BG CLASS [SEVERITY X Y RADIUS]'",
        ),
    ],
)
def test_bad_rows(row: str, message: str) -> None:
    text = _info([row])
    images, problems = parse_info_lenient(text, "I.txt")
    assert images == {}
    assert [p.message for p in problems] == [f"I.txt line {_line(text, 'mdb001')}: {message}"]


def test_duplicates_in_info() -> None:
    text = _info(
        ["mdb001 G NORM", "mdb001 G NORM", "mdb002 D NORM", "mdb003 D NORM", "mdb002 D NORM"]
    )
    images, problems = parse_info_lenient(text)
    assert sorted(images) == ["mdb003"]
    first = _line(text, "mdb001")
    assert [p.message for p in problems] == [
        f"Info.txt line {first + 1}: duplicate image ID mdb001 (row 'mdb001 G NORM' repeats the "
        f"image of line {first}); keep one row per lesion and one NORM row per normal image",
        f"Info.txt line {first + 4}: duplicate image ID mdb002 (first on line {first + 2}); rows "
        "of one image must be consecutive: remove the duplicate",
    ]


def test_prose_only_is_an_error(tmp_path: Path) -> None:
    assert parse_info_lenient(PROSE) == ({}, [])
    folder = _folder(tmp_path / "prose", rows=[], images=(1,))
    with pytest.raises(IngestError, match=r"Info.txt: no data rows \('mdbNNN BG CLASS ...'\)"):
        ingest_mias(folder, tmp_path / "out")


def test_patient_pairs() -> None:
    assert patient_of("mdb001") == ("mias-P001", "R")
    assert patient_of("mdb002") == ("mias-P001", "L")
    assert patient_of("mdb322") == ("mias-P161", "L")


# ------------------------------------------------------------------ ingestion


def test_ingest_folder(tmp_path: Path) -> None:
    source = _folder(tmp_path / "mias")
    before = _snapshot(source)
    result = ingest_mias(source, tmp_path / "out", dataset="sample_mias")
    frame = result.frame
    assert list(frame.columns) == list(COLUMNS)
    assert frame["image_id"].tolist() == ["mdb001", "mdb002", "mdb003", "mdb004"]
    assert frame["patient_id"].tolist() == ["mias-P001"] * 2 + ["mias-P002"] * 2
    assert frame["laterality"].tolist() == ["R", "L", "R", "L"]
    assert set(frame["view"]) == {"MLO"} and set(frame["dataset"]) == {"sample_mias"}
    assert frame["label"].tolist() == ["benign", "normal", "malignant", "benign"]
    assert frame["label_index"].tolist() == [1, 0, 2, 1]
    assert result.counts == {"normal": 1, "benign": 2, "malignant": 1}
    assert result.bad == []
    row = frame.iloc[2]
    assert row["raw_path"] == str(source / "mdb003.pgm")
    assert row["raw_sha256"] == sha256_file(source / "mdb003.pgm")
    assert (row["width"], row["height"], row["bits"]) == (8, 8, 8)
    mean, std = raw_stats(load_raw(row["raw_path"]))
    assert row["intensity_mean"] == pytest.approx(mean) and row["intensity_std"] == pytest.approx(
        std
    )
    extras = json.loads(row["extras"])
    assert extras["tissue"] == "F" and len(extras["lesions"]) == 2
    assert pd.isna(row["converted_path"])
    assert read_manifest(tmp_path / "out").equals(frame)
    assert json.loads((tmp_path / "out" / "quarantine.json").read_text())["bad"] == []
    assert _snapshot(source) == before


def _tar(path: Path, folder: Path, extra: Sequence[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(folder.iterdir()):
            archive.add(file, arcname=file.name)
        for info, data in extra:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def test_ingest_archive_extracts_into_raw(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "all-mias.tar.gz", _folder(tmp_path / "src"))
    out = tmp_path / "out"
    result = ingest_mias(archive, out)
    assert result.frame["raw_path"].tolist() == [
        str(out / "raw" / f"mdb00{i}.pgm") for i in (1, 2, 3, 4)
    ]
    assert sorted(p.name for p in (out / "raw").iterdir()) == [
        "Info.txt",
        "README",
        "mdb001.pgm",
        "mdb002.pgm",
        "mdb003.pgm",
        "mdb004.pgm",
    ]
    for path, sha in zip(result.frame["raw_path"], result.frame["raw_sha256"], strict=True):
        assert sha256_file(Path(path)) == sha
    assert result.counts == {"normal": 1, "benign": 2, "malignant": 1}


def test_archive_unsafe_members_are_rejected(
    tmp_path: Path, prior: tuple[Path, bytes, bytes]
) -> None:
    evil = tarfile.TarInfo("../evil.pgm")
    absolute = tarfile.TarInfo("/tmp/abs.pgm")
    link = tarfile.TarInfo("link.pgm")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    pgm = encode_pgm(_pixels(9), 255)
    archive = _tar(
        tmp_path / "a.tar.gz",
        _folder(tmp_path / "src"),
        [(evil, pgm), (absolute, pgm), (link, b"")],
    )
    out = prior[0]
    with pytest.raises(IngestError) as err:
        ingest_mias(archive, out)
    assert str(err.value) == FAIL_HEAD.format(source=archive, n=3) + (
        f"  - {archive}:../evil.pgm: unsafe archive member path '../evil.pgm' (contains '..'); "
        "not extracted\n"
        f"  - {archive}:/tmp/abs.pgm: unsafe archive member path '/tmp/abs.pgm' (absolute); "
        "not extracted\n"
        f"  - {archive}:link.pgm: archive member 'link.pgm' is a link or special file; "
        "not extracted"
    )
    _assert_untouched(prior)
    assert not (tmp_path / "evil.pgm").exists()
    result = ingest_mias(archive, tmp_path / "q", on_bad_file="quarantine")
    assert len(result.frame) == 4 and len(result.bad) == 3
    assert not (tmp_path / "evil.pgm").exists() and not (tmp_path / "q" / "link.pgm").exists()


def test_truncated_pgm(tmp_path: Path, prior: tuple[Path, bytes, bytes]) -> None:
    source = _folder(tmp_path / "src")
    bad = source / "mdb002.pgm"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(IngestError) as err:
        ingest_mias(source, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=source, n=1) + (
        f"  - {bad}: truncated PGM: the header (8x8, maxval 255) needs 64 pixel bytes but only "
        "54 follow the 11-byte header (file is 65 bytes, expected 75); re-download or re-extract "
        "the file"
    )
    _assert_untouched(prior)


def test_pgm_with_wrong_header(tmp_path: Path, prior: tuple[Path, bytes, bytes]) -> None:
    source = _folder(tmp_path / "src")
    bad = source / "mdb001.pgm"
    bad.write_bytes(b"P6" + bad.read_bytes()[2:])
    with pytest.raises(IngestError) as err:
        ingest_mias(source, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=source, n=1) + (
        f"  - {bad}: wrong magic number b'P6', expected b'P5': the file is not a binary PGM (P5)"
    )
    _assert_untouched(prior)


def test_info_row_with_unknown_class(tmp_path: Path, prior: tuple[Path, bytes, bytes]) -> None:
    rows = [*ROWS[:1], "mdb002 D NORX", *ROWS[2:]]
    source = _folder(tmp_path / "src", rows)
    line = _line(_info(rows), "mdb002")
    with pytest.raises(IngestError) as err:
        ingest_mias(source, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=source, n=1) + (
        f"  - {source / 'mdb002.pgm'}: {source / 'Info.txt'} line {line}: unknown class code "
        "'NORX' in row 'mdb002 D NORX'; expected one of ARCH, ASYM, CALC, CIRC, MISC, NORM, SPIC"
    )
    _assert_untouched(prior)


def test_duplicate_image_ids(tmp_path: Path, prior: tuple[Path, bytes, bytes]) -> None:
    source = _folder(tmp_path / "src")
    write_pgm(source / "MDB004.PGM", _pixels(4), 255)  # same ID as mdb004.pgm
    with pytest.raises(IngestError) as err:
        ingest_mias(source, prior[0])
    both = [str(source / "MDB004.PGM"), str(source / "mdb004.pgm")]
    assert str(err.value) == FAIL_HEAD.format(source=source, n=2) + (
        f"  - {both[0]}: duplicate image ID mdb004: found as {both}\n"
        f"  - {both[1]}: duplicate image ID mdb004: found as {both}"
    )
    _assert_untouched(prior)


def test_duplicate_archive_members(tmp_path: Path, prior: tuple[Path, bytes, bytes]) -> None:
    again = tarfile.TarInfo("mdb001.pgm")
    archive = _tar(tmp_path / "d.tar", _folder(tmp_path / "src"), [(again, encode_pgm(_pixels(7)))])
    with pytest.raises(IngestError, match=r"duplicate image ID mdb001: found as") as err:
        ingest_mias(archive, prior[0])
    assert str(err.value).count("duplicate image ID mdb001") == 2
    _assert_untouched(prior)


def test_missing_image_and_orphan_pgm_and_all_reported(
    tmp_path: Path, prior: tuple[Path, bytes, bytes]
) -> None:
    source = _folder(tmp_path / "src", images=(1, 2, 3))
    write_pgm(source / "mdb009.pgm", _pixels(9), 255)
    truncated = source / "mdb002.pgm"
    truncated.write_bytes(truncated.read_bytes()[:20])
    info = source / "Info.txt"
    with pytest.raises(IngestError) as err:
        ingest_mias(source, prior[0])
    assert str(err.value) == FAIL_HEAD.format(source=source, n=3) + (
        f"  - {truncated}: truncated PGM: the header (8x8, maxval 255) needs 64 pixel bytes but "
        "only 9 follow the 11-byte header (file is 20 bytes, expected 75); re-download or "
        "re-extract the file\n"
        f"  - {source}/mdb004.pgm: listed in {info} (line {_line(_info(ROWS), 'mdb004')}) but the "
        "file is missing\n"
        f"  - {source / 'mdb009.pgm'}: no row for mdb009 in {info}; add its row or remove the file"
    )
    _assert_untouched(prior)


def test_quarantine_writes_good_images_and_report(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src")
    truncated = source / "mdb002.pgm"
    truncated.write_bytes(truncated.read_bytes()[:30])
    write_pgm(source / "mdb009.pgm", _pixels(9), 255)
    before = _snapshot(source)
    out = tmp_path / "out"
    result = ingest_mias(source, out, on_bad_file="quarantine")
    assert result.frame["image_id"].tolist() == ["mdb001", "mdb003", "mdb004"]
    assert result.counts == {"normal": 0, "benign": 2, "malignant": 1}
    report = json.loads((out / "quarantine.json").read_text())
    assert [b["path"] for b in report["bad"]] == [str(truncated), str(source / "mdb009.pgm")]
    assert report["bad"][0]["reason"].startswith("truncated PGM")
    assert result.bad == [(b["path"], b["reason"]) for b in report["bad"]]
    assert result.quarantine_path == out / "quarantine.json"
    assert _snapshot(source) == before  # the user's files are never moved or deleted
    assert read_manifest(out).equals(result.frame)


def test_missing_info_and_bad_source(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(IngestError, match=r"no Info.txt in .*MIAS labels come from Info.txt"):
        ingest_mias(folder, tmp_path / "out")
    with pytest.raises(IngestError, match=r"not a folder or a tar archive"):
        ingest_mias(tmp_path / "nope.tar.gz", tmp_path / "out")
    with pytest.raises(ValueError, match=r"on_bad_file must be 'fail' or 'quarantine', got 'skip'"):
        ingest_mias(folder, tmp_path / "out", on_bad_file="skip")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
