"""A scorer as an MLflow pyfunc model: what ``mlflow models serve`` runs, saved here.

The scorer (:class:`mammoflow.serving.serve.ImageClassifier`) knows nothing of MLflow: it is
handed its Keras models, loaded, and its settings; it scores a DataFrame and raises its
``refused`` error for bad input, which :class:`PyfuncScorer` turns into the scoring server's
HTTP 400. Not imported by ``mammoflow.tracking`` itself: it loads MLflow's pyfunc at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd  # at run time: MLflow reads predict's type hints (a DataFrame: no inference)
from mlflow.pyfunc.model import PythonModel


class Scorer(Protocol):
    """What :class:`PyfuncScorer` serves."""

    refused: type[Exception]  # bad input: HTTP 400 naming it, nothing scored

    def load(self, config: Mapping[str, Any], models: Mapping[str, Any]) -> None:
        """Take the settings (``model_config``) and the Keras models (by artifact name)."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Score the request's rows."""


class PyfuncScorer(PythonModel):
    """``scorer`` as a pyfunc model: its Keras artifacts loaded for it, its refusals HTTP 400."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def load_context(self, context: Any) -> None:
        """Load each artifact as a Keras model and hand them to the scorer with its settings."""
        import mlflow.keras

        models = {name: mlflow.keras.load_model(path) for name, path in context.artifacts.items()}
        self.scorer.load(context.model_config, models)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """The scorer's answer; its ``refused`` error as an ``INVALID_PARAMETER_VALUE`` (400)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.scorer.predict(model_input)
        except self.scorer.refused as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def save_scorer(
    path: Path,
    scorer: Scorer,
    artifacts: Mapping[str, str],
    config: Mapping[str, Any],
    columns: tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]],
    requirements: Sequence[str],
) -> None:
    """Save ``scorer`` as a pyfunc model folder at ``path``.

    Args:
        artifacts: artifact name → local folder of a Keras model (copied into the folder).
        config: the scorer's settings (the model's ``model_config``).
        columns: ``(inputs, outputs)`` of the signature, each ``[(column, MLflow type)]``.
        requirements: the model's pip requirements.
    """
    import mlflow.pyfunc
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs, outputs = columns
    signature = ModelSignature(
        inputs=Schema([ColSpec(kind, name) for name, kind in inputs]),
        outputs=Schema([ColSpec(kind, name) for name, kind in outputs]),
    )
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=PyfuncScorer(scorer),
        artifacts=dict(artifacts),
        model_config=dict(config),
        signature=signature,
        pip_requirements=list(requirements),
    )
