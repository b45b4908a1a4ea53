"""The logged Keras model: logged with its signature, loaded back, traced to its run."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mammoflow.tracking.client import TrackerBase
from mammoflow.tracking.registry import registry_version
from mammoflow.tracking.retry import _short_reason
from mammoflow.tracking.store import _use_store
from mammoflow.tracking.tags import MODEL_NAME, TAG_DATASET, TAG_MODEL_URI

log = logging.getLogger(__name__)


class Models(TrackerBase):
    """Log a model into a run; load one (registry or run URI) for scoring; find its source."""

    def log_model(
        self, run_id: str, model: Any, input_example: Any, source_run_id: str | None = None
    ) -> str:
        """Log a Keras model (Keras 3 flavor, ``.keras`` format) with signature and example.

        The full model is built from stock Keras layers only, so it loads without MammoFlow's
        code and ``mlflow models predict`` / ``serve`` work anywhere. The model is attached to ``run_id`` explicitly (no active run).
        Returns the model URI, also set as the run's ``mammoflow.model_uri`` tag.
        ``source_run_id`` (default ``run_id``) is the run MLflow names as the model's source: the
        runs table's Models column and the registered version point there.
        """
        import mlflow
        import mlflow.keras
        from mlflow.models import Model

        _patch_keras_input_example()
        import numpy as np
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        output = np.asarray(model(input_example, training=False))  # no predict(): no retrace
        # any image size: the model resizes itself, so height and width stay variable (-1)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 1))]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, int(output.shape[-1])))]),
        )
        with self.timed(), _use_store(self.uri):
            run = self._client.get_run(run_id)
            logged = self._client.create_logged_model(
                run.info.experiment_id, name=MODEL_NAME, source_run_id=source_run_id or run_id
            )

            def upload() -> Any:  # into the one logged model: a retry overwrites its files
                # Keras' export prints its whole signature to stdout; keep the output readable.
                with contextlib.redirect_stdout(io.StringIO()):
                    return Model.log(
                        artifact_path=None,
                        name=MODEL_NAME,
                        flavor=mlflow.keras,
                        run_id=run_id,
                        model_id=logged.model_id,
                        model=model,
                        signature=signature,
                        input_example=input_example,
                        save_exported_model=False,
                        pip_requirements=_pip_requirements(),
                    )

            info = self._call("log_model", upload)
            self._client.set_tag(run_id, TAG_MODEL_URI, info.model_uri)
        return str(info.model_uri)

    def load_serving_model(self, uri: str) -> ServingModel:
        """Load any MLflow model URI (``models:/…``, ``runs:/…``, a path) as a Keras model.

        Raises:
            ValueError: the URI names nothing in this store (the message quotes it).
        """
        import mlflow
        import mlflow.keras
        from mlflow.exceptions import MlflowException

        with self.timed(), _use_store(self.uri):
            try:
                name, version = registry_version(self._client, uri)
                model = mlflow.keras.load_model(uri)
            except (MlflowException, OSError) as exc:
                raise ValueError(
                    f"cannot load model {uri!r} from {self.uri}: {_short_reason(exc)}; "
                    "train and evaluate the dataset first (`make run`), or pass --model"
                ) from None
        return ServingModel(model=model, uri=uri, name=name, version=version)

    def resolve_version(self, uri: str) -> tuple[str, str]:
        """``(name, version)`` a registry URI names now (an alias resolved); ``("", "")`` for a
        run or path URI.

        Raises:
            ValueError: the alias or model names nothing in the store.
        """
        from mlflow.exceptions import MlflowException

        try:
            return registry_version(self._client, uri)
        except MlflowException as exc:
            raise ValueError(
                f"cannot resolve model {uri!r} in {self.uri}: {exc.message.splitlines()[0]}; "
                "train and evaluate the dataset first (`make run`), or pass --model"
            ) from None

    def download_keras(self, uri: str, dest: Path, label: str) -> tuple[str, Any]:
        """Download the model ``uri`` into ``dest`` and load it: ``(local folder, Keras model)``.

        Raises:
            ValueError: it cannot be found or loaded (names ``label``, the URI as the user gave it).
        """
        import mlflow.keras
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        try:
            local = download_artifacts(
                artifact_uri=uri, dst_path=str(dest), tracking_uri=self.uri, registry_uri=self.uri
            )
            return local, mlflow.keras.load_model(local)
        except (MlflowException, OSError) as exc:
            reason = exc.message if isinstance(exc, MlflowException) else str(exc)
            raise ValueError(
                f"cannot load model {label!r} from {self.uri}: {reason.splitlines()[0]}; "
                "train and evaluate the dataset first (`make run`), or pass --model"
            ) from None

    def model_source(self, uri: str) -> ModelSource:
        """The test run, training dataset and registry entry behind a model URI.

        Raises:
            ValueError: a URI that names no registered version or run of this store.
        """
        from mlflow.exceptions import MlflowException

        try:
            with self.timed():
                name, version = registry_version(self._client, uri)
                if name and version:
                    run_id = self._client.get_model_version(name, version).tags["run_id"]
                elif uri.startswith("runs:/"):
                    run_id = uri.removeprefix("runs:/").split("/", 1)[0]
                else:
                    raise ValueError("use models:/<name>@<alias>, models:/<name>/<n> or runs:/")
                run = self._client.get_run(run_id)
        except (MlflowException, KeyError) as exc:
            raise ValueError(
                f"model {uri!r} names no registered version or run in {self.uri}: "
                f"{_short_reason(exc) if isinstance(exc, MlflowException) else exc}"
            ) from None
        dataset = run.data.tags.get(TAG_DATASET, "")
        if not dataset:
            raise ValueError(f"model {uri!r}: its run {run_id} has no {TAG_DATASET} tag")
        return ModelSource(uri, dataset, run_id, run.info.experiment_id, name, version)


@dataclass(frozen=True)
class ModelSource:
    """Where a model URI comes from: its test run, its training dataset, its registry entry."""

    uri: str
    dataset: str  # the dataset it was trained on
    test_run_id: str
    experiment_id: str
    name: str = ""  # registered model name ("" for a run / logged-model URI)
    version: str = ""

    @property
    def label(self) -> str:
        """``name vN``, or the URI for an unregistered model."""
        return f"{self.name} v{self.version}" if self.name and self.version else self.uri


@dataclass(frozen=True)
class ServingModel:
    """A logged Keras model loaded for scoring, with where it came from."""

    model: Any
    uri: str
    name: str  # registered model name ("" for a run or path URI)
    version: str  # registry version ("" for a run or path URI)


#: what the logged Keras model needs to load and run (its pip requirements, pinned)
SERVING_PACKAGES = ("tensorflow", "keras", "numpy")


def _pip_requirements() -> list[str]:
    """Minimal serving requirements (avoids MLflow exporting the whole project lock)."""
    return pinned_requirements(SERVING_PACKAGES)


def pinned_requirements(packages: Sequence[str]) -> list[str]:
    """``<package>==<installed version>`` of each package; one not installed is left out with a
    warning naming it (the served model's environment would then resolve it unpinned)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            log.warning(
                "%s is not installed here: the served model's pip requirements do not pin it "
                "(install it, or the serving environment resolves whatever version it finds)",
                pkg,
            )
    return reqs


_PATCHED = False


def _patch_keras_input_example() -> None:
    """Work around mlflow/mlflow#16183 (open): the Keras flavor writes input_example.json
    before creating the model folder. Create the folder first; behaviour is otherwise unchanged."""
    global _PATCHED
    if _PATCHED:
        return
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model: Any, input_example: Any, path: str, *a: Any, **k: Any) -> Any:
        Path(path).mkdir(parents=True, exist_ok=True)
        return original(mlflow_model, input_example, path, *a, **k)

    keras_save._save_example = save_example
    _PATCHED = True
