"""Acquire: bring a dataset's raw files to ``data/raw/<name>`` (the DVC-tracked raw copy).

* ``acquire: sample`` generates the embedded synthetic dataset deterministically.
* ``acquire: local`` takes an archive (``all-mias.tar.gz``) or a folder already on disk; a folder
  is hard-linked where possible (no second copy of a large DICOM tree on the same disk).

The target is built in a temporary sibling folder and swapped in at the end, so a failure never
leaves a half-written raw folder behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from mammoflow.config import DatasetConfig, SampleConfig


class AcquireError(ValueError):
    """A dataset's source cannot be acquired; the message names the path and the fix."""


CLINICAL_SUFFIXES = (".xlsx", ".csv")


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract a tar archive, refusing members that would escape ``dest``.

    Returns:
        The member names extracted (files only).
    """
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise AcquireError(f"{archive}: not a readable tar archive ({exc})") from None
    names: list[str] = []
    with tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not target.is_relative_to(dest.resolve()) or member.issym() or member.islnk():
                raise AcquireError(
                    f"{archive}: member {member.name!r} would be written outside the target "
                    "folder (or is a link); refusing to extract an unsafe archive"
                )
            if member.isfile():
                names.append(member.name)
        tar.extractall(dest, filter="data")
    return names


def _link_or_copy_tree(src: Path, dest: Path) -> None:
    def _copy(s: str, d: str) -> object:
        try:
            os.link(s, d)
            return d
        except OSError:
            return shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=_copy)


def _link_cmmd_tree(src: Path, dest: Path) -> None:
    """Hard-link (or copy) a TCIA tree, renaming study and series folders pseudonymously.

    TCIA folder names embed a (shifted) study date, e.g. ``07-18-2010-NA-NA-79377``; dates must
    not reach manifests, so ``<patient>/<study>/<series>/1-N.dcm`` becomes
    ``<patient>/study-K/series-K/1-N.dcm`` with K the folder's rank in sorted order.
    """
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
    studies: dict[Path, str] = {}
    series: dict[Path, str] = {}
    for path in files:
        rel = path.relative_to(src)
        if len(rel.parts) != 4:
            raise AcquireError(
                f"{path}: expected CMMD/<patient>/<study>/<series>/1-N.dcm (the TCIA layout), "
                f"found {len(rel.parts) - 1} folder level(s) under {src}"
            )
        patient, study, serie, name = rel.parts
        skey, rkey = src / patient / study, src / patient / study / serie
        studies.setdefault(skey, f"study-{sum(k.parent == skey.parent for k in studies) + 1}")
        series.setdefault(rkey, f"series-{sum(k.parent == rkey.parent for k in series) + 1}")
        target = dest / patient / studies[skey] / series[rkey] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _swap_in(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an older target is moved aside first, then removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)


def acquire_local(ds: DatasetConfig, target: Path) -> Path:
    """Copy (hard-link) or extract a local source into ``target``."""
    if ds.source is None:
        raise AcquireError("dataset has no 'source'; set datasets.<name>.source in params.yaml")
    src = Path(ds.source)
    if not src.exists():
        raise AcquireError(
            f"dataset source {str(src)!r} does not exist; put the files there or fix "
            "'datasets.<name>.source' in params.yaml"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        payload = staging / "payload"
        if src.is_file():
            payload.mkdir()
            names = safe_extract(src, payload)
            if ds.kind == "cmmd" and not any(n.endswith(".dcm") for n in names):
                raise AcquireError(f"{src}: archive holds no .dcm files; expected a TCIA CMMD tree")
        elif ds.kind == "cmmd":
            payload.mkdir()
            _link_cmmd_tree(src, payload / "CMMD")
        else:
            _link_or_copy_tree(src, payload)
        if ds.kind == "cmmd":
            if ds.clinical is None or not Path(ds.clinical).is_file():
                raise AcquireError(
                    f"clinical table {str(ds.clinical)!r} not found; set 'clinical' to "
                    "CMMD_clinicaldata_revision.xlsx (or a CSV export)"
                )
            shutil.copy2(ds.clinical, payload / Path(ds.clinical).name)
        _swap_in(payload, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def acquire_sample(ds: DatasetConfig, sample: SampleConfig, target: Path) -> Path:
    """Generate the embedded sample and keep the part of kind ``ds.kind``.

    ``variant: vendor_b``: the second, "other vendor" MIAS sample (same seed, its own stream).
    """
    from mammoflow.data.sample import make_sample, make_vendor_sample

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if ds.variant == "vendor_b":
            make_vendor_sample(staging, sample.seed, sample.mias_patients, sample.size)
        else:
            make_sample(
                staging,
                seed=sample.seed,
                mias_patients=sample.mias_patients,
                cmmd_patients=sample.cmmd_patients,
                size=sample.size,
            )
        _swap_in(staging / ds.kind, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def acquire(ds: DatasetConfig, sample: SampleConfig, target: Path) -> Path:
    """Acquire one dataset into ``target`` according to ``ds.acquire``."""
    if ds.acquire == "sample":
        return acquire_sample(ds, sample, target)
    return acquire_local(ds, target)


def source_fingerprint(ds: DatasetConfig) -> dict[str, object]:
    """What DVC compares to see that a local source changed: each file's relative path, size,
    modification time and inode (a film re-exported or replaced gets a new one), like DVC's
    own state database. Stat only, no reading: cheap on a 100 GB DICOM tree.

    A sample dataset has no files of its own: it is generated from params ``sample:``, which
    are the acquire stage's params already.
    """
    if ds.acquire == "sample":
        return {"acquire": "sample", "files": 0}
    paths = [Path(p) for p in (ds.source, ds.clinical) if p is not None]
    for path in paths:
        if not path.exists():
            raise AcquireError(
                f"dataset source {str(path)!r} does not exist; put the files there or fix "
                "'datasets.<name>.source' / 'clinical' in params.yaml"
            )
    entries: list[tuple[str, int, int, int]] = []
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            st = file.stat()
            rel = file.name if file == path else str(file.relative_to(path))
            entries.append((f"{path.name}/{rel}", st.st_size, st.st_mtime_ns, st.st_ino))
    return {
        "acquire": "local",
        "files": len(entries),
        "bytes": sum(e[1] for e in entries),
        "entries": entries,
    }


def find_clinical(raw_dir: Path) -> Path:
    """The clinical table at the top of an acquired CMMD folder."""
    found = sorted(p for p in raw_dir.iterdir() if p.suffix.lower() in CLINICAL_SUFFIXES)
    if len(found) != 1:
        raise AcquireError(
            f"{raw_dir}: expected exactly one clinical table (.xlsx or .csv) at the top, "
            f"found {[p.name for p in found]!r}"
        )
    return found[0]


def source_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Record what ``dataset``'s source holds now (data/sources/<dataset>.json): the acquire
    stage depends on it, so DVC re-acquires when a film of a local source is replaced."""
    from mammoflow.files import atomic_write_json

    layout = layout or Layout()
    record = {"dataset": dataset, **source_fingerprint(cfg.dataset(dataset))}
    atomic_write_json(layout.source(dataset), record)
    return {k: v for k, v in record.items() if k != "entries"}


def acquire_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Bring the raw files of ``dataset`` to ``data/raw/<dataset>``."""

    layout = layout or Layout()
    ds = cfg.dataset(dataset)
    target = acquire(ds, cfg.sample, layout.raw(dataset))
    n_files = sum(1 for p in target.rglob("*") if p.is_file())
    return {"dataset": dataset, "raw_dir": str(target), "files": n_files}
