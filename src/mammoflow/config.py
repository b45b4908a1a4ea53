"""params.yaml → one validated, typed :class:`Config`.

Nothing else in MammoFlow reads YAML. Every section is a frozen pydantic model that forbids
unknown keys, so a typo in params.yaml stops the run with an error naming the key, the bad
value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")

BACKBONE_NAMES = ("vgg16", "vgg19", "resnet50", "inception_v3")


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names each bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PipelineConfig(_Section):
    """Which datasets a pipeline run processes."""

    datasets: list[str] = Field(
        default_factory=lambda: ["sample_mias", "sample_cmmd"], min_length=1
    )


class DatasetConfig(_Section):
    """One dataset's origin."""

    kind: Literal["mias", "cmmd"]
    acquire: Literal["sample", "local"] = "local"
    source: Path | None = None
    clinical: Path | None = None

    @model_validator(mode="after")
    def _local_needs_source(self) -> DatasetConfig:
        if self.acquire == "local" and self.source is None:
            raise ValueError("a dataset with acquire: local needs 'source' (archive or folder)")
        if self.acquire == "local" and self.kind == "cmmd" and self.clinical is None:
            raise ValueError("a cmmd dataset needs 'clinical' (the clinical .xlsx or .csv)")
        return self


class SampleConfig(_Section):
    """The embedded synthetic dataset."""

    seed: int = 20240601
    mias_patients: Annotated[int, Field(ge=6, le=200)] = 20
    cmmd_patients: Annotated[int, Field(ge=4, le=200)] = 12
    size: Annotated[int, Field(ge=64, le=512)] = 256


class IngestConfig(_Section):
    """Ingestion policy for bad raw files."""

    on_bad_file: Literal["fail", "quarantine"] = "fail"


class ConvertConfig(_Section):
    """Raw image → PNG conversion."""

    size: Annotated[int, Field(ge=32, le=4096)] = 512
    bit_depth: Literal[8, 16] = 8
    crop_to_breast: bool = False
    workers: Annotated[int, Field(ge=0, le=256)] = 0


class ValidateConfig(_Section):
    """Great Expectations validation."""

    fail_on_error: bool = True


class SplitConfig(_Section):
    """Held-out test set and K-fold cross-validation."""

    test_size: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    k_folds: Annotated[int, Field(ge=3, le=20)] = 5
    group_by: Literal["patient", "image"] = "patient"
    seed: int = 42


class ModelConfig(_Section):
    """Backbones and the paper's classification head."""

    backbones: list[str] = Field(default_factory=lambda: list(BACKBONE_NAMES), min_length=1)
    weights: str = "none"
    trainable_layers: Annotated[int, Field(ge=0, le=50)] = 3
    head_units: Annotated[int, Field(ge=8, le=8192)] = 512
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    input_size: Annotated[int, Field(ge=32, le=1024)] | None = None

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, value: list[str]) -> list[str]:
        from mammoflow.models.backbones import BACKBONE_NAMES as KNOWN

        unknown = [b for b in value if b not in KNOWN]
        if unknown:
            raise ValueError(f"unknown backbone(s) {unknown!r}; registered: {list(KNOWN)!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"backbones listed twice in {value!r}")
        return value


class TrainConfig(_Section):
    """The fold loop."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    class_weight: Literal["balanced", "none"] = "balanced"
    early_stopping: bool = False
    patience: Annotated[int, Field(ge=1, le=100)] = 3
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    feature_cache: bool = True
    augment: bool = False
    seed: int = 42


class EvaluateConfig(_Section):
    """Metrics on the held-out test set."""

    bootstrap: Annotated[int, Field(ge=0, le=100_000)] = 1000
    ci: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95


class TrackingConfig(_Section):
    """MLflow logging and the model registry."""

    log_models: Literal["all", "final", "none"] = "all"
    registry_metric: str = "test_f1_macro"


class Config(_Section):
    """The whole of params.yaml."""

    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _datasets_exist(self) -> Config:
        unknown = [d for d in self.pipeline.datasets if d not in self.datasets]
        if unknown:
            raise ValueError(
                f"pipeline.datasets names {unknown!r}, which are not defined under 'datasets' "
                f"(defined: {sorted(self.datasets)!r})"
            )
        return self

    def dataset(self, name: str) -> DatasetConfig:
        """Return the dataset called ``name`` or raise a clear error."""
        try:
            return self.datasets[name]
        except KeyError:
            raise ConfigError(
                f"unknown dataset {name!r}; params.yaml defines {sorted(self.datasets)!r}"
            ) from None

    def flat(self) -> dict[str, Any]:
        """All values flattened to ``section.key`` strings (for experiment tracking)."""
        return _flatten(self.model_dump(mode="json", by_alias=True))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"] if p not in ("function-after", "constrained-int"))
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key {loc!r} (value {value!r}); remove it or fix its spelling"
    msg = error["msg"]
    if kind == "literal_error" and "ctx" in error:
        msg = f"allowed values are {error['ctx'].get('expected')}"
    where = f"{loc!r}" if loc else "params"
    return f"{where}: bad value {value!r}: {msg}"


def parse_config(raw: Mapping[str, Any] | None, source: str = "params.yaml") -> Config:
    """Validate a mapping (the parsed YAML) into a :class:`Config`.

    Raises:
        ConfigError: listing every bad key with its value and what is allowed.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source} is invalid:\n  - " + "\n  - ".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted ``section.key`` overrides applied."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[leaf] = value
    return out


def load_config(
    path: Path | str = DEFAULT_PARAMS, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read params.yaml once and return the validated config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: parameters file not found; run from the project root or pass --params"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    return parse_config(raw, source=str(path))
