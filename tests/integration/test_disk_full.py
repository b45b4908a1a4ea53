"""A full disk during convert and during the feature-cache write: a clear error, nothing
truncated left behind that a later run would trust, and the rerun completes.

The fault is injected at the write call: every file :mod:`mammoflow.files` opens for writing (its
atomic writer's temporary file) whose path matches gets ``OSError(ENOSPC)`` once a byte budget
is spent, after writing the bytes that still "fit" (a disk that fills mid-file). Everything
else is real: the sample's raw files, the conversion, the backbone, the cache.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mammoflow import files as mf_io
from mammoflow.config import ConvertConfig
from mammoflow.data.convert import STATE_NAME, ConvertError, convert_dataset
from mammoflow.data.manifest import MANIFEST_NAME
from mammoflow.data.mias import ingest_mias
from mammoflow.data.readers import load_png
from mammoflow.data.sample import make_sample
from mammoflow.files import sha256_file

pytestmark = [pytest.mark.integration]


class _FullDisk:
    """A binary file whose writes fail with ENOSPC once the shared budget is spent."""

    def __init__(self, real: Any, budget: list[int]) -> None:
        self._real, self._budget = real, budget

    def write(self, data: bytes) -> int:
        fits = max(0, min(len(data), self._budget[0]))
        if fits:
            self._real.write(data[:fits])
            self._budget[0] -= fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def disk_full(
    monkeypatch: pytest.MonkeyPatch, budget: int, matches: Callable[[str], bool]
) -> Iterator[list[int]]:
    """Writes through :mod:`mammoflow.files` to temp files whose final name ``matches`` share
    ``budget`` bytes, then fail with ENOSPC (the budget list is yielded, to read what is left)."""
    left = [budget]
    real_fdopen = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(fd, mode, *args, **kwargs)
        name = str(Path(f"/proc/self/fd/{fd}").readlink())
        return _FullDisk(handle, left) if "w" in mode and matches(name) else handle

    with monkeypatch.context() as mp:
        mp.setattr(mf_io.os, "fdopen", fdopen)
        yield left


def _leftover_temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp"))


def _check_trustworthy(out: Path) -> dict[str, str]:
    """Every PNG on disk decodes whole; every state entry's PNG has the recorded sha256."""
    import json

    state_path = out / STATE_NAME
    state = json.loads(state_path.read_text())["images"] if state_path.is_file() else {}
    for png in sorted((out / "images").glob("*.png")):
        assert load_png(png).shape == (64, 64), png  # a truncated PNG does not decode
    for image_id, entry in state.items():
        png = out / "images" / f"{image_id}.png"
        assert png.is_file() and sha256_file(png) == entry["png_sha256"], image_id
    assert _leftover_temps(out) == []
    return {k: v["png_sha256"] for k, v in state.items()}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    sample = make_sample(root / "raw", seed=3, mias_patients=4, cmmd_patients=2, size=128)
    return ingest_mias(sample.mias_dir, root / "interim").manifest_path


def _cfg(size: int = 64) -> ConvertConfig:
    return ConvertConfig(size=size, bit_depth=8, crop_to_breast=False, workers=1)


def test_disk_full_during_png_writes(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "converted"
    with (
        disk_full(monkeypatch, 2500, lambda name: ".png." in name) as left,
        pytest.raises(ConvertError) as err,
    ):
        convert_dataset(manifest, out, _cfg(), progress=False)
    assert left[0] == 0  # the disk did fill
    failures = err.value.failures
    assert failures and all(
        "no space left on the device while writing" in f.reason for f in failures
    )
    assert all(f"{f.image_id}.png" in f.reason for f in failures)
    assert not (out / MANIFEST_NAME).exists()  # the stage's output is not written
    written = _check_trustworthy(out)
    assert set(written).isdisjoint(f.image_id for f in failures)
    # the rerun, disk free again, converts what failed and keeps what was written
    result = convert_dataset(manifest, out, _cfg(), progress=False)
    assert set(result.skipped) == set(written)
    assert set(result.converted) == {f.image_id for f in failures}
    assert len(_check_trustworthy(out)) == len(pd.read_parquet(manifest))


def test_disk_full_while_recording_the_state(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "converted"
    convert_dataset(manifest, out, _cfg(), progress=False)
    before = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    state_before = (out / STATE_NAME).read_bytes()
    # new parameters: every PNG is rewritten, then the disk is full for the state file
    with (
        disk_full(monkeypatch, 100, lambda name: STATE_NAME in name),
        pytest.raises(OSError, match=f"while writing {out / STATE_NAME}") as err,
    ):
        convert_dataset(manifest, out, _cfg(size=48), progress=False)
    assert err.value.errno == errno.ENOSPC
    assert (out / STATE_NAME).read_bytes() == state_before  # the old record, whole
    assert _leftover_temps(out) == []
    changed = {p.name for p in (out / "images").glob("*.png") if p.read_bytes() != before[p.name]}
    assert changed == set(before)  # the 48-px PNGs were written, but the old state does not
    # name their hashes: a later run does not trust them and converts again
    result = convert_dataset(manifest, out, _cfg(size=48), progress=False)
    assert len(result.converted) == len(before) and not result.skipped


def test_disk_full_during_the_feature_cache_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mammoflow.models import build
    from mammoflow.models.features import cached_features
    from tests.unit.test_features import write_pngs

    frame = write_pngs(tmp_path / "png", [0, 1, 0, 1])
    cache = tmp_path / "cache"
    bb = build.load_backbone("vgg16", trainable_layers=3, input_size=32)
    # the disk fills in the middle of the .npy
    with (
        disk_full(monkeypatch, 1000, lambda name: ".npy." in name),
        pytest.raises(OSError, match=r"no space left on the device while writing .*\.npy"),
    ):
        cached_features(frame, bb, dataset="t", cache_dir=cache)
    assert list(cache.iterdir()) == []  # no .npy, no sidecar, no temp file
    # the disk fills at the sidecar, after the .npy: a .npy without its sidecar is not a hit
    with (
        disk_full(monkeypatch, 10, lambda name: ".json." in name),
        pytest.raises(OSError, match=r"while writing .*\.json"),
    ):
        cached_features(frame, bb, dataset="t", cache_dir=cache)
    assert [p.suffix for p in cache.iterdir()] == [".npy"]
    first = cached_features(frame, bb, dataset="t", cache_dir=cache)
    assert not first.hit  # recomputed, not trusted
    second = cached_features(frame, bb, dataset="t", cache_dir=cache)
    assert second.hit
    np.testing.assert_array_equal(second.features, first.features)
