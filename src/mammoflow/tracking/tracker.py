"""The :class:`Tracker`: one MLflow client with every room's calls; the audit's variant."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mammoflow.files import finite_json
from mammoflow.tracking.cards import Cards
from mammoflow.tracking.evaluations import Evaluations
from mammoflow.tracking.models import Models
from mammoflow.tracking.registry import Registry
from mammoflow.tracking.tags import TAG_BACKBONE, TAG_DATASET, TAG_ROLE, audit_experiment_name


@dataclass
class Tracker(Evaluations, Models, Registry, Cards):
    """An MLflow client bound to one store; every call names its run explicitly.

    Its calls come from the rooms it is made of: :class:`~mammoflow.tracking.runs.Runs`
    (experiments, parent and child runs), :class:`~mammoflow.tracking.record.Record` (params,
    metrics, artifacts), :class:`~mammoflow.tracking.readback.ReadBack`,
    :class:`~mammoflow.tracking.models.Models`,
    :class:`~mammoflow.tracking.evaluations.Evaluations`,
    :class:`~mammoflow.tracking.registry.Registry` and :class:`~mammoflow.tracking.cards.Cards`.
    """


@dataclass
class AuditTracker(Tracker):
    """A :class:`Tracker` whose studies go to the dataset's audit experiment."""

    def experiment_id(self, dataset: str) -> str:
        """Get or create ``mammoflow-<dataset>-audit``."""
        return self._experiment(audit_experiment_name(dataset), {TAG_DATASET: dataset})

    def log_audit(self, dataset: str, backbone: str, audit: Mapping[str, Any], text: str) -> str:
        """One ``audit`` run with both results: image-level, patient-level and inflation metrics
        (with CIs), the split checks, ``audit.json`` and the printed summary. Returns its id."""
        exp = self.experiment_id(dataset)
        with self.timed():
            run = self._client.create_run(
                exp,
                run_name=f"audit-{backbone}",
                tags={TAG_ROLE: "audit", TAG_DATASET: dataset, TAG_BACKBONE: backbone},
            )
        run_id = str(run.info.run_id)
        with self.run_guard(run_id):
            self._log_params(
                run_id, {k: audit[k] for k in ("backbone", "seed", "k_folds", "epochs", "ci")}
            )
            metrics: dict[str, float] = {}
            for m, v in audit["inflation"].items():
                metrics |= {f"image_{m}": v["image"], f"patient_{m}": v["patient"]}
                metrics |= {f"inflation_{m}": v["inflation"]}
                metrics |= {f"inflation_{m}_ci_low": v["low"], f"inflation_{m}_ci_high": v["high"]}
            for group_by, checks in audit["checks"].items():
                metrics |= {
                    f"{group_by}_{k}": float(v)
                    for k, v in checks.items()
                    if isinstance(v, int | float) and k != "near_duplicate_bits"
                }
            self.log_metrics(run_id, metrics)
            self.log_dict(run_id, finite_json(dict(audit)), "audit.json")
            self.log_text(run_id, text, "audit.txt")
        return run_id
