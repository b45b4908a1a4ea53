from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mammoflow.config import DatasetConfig, SampleConfig
from mammoflow.data.acquire import AcquireError, acquire, find_clinical, safe_extract


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_safe_extract_rejects_escaping_member(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", {"../escape.pgm": b"x"})
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(AcquireError, match=r"member '\.\./escape\.pgm' would be written outside"):
        safe_extract(archive, dest)
    assert not (tmp_path / "escape.pgm").exists()


def test_safe_extract_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "all-mias.tar.gz"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(AcquireError, match="not a readable tar archive"):
        safe_extract(bogus, tmp_path)


def test_local_archive_is_extracted_and_swapped_in(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {"Info.txt": b"info", "mdb001.pgm": b"P5"})
    target = tmp_path / "raw" / "mias"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("previous")
    ds = DatasetConfig(kind="mias", acquire="local", source=archive)
    acquire(ds, SampleConfig(), target)
    assert sorted(p.name for p in target.iterdir()) == ["Info.txt", "mdb001.pgm"]
    assert not list((tmp_path / "raw").glob(".*"))  # no staging folder left behind


def test_missing_source_names_the_path(tmp_path: Path) -> None:
    ds = DatasetConfig(kind="mias", acquire="local", source=tmp_path / "nope.tar.gz")
    with pytest.raises(AcquireError, match=r"nope\.tar\.gz' does not exist"):
        acquire(ds, SampleConfig(), tmp_path / "raw")


def test_cmmd_tree_is_linked_with_pseudonymous_folders(tmp_path: Path) -> None:
    src = tmp_path / "CMMD"
    for study, series, n in [("07-18-2010-NA-NA-79377", "1.000000-NA-70244", 2)]:
        folder = src / "D1-0001" / study / series
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            (folder / f"1-{i}.dcm").write_bytes(b"dicom")
    clinical = tmp_path / "clin.csv"
    clinical.write_text("ID1,LeftRight\n")
    target = tmp_path / "raw" / "cmmd"
    ds = DatasetConfig(kind="cmmd", acquire="local", source=src, clinical=clinical)
    acquire(ds, SampleConfig(), target)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*.dcm"))
    assert files == [
        "CMMD/D1-0001/study-1/series-1/1-1.dcm",
        "CMMD/D1-0001/study-1/series-1/1-2.dcm",
    ]
    assert "2010" not in "".join(str(p) for p in target.rglob("*"))
    assert find_clinical(target).name == "clin.csv"


def test_cmmd_needs_clinical_file(tmp_path: Path) -> None:
    src = tmp_path / "CMMD" / "D1-0001" / "s" / "r"
    src.mkdir(parents=True)
    (src / "1-1.dcm").write_bytes(b"d")
    ds = DatasetConfig(
        kind="cmmd", acquire="local", source=tmp_path / "CMMD", clinical=tmp_path / "none.xlsx"
    )
    with pytest.raises(AcquireError, match=r"clinical table .*none\.xlsx' not found"):
        acquire(ds, SampleConfig(), tmp_path / "raw")


def test_sample_acquire_is_deterministic(tmp_path: Path) -> None:
    ds = DatasetConfig(kind="mias", acquire="sample")
    cfg = SampleConfig(mias_patients=6, cmmd_patients=4, size=64)
    a = acquire(ds, cfg, tmp_path / "a")
    b = acquire(ds, cfg, tmp_path / "b")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert Path("Info.txt") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
