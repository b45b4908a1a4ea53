"""What data a run read and where that version can be fetched again.

Every study's parent run (and the registered version made from it) carries:

* ``dvc_data_hash`` / ``dvc_split_hash``: DVC's md5 of ``data/processed/<ds>`` and of
  ``data/splits/<ds>.parquet`` as the run read them;
* ``dvc_remote``: the URL of the checkout's default DVC remote (``none`` without one);
* ``dvc_data_location``: where both versions were when the run started — ``remote`` (fetchable by
  anyone with the remote), ``local cache only`` (this checkout's DVC cache), ``nowhere`` or
  ``unknown`` (not a DVC repo): then ``lineage_warning`` says, loudly, that the run cannot be
  reproduced, and a warning is logged.

A run made by ``dvc repro`` starts with its data in the local cache (DVC commits each stage's
outputs before the next runs); ``dvc push`` comes later, so a flow calls :func:`mark_pushed`
after pushing, which turns ``local cache only`` into ``remote`` where the remote now holds both
versions. ``mammoflow reproduce`` does not trust the tag: it looks the hashes up again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mammoflow.dvcdata import IN_REMOTE, LOCAL_ONLY, UNKNOWN, dvc_hash, dvc_setup, locate
from mammoflow.paths import Layout
from mammoflow.tracking.tags import TAG_DATA, TAG_LOCATION, TAG_REMOTE, TAG_SPLIT
from mammoflow.tracking.tags import TAG_LINEAGE_WARNING as TAG_WARNING

log = logging.getLogger(__name__)


class LineageWarning(UserWarning):
    """A run's data is in no DVC cache or remote: it cannot be reproduced."""


def data_lineage(dataset: str, root: Path = Path()) -> dict[str, str]:
    """The lineage tags of a study of ``dataset`` in the checkout at ``root`` (see module doc)."""
    layout = Layout(root)
    data = dvc_hash(layout.processed(dataset))
    split = dvc_hash(layout.splits(dataset))
    setup = dvc_setup(root)
    location = locate(root, [data, split]) if setup is not None else UNKNOWN
    tags = {
        TAG_DATA: data,
        TAG_SPLIT: split,
        TAG_REMOTE: (setup.remote_url if setup else None) or "none",
        TAG_LOCATION: location,
    }
    if location not in (IN_REMOTE, LOCAL_ONLY):
        tags[TAG_WARNING] = missing_message(dataset, data, split, location)
        warnings.warn(tags[TAG_WARNING], LineageWarning, stacklevel=2)
        log.warning(tags[TAG_WARNING])
    return tags


def missing_message(dataset: str, data: str, split: str, location: str) -> str:
    """Why a run's data cannot be fetched again, and the fix."""
    where = "not in a DVC repo" if location == UNKNOWN else "in no DVC cache or remote"
    return (
        f"NOT REPRODUCIBLE: data/processed/{dataset} ({data}) and data/splits/{dataset}.parquet "
        f"({split}) are {where}; run the stages through DVC (`dvc repro`) and `dvc push`"
    )


def dataset_source(tags: Mapping[str, str]) -> str:
    """Where the data version of ``tags`` is fetched from: ``<remote>/files/md5/ab/cdef….dir``,
    or ``local DVC cache only`` (the MLflow dataset input's source)."""
    data, remote = tags[TAG_DATA], tags[TAG_REMOTE]
    if remote == "none" or data == UNKNOWN:
        return f"local DVC cache only: {data}"
    return f"{remote.rstrip('/')}/files/md5/{data[:2]}/{data[2:]}"


def mark_pushed(root: Path = Path(), tracker: Any | None = None) -> list[str]:
    """After ``dvc push``: tag the parent runs (and registered versions) whose data the default
    remote now holds ``dvc_data_location: remote``. Returns the run ids updated."""
    from mammoflow.tracking.tracker import Tracker

    tracker = tracker or Tracker(root=root)
    client = tracker.client
    exps = [e.experiment_id for e in client.search_experiments() if e.name.startswith("mammoflow-")]
    if not exps:
        return []
    runs = client.search_runs(
        exps, filter_string=f"tags.`{TAG_LOCATION}` != '{IN_REMOTE}'", max_results=50000
    )
    checked: dict[tuple[str, str], bool] = {}
    updated: dict[str, dict[str, str]] = {}
    setup = dvc_setup(root)
    for run in runs:
        tags = run.data.tags
        pair = (tags.get(TAG_DATA, UNKNOWN), tags.get(TAG_SPLIT, UNKNOWN))
        if pair not in checked:
            checked[pair] = UNKNOWN not in pair and locate(root, pair) == IN_REMOTE
        if checked[pair] and setup is not None:
            new = {TAG_LOCATION: IN_REMOTE, TAG_REMOTE: setup.remote_url or "none"}
            tracker.set_tags(run.info.run_id, new)
            if TAG_WARNING in tags:
                client.delete_tag(run.info.run_id, TAG_WARNING)
            updated[run.info.run_id] = new
    _mark_versions(client, updated)
    return sorted(updated)


def _mark_versions(client: Any, updated: Mapping[str, Mapping[str, str]]) -> None:
    """Copy the new tags onto registered versions made from the updated parents' test runs."""
    from mlflow.exceptions import MlflowException

    if not updated:
        return
    for model in client.search_registered_models():
        if not model.name.startswith("mammoflow-"):
            continue
        for mv in client.search_model_versions(f"name = '{model.name}'"):
            run_id = mv.tags.get("run_id") or mv.run_id
            try:
                parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId", run_id)
            except MlflowException as exc:  # its run was deleted: nothing to copy from
                log.warning(
                    "%s v%s: its run %s is not in the store (%s); its lineage tags stay as they are",
                    model.name,
                    mv.version,
                    run_id,
                    exc.error_code,
                )
                continue
            if parent not in updated:
                continue
            for key, value in updated[parent].items():
                client.set_model_version_tag(model.name, mv.version, key, value)
            if TAG_WARNING in mv.tags:
                client.delete_model_version_tag(model.name, mv.version, TAG_WARNING)
