"""Resolve ``model.weights`` to a file on disk (or none), never falling back silently.

``model.weights`` is one of:

* ``"imagenet"``: the Keras-cached ImageNet no-top file (``$KERAS_HOME/models/<file>``, by default
  ``~/.keras/models/<file>``); downloaded through Keras when missing. Offline with no cached file
  → :class:`WeightsError` naming the exact file and directory.
* a path to a local weights file (``.h5`` or ``.weights.h5``) for the same architecture.
* ``"none"``: random initialisation.

Every result records the :class:`WeightsInfo` (source, path, sha256) it was trained from.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from mammoflow.config import Config
from mammoflow.files import sha256_file
from mammoflow.models.backbones import KERAS_CACHE_SUBDIR, get_spec
from mammoflow.quiet import load_keras

WeightsSource = Literal["imagenet", "file", "none"]


class WeightsError(ValueError):
    """``model.weights`` cannot be satisfied; the message says which file to place where."""


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone was built from.

    Attributes:
        source: ``imagenet``, ``file`` or ``none``.
        path: absolute path of the weights file, or None for ``none``.
        sha256: hex sha256 of the file, or ``"none"``.
    """

    source: WeightsSource
    path: str | None
    sha256: str

    def as_dict(self) -> dict[str, str | None]:
        """Plain dict for JSON / tracking."""
        return asdict(self)

    @property
    def keras_arg(self) -> str | None:
        """The ``weights=`` argument to pass to the ``keras.applications`` constructor."""
        return self.path


NO_WEIGHTS = WeightsInfo(source="none", path=None, sha256="none")


def keras_cache_dir(keras_home: Path | str | None = None) -> Path:
    """Directory where Keras keeps downloaded model weights.

    Args:
        keras_home: Keras home to use; default ``$KERAS_HOME`` or ``~/.keras`` (read at call time).
    """
    if keras_home is None:
        keras_home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(keras_home).expanduser() / KERAS_CACHE_SUBDIR


def _download(backbone: str, keras_home: Path) -> Path:
    keras = load_keras()

    spec = get_spec(backbone)
    fetched = keras.utils.get_file(
        spec.weights_file,
        spec.weights_url,
        cache_subdir=KERAS_CACHE_SUBDIR,
        cache_dir=str(keras_home),
        file_hash=spec.weights_md5,
    )
    return Path(fetched)


def resolve_weights(
    backbone: str,
    weights: str,
    *,
    keras_home: Path | str | None = None,
    allow_download: bool = True,
) -> WeightsInfo:
    """Turn ``model.weights`` into a :class:`WeightsInfo` with the file's sha256.

    Args:
        backbone: registry name (selects the ImageNet file name).
        weights: ``"imagenet"``, ``"none"`` or a path to a local weights file.
        keras_home: Keras home directory (default ``$KERAS_HOME`` or ``~/.keras``).
        allow_download: if False, a missing ImageNet file is an error without trying the network.

    Raises:
        WeightsError: the ImageNet file is neither cached nor downloadable, or the local path
            does not exist.
    """
    spec = get_spec(backbone)
    if weights.strip().lower() == "none":
        return NO_WEIGHTS
    if weights.strip().lower() == "imagenet":
        home = Path(keras_home).expanduser() if keras_home else keras_cache_dir().parent
        cached = home / KERAS_CACHE_SUBDIR / spec.weights_file
        if not cached.is_file():
            why = "downloads are disabled"
            if allow_download:
                try:
                    cached = _download(backbone, home)
                except Exception as exc:  # network, HTTP, hash mismatch: all mean "not here"
                    why = (
                        f"the download from {spec.weights_url} failed ({type(exc).__name__}: {exc})"
                    )
                else:
                    why = ""
            if why or not cached.is_file():
                raise WeightsError(
                    f"model.weights='imagenet' for {backbone!r}: the file {spec.weights_file!r} is "
                    f"not in {cached.parent} and {why or 'it is still missing'}. Place "
                    f"{spec.weights_file} (from {spec.weights_url}) in {cached.parent}, or set "
                    "model.weights to 'none' or to the path of a local weights file."
                )
        return WeightsInfo(
            source="imagenet", path=str(cached.resolve()), sha256=sha256_file(cached)
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"model.weights={weights!r} is neither 'imagenet', 'none' nor an existing file; "
            "give the path of a .h5 / .weights.h5 file for this backbone, or use 'imagenet' or 'none'."
        )
    return WeightsInfo(source="file", path=str(path.resolve()), sha256=sha256_file(path))


def check_weights(cfg: Config, dataset: str, hint: str | None = None) -> dict[str, str]:
    """Resolve ``model.weights`` of ``dataset`` for every backbone now, before any long work.

    Args:
        cfg: the configuration (the dataset's own model keys are applied here).
        dataset: the dataset about to be studied.
        hint: how to run without ImageNet weights on purpose, for the error message.

    Returns:
        backbone → weights source (``imagenet``, ``file`` or ``none``).

    Raises:
        WeightsError: listing every missing file and the folder it belongs in, plus ``hint``.
    """

    cfg = cfg.for_dataset(dataset)
    sources: dict[str, str] = {}
    missing: list[str] = []
    for backbone in cfg.model.backbones:
        try:
            sources[backbone] = resolve_weights(backbone, cfg.model.weights).source
        except WeightsError as exc:
            missing.append(str(exc))
    if missing:
        lines = "\n  - ".join(missing)
        raise WeightsError(
            f"{dataset}: weights missing:\n  - {lines}" + (f"\n{hint}" if hint else "")
        )
    return sources
