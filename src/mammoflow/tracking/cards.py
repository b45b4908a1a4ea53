"""Model cards: the facts of a registered version read from its runs, the card written back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mammoflow.tracking.readback import ReadBack
from mammoflow.tracking.record import Record
from mammoflow.tracking.retry import _short_reason
from mammoflow.tracking.tags import (
    TAG_BACKBONE,
    TAG_EXTERNAL_PREFIX,
    TAG_SELECTION,
    registered_model_name,
)

if TYPE_CHECKING:
    from mammoflow.reporting.card import CardFacts

log = logging.getLogger(__name__)


class Cards(Record, ReadBack):
    """Card facts of ``mammoflow-<dataset>@<alias>``; the card as description and artifact."""

    def write_model_cards(self, dataset: str) -> dict[str, str]:
        """Write the card of every registered version with an alias (champion, challenger).

        Returns ``{alias: version}`` of the cards written.
        """
        from mammoflow.reporting.card import description, model_card

        written: dict[str, str] = {}
        for alias in ("champion", "challenger"):
            facts = self.card_facts(dataset, alias)
            if facts is None:
                continue
            self.set_model_card(facts, model_card(facts), description(facts))
            written[alias] = facts.version
        return written

    def card_facts(self, dataset: str, alias: str) -> CardFacts | None:
        """What the model card of ``mammoflow-<dataset>@<alias>`` is written from, or None."""
        from mlflow.exceptions import MlflowException

        from mammoflow.reporting.card import CardFacts

        name = registered_model_name(dataset)
        with self.timed():
            try:
                mv = self._client.get_model_version_by_alias(name, alias)
            except MlflowException:
                return None
            test = self._client.get_run(mv.tags["run_id"])
            parent_id = test.data.tags.get("mlflow.parentRunId", test.info.run_id)
            parent = self._client.get_run(parent_id)
        subgroups = self._subgroups_md(parent_id)
        return CardFacts(
            name=name,
            version=str(mv.version),
            alias=alias,
            dataset=dataset,
            backbone=test.data.tags.get(TAG_BACKBONE, "?"),
            test_run_id=test.info.run_id,
            parent_run_id=parent_id,
            params=dict(test.data.params),
            tags={**parent.data.tags, **test.data.tags},
            metrics=dict(parent.data.metrics),
            subgroups_md=subgroups,
            selection_metric=mv.tags.get(TAG_SELECTION, ""),
            external=self._external_metrics(mv.tags),
        )

    def _subgroups_md(self, parent_id: str) -> str:
        """The parent's ``subgroups.md``; when it cannot be read, a warning and the card's line
        saying why the table is missing."""
        from mlflow.exceptions import MlflowException

        try:
            return self.load_text_artifact(parent_id, "subgroups.md")
        except (MlflowException, OSError) as exc:
            reason = _short_reason(exc)
        log.warning(
            "model card without its subgroup table: subgroups.md of parent run %s could not be "
            "read (%s)",
            parent_id,
            reason,
        )
        return (
            f"_No subgroup table: `subgroups.md` of the parent run {parent_id} could not be "
            f"read ({reason}); the train stage logs it (rerun it for this run's table)._"
        )

    def _external_metrics(self, version_tags: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """External dataset → its run's metrics, for the version's ``mammoflow.external.*``."""
        from mlflow.exceptions import MlflowException

        out: dict[str, dict[str, Any]] = {}
        for key, run_id in sorted(version_tags.items()):
            if key.startswith(TAG_EXTERNAL_PREFIX):
                with self.timed(), contextlib.suppress(MlflowException):
                    metrics = dict(self._client.get_run(run_id).data.metrics)
                    out[key.removeprefix(TAG_EXTERNAL_PREFIX)] = {"run": run_id, **metrics}
        return out

    def set_model_card(self, facts: CardFacts, card: str, description: str) -> None:
        """The card as the version's description and as ``model_card.md`` on its test run."""
        with self.timed():
            self._client.update_model_version(facts.name, facts.version, description=description)
        self.log_text(facts.test_run_id, card, "model_card.md")
