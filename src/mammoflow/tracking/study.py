"""One study in MLflow: a parent run per (dataset, backbone) with ``fold-k`` and ``test`` children."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mammoflow.files import finite_json
from mammoflow.tracking.tags import (
    CALIBRATION_FILE,
    SOURCE_PREFIX,
    TAG_BACKBONE,
    TAG_DATASET,
    TAG_FOLD,
    TAG_KEY,
    TAG_ROLE,
    TAG_TEMPERATURE,
    experiment_name,
)
from mammoflow.tracking.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """One set of predictions to log: ids, true labels, probabilities and their metrics."""

    ids: list[str]
    y_true: Any
    prob: Any
    metrics: Mapping[str, float]
    class_names: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """The ``predictions.json`` artifact."""
        return {
            "image_id": list(self.ids),
            "y_true": [int(v) for v in self.y_true],
            "prob": [[float(p) for p in row] for row in self.prob],
        }


@dataclass
class StudyRun:
    """One (dataset, backbone) study in MLflow: a parent run with ``fold-k`` and ``test`` children.

    Open it with :meth:`open` (reopens the parent of the same configuration key and marks children
    left RUNNING by a killed process FAILED); :meth:`finished` lists the children to reuse.
    Every method names its run explicitly; nothing uses MLflow's ambient active run.
    """

    tracker: Tracker
    experiment_id: str
    parent_id: str
    dataset: str
    backbone: str
    child_params: dict[str, Any]
    reopened: bool = False
    stale: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)  # mlflow.source.* tags for children

    @classmethod
    def open(
        cls,
        tracker: Tracker,
        *,
        dataset: str,
        backbone: str,
        key: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> StudyRun:
        """Reopen or create the parent run of configuration ``key``."""
        exp_id = tracker.experiment_id(dataset)
        parent_id, reopened = tracker.open_parent(
            exp_id, backbone, key, {TAG_DATASET: dataset, **tags}, params
        )
        stale = tracker.fail_stale_children(exp_id, parent_id) if reopened else []
        if stale:
            log.warning("runs %s were left RUNNING by a killed process; marked FAILED", stale)
        return cls(
            tracker,
            exp_id,
            parent_id,
            dataset,
            backbone,
            {**params, "backbone": backbone},
            reopened,
            stale,
            {k: v for k, v in tags.items() if k.startswith(SOURCE_PREFIX)},
        )

    @staticmethod
    def finished_names(tracker: Tracker, dataset: str, backbone: str, key: str) -> set[str]:
        """Names of the FINISHED children of configuration ``key`` (read-only; for planning)."""
        with tracker.timed():
            exp = tracker.client.get_experiment_by_name(experiment_name(dataset))
            if exp is None:
                return set()
            runs = tracker.client.search_runs(
                [exp.experiment_id],
                filter_string=(
                    f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_KEY}` = '{key}' "
                    f"and tags.`{TAG_BACKBONE}` = '{backbone}'"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        if not runs:
            return set()
        children = tracker.children(exp.experiment_id, runs[0].info.run_id)
        return {name for name, run in children.items() if run.info.status == "FINISHED"}

    def finished(self) -> dict[str, Any]:
        """FINISHED children by name (``fold-k``, ``test``): their work is reused."""
        children = self.tracker.children(self.experiment_id, self.parent_id)
        return {name: run for name, run in children.items() if run.info.status == "FINISHED"}

    def reused_fold(self, run: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """``(validation metrics, predictions record)`` of a FINISHED fold run."""
        metrics = {
            k.removeprefix("val_"): v for k, v in run.data.metrics.items() if k.startswith("val_")
        }
        return metrics, self.tracker.load_json_artifact(run.info.run_id, "predictions.json")

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """The parent: FINISHED when the block completes, FAILED on any error or interrupt."""
        return self.tracker.run_guard(self.parent_id)

    def _child(
        self, name: str, role: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        base = {TAG_BACKBONE: self.backbone, TAG_DATASET: self.dataset, **self.source}
        return self.tracker.start_child(
            self.experiment_id,
            self.parent_id,
            name,
            role,
            {**base, **tags},
            {**self.child_params, **params},
        )

    def _evaluation(
        self, run_id: str, ev: Evaluation, prefix: str, artifacts: Mapping[str, Any]
    ) -> None:
        """Metrics, ``predictions.json``, then each artifact in order (text, or a figure)."""
        t = self.tracker
        t.log_metrics(run_id, ev.metrics, prefix=prefix)
        t.log_dict(run_id, ev.record(), "predictions.json")
        for name, item in artifacts.items():
            if isinstance(item, str):
                t.log_text(run_id, item, name)
            else:
                t.log_figure(run_id, item, name)

    def start_fold(self, fold: int) -> str:
        """Child ``fold-<k>``, RUNNING while the fold trains (a crash then leaves it FAILED)."""
        return self._child(f"fold-{fold}", "fold", {TAG_FOLD: str(fold)}, {"fold": fold})

    def start_test(self, mode: str) -> str:
        """Child ``test``, RUNNING while the refit model trains."""
        return self._child("test", "test", {"mammoflow.test_model": mode}, {"test_model": mode})

    def log_fold(
        self,
        fold: int,
        ev: Evaluation,
        history: Mapping[str, Sequence[float]],
        timing: Mapping[str, float],
        model: Any | None = None,
        example: Any | None = None,
        run_id: str | None = None,
        artifacts: Mapping[str, Any] | None = None,
    ) -> str:
        """A finished fold into child ``fold-<k>`` (``run_id`` from :meth:`start_fold`, else a new
        one): validation metrics, curves, predictions, the caller's ``artifacts`` (file name →
        text or figure: the report, confusion matrix, ROC, training curves), model; the run ends
        FINISHED."""
        run_id = run_id or self.start_fold(fold)
        with self.tracker.run_guard(run_id):
            self.tracker.log_history(run_id, history)
            self.tracker.log_metrics(run_id, timing, prefix="time_")
            self._evaluation(run_id, ev, "val_", artifacts or {})
            if model is not None:
                self.tracker.log_model(run_id, model, example)
        return run_id

    def log_test(
        self,
        ev: Evaluation,
        mode: str,
        history: Mapping[str, Sequence[float]] | None = None,
        model: Any | None = None,
        example: Any | None = None,
        run_id: str | None = None,
        artifacts: Mapping[str, Any] | None = None,
    ) -> str:
        """The held-out test into child ``test`` (``run_id`` from :meth:`start_test`, else a new
        one): metrics, predictions, the caller's ``artifacts`` (as :meth:`log_fold`) and the
        serving model; the run ends FINISHED."""
        run_id = run_id or self.start_test(mode)
        with self.tracker.run_guard(run_id):
            if history:
                self.tracker.log_history(run_id, history)
            self._evaluation(run_id, ev, "test_", artifacts or {})
            if model is not None:
                # the backbone's parent row shows the model and its registered version
                uri = self.tracker.log_model(run_id, model, example, source_run_id=self.parent_id)
                self.tracker.link_model(self.parent_id, uri)
        return run_id

    def log_dataset(
        self, frame: Any, source: str, data_hash: str, split_hash: str, group_by: str
    ) -> None:
        """The manifest as the parent's dataset input: DVC hash as digest, split in context."""
        self.tracker.log_dataset_input(
            self.parent_id,
            frame,
            source,
            data_hash,
            name=f"{self.dataset}-manifest",
            context=f"{group_by}-level split {split_hash[:16]}",
        )

    def log_dvc_data(self, source: str, digest: str, location: str) -> None:
        """The DVC data version as the parent's dataset input: ``source`` (the remote's object,
        see :func:`mammoflow.tracking.lineage.dataset_source`), the DVC hash as ``digest``, where it was
        found (``dvc_data_location``) as context."""
        self.tracker.log_dvc_input(
            self.parent_id, source, digest, name=f"{self.dataset}-dvc", context=f"dvc: {location}"
        )

    def finish(
        self,
        cv: Mapping[str, float],
        test: Mapping[str, float],
        ci: Mapping[str, Mapping[str, float]],
        fold_figure: Any,
        reused_folds: Sequence[int],
    ) -> None:
        """Aggregates on the parent: CV mean/std, test metrics with CIs, the fold spread figure."""
        t = self.tracker
        t.log_metrics(self.parent_id, cv)
        t.log_metrics(self.parent_id, test, prefix="test_")
        t.log_metrics(
            self.parent_id,
            {f"test_{m}_ci_{side}": v[side] for m, v in ci.items() for side in ("low", "high")},
        )
        t.log_figure(self.parent_id, fold_figure, "fold_metrics.png")
        t.set_tags(self.parent_id, {"resumed_folds": json.dumps(list(reused_folds))})

    def log_calibration(
        self, test_run_id: str, metrics: Mapping[str, float], sidecar: Any, figure: Any
    ) -> None:
        """Calibration of the test model, raw and temperature-scaled.

        Metrics (``test_ece``, ``test_calibrated_ece``, CIs, ``temperature``) go on the parent
        and the test run; the test run also carries the temperature as tag
        ``mammoflow.temperature`` (copied onto the registered version by :meth:`Tracker.promote`)
        and the sidecar ``calibration.json``; the reliability diagram goes on the parent.
        """
        t = self.tracker
        temperature = f"{float(metrics['temperature']):.6g}"
        for run_id in (self.parent_id, test_run_id):
            t.log_metrics(run_id, metrics)
            t.set_tags(run_id, {TAG_TEMPERATURE: temperature})
        t.log_dict(test_run_id, finite_json(sidecar), CALIBRATION_FILE)
        t.log_figure(self.parent_id, figure, "reliability_diagram.png")

    def log_subgroups(self, tables: Mapping[str, Any], markdown: str) -> None:
        """Metrics per subgroup on the parent: ``subgroups.json`` and ``subgroups.md``."""
        self.tracker.log_dict(self.parent_id, finite_json(tables), "subgroups.json")
        self.tracker.log_text(self.parent_id, markdown, "subgroups.md")
