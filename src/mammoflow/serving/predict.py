"""Score new mammograms with a registered (or any MLflow) model, through the training readers.

Every file goes through exactly what training's images went through: :func:`read_image` (the
raw readers of :mod:`mammoflow.data.readers`, with ingestion's DICOM acceptance rules, plus grey
PNG), :func:`mammoflow.data.convert.prepare_image` (optional breast crop, aspect-kept resize,
black padding to ``convert.size``, quantization to ``convert.bit_depth``) and the same scaling
to [0, 255] as the feature loader. The logged model resizes itself, so the converted canvases are
fed in batches as they are.

Image ids are pseudonymous: ``i`` + 16 hex digits of the file's sha256 (keyed with HMAC when
``ingest.pseudonymize`` is ``hmac``), never the file name.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from mammoflow.config import Config
from mammoflow.data.prepare import (
    Prepared,
    acceptance,
    prepare,
)

if TYPE_CHECKING:
    from mammoflow.data.dicom import Acceptance
    from mammoflow.tracking import ServingModel

SUFFIXES = (".dcm", ".dicom", ".pgm", ".png")
DEFAULT_BATCH = 16


class PredictError(ValueError):
    """Some files could not be scored; ``failures`` lists each with its reason."""

    def __init__(self, failures: Sequence[ScoreFailure], scored: int) -> None:
        self.failures = list(failures)
        lines = [f"  - {f.path}: {f.reason}" for f in failures]
        super().__init__(
            f"{len(failures)} file(s) could not be scored ({scored} scored):\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class ScoreFailure:
    """One input that could not be scored, and why."""

    path: str
    reason: str


@dataclass
class PredictResult:
    """What :func:`predict_files` did."""

    rows: list[dict[str, Any]]
    failures: list[ScoreFailure]
    seconds: float
    out: Path | None = None
    explained: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Scored images per second (reading, conversion and forward passes)."""
        return len(self.rows) / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- inputs


def find_images(paths: Iterable[Path | str]) -> tuple[list[Path], list[ScoreFailure]]:
    """Files (folders searched recursively) with a scorable suffix; missing paths as failures."""
    files: list[Path] = []
    failures: list[ScoreFailure] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _scorable(p))
            if not found:
                failures.append(ScoreFailure(str(path), f"no {'/'.join(SUFFIXES)} files in it"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            failures.append(ScoreFailure(str(path), "no such file or folder"))
    unique: dict[Path, Path] = {}  # a file named twice (itself and its folder) is scored once
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), failures


def _scorable(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and not path.name.startswith(".")


# --------------------------------------------------------------------------- model


def default_model_uri(dataset: str) -> str:
    """The registry alias of ``dataset``'s champion."""
    from mammoflow.tracking import registered_model_name

    return f"models:/{registered_model_name(dataset)}@champion"


def class_names(cfg: Config, dataset: str) -> tuple[str, ...]:
    """The dataset's classes in label_index order."""
    from mammoflow.data.manifest import CLASSES

    return CLASSES[cfg.dataset(dataset).kind]


def forward(model: Any, batch: NDArray[np.float32]) -> NDArray[np.float32]:
    """One batched forward pass ``(n, size, size) → (n, classes)`` probabilities.

    Through ``model.predict`` (one batch), the compiled path ``mlflow models serve`` runs too,
    so a bfloat16 model gives the served numbers exactly.
    """
    out = model.predict(batch[..., None], batch_size=len(batch), verbose=0)
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- scoring


def batches(
    files: Sequence[Path],
    cfg: Config,
    rules: Acceptance | None,
    key: bytes | None,
    batch_size: int,
) -> Iterator[tuple[list[Prepared], list[ScoreFailure]]]:
    """Prepared inputs ``batch_size`` files at a time, with the files that failed among them."""
    for start in range(0, len(files), batch_size):
        ready: list[Prepared] = []
        failed: list[ScoreFailure] = []
        for path in files[start : start + batch_size]:
            try:
                ready.append(prepare(path, cfg, rules, key))
            except Exception as exc:  # every bad file is reported together at the end
                failed.append(ScoreFailure(str(path), f"{type(exc).__name__}: {exc}"))
        yield ready, failed


def result_row(
    item: Prepared, probs: NDArray[np.float32], classes: Sequence[str], model: Any
) -> dict[str, Any]:
    """One output row: path, id, ``p_<class>`` per class, the predicted class, the model."""
    row: dict[str, Any] = {"path": item.path, "image_id": item.image_id}
    row.update({f"p_{c}": float(p) for c, p in zip(classes, probs, strict=True)})
    row["predicted"] = classes[int(np.argmax(probs))]
    row.update({"model_name": model.name, "model_version": model.version, "model_uri": model.uri})
    return row


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """Write the rows atomically as ``.csv`` or ``.json`` (by the suffix).

    Raises:
        ValueError: another suffix.
    """
    from mammoflow.files import atomic_write_text

    suffix = out.suffix.lower()
    if suffix == ".json":
        atomic_write_text(out, json.dumps(list(rows), indent=2) + "\n")
        return
    if suffix != ".csv":
        raise ValueError(f"--out {str(out)!r}: use a .csv or .json file")
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["path", "image_id", "predicted"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out, buf.getvalue())


def predict_files(
    paths: Sequence[Path | str],
    cfg: Config,
    dataset: str,
    *,
    model_uri: str | None = None,
    out: Path | None = None,
    explain_dir: Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    target_layer: str | None = None,
    raw: bool = False,
) -> PredictResult:
    """Score every image under ``paths`` with ``model_uri`` (default: the dataset's champion).

    The registered model returns calibrated probabilities (its temperature layer); ``raw``
    rebuilds it with T = 1 for the uncalibrated ones. Each row says which it holds.

    Good files are scored even when others fail; the failures are in the result (the caller
    decides the exit code). ``out`` is written atomically; ``explain_dir`` gets a Grad-CAM
    overlay PNG and the raw map (``.npy``) per image.

    Raises:
        ValueError: a bad ``batch_size`` or ``out`` suffix, or a model whose outputs do not
            match the dataset's classes.
    """
    from mammoflow.console import progress as shown
    from mammoflow.data.pseudonym import pseudonymizer
    from mammoflow.tracking import Tracker

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {str(out)!r}: use a .csv or .json file")
    cfg = cfg.for_dataset(dataset)
    classes = class_names(cfg, dataset)
    files, failures = find_images(paths)
    model, calibration = calibration_mode(
        Tracker().load_serving_model(model_uri or default_model_uri(dataset)), raw
    )
    check_outputs(model.model, len(classes), model.uri)
    key = pseudonymizer(cfg.ingest.pseudonymize).key
    rules = acceptance(cfg, dataset)
    result = PredictResult(rows=[], failures=failures, seconds=0.0, out=out)
    start = time.perf_counter()
    with shown("predict", len(files), enabled=progress) as bar:
        for ready, failed in batches(files, cfg, rules, key, batch_size):
            result.failures.extend(failed)
            if ready:
                probs = forward(model.model, np.stack([r.pixels for r in ready]))
                result.rows.extend(
                    result_row(r, p, classes, model) | calibration
                    for r, p in zip(ready, probs, strict=True)
                )
                if explain_dir is not None:
                    result.explained.extend(
                        explain_batch(model.model, ready, probs, explain_dir, target_layer)
                    )
            bar.advance(len(ready) + len(failed))
    result.seconds = time.perf_counter() - start
    if out is not None:
        write_rows(result.rows, out)
    return result


def calibration_mode(model: ServingModel, raw: bool) -> tuple[ServingModel, dict[str, Any]]:
    """The model to score with, and the columns saying what its probabilities are.

    A calibrated model (a ``temperature`` layer) is used as is, or with T = 1 when ``raw``; a
    model without one (trained before calibrated serving) gives raw probabilities either way,
    with a warning when calibrated ones were asked for.
    """
    import dataclasses
    import logging

    from mammoflow.models.build import model_temperature, with_temperature

    t = model_temperature(model.model)
    if t is None:
        if not raw:
            logging.getLogger(__name__).warning(
                "model %s has no temperature layer: its probabilities are uncalibrated "
                "(retrain to serve calibrated ones)",
                model.uri,
            )
        return model, {"calibrated": False, "temperature": None}
    if raw:
        return dataclasses.replace(model, model=with_temperature(model.model, 1.0)), {
            "calibrated": False,
            "temperature": t,
        }
    return model, {"calibrated": True, "temperature": t}


def check_outputs(model: Any, n_classes: int, uri: str) -> None:
    """Refuse a model whose output is not one probability per class of the dataset."""
    shape = tuple(model.outputs[0].shape) if getattr(model, "outputs", None) else ()
    if not shape or shape[-1] != n_classes:
        raise ValueError(
            f"model {uri!r} outputs shape {shape!r}, not {n_classes} class probabilities; "
            "is it a model of another dataset?"
        )


def explain_batch(
    model: Any,
    ready: Sequence[Prepared],
    probs: NDArray[np.float32],
    out_dir: Path,
    target_layer: str | None,
) -> list[str]:
    """Grad-CAM of each image's predicted class, written under ``out_dir``; the PNG paths."""
    from mammoflow.explain.gradcam import gradcam_batch, write_explanation

    maps = gradcam_batch(
        model, np.stack([r.pixels for r in ready]), np.argmax(probs, axis=1), target_layer
    )
    return [str(write_explanation(r, m, out_dir)) for r, m in zip(ready, maps, strict=True)]


# --------------------------------------------------------------------------- serving


def serve_command(
    model_uri: str, port: int, host: str = "127.0.0.1", workers: int = 1
) -> list[str]:
    """``mlflow models serve`` of ``model_uri`` in this environment (no new virtualenv), with
    ``workers`` uvicorn worker processes.

    Raises:
        ValueError: a port outside 1..65535, or fewer than 1 worker.
    """
    import sys

    if not 0 < port < 65536:
        raise ValueError(f"port {port!r} is not a TCP port (1..65535)")
    if workers < 1:
        raise ValueError(f"--workers {workers!r}: serve with at least 1 worker")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]


def request_body(paths: Sequence[Path], cfg: Config, dataset: str) -> dict[str, Any]:
    """The tensor JSON body for the Keras champion served as registered (``--format tensor``):
    the files converted as :func:`predict_files` does (~2 MB per 512 px image).

    ``{"inputs": [[[[v], …], …], …]}``: ``(n, size, size, 1)`` grey in [0, 255].

    Raises:
        ValueError: a file the readers refuse.
    """
    cfg = cfg.for_dataset(dataset)
    rules = acceptance(cfg, dataset)
    pixels = np.stack([prepare(Path(p), cfg, rules).pixels for p in paths])
    return {"inputs": pixels[..., None].tolist()}
