"""Experiments and runs: one experiment per dataset, a parent run per configuration, children.

Per pipeline execution one parent run per backbone (named after it), and under it one nested run
per fold (``fold-1`` … ``fold-k``) and one for the held-out test evaluation (``test``). Run IDs
are passed explicitly; nothing relies on the ambient active run or ``MLFLOW_RUN_ID``.
Resume: a parent carries the hash of (params, data hash, split hash); re-running the same
configuration reopens it; a child left RUNNING by a killed process is marked FAILED.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from mammoflow.tracking.record import Record
from mammoflow.tracking.store import artifact_root
from mammoflow.tracking.tags import (
    EXPERIMENT_KIND,
    TAG_BACKBONE,
    TAG_DATASET,
    TAG_EXPERIMENT_KIND,
    TAG_KEY,
    TAG_ROLE,
    TAG_STUDY,
    experiment_name,
    tuning_experiment_name,
)


class Runs(Record):
    """Get or create experiments; open, list, start and end runs."""

    def _experiment(self, name: str, tags: Mapping[str, str]) -> str:
        """Get (restoring a deleted one) or create the experiment ``name``."""
        with self.timed():
            exp = self._client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self._client.restore_experiment(exp.experiment_id)
                if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
                    self._client.set_experiment_tag(
                        exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
                    )
                return str(exp.experiment_id)
            return str(
                self._client.create_experiment(
                    name,
                    artifact_location=artifact_root(self.root),
                    tags={**tags, TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                )
            )

    def experiment_id(self, dataset: str) -> str:
        """Get or create the dataset's experiment."""
        return self._experiment(experiment_name(dataset), {TAG_DATASET: dataset})

    def suffixed_experiment_id(self, dataset: str, suffix: str) -> str:
        """Get or create ``mammoflow-<dataset><suffix>`` (``mammoflow reproduce``'s runs)."""
        return self._experiment(experiment_name(dataset) + suffix, {TAG_DATASET: dataset})

    def open_parent(
        self,
        experiment_id: str,
        backbone: str,
        config_hash: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> tuple[str, bool]:
        """Reopen the parent run of this configuration, or create it.

        Returns:
            ``(run_id, resumed)``.
        """
        with self.timed():
            runs = self._client.search_runs(
                [experiment_id],
                filter_string=(
                    f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_KEY}` = '{config_hash}' "
                    f"and tags.`{TAG_BACKBONE}` = '{backbone}'"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                return self._reopen(str(runs[0].info.run_id), tags), True
            tags = {TAG_ROLE: "parent", TAG_KEY: config_hash, TAG_BACKBONE: backbone, **tags}
            return self._create(experiment_id, backbone, tags, params), False

    def _reopen(self, run_id: str, tags: Mapping[str, str]) -> str:
        """A parent run RUNNING again, its tags updated."""
        self._client.update_run(run_id, status="RUNNING")
        self._log_tags(run_id, tags)
        return run_id

    def _create(
        self, experiment_id: str, name: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        """A new parent run with its tags and params."""
        run = self._client.create_run(experiment_id, run_name=name, tags=dict(tags))
        run_id = str(run.info.run_id)
        self._log_params(run_id, params)
        return run_id

    def children(self, experiment_id: str, parent_id: str) -> dict[str, Any]:
        """The parent's child runs by name (``fold-1`` … ``test``), newest first wins."""
        with self.timed():
            runs = self._client.search_runs(
                [experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
            )
        return {r.info.run_name: r for r in runs}

    def fail_stale_children(self, experiment_id: str, parent_id: str) -> list[str]:
        """Mark children left RUNNING (their process died) as FAILED; return their names."""
        stale = [
            r
            for r in self.children(experiment_id, parent_id).values()
            if r.info.status == "RUNNING"
        ]
        with self.timed():
            for run in stale:
                self._client.set_terminated(run.info.run_id, status="FAILED")
        return [r.info.run_name for r in stale]

    def start_child(
        self,
        experiment_id: str,
        parent_id: str,
        name: str,
        role: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> str:
        """Create a nested run under ``parent_id`` and log its params."""
        with self.timed():
            run = self._client.create_run(
                experiment_id,
                run_name=name,
                tags={"mlflow.parentRunId": parent_id, TAG_ROLE: role, **tags},
            )
        run_id = str(run.info.run_id)
        self._log_params(run_id, params)
        return run_id

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a run (FINISHED, FAILED or KILLED)."""
        with self.timed():
            self._client.set_terminated(run_id, status=status)

    def retire_config(self, experiment: str, key: str) -> None:
        """Runs of ``experiment`` with configuration ``key`` stop being resumable: their
        ``mammoflow.config_hash`` tag becomes ``mammoflow.retired_config_hash``."""
        exp = self._client.get_experiment_by_name(experiment)
        if exp is None:
            return
        for run in self._client.search_runs([exp.experiment_id], f"tags.`{TAG_KEY}` = '{key}'"):
            self.set_tags(run.info.run_id, {"mammoflow.retired_config_hash": key})
            self._client.delete_tag(run.info.run_id, TAG_KEY)

    @contextlib.contextmanager
    def run_guard(self, run_id: str) -> Iterator[None]:
        """FINISHED when the block completes; FAILED (then re-raise) on any error or interrupt."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.end(run_id, "FAILED")
            raise
        self.end(run_id, "FINISHED")

    # tuning (Optuna)

    def tuning_experiment_id(self, dataset: str) -> str:
        """Get or create the dataset's tuning experiment (``mammoflow-<dataset>-tuning``)."""
        return self._experiment(
            tuning_experiment_name(dataset), {TAG_DATASET: dataset, TAG_ROLE: "tuning"}
        )

    def open_study_parent(
        self,
        experiment_id: str,
        study_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        run_id: str | None = None,
    ) -> tuple[str, bool]:
        """Reopen the parent run of an Optuna study, or create it.

        A study is identified by its storage and name, so the caller passes the parent it
        recorded in the study (``run_id``); it is reopened if this store has it, else a new
        parent is created. Trials of the study (from any worker or invocation) are nested under
        it with :meth:`start_child` (role ``trial``). Returns ``(run_id, resumed)``.
        """
        from mlflow.exceptions import MlflowException

        with self.timed():
            if run_id:
                try:
                    run = self._client.get_run(run_id)
                except MlflowException:
                    run = None
                if (
                    run is not None
                    and run.info.lifecycle_stage == "active"
                    and run.info.experiment_id == experiment_id
                ):
                    return self._reopen(run_id, tags), True
            tags = {TAG_ROLE: "study", TAG_STUDY: study_name, **tags}
            return self._create(experiment_id, study_name, tags, params), False
