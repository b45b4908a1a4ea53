"""Reading runs back: JSON artifacts, the latest parents, the comparison rows, tags and params."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammoflow.tracking.client import TrackerBase
from mammoflow.tracking.tags import TAG_BACKBONE, TAG_MODEL_URI, TAG_ROLE, experiment_name

if TYPE_CHECKING:
    from mammoflow.paths import Layout

log = logging.getLogger(__name__)


class ReadBack(TrackerBase):
    """What runs of this store hold, read back for resuming, comparing and reporting."""

    def load_json_artifact(self, run_id: str, path: str) -> Any:
        """Download and parse a JSON artifact of a run."""
        return json.loads(self.load_text_artifact(run_id, path))

    def load_text_artifact(self, run_id: str, path: str) -> str:
        """Download a text artifact of a run (from this store, whatever MLflow's default is)."""
        from mlflow.artifacts import download_artifacts

        with self.timed(), tempfile.TemporaryDirectory() as tmp:
            local = self._call(
                f"download of {path}",
                lambda: download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self.uri
                ),
            )
            return Path(local).read_text(encoding="utf-8")

    def load_history(self, run: Any) -> dict[str, list[float]]:
        """A fold run's per-epoch curves as :meth:`~mammoflow.tracking.record.Record.log_history`
        logged them (``epoch_<name>`` stepped metrics); an epoch not logged (non-finite) is NaN."""
        out: dict[str, list[float]] = {}
        run_id = str(run.info.run_id)
        for key in sorted(k for k in run.data.metrics if k.startswith("epoch_")):
            with self.timed():
                points = self._call(f"history of {key}", partial(self._metric_history, run_id, key))
            by_step = {int(m.step): float(m.value) for m in points}
            steps = range(max(by_step) + 1) if by_step else range(0)
            out[key.removeprefix("epoch_")] = [by_step.get(i, math.nan) for i in steps]
        return out

    def _metric_history(self, run_id: str, key: str) -> list[Any]:
        return list(self._client.get_metric_history(run_id, key))

    def parents(self, dataset: str) -> list[Any]:
        """Latest FINISHED parent run per backbone of ``dataset``."""
        with self.timed():
            exp = self._client.get_experiment_by_name(experiment_name(dataset))
            if exp is None:
                return []
            runs = self._client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{TAG_ROLE}` = 'parent' and attributes.status = 'FINISHED'",
                order_by=["attributes.end_time DESC"],
                max_results=1000,
            )
        latest: dict[str, Any] = {}
        for run in runs:
            latest.setdefault(run.data.tags.get(TAG_BACKBONE, run.info.run_name), run)
        return list(latest.values())

    def study_rows(
        self,
        dataset: str,
        wanted: Mapping[str, str | None],
        sources: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Comparison rows from parent runs: the given run per backbone, else the latest.

        ``sources`` names where each backbone's run id came from (its metrics file): when that
        run is not in this store, or the source named none, the latest FINISHED parent stands
        in with a warning naming the source and the substitute. Each row: ``backbone``,
        ``run_id``, ``cv`` (``*_mean``/``*_std``), ``test`` and ``test_ci``
        (``{metric: {low, high}}``).
        """
        from mlflow.exceptions import MlflowException

        latest = {r.data.tags.get(TAG_BACKBONE): r for r in self.parents(dataset)}
        sources = sources or {}
        rows = []
        for backbone, run_id in wanted.items():
            run = None
            if run_id:
                with self.timed(), contextlib.suppress(MlflowException):
                    run = self._client.get_run(run_id)  # absent if it was logged to another store
            if run is None and (run_id or backbone in sources):
                _warn_substitute(
                    sources.get(backbone, "the run id given"),
                    backbone,
                    run_id,
                    self.uri,
                    latest.get(backbone),
                )
            run = run or latest.get(backbone)
            if run is not None:
                rows.append(_row(backbone, run))
        return rows

    def run(self, run_id: str) -> Any:
        """The MLflow run ``run_id`` (its ``info`` and ``data``)."""
        with self.timed():
            return self._client.get_run(run_id)

    def missing_run(self, run_id: str) -> str | None:
        """Why ``run_id`` is not in this store (it was logged to another one); None when it is."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except (MlflowException, OSError) as exc:
            return str(exc)
        return None

    def study_parent(self, uri: str) -> Any:
        """The study's parent run behind ``uri`` (a registered version or a run).

        Raises:
            ValueError: a URI of another form, or one that names nothing in this store.
        """
        from mlflow.exceptions import MlflowException

        from mammoflow.tracking.registry import registry_version

        client = self._client
        try:
            with self.timed():
                if uri.startswith("models:/"):
                    name, version = registry_version(client, uri)
                    mv = client.get_model_version(name, version)
                    run_id = mv.tags.get("run_id") or mv.run_id
                elif uri.startswith("runs:/"):
                    run_id = uri.removeprefix("runs:/").split("/")[0]
                else:
                    raise ValueError(
                        f"{uri!r}: expected models:/<name>@<alias>, models:/<name>/<n> "
                        "or runs:/<id>"
                    )
                run = client.get_run(run_id)
                return client.get_run(run.data.tags.get("mlflow.parentRunId", run_id))
        except MlflowException as exc:
            raise ValueError(
                f"{uri!r} is not in the MLflow store {self.uri}: {exc.message}"
            ) from None

    def run_tags_params(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """``(tags, params)`` of a run; empty when the run is not in this store."""
        from mlflow.exceptions import MlflowException

        with self.timed():
            try:
                run = self._client.get_run(run_id)
            except MlflowException:
                return {}, {}
        return dict(run.data.tags), dict(run.data.params)

    def model_uri_of(self, run_id: str) -> str:
        """The model URI a run logged (its ``mammoflow.model_uri`` tag).

        Raises:
            ValueError: the run logged no model.
        """
        with self.timed():
            uri = self._client.get_run(run_id).data.tags.get(TAG_MODEL_URI)
        if not uri:
            raise ValueError(
                f"run {run_id} has no logged model; set tracking.log_models to 'final' and rerun"
            )
        return str(uri)


def _row(backbone: str, run: Any) -> dict[str, Any]:
    """A comparison row of a parent run: its CV aggregates, test metrics and their CIs."""
    m = dict(run.data.metrics)
    cv = {k: v for k, v in m.items() if k.endswith(("_mean", "_std"))}
    test = {
        k.removeprefix("test_"): v
        for k, v in m.items()
        if k.startswith("test_") and "_ci_" not in k
    }
    ci: dict[str, dict[str, float]] = {}
    for k, v in m.items():
        if k.startswith("test_") and "_ci_" in k:
            name, side = k.removeprefix("test_").rsplit("_ci_", 1)
            ci.setdefault(name, {})[side] = v
    return {"backbone": backbone, "run_id": run.info.run_id, "cv": cv, "test": test, "test_ci": ci}


def _warn_substitute(
    source: str, backbone: str, run_id: str | None, uri: str, substitute: Any | None
) -> None:
    """Say that the run ``source`` names is not the one the comparison shows, and which is."""
    missing = (
        f"MLflow parent run {run_id} of {backbone} is not in {uri} (logged to another store?)"
        if run_id
        else f"no MLflow parent run of {backbone} recorded"
    )
    used = (
        f"the comparison shows the latest FINISHED parent {substitute.info.run_id} instead"
        if substitute is not None
        else f"{backbone} is left out of the comparison"
    )
    log.warning(
        "%s: %s; %s (rerun `mammoflow train` for it to compare the run it names)",
        source,
        missing,
        used,
    )


#: where the train stage's metrics file (``metrics/<dataset>/<backbone>.json``) records its runs
RUN_ID_KEYS = {"parent": "mlflow_parent_run_id", "test": "mlflow_test_run_id"}


def metrics_run_id(layout: Layout, dataset: str, backbone: str, role: str = "test") -> str:
    """The MLflow run id (``role``: ``parent`` or ``test``) the train stage recorded in its
    metrics file of ``dataset`` / ``backbone``.

    Raises:
        FileNotFoundError: no metrics file (the message says which command writes it).
        ValueError: the file records no such run (names the file and the key).
    """
    path = layout.metrics(dataset, backbone)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; run `mammoflow train --dataset {dataset} --backbone {backbone}`"
        )
    key = RUN_ID_KEYS[role]
    run_id = json.loads(path.read_text(encoding="utf-8")).get(key)
    if not run_id:
        raise ValueError(
            f"{path}: no {key!r}; rerun `mammoflow train --dataset {dataset} "
            f"--backbone {backbone}` to record its MLflow runs"
        )
    return str(run_id)
