"""Runs that evaluate a logged model after its study: an external dataset, the pointing game."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mammoflow.files import finite_json
from mammoflow.tracking.models import ModelSource
from mammoflow.tracking.readback import ReadBack
from mammoflow.tracking.runs import Runs
from mammoflow.tracking.tags import TAG_DATASET, TAG_EXTERNAL_PREFIX, TAG_MODEL_URI, TAG_ROLE


class Evaluations(Runs, ReadBack):
    """An ``external`` run in the model's experiment; the Grad-CAM pointing game on a test run."""

    def open_external(self, source: ModelSource, dataset: str) -> str:
        """A RUNNING ``external`` run in the model's experiment; tags name the model."""
        tags = {
            TAG_ROLE: "external",
            TAG_DATASET: source.dataset,
            "mammoflow.external_dataset": dataset,
            TAG_MODEL_URI: source.uri,
            "mammoflow.model_test_run": source.test_run_id,
            "mammoflow.registered_model": source.name,
            "mammoflow.registered_version": source.version,
            "mlflow.source.name": "mammoflow external",
        }
        with self.timed():
            run = self._client.create_run(
                source.experiment_id, run_name=f"external-{dataset}", tags=tags
            )
        return str(run.info.run_id)

    def log_external(
        self,
        run_id: str,
        source: ModelSource,
        dataset: str,
        metrics: Mapping[str, float],
        evidence: Any,
        page: str,
    ) -> None:
        """Fill and finish the external run, linked both ways to the model.

        The run shows the logged model as an output; the registered version gets
        ``mammoflow.external.<dataset>`` = the run id (what its model card reads).
        """
        with self.run_guard(run_id):
            self.log_metrics(run_id, {k: v for k, v in metrics.items() if math.isfinite(v)})
            self.log_dict(run_id, finite_json(evidence), "external.json")
            self.log_text(run_id, page, "report.html")
            model_uri = self.run_tags_params(source.test_run_id)[0].get(TAG_MODEL_URI, "")
            self.link_model(run_id, model_uri)
            if source.name and source.version:
                with self.timed():
                    self._client.set_model_version_tag(
                        source.name, source.version, f"{TAG_EXTERNAL_PREFIX}{dataset}", run_id
                    )

    def log_pointing_game(
        self, test_run_id: str, rate: Mapping[str, float], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Log the Grad-CAM pointing game on a test run and its parent.

        Metrics ``pointing_game_hit_rate`` / ``_ci_low`` / ``_ci_high`` / ``_n`` on both runs;
        the per-image peaks and hits as ``pointing_game.json`` on the test run.
        """
        metrics = {
            "pointing_game_hit_rate": rate["hit_rate"],
            "pointing_game_hit_rate_ci_low": rate["low"],
            "pointing_game_hit_rate_ci_high": rate["high"],
            "pointing_game_n": rate["n"],
        }
        for key in ("chance", "outside_breast"):  # its chance level, the shortcut signal
            if key in rate:
                metrics[f"pointing_game_{key}"] = rate[key]
        with self.timed():
            parent = self._client.get_run(test_run_id).data.tags.get("mlflow.parentRunId")
        for run_id in (test_run_id, parent) if parent else (test_run_id,):
            self.log_metrics(run_id, metrics)
        self.log_dict(test_run_id, {"rate": dict(rate), "images": list(rows)}, "pointing_game.json")
