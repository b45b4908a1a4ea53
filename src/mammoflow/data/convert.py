"""Raw images → fixed-size PNGs, in parallel and incrementally.

Each manifest row's raw file is decoded (:func:`mammoflow.data.readers.load_raw`), optionally
cropped to the breast, resized with its aspect ratio kept, padded black to a square and
written as a deterministic 8- or 16-bit grayscale PNG ``out_dir/images/<image_id>.png``.

``out_dir/convert_state.json`` remembers, per image, the raw file's sha256, the hash of the
conversion parameters and the PNG's sha256; an image whose three still match is skipped. The
output manifest ``out_dir/manifest.parquet`` is the input manifest with ``converted_path`` and
``converted_sha256`` filled. Bad images are collected and reported together; nothing written
by an earlier run is deleted, and every file is written atomically (temp + rename).

A pseudonymous ``raw_path`` (relative to the source root, see :mod:`mammoflow.data.pseudonym`)
is found on disk through the ``raw_files`` mapping; messages quote the manifest's ``raw_path``,
never the file's real location.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image

from mammoflow.config import Config, ConvertConfig
from mammoflow.console import progress as shown
from mammoflow.data import images
from mammoflow.data.manifest import MANIFEST_NAME, check, read_manifest, write_manifest
from mammoflow.files import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from mammoflow.paths import Layout

STATE_NAME = "convert_state.json"
IMAGES_DIR = "images"
#: Bump when the conversion algorithm changes so every image is converted again.
ALGORITHM_VERSION = 1
#: zlib level for PNGs; fixed so identical pixels always give identical bytes. Level 3 encodes
#: ~3x faster than 6 on 512² mammograms for ~15 % larger files.
PNG_COMPRESS_LEVEL = 3

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Loader = Callable[[Path], NDArray[np.floating]]


class ConvertError(ValueError):
    """One or more images could not be converted; ``failures`` lists each with its reason."""

    def __init__(self, failures: list[ConvertFailure], total: int) -> None:
        self.failures = failures
        lines = [f"  - {f.image_id} ({f.raw_path}): {f.reason}" for f in failures]
        super().__init__(
            f"{len(failures)} of {total} images failed to convert; the output manifest was not "
            "updated and earlier PNGs were kept. Fix or remove these files and re-run:\n"
            + "\n".join(lines)
        )


@dataclass(frozen=True)
class ConvertFailure:
    """One image that could not be converted."""

    image_id: str
    raw_path: str
    reason: str


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_dataset` did."""

    out_dir: Path
    manifest_path: Path
    state_path: Path
    converted: tuple[str, ...]
    skipped: tuple[str, ...]
    workers: int
    seconds: float
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Images in the manifest."""
        return len(self.converted) + len(self.skipped)


@dataclass(frozen=True)
class _Task:
    image_id: str
    raw_path: str  # the file on disk
    shown_path: str  # the manifest's raw_path, for messages
    manifest_sha256: str | None
    png_path: str
    params: Mapping[str, Any]
    params_hash: str
    previous: Mapping[str, Any] | None


@dataclass(frozen=True)
class _Outcome:
    image_id: str
    status: str  # converted | skipped | failed
    raw_sha256: str = ""
    png_sha256: str = ""
    reason: str = ""


# --------------------------------------------------------------------------- pure functions


def convert_params(cfg: ConvertConfig) -> dict[str, Any]:
    """The parameters that determine a PNG's bytes (``workers`` does not)."""
    return {
        "algorithm": ALGORITHM_VERSION,
        "size": cfg.size,
        "bit_depth": cfg.bit_depth,
        "crop_to_breast": cfg.crop_to_breast,
        "resample": "lanczos",
        "pad": "center-black",
        "png_compress_level": PNG_COMPRESS_LEVEL,
    }


def params_hash(params: Mapping[str, Any]) -> str:
    """Stable sha256 of the conversion parameters."""
    return sha256_bytes(json.dumps(dict(params), sort_keys=True).encode("utf-8"))


def prepare_image(
    img: NDArray[np.floating], size: int, bit_depth: int, crop_to_breast: bool
) -> NDArray[np.uint8] | NDArray[np.uint16]:
    """Crop (optional), resize keeping aspect, pad black to ``size``², quantize.

    Args:
        img: 2-D float image in [0, 1].
        size: side of the square output.
        bit_depth: 8 or 16.
        crop_to_breast: crop to :func:`images.breast_bbox` first.
    """
    data = np.asarray(img, dtype=np.float32)
    if crop_to_breast:
        data = images.crop(data, images.breast_bbox(data))
    return images.quantize(images.letterbox(data, size), bit_depth)


def encode_png(pixels: NDArray[np.uint8] | NDArray[np.uint16]) -> bytes:
    """Encode a 2-D uint8/uint16 array as grayscale PNG bytes, deterministically.

    No metadata chunks (no time, text or gamma) and a fixed compression level, so the same
    pixels always give the same bytes (stable DVC hashes).
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"PNG pixels must be a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}"
        )
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(
        buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL
    )
    return buf.getvalue()


def _should_skip(task: _Task, raw_sha: str, png: Path) -> bool:
    prev = task.previous
    if not prev or prev.get("params_hash") != task.params_hash:
        return False
    if prev.get("raw_sha256") != raw_sha or not png.is_file():
        return False
    return bool(sha256_file(png) == prev.get("png_sha256"))


# --------------------------------------------------------------------------- worker


def _default_loader(path: Path) -> NDArray[np.floating]:
    from mammoflow.data.readers import load_raw

    return load_raw(path)


def _convert_one(task: _Task, loader: Loader | None) -> _Outcome:
    """Convert one image (runs in a worker process); never raises."""
    raw = Path(task.raw_path)
    try:
        if not _SAFE_ID.match(task.image_id):
            raise ValueError(
                f"image_id {task.image_id!r} is not usable as a file name "
                "(letters, digits, '.', '_', '-' only)"
            )
        if not raw.is_file():
            raise FileNotFoundError(
                f"raw file {task.shown_path} not found; re-run ingest or restore it"
            )
        raw_sha = sha256_file(raw)
        if task.manifest_sha256 and raw_sha != task.manifest_sha256:
            raise ValueError(
                f"raw file changed since ingest (manifest sha256 {task.manifest_sha256[:12]}…, "
                f"file {raw_sha[:12]}…); re-run `mammoflow ingest`"
            )
        png = Path(task.png_path)
        if task.previous is not None and _should_skip(task, raw_sha, png):
            return _Outcome(task.image_id, "skipped", raw_sha, str(task.previous["png_sha256"]))
        img = (loader or _default_loader)(raw)
        pixels = prepare_image(
            img,
            size=int(task.params["size"]),
            bit_depth=int(task.params["bit_depth"]),
            crop_to_breast=bool(task.params["crop_to_breast"]),
        )
        data = encode_png(pixels)
        atomic_write_bytes(png, data)
        return _Outcome(task.image_id, "converted", raw_sha, sha256_bytes(data))
    except Exception as exc:  # collected and reported together by the caller
        reason = (str(exc) or type(exc).__name__).replace(str(raw), task.shown_path)
        return _Outcome(task.image_id, "failed", reason=f"{type(exc).__name__}: {reason}")


# --------------------------------------------------------------------------- I/O wrapper


def _load_state(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["images"]
        if not isinstance(entries, dict):
            raise TypeError("'images' is not an object")
        return {str(k): dict(v) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        # An unreadable state only costs a full re-conversion; it is rewritten below.
        return {}


def _pool_context() -> BaseContext:
    """``fork`` while this process is single-threaded (fast start), else ``spawn``.

    Forking a process that runs threads (TensorFlow, Prefect, Dask, a progress bar) can
    deadlock the child, so any extra thread selects ``spawn``.
    """
    if os.name == "posix" and threading.active_count() == 1:
        return get_context("fork")
    return get_context("spawn")


def _run(
    tasks: list[_Task], workers: int, loader: Loader | None, progress: bool, label: str
) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    if workers <= 1 or len(tasks) <= 1:
        with shown(label, len(tasks), enabled=progress) as bar:
            for task in tasks:
                outcomes.append(_convert_one(task, loader))
                bar.advance()
        return outcomes
    # The pool starts before the progress bar's refresh thread, so it may fork.
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        futures: dict[Future[_Outcome], _Task] = {
            pool.submit(_convert_one, t, loader): t for t in tasks
        }
        with shown(label, len(tasks), enabled=progress) as bar:
            for fut in as_completed(futures):
                try:
                    outcomes.append(fut.result())
                except Exception as exc:  # a worker died (killed, out of memory)
                    reason = (
                        f"worker process failed ({type(exc).__name__}: {exc}); "
                        "re-run, or set convert.workers: 1 to convert in-process"
                    )
                    outcomes.append(_Outcome(futures[fut].image_id, "failed", reason=reason))
                bar.advance()
    return outcomes


def resolve_workers(workers: int, n_tasks: int) -> int:
    """``workers`` (0 = one per CPU), capped at the number of images."""
    wanted = workers if workers > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, max(n_tasks, 1)))


def convert_dataset(
    manifest: Path | str | pd.DataFrame,
    out_dir: Path,
    cfg: ConvertConfig,
    progress: bool = True,
    loader: Loader | None = None,
    raw_files: Mapping[str, Path] | None = None,
) -> ConvertResult:
    """Convert every image of a manifest to PNG under ``out_dir`` (see module docstring).

    Args:
        manifest: a manifest parquet path (or its directory) or a manifest DataFrame.
        out_dir: output directory (``images/``, ``convert_state.json``, ``manifest.parquet``).
        cfg: size, bit depth, breast crop and worker count.
        progress: show progress (a bar in a terminal, a line every 30 s in a log).
        loader: ``path -> 2-D float [0, 1]`` decoder; a picklable top-level function.
            Defaults to :func:`mammoflow.data.readers.load_raw`.
        raw_files: manifest ``raw_path`` → file on disk, for pseudonymous raw paths; a path
            not in it (or no mapping) is read as it is written.

    Returns:
        Which images were converted and which skipped as unchanged.

    Raises:
        ConvertError: listing every image that failed, after the others were converted and
            recorded; the output manifest is then left as it was.
    """
    start = time.perf_counter()
    frame = manifest.copy() if isinstance(manifest, pd.DataFrame) else read_manifest(Path(manifest))
    check(frame)
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_NAME
    state = _load_state(state_path)
    params = convert_params(cfg)
    p_hash = params_hash(params)

    tasks = _tasks(frame, images_dir, params, p_hash, state, raw_files)
    png_paths = {t.image_id: t.png_path for t in tasks}

    workers = resolve_workers(cfg.workers, len(tasks))
    outcomes = {o.image_id: o for o in _run(tasks, workers, loader, progress, f"convert {out_dir.name}")}

    failures = _record(tasks, outcomes, state, p_hash)
    atomic_write_json(state_path, {"version": 1, "params": params, "images": state})
    if failures:
        raise ConvertError(failures, total=len(tasks))

    frame["converted_path"] = frame["image_id"].map(png_paths).astype(object)
    frame["converted_sha256"] = (
        frame["image_id"].map({k: o.png_sha256 for k, o in outcomes.items()}).astype(object)
    )
    manifest_path = out_dir / MANIFEST_NAME
    write_manifest(frame, manifest_path)
    return ConvertResult(
        out_dir=out_dir,
        manifest_path=manifest_path,
        state_path=state_path,
        converted=tuple(t.image_id for t in tasks if outcomes[t.image_id].status == "converted"),
        skipped=tuple(t.image_id for t in tasks if outcomes[t.image_id].status == "skipped"),
        workers=workers,
        seconds=time.perf_counter() - start,
        params=params,
    )


def _tasks(
    frame: pd.DataFrame,
    images_dir: Path,
    params: dict[str, Any],
    p_hash: str,
    state: Mapping[str, dict[str, Any]],
    raw_files: Mapping[str, Path] | None,
) -> list[_Task]:
    """One conversion task per manifest row, with the state recorded for it last time."""
    tasks: list[_Task] = []
    for row in frame.itertuples(index=False):
        image_id = str(row.image_id)
        sha = row.raw_sha256
        shown = str(row.raw_path)
        tasks.append(
            _Task(
                image_id=image_id,
                raw_path=str((raw_files or {}).get(shown, shown)),
                shown_path=shown,
                manifest_sha256=str(sha) if isinstance(sha, str) and sha else None,
                png_path=(images_dir / f"{image_id}.png").as_posix(),
                params=params,
                params_hash=p_hash,
                previous=state.get(image_id),
            )
        )
    return tasks


def _record(
    tasks: Sequence[_Task],
    outcomes: Mapping[str, _Outcome],
    state: dict[str, dict[str, Any]],
    p_hash: str,
) -> list[ConvertFailure]:
    """Record each converted/skipped image in ``state``; the failures (their entries kept)."""
    failures: list[ConvertFailure] = []
    for task in tasks:
        out = outcomes[task.image_id]
        if out.status == "failed":
            failures.append(ConvertFailure(task.image_id, task.shown_path, out.reason))
            continue  # keep the earlier state entry (its PNG was not touched)
        state[task.image_id] = {
            "raw_sha256": out.raw_sha256,
            "params_hash": p_hash,
            "png_sha256": out.png_sha256,
        }
    return failures


def convert_stage(
    cfg: Config, dataset: str, layout: Layout | None = None, progress: bool = True
) -> dict[str, Any]:
    """Convert every ingested image to a padded PNG under ``data/processed/<dataset>``.

    Then checks every PNG against the converted manifest (present, readable, square, one
    size, sha256 as recorded): :func:`~mammoflow.data.validate.validate_converted` raises
    ``ConvertedImagesInvalid`` naming the images that fail.
    """
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.raw import raw_files
    from mammoflow.data.validate import validate_converted

    kind = cfg.dataset(dataset).kind
    layout = layout or Layout()
    result = convert_dataset(
        layout.interim(dataset) / "manifest.parquet",
        layout.processed(dataset),
        cfg.convert,
        progress=progress,
        raw_files=raw_files(cfg, dataset, layout),
    )
    validate_converted(read_manifest(result.manifest_path), kind, dataset)
    return {
        "dataset": dataset,
        "converted": len(result.converted),
        "skipped": len(result.skipped),
        "seconds": round(result.seconds, 2),
    }
