"""The MLflow layout. Only this package talks to MLflow (tests/unit/test_architecture.py).

Rooms, one idea each:

* :mod:`~mammoflow.tracking.tags`: experiment and model names, the tags runs carry;
* :mod:`~mammoflow.tracking.store`: the tracking URI, artifact root, client, server probe;
  :mod:`~mammoflow.tracking.retry`: calls retried while a server is unreachable;
* :mod:`~mammoflow.tracking.client`, :mod:`~mammoflow.tracking.runs`,
  :mod:`~mammoflow.tracking.record`, :mod:`~mammoflow.tracking.readback`,
  :mod:`~mammoflow.tracking.models`, :mod:`~mammoflow.tracking.evaluations`,
  :mod:`~mammoflow.tracking.registry`, :mod:`~mammoflow.tracking.cards`: the
  :class:`Tracker`'s calls, composed in :mod:`~mammoflow.tracking.tracker`;
* :mod:`~mammoflow.tracking.study`: one study's run layout (:class:`StudyRun`);
* :mod:`~mammoflow.tracking.lineage`: what data a run read and where it can be fetched again;
* :mod:`~mammoflow.tracking.pyfunc`: a scorer as an MLflow pyfunc model (serving).
"""

from __future__ import annotations

from mammoflow.tracking.models import ModelSource, ServingModel
from mammoflow.tracking.readback import RUN_ID_KEYS, metrics_run_id
from mammoflow.tracking.registry import (
    LOCK_LEASE_S,
    LOCK_SUFFIX,
    LOCK_WAIT_S,
    PromotionLockedError,
    promotion_decision,
    registry_lock,
    registry_version,
)
from mammoflow.tracking.retry import (
    RETRY_DEFAULT_S,
    RETRY_ENV,
    TrackingUnavailable,
    TrackingUnreachable,
    retry_seconds,
    server_unreachable,
)
from mammoflow.tracking.store import (
    HTTP_DEFAULTS,
    PROBE_TIMEOUT_S,
    artifact_root,
    check_server,
    tracking_uri,
)
from mammoflow.tracking.study import Evaluation, StudyRun
from mammoflow.tracking.tags import (
    CALIBRATION_FILE,
    EXPERIMENT_KIND,
    EXPERIMENT_SUFFIX_ENV,
    LINEAGE_TAGS,
    MODEL_NAME,
    SOURCE_PREFIX,
    TAG_BACKBONE,
    TAG_DATA,
    TAG_DATASET,
    TAG_DISPLACED,
    TAG_EXPERIMENT_KIND,
    TAG_EXTERNAL_PREFIX,
    TAG_FOLD,
    TAG_KEY,
    TAG_LINEAGE_WARNING,
    TAG_LOCATION,
    TAG_MODEL_URI,
    TAG_PROMOTION,
    TAG_REMOTE,
    TAG_ROLE,
    TAG_SELECTION,
    TAG_SPLIT,
    TAG_STUDY,
    TAG_TEMPERATURE,
    TAG_TRIAL,
    TAG_TRIAL_STATE,
    audit_experiment_name,
    experiment_name,
    registered_model_name,
    tuning_experiment_name,
)
from mammoflow.tracking.tracker import AuditTracker, Tracker

__all__ = [
    "CALIBRATION_FILE",
    "EXPERIMENT_KIND",
    "EXPERIMENT_SUFFIX_ENV",
    "HTTP_DEFAULTS",
    "LINEAGE_TAGS",
    "LOCK_LEASE_S",
    "LOCK_SUFFIX",
    "LOCK_WAIT_S",
    "MODEL_NAME",
    "PROBE_TIMEOUT_S",
    "RETRY_DEFAULT_S",
    "RETRY_ENV",
    "RUN_ID_KEYS",
    "SOURCE_PREFIX",
    "TAG_BACKBONE",
    "TAG_DATA",
    "TAG_DATASET",
    "TAG_DISPLACED",
    "TAG_EXPERIMENT_KIND",
    "TAG_EXTERNAL_PREFIX",
    "TAG_FOLD",
    "TAG_KEY",
    "TAG_LINEAGE_WARNING",
    "TAG_LOCATION",
    "TAG_MODEL_URI",
    "TAG_PROMOTION",
    "TAG_REMOTE",
    "TAG_ROLE",
    "TAG_SELECTION",
    "TAG_SPLIT",
    "TAG_STUDY",
    "TAG_TEMPERATURE",
    "TAG_TRIAL",
    "TAG_TRIAL_STATE",
    "AuditTracker",
    "Evaluation",
    "ModelSource",
    "PromotionLockedError",
    "ServingModel",
    "StudyRun",
    "Tracker",
    "TrackingUnavailable",
    "TrackingUnreachable",
    "artifact_root",
    "audit_experiment_name",
    "check_server",
    "experiment_name",
    "metrics_run_id",
    "promotion_decision",
    "registered_model_name",
    "registry_lock",
    "registry_version",
    "retry_seconds",
    "server_unreachable",
    "tracking_uri",
    "tuning_experiment_name",
]
