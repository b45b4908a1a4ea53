"""Frozen-prefix feature cache, image loading and precision selection.

The frozen prefix of a backbone never changes during training, so its outputs are computed once
per :class:`CacheKey` (dataset, backbone, converted-image content hash, weights sha256, N and cut
layer, input size, precision, stored dtype) and stored as
``<cache_dir>/<dataset>-<backbone>-<digest>.npy`` plus a ``.json`` sidecar. Every fold, epoch and
tuning trial with the same key reuses them; changing the images, the weights or N changes the key
(a miss).

Bounded memory: the ``.npy`` is written batch by batch as extraction runs (never a whole array in
memory) into a temp file that is renamed into place once complete, its sha256 computed on the way
and recorded in the sidecar (written last). It is stored as ``train.feature_dtype`` (float16 by
default: half the disk and page traffic; float32 keeps the extracted values exactly) and read
back memory-mapped, verified against the recorded sha256 first — a truncated or bit-flipped file
is a miss (recomputed, never trained on). The trainer decides from ``MAMMOFLOW_MEMORY_BUDGET_MB``
whether to hold it on the device in float32 or stream it in chunks.

With ``train.augment`` on, images differ every epoch, so caching is off (and the log says so):
:func:`prepare_inputs` then returns the images for end-to-end training.

Keras / TensorFlow are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammoflow.data.images import UINT16_PER_MODEL_UNIT
from mammoflow.files import atomic_file, atomic_write_json, sha256_file
from mammoflow.models.build import BackboneModel, check_precision, extraction_model
from mammoflow.quiet import load_tensorflow

log = logging.getLogger(__name__)

#: Bump when the stored layout or the preprocessing changes (invalidates every cache entry).
#: 2: stored dtype in the key, sha256 of the .npy in the sidecar.
CACHE_FORMAT = 2
DEFAULT_CACHE_DIR = Path(".cache/features")
#: How the cache stores features on disk (``train.feature_dtype``).
FEATURE_DTYPES = ("float16", "float32")
#: Resident memory the trainer may use for features (an execution setting: never changes numbers).
MEMORY_BUDGET_ENV = "MAMMOFLOW_MEMORY_BUDGET_MB"
DEFAULT_MEMORY_BUDGET_MB = 2048

#: ``progress(done, total)`` — called after every batch.
BatchProgress = Callable[[int, int], None]


class FeatureError(ValueError):
    """Images or settings unusable for feature extraction; the message names them."""


def memory_budget_bytes(value: str | None = None) -> int:
    """``$MAMMOFLOW_MEMORY_BUDGET_MB`` (default 2048) in bytes.

    Args:
        value: the setting's text (read from the environment when None).

    Raises:
        FeatureError: not a positive whole number of MB.
    """
    text = os.environ.get(MEMORY_BUDGET_ENV) if value is None else value
    if text is None or not text.strip():
        return DEFAULT_MEMORY_BUDGET_MB << 20
    try:
        mb = int(text)
    except ValueError:
        mb = 0
    if mb < 1:
        raise FeatureError(
            f"{MEMORY_BUDGET_ENV}={text!r}; set a positive number of MB, e.g. 2048, or unset it"
        )
    return mb << 20


# ----------------------------------------------------------------------------- precision


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True if the CPU flags include ``amx_bf16`` or ``avx512_bf16``.

    Args:
        cpuinfo: text of /proc/cpuinfo (read when None; unreadable → False).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def gpu_bf16_support() -> bool | None:
    """None without a GPU; otherwise whether every visible GPU has compute capability ≥ 8.0."""
    tf = load_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    caps = [tf.config.experimental.get_device_details(g).get("compute_capability") for g in gpus]
    return all(c is not None and tuple(c) >= (8, 0) for c in caps)


def resolve_precision(
    setting: str, *, cpuinfo: str | None = None, gpu_bf16: bool | str | None = "detect"
) -> str:
    """Turn ``train.precision`` into a Keras dtype policy name.

    ``auto`` → ``mixed_bfloat16`` on a GPU with bf16 (compute capability ≥ 8.0) or, without a
    GPU, on a CPU with AMX / AVX512-BF16; otherwise ``float32``.

    Args:
        setting: ``auto``, ``float32``, ``mixed_bfloat16`` or ``mixed_float16``.
        cpuinfo: /proc/cpuinfo text override (tests).
        gpu_bf16: GPU answer override (tests); ``"detect"`` asks TensorFlow.

    Raises:
        FeatureError: for an unknown setting.
    """
    if setting != "auto":
        try:
            return check_precision(setting)
        except ValueError as exc:
            raise FeatureError(f"train.precision={setting!r}: {exc}") from None
    gpu = gpu_bf16_support() if gpu_bf16 == "detect" else gpu_bf16
    if gpu is not None:
        return "mixed_bfloat16" if gpu else "float32"
    return "mixed_bfloat16" if cpu_supports_bf16(cpuinfo) else "float32"


# ----------------------------------------------------------------------------- images


def images_hash(frame: pd.DataFrame) -> str:
    """sha256 over the sorted ``image_id`` + converted-content hash of every row.

    Uses ``converted_sha256`` when present, else hashes the file at ``converted_path``.

    Raises:
        FeatureError: a row has neither a hash nor a readable converted file.
    """
    h = hashlib.sha256()
    has_sha = "converted_sha256" in frame.columns
    for row in frame.sort_values("image_id").itertuples(index=False):
        digest = getattr(row, "converted_sha256", None) if has_sha else None
        if not isinstance(digest, str) or not digest:
            path = Path(str(row.converted_path))
            if not path.is_file():
                raise FeatureError(
                    f"image {row.image_id!r}: converted file {str(path)!r} not found; "
                    "run `mammoflow convert` first"
                )
            digest = sha256_file(path)
        h.update(f"{row.image_id}\t{digest}\n".encode())
    return h.hexdigest()


def _png_dataset(paths: Sequence[str], size: int) -> Any:
    tf = load_tensorflow()

    def load(path: Any) -> Any:
        raw = tf.io.read_file(path)
        # uint16 decoding scales 8-bit PNGs by 257, so one division maps both depths to [0, 255]
        # (serving: images.to_model_range)
        img = tf.io.decode_png(raw, channels=1, dtype=tf.uint16)
        img = tf.cast(img, tf.float32) / UINT16_PER_MODEL_UNIT
        return tf.image.resize(img, (size, size), method="bilinear", antialias=False)

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load_images(paths: Sequence[Path | str], size: int) -> np.ndarray:
    """Load grey PNGs (8- or 16-bit) as float32 ``(n, size, size, 1)`` in [0, 255], bilinear-resized.

    Raises:
        FeatureError: a file is missing.
    """
    tf = load_tensorflow()

    strs = [str(p) for p in paths]
    missing = [p for p in strs if not Path(p).is_file()]
    if missing:
        raise FeatureError(f"{len(missing)} image files not found, e.g. {missing[0]!r}")
    if not strs:
        return np.zeros((0, size, size, 1), np.float32)
    batches = _png_dataset(strs, size).batch(64).prefetch(tf.data.AUTOTUNE)
    return np.concatenate([b.numpy() for b in batches], axis=0)


# ----------------------------------------------------------------------------- extraction


def extractor(bb: BackboneModel) -> Any:
    """The compiled ``images (input_size) → float32 prefix features`` function of ``bb``.

    Traced once per backbone (kept in ``bb.compiled``) and shared by extraction, the uncached
    training path and BatchNorm recalibration.
    """
    tf = load_tensorflow()

    forward: Any = bb.compiled.get("extract")
    if forward is None:
        model = extraction_model(bb)
        size = bb.input_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)])
        def forward(x: Any) -> Any:
            return tf.cast(model(x, training=False), tf.float32)

        bb.compiled["extract"] = forward
    return forward


def iter_features(
    bb: BackboneModel,
    images: np.ndarray | Sequence[Path | str],
    *,
    batch_size: int = 16,
    progress: BatchProgress | None = None,
) -> Iterator[np.ndarray]:
    """Run the frozen prefix over images, batched with tf.data prefetching; yield float32 batches.

    Args:
        bb: the backbone (its precision decides the compute dtype).
        images: grey float array ``(n, h, w, 1)`` in [0, 255], or PNG paths (read batch by batch).
        batch_size: images per forward pass.
        progress: ``progress(done, total)`` after each batch.
    """
    tf = load_tensorflow()

    if batch_size < 1:
        raise FeatureError(f"batch_size={batch_size}; use a positive batch size")
    if isinstance(images, np.ndarray):
        total = len(images)
        ds = tf.data.Dataset.from_tensor_slices(images.astype(np.float32, copy=False))
        resize = images.shape[1:3] != (bb.input_size, bb.input_size)
        if resize:
            size = bb.input_size
            ds = ds.map(lambda x: tf.image.resize(x, (size, size), method="bilinear"))
    else:
        paths = [str(p) for p in images]
        total = len(paths)
        ds = _png_dataset(paths, bb.input_size)
    if total == 0:
        return
    forward = extractor(bb)
    done = 0
    for batch in ds.batch(batch_size).prefetch(tf.data.AUTOTUNE):
        feats = forward(batch).numpy()
        done += len(feats)
        yield feats
        if progress is not None:
            progress(done, total)


def extract_features(
    bb: BackboneModel,
    images: np.ndarray | Sequence[Path | str],
    *,
    batch_size: int = 16,
    progress: BatchProgress | None = None,
) -> np.ndarray:
    """:func:`iter_features` gathered into one float32 array ``(n, *bb.feature_shape)``."""
    out = np.zeros((len(images), *bb.feature_shape), np.float32)
    done = 0
    for feats in iter_features(bb, images, batch_size=batch_size, progress=progress):
        out[done : done + len(feats)] = feats
        done += len(feats)
    return out


# ----------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CacheKey:
    """Everything the prefix features depend on."""

    dataset: str
    backbone: str
    images_sha256: str
    weights_sha256: str
    trainable_layers: int
    cut_layer: str
    input_size: int
    precision: str
    dtype: str = "float32"
    format: int = CACHE_FORMAT

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the key."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def stem(self) -> str:
        """File stem ``<dataset>-<backbone>-<digest[:16]>``."""
        return f"{self.dataset}-{self.backbone}-{self.digest[:16]}"


@dataclass
class FeatureSet:
    """Cached prefix features for a set of images (rows in ``image_ids`` order).

    ``features`` is the cache file memory-mapped read-only (float16 or float32), or an array.
    """

    image_ids: tuple[str, ...]
    features: np.ndarray
    key: CacheKey | None = None
    hit: bool = False
    seconds: float = 0.0
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Features for ``ids`` in that order.

        Raises:
            FeatureError: an id has no features.
        """
        if not self._index:
            self._index = {k: i for i, k in enumerate(self.image_ids)}
        try:
            rows = np.asarray([self._index[i] for i in ids], np.int64)
        except KeyError as exc:
            raise FeatureError(
                f"no features for image {exc.args[0]!r}; rebuild the cache"
            ) from None
        return read_rows(self.features, rows)

    @property
    def nbytes_float32(self) -> int:
        """Bytes of every feature as float32 (what the in-memory training path holds)."""
        return int(np.prod(self.features.shape, dtype=np.int64)) * 4


def read_rows(source: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``source[rows]`` as a new float32 array, read in ascending row order.

    On a memory map, ascending order turns a shuffled batch into forward reads of the file; the
    rows are put back in the order asked. Values are exact (float16 → float32 is lossless).
    """
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *source.shape[1:]), np.float32)
    out[order] = source[rows[order]]
    return out


@dataclass
class ImageSet:
    """Grey images ``(n, size, size, 1)`` in [0, 255] for end-to-end training (no cache)."""

    image_ids: tuple[str, ...]
    images: np.ndarray
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Images for ``ids`` in that order.

        Raises:
            FeatureError: an id has no image.
        """
        if not self._index:
            self._index = {k: i for i, k in enumerate(self.image_ids)}
        try:
            return self.images[[self._index[i] for i in ids]]
        except KeyError as exc:
            raise FeatureError(f"no image for {exc.args[0]!r}") from None


def check_feature_dtype(dtype: str) -> str:
    """``dtype`` if the cache can store it.

    Raises:
        FeatureError: another dtype.
    """
    if dtype not in FEATURE_DTYPES:
        raise FeatureError(f"train.feature_dtype={dtype!r}; use one of {', '.join(FEATURE_DTYPES)}")
    return dtype


def cache_key(
    frame: pd.DataFrame, bb: BackboneModel, dataset: str, dtype: str = "float32"
) -> CacheKey:
    """The cache key of ``frame``'s converted images through ``bb``'s prefix, stored as ``dtype``."""
    return CacheKey(
        dataset=dataset,
        backbone=bb.name,
        images_sha256=images_hash(frame),
        weights_sha256=bb.weights.sha256,
        trainable_layers=bb.trainable_layers,
        cut_layer=bb.plan.cut_layer,
        input_size=bb.input_size,
        precision=bb.precision,
        dtype=check_feature_dtype(dtype),
    )


#: (path, size, mtime, inode) of cache files whose sha256 this process checked.
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _load(stem: Path, key: CacheKey, ids: tuple[str, ...]) -> np.ndarray | None:
    """The cache file of ``key`` memory-mapped, or None when absent, stale or corrupt.

    Its sha256 must equal the one recorded in the sidecar when it was written (checked once per
    process and file version): a truncated or bit-flipped file is a miss, never trained on.
    """
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != asdict(key) or tuple(meta.get("image_ids", ())) != ids:
            log.warning("feature cache %s does not match its key; recomputing", data_path)
            return None
        stat = _stat_key(data_path)
        if stat not in _VERIFIED:
            if sha256_file(data_path) != meta.get("sha256"):
                log.warning(
                    "feature cache %s fails its recorded sha256 (truncated or corrupted); "
                    "recomputing",
                    data_path,
                )
                return None
            _VERIFIED.add(stat)
        arr = np.load(data_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("feature cache %s unreadable (%s); recomputing", data_path, exc)
        return None
    if arr.shape != (len(ids), *meta.get("shape", [])[1:]) or str(arr.dtype) != key.dtype:
        log.warning("feature cache %s has the wrong shape or dtype; recomputing", data_path)
        return None
    return arr


class _HashingWriter:
    """A binary file that hashes what is written to it (the header included)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        return int(self.fh.write(data))


def write_cache(
    path: Path, batches: Iterator[np.ndarray], shape: tuple[int, ...], dtype: str
) -> str:
    """Write an ``.npy`` of ``shape`` / ``dtype`` batch by batch; return its sha256.

    Goes through a temp file in the same folder, fsynced and renamed into place only when
    complete, so a crash or a full disk (``ENOSPC``) never leaves a file a later run would read.

    Raises:
        FeatureError: a value does not fit ``dtype`` (float16 overflows above 65504), or fewer
            rows came than ``shape`` says.
    """
    with atomic_file(path) as fh:
        out = _HashingWriter(fh)
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(out, header)
        done = 0
        for feats in batches:
            with np.errstate(over="ignore"):  # overflow is checked just below
                stored = feats.astype(dtype)
            if not np.isfinite(stored).all() and np.isfinite(feats).all():
                raise FeatureError(
                    f"features of rows {done}..{done + len(feats) - 1} exceed {dtype}'s "
                    f"range (max |x| = {float(np.abs(feats).max()):.4g}); set "
                    "train.feature_dtype: float32"
                )
            out.write(np.ascontiguousarray(stored).tobytes())
            done += len(feats)
        if done != shape[0]:
            raise FeatureError(f"extraction gave {done} rows for {shape[0]} images")
    return out.sha.hexdigest()


def cached_features(
    frame: pd.DataFrame,
    bb: BackboneModel,
    *,
    dataset: str,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    batch_size: int = 16,
    progress: BatchProgress | None = None,
    dtype: str = "float32",
) -> FeatureSet:
    """Prefix features for every row of ``frame`` (manifest rows with ``converted_path``).

    Memory-maps ``<cache_dir>/<stem>.npy`` on a hit (after checking its recorded sha256); on a
    miss extracts and writes it batch by batch (see :func:`write_cache`), then maps it.

    Args:
        dtype: how the features are stored (``float16`` or ``float32``; part of the key).
    """
    t0 = time.perf_counter()
    ordered = frame.sort_values("image_id").reset_index(drop=True)
    ids = tuple(str(i) for i in ordered["image_id"])
    key = cache_key(ordered, bb, dataset, dtype)
    stem = Path(cache_dir) / key.stem()
    data_path, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    arr = _load(stem, key, ids)
    if arr is not None:
        log.info("feature cache hit: %s (%d images, %s)", data_path, len(ids), dtype)
        return FeatureSet(ids, arr, key, hit=True, seconds=time.perf_counter() - t0)
    log.info("feature cache miss: %s; extracting %d images (%s)", data_path, len(ids), dtype)
    meta_path.unlink(missing_ok=True)  # the sidecar names a complete, verified file only
    shape = (len(ids), *bb.feature_shape)
    batches = iter_features(
        bb, list(ordered["converted_path"].astype(str)), batch_size=batch_size, progress=progress
    )
    sha = write_cache(data_path, batches, shape, dtype)
    atomic_write_json(
        meta_path,
        {
            "key": asdict(key),
            "digest": key.digest,
            "image_ids": list(ids),
            "shape": list(shape),
            "dtype": dtype,
            "sha256": sha,
        },
    )
    _VERIFIED.add(_stat_key(data_path))
    arr = np.load(data_path, mmap_mode="r", allow_pickle=False)
    return FeatureSet(ids, arr, key, hit=False, seconds=time.perf_counter() - t0)


def prepare_inputs(
    frame: pd.DataFrame,
    bb: BackboneModel,
    *,
    dataset: str,
    feature_cache: bool = True,
    augment: bool = False,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    batch_size: int = 16,
    progress: BatchProgress | None = None,
    dtype: str = "float32",
) -> FeatureSet | ImageSet:
    """Cached features when allowed, else the images (augmentation or ``train.feature_cache: false``)."""
    if feature_cache and not augment:
        return cached_features(
            frame,
            bb,
            dataset=dataset,
            cache_dir=cache_dir,
            batch_size=batch_size,
            progress=progress,
            dtype=dtype,
        )
    why = "train.augment is on" if augment else "train.feature_cache is off"
    log.info("feature cache disabled: %s; training end to end on images", why)
    ordered = frame.sort_values("image_id").reset_index(drop=True)
    images = load_images(list(ordered["converted_path"].astype(str)), bb.input_size)
    return ImageSet(tuple(str(i) for i in ordered["image_id"]), images)
