"""The project's canonical file layout, in one place (dvc.yaml mirrors it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes, relative to the project root."""

    root: Path = Path()

    def source(self, dataset: str) -> Path:
        """The source's file list (DVC out of `source`, a dep of `acquire`)."""
        return self.root / "data" / "sources" / f"{dataset}.json"

    def raw(self, dataset: str) -> Path:
        """Raw files as acquired (DVC out of `acquire`)."""
        return self.root / "data" / "raw" / dataset

    def interim(self, dataset: str) -> Path:
        """Ingested manifest (DVC out of `ingest`)."""
        return self.root / "data" / "interim" / dataset

    def processed(self, dataset: str) -> Path:
        """Converted PNGs and their manifest (DVC out of `convert`)."""
        return self.root / "data" / "processed" / dataset

    def splits(self, dataset: str) -> Path:
        """The split file (DVC out of `split`)."""
        return self.root / "data" / "splits" / f"{dataset}.parquet"

    def validation(self, dataset: str) -> Path:
        """Great Expectations results and data docs."""
        return self.root / "reports" / "validation" / dataset

    def validation_metrics(self, dataset: str) -> Path:
        """DVC metrics summary of the validation."""
        return self.root / "metrics" / "validation" / f"{dataset}.json"

    def models(self, dataset: str, backbone: str) -> Path:
        """Per-fold models and histories of one backbone."""
        return self.root / "models" / dataset / backbone

    def metrics(self, dataset: str, backbone: str) -> Path:
        """DVC metrics JSON of one backbone."""
        return self.root / "metrics" / dataset / f"{backbone}.json"

    def summary(self, dataset: str, backbone: str) -> Path:
        """The short DVC metrics of one backbone (``dvc metrics show``'s row; the detail is
        :meth:`metrics`)."""
        return self.root / "metrics" / "summary" / dataset / f"{backbone}.json"

    def champion(self, dataset: str) -> Path:
        """Which backbone won on ``dataset`` (DVC metrics of `evaluate`)."""
        return self.root / "metrics" / "champion" / f"{dataset}.json"

    def plots(self, dataset: str, backbone: str) -> Path:
        """DVC plots data (confusion matrix, ROC, PR, reliability, learning curves) of one backbone."""
        return self.root / "plots" / dataset / backbone

    def features(self) -> Path:
        """Frozen-prefix feature cache (not a DVC out: a pure cache)."""
        return self.root / ".cache" / "features"

    def fold_weights(self, key: str, backbone: str, fold: int) -> Path:
        """A trained fold's tail + head weights (a cache for resuming an ensemble; not a DVC out)."""
        return self.root / ".cache" / "folds" / f"{backbone}-{key[:16]}-fold-{fold}.npz"

    def explain_metrics(self, dataset: str) -> Path:
        """The explain_check stage's pointing-game metrics."""
        return self.root / "metrics" / "explain" / f"{dataset}.json"

    def best_params(self, dataset: str, backbone: str) -> Path:
        """The tune stage's best values (``tuning/<dataset>-<backbone>.json``, a DVC out)."""
        return self.root / "tuning" / f"{dataset}-{backbone}.json"

    def audit_work(self, dataset: str, group_by: str) -> Path:
        """Scratch of the leakage audit's study split by ``group_by`` (a cache, not a DVC out)."""
        return self.root / ".cache" / "audit" / dataset / group_by

    def reports(self) -> Path:
        """Comparison reports."""
        return self.root / "reports"
