"""Serve a champion on image FILES: an MLflow pyfunc wrapper that ``mlflow models serve`` runs.

The registered champion is a Keras model whose input is the converted canvas as a tensor: a
request body of ``convert.size``² floats as a JSON nested list (~2 MB for 512 px) that the
scoring server spends over a second parsing. The wrapper takes the image file's own bytes
instead (base64 in a ``dataframe_split`` column, ~1.4× the file), decodes them with the readers
:mod:`mammoflow.serving.predict` uses (DICOM with ingestion's acceptance rules, PNG, PGM; the format
told by its magic bytes), converts them with ``convert.prepare_image`` and calls the same Keras
champion (calibrated), so a served probability is ``mammoflow predict``'s for the same file.

The wrapper is an ``mlflow.pyfunc`` model (:mod:`mammoflow.tracking.pyfunc` around the
MLflow-free :class:`ImageClassifier`) saved into ``.cache/serving/`` under a key of the
tracking store, the pinned model version (``@champion`` resolved), the settings it applies and
:data:`WRAPPER_VERSION`; it holds a copy of the champion's files, so serving it needs neither
the tracking store nor a rebuild until the champion (or the settings) change. It is built in a
temporary folder and renamed into place, so a crash never leaves a half-saved wrapper.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mammoflow.config import Config
from mammoflow.quiet import load_tensorflow

if TYPE_CHECKING:
    from mammoflow.tracking import Tracker

#: The request's column holding each image file's bytes (base64 in JSON).
IMAGE_COLUMN = "image"
#: Bump when the wrapper's saved form or behaviour changes: it is part of the cache key.
#: 2: the pickled model is tracking.pyfunc.PyfuncScorer around a plain ImageClassifier.
WRAPPER_VERSION = "2"
#: ``file``: the wrapper, the image files' bytes; ``tensor``: the Keras champion as registered.
FORMATS = ("file", "tensor")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pinned:
    """A model URI and the registry version it named when the wrapper was built."""

    uri: str  # as given (``models:/mammoflow-<ds>@champion``)
    pinned: str  # ``models:/<name>/<version>`` for a registry URI, else ``uri``
    name: str  # "" for a run or path URI
    version: str


def pin(tracker: Tracker, uri: str) -> Pinned:
    """Resolve a registry alias to its version (the wrapper serves that version until rebuilt).

    Raises:
        ValueError: the alias or model names nothing in the store.
    """
    name, version = tracker.resolve_version(uri)
    aliased = uri.startswith("models:/") and "@" in uri
    return Pinned(uri, f"models:/{name}/{version}" if aliased else uri, name, version)


def wrapper_config(cfg: Config, dataset: str, model: Pinned) -> dict[str, Any]:
    """What the wrapper applies (its ``model_config``): conversion, DICOM rules, classes, model."""
    from mammoflow.data.prepare import acceptance
    from mammoflow.serving.predict import class_names

    cfg = cfg.for_dataset(dataset)
    conv = cfg.convert
    return {
        "dataset": dataset,
        "classes": list(class_names(cfg, dataset)),
        "convert": {"size": conv.size, "bit_depth": conv.bit_depth, "crop": conv.crop_to_breast},
        "acceptance": dataclasses.asdict(acceptance(cfg, dataset)),
        "model": dataclasses.asdict(model),
        "wrapper_version": WRAPPER_VERSION,
    }


def _fingerprint(uri: str) -> str:
    """Sizes and times of a local model folder's files (a path can change; a version cannot)."""
    path = Path(uri.removeprefix("file://"))
    if not path.is_dir():
        return ""
    return ";".join(
        f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(path.rglob("*"))
        if p.is_file()
    )


def cache_dir(store: str, config: dict[str, Any], root: Path) -> Path:
    """``root/<name>-v<version>-<key>``: one folder per store, pinned model and settings."""
    model = config["model"]
    key_text = json.dumps(
        {"store": store, "config": config, "files": _fingerprint(model["pinned"])}, sort_keys=True
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    label = f"{model['name']}-v{model['version']}" if model["version"] else "model"
    return root / f"{label}-{key}"


def ensure_wrapper(
    cfg: Config,
    dataset: str,
    model_uri: str,
    root: Path = Path(".cache") / "serving",
    tracker: Tracker | None = None,
) -> tuple[Path, bool]:
    """The wrapper folder serving ``model_uri`` on files, and whether it was built just now.

    Raises:
        ValueError: the model cannot be found or loaded, or it does not output one probability
            per class of ``dataset``.
    """
    from mammoflow.tracking import Tracker

    tracker = tracker or Tracker()
    config = wrapper_config(cfg, dataset, pin(tracker, model_uri))
    dest = cache_dir(tracker.uri, config, root)
    if (dest / "MLmodel").is_file():
        return dest, False
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
    try:
        _build(tracker, config, scratch)
        try:
            (scratch / "wrapper").rename(dest)  # atomic: a reader sees all of it or nothing
        except OSError:
            if not (dest / "MLmodel").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest, True


def _build(tracker: Tracker, config: dict[str, Any], scratch: Path) -> None:
    """Download the pinned champion, check it, save the pyfunc wrapper to ``scratch/wrapper``."""
    from mammoflow.models.build import model_temperature
    from mammoflow.serving.predict import check_outputs
    from mammoflow.tracking.pyfunc import save_scorer

    model = config["model"]
    local, keras_model = tracker.download_keras(model["pinned"], scratch / "champion", model["uri"])
    check_outputs(keras_model, len(config["classes"]), model["uri"])
    if model_temperature(keras_model) is None:
        log.warning(
            "model %s has no temperature layer: it serves uncalibrated probabilities "
            "(retrain to serve calibrated ones)",
            model["uri"],
        )
    save_scorer(
        scratch / "wrapper",
        ImageClassifier(),
        {"champion": local},
        config,
        signature(config["classes"]),
        _requirements(),
    )


def signature(classes: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Input: one binary column of file bytes; output: a probability per class and the class
    (``(inputs, outputs)``, each ``[(column, MLflow type)]``)."""
    outputs = [(f"p_{c}", "double") for c in classes]
    outputs += [(n, "string") for n in ("predicted", "model_name", "model_version")]
    return [(IMAGE_COLUMN, "binary")], outputs


def _requirements() -> list[str]:
    """Pinned versions of what the wrapper imports (``--env-manager local`` runs this venv);
    one not installed is left out with a warning naming it."""
    from mammoflow.tracking.models import pinned_requirements

    return pinned_requirements(
        ("mlflow", "tensorflow", "keras", "numpy", "pandas", "pydicom", "pillow")
    )


def compiled(model: Any, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """``(n, size, size) → (n, classes)`` probabilities: the Keras model's own graph, traced
    once for any batch size.

    ``model.predict`` builds a ``tf.data`` pipeline on every call: ~3× the forward pass itself
    for one image (benchmarks/profile_serving.py). The traced call runs the same layers and
    weights; the served probabilities equal ``mammoflow predict``'s to 1e-5
    (tests/integration/test_serving.py). It is safe to call from several threads at once.
    """
    tf = load_tensorflow()

    spec = tf.TensorSpec([None, size, size, 1], tf.float32)
    call = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(call(np.asarray(batch, np.float32)[..., None]), dtype=np.float32)

    return run


class RefusedInputError(ValueError):
    """A request's rows refused (not DICOM/PNG/PGM, refused by the DICOM rules, corrupt, none):
    the scoring server answers HTTP 400 with the message (see mammoflow.tracking.pyfunc)."""


class ImageClassifier:
    """The champion on image files: bytes in (column ``image``), one row of probabilities out.

    A request with a bad row (not DICOM/PNG/PGM, refused by the DICOM rules, corrupt) scores
    nothing and gets HTTP 400 whose message names every bad row and why. Served as a pyfunc
    model through :class:`mammoflow.tracking.pyfunc.PyfuncScorer`.
    """

    refused: type[Exception] = RefusedInputError

    def load(self, config: Mapping[str, Any], models: Mapping[str, Any]) -> None:
        """Take the settings and the champion's copy (loaded); one warm-up pass (traces it)."""
        from mammoflow.config import ConvertConfig
        from mammoflow.data.dicom import Acceptance
        from mammoflow.serving.predict import check_outputs

        self.classes: list[str] = list(config["classes"])
        conv = config["convert"]
        self.convert = ConvertConfig(
            size=conv["size"], bit_depth=conv["bit_depth"], crop_to_breast=conv["crop"]
        )
        self.rules = Acceptance(**config["acceptance"])
        self.model_name = str(config["model"]["name"] or config["model"]["uri"])
        self.model_version = str(config["model"]["version"])
        self.keras = models["champion"]
        check_outputs(self.keras, len(self.classes), config["model"]["uri"])
        self.call = compiled(self.keras, self.convert.size)
        self.call(np.zeros((1, self.convert.size, self.convert.size), np.float32))  # trace

    def predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        """Score each row's file bytes; a bad row is a :class:`RefusedInputError` naming it."""
        probs = self.call(np.stack(self.pixels(list(model_input[IMAGE_COLUMN]))))
        frame = pd.DataFrame(
            {f"p_{c}": probs[:, i].astype(np.float64) for i, c in enumerate(self.classes)}
        )
        frame["predicted"] = [self.classes[int(i)] for i in np.argmax(probs, axis=1)]
        frame["model_name"] = self.model_name
        frame["model_version"] = self.model_version
        return frame

    def pixels(self, rows: Sequence[Any]) -> list[np.ndarray]:
        """Each row decoded and converted as ``mammoflow predict`` does.

        Raises:
            RefusedInputError: naming every bad row (HTTP 400 when served).
        """
        from mammoflow.data.prepare import model_input
        from mammoflow.data.readers import load_bytes

        ready: list[np.ndarray] = []
        problems: list[str] = []
        for i, value in enumerate(rows):
            name = f"{IMAGE_COLUMN} row {i}"
            try:
                data = value if isinstance(value, bytes) else bytes(value)
                ready.append(model_input(load_bytes(data, name, self.rules), self.convert))
            except Exception as exc:  # every bad row is reported together, none is scored
                text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                problems.append(text if text.startswith(name) else f"{name}: {text}")
        if not rows:
            problems.append(f"no rows: send one base64 image file per row of {IMAGE_COLUMN!r}")
        if problems:
            raise RefusedInputError(
                f"{len(problems)} of {len(rows)} image(s) refused, none scored:\n"
                + "\n".join(problems)
            )
        return ready


# --------------------------------------------------------------------------- request bodies


def file_body(paths: Sequence[Path]) -> dict[str, Any]:
    """The wrapper's JSON body: each file's bytes base64-encoded, one row per file.

    ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], …]}}``; the scoring
    server decodes the binary column. Only the format is checked here (the server decodes).

    Raises:
        ValueError: a missing file, or one that is not DICOM, PNG or PGM by its magic bytes.
    """
    from mammoflow.data.readers import sniff_format

    rows = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        if sniff_format(data) is None:
            raise ValueError(
                f"{path}: not a DICOM (Part 10), PNG or binary PGM (P5) file by its first bytes "
                f"{data[:16]!r}; the served model reads only these"
            )
        rows.append([base64.b64encode(data).decode("ascii")])
    return {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": rows}}


def serve_env() -> dict[str, str]:
    """The environment ``mlflow models serve`` needs: the venv's bin on PATH (for uvicorn)."""
    import sys

    from mammoflow.tracking import tracking_uri

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "PATH": path}
