"""The run layout's vocabulary: experiment and model names, the tags every run carries."""

from __future__ import annotations

import os

TAG_ROLE = "mammoflow.role"  # parent | fold | test
TAG_KEY = "mammoflow.config_hash"
TAG_BACKBONE = "mammoflow.backbone"
TAG_FOLD = "mammoflow.fold"
TAG_DATASET = "mammoflow.dataset"
MODEL_NAME = "model"
TAG_STUDY = "mammoflow.study"  # Optuna study name (tuning runs)
TAG_TRIAL = "mammoflow.trial"  # Optuna trial number
TAG_TRIAL_STATE = "mammoflow.trial_state"  # complete | pruned | failed
TAG_TEMPERATURE = "mammoflow.temperature"  # temperature scaling of the test model (calibration)
TAG_SELECTION = "mammoflow.selection_metric"  # on a version: the rule it was promoted under
TAG_PROMOTION = "mammoflow.promotion"  # on a version: when, by whom and why it got its alias
TAG_DISPLACED = "mammoflow.displaced"  # on a version: when and by whom it lost `champion`
TAG_EXTERNAL_PREFIX = "mammoflow.external."  # on a version: external dataset → its run id
CALIBRATION_FILE = "calibration.json"  # its sidecar on the test run (see calibration.py)
# MLflow 3's UI opens an experiment by its kind: without it, on the GenAI traces overview
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: lineage tags of a parent run (see mammoflow.tracking.lineage), copied onto its registered versions
TAG_DATA = "dvc_data_hash"
TAG_SPLIT = "dvc_split_hash"
TAG_REMOTE = "dvc_remote"
TAG_LOCATION = "dvc_data_location"
TAG_LINEAGE_WARNING = "lineage_warning"
LINEAGE_TAGS = (
    "git_commit",
    "git_dirty",
    TAG_DATA,
    TAG_SPLIT,
    TAG_REMOTE,
    TAG_LOCATION,
    TAG_LINEAGE_WARNING,
)
SOURCE_PREFIX = "mlflow.source."  # mlflow.source.name / .type / .git.commit: the Source column
#: a run's logged model URI (set when it logs a model)
TAG_MODEL_URI = "mammoflow.model_uri"
#: appended to the study experiment's name (``mammoflow reproduce`` sets ``-reproduce``)
EXPERIMENT_SUFFIX_ENV = "MAMMOFLOW_EXPERIMENT_SUFFIX"


def experiment_name(dataset: str) -> str:
    """``mammoflow-<dataset>`` (plus ``$MAMMOFLOW_EXPERIMENT_SUFFIX``)."""
    return f"mammoflow-{dataset}{os.environ.get(EXPERIMENT_SUFFIX_ENV, '')}"


def tuning_experiment_name(dataset: str) -> str:
    """``mammoflow-<dataset>-tuning``: Optuna studies, kept apart from the training runs."""
    return f"mammoflow-{dataset}-tuning"


def registered_model_name(dataset: str) -> str:
    """The registry name of a dataset's champion model."""
    return f"mammoflow-{dataset}"


def audit_experiment_name(dataset: str) -> str:
    """``mammoflow-<dataset>-audit``: the leakage audit's studies, apart from the training runs."""
    return f"mammoflow-{dataset}-audit"
