"""Writing into runs: params, tags, metrics, curves, figures, text, JSON, dataset inputs."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from mammoflow.tracking.client import TrackerBase

_BATCH = 100  # MLflow log_batch accepts at most 100 params / tags and 1000 metrics per call


class Record(TrackerBase):
    """Params, tags, metrics and artifacts of a run named explicitly (no active run)."""

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        with self.timed():
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(run_id, params=items[i : i + _BATCH], synchronous=True)

    def _log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in sorted(tags.items())]
        with self.timed():
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(run_id, tags=items[i : i + _BATCH], synchronous=True)

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int = 0, prefix: str = ""
    ) -> None:
        """Log finite scalar metrics in batches (NaN values are skipped, not logged)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(prefix + k), float(v), now, step)
            for k, v in sorted(metrics.items())
            if v is not None and math.isfinite(float(v))
        ]
        with self.timed():
            for i in range(0, len(items), 1000):
                self._client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True)

    def log_history(self, run_id: str, history: Mapping[str, Sequence[float]]) -> None:
        """Per-epoch curves (``loss``, ``val_loss`` …) as stepped metrics, in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"epoch_{name}", float(v), now, step)
            for name, values in sorted(history.items())
            for step, v in enumerate(values)
            if math.isfinite(float(v))
        ]
        with self.timed():
            for i in range(0, len(items), 1000):
                self._client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags in batches."""
        self._log_tags(run_id, tags)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image artifact (and close it)."""
        import matplotlib.pyplot as plt

        with self.timed():
            self._client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Log a text artifact."""
        with self.timed():
            self._client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """Log a JSON artifact."""
        with self.timed():
            self._client.log_dict(run_id, obj, artifact_file)

    def log_dataset_input(
        self, run_id: str, frame: Any, source: str, digest: str, name: str, context: str
    ) -> None:
        """The runs table's Dataset column: ``frame`` as an MLflow dataset input of ``run_id``.

        Args:
            frame: the manifest (its schema and row count are logged, not its rows).
            source: where it lives (the manifest's path).
            digest: the DVC hash of the data (MLflow keeps at most 36 characters).
            name: the dataset's name in the UI.
            context: the input's ``mlflow.data.context`` (the split hash goes here).
        """
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import Dataset, DatasetInput, InputTag

        plain = frame.drop(columns=[c for c in ("extras",) if c in frame.columns])
        with warnings.catch_warnings():  # the integer-columns hint is about model signatures
            warnings.simplefilter("ignore", UserWarning)
            entity = from_pandas(plain, source=source, name=name)._to_mlflow_entity()
        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type=entity.source_type,
            source=entity.source,
            schema=entity.schema,
            profile=entity.profile,
        )
        tags = [InputTag("mlflow.data.context", context[:500])]
        with self.timed():
            self._client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    def log_dvc_input(self, run_id: str, source: str, digest: str, name: str, context: str) -> None:
        """A data version as an MLflow ``MetaDataset`` input of ``run_id`` (no rows, no schema):
        ``source`` names where DVC fetches it from, ``digest`` is DVC's md5 (36 characters)."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        entity = MetaDataset(  # type: ignore[abstract]  # profile is a property there
            HTTPDatasetSource(source), name=name, digest=digest[:36]
        )
        tags = [InputTag("mlflow.data.context", context[:500])]
        with self.timed():
            self._client.log_inputs(
                run_id, datasets=[DatasetInput(entity._to_mlflow_entity(), tags)]
            )

    def link_model(self, run_id: str, model_uri: str) -> None:
        """Show a logged model (``models:/<model id>``) as an output of ``run_id`` too."""
        from mlflow.entities import LoggedModelOutput

        if not model_uri.startswith("models:/m-"):
            return
        with self.timed():
            self._client.log_outputs(run_id, [LoggedModelOutput(model_uri.split("/")[1], 0)])


def _param_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
