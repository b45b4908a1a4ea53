"""params.yaml → one validated, typed :class:`Config`.

Nothing else in MammoFlow reads YAML. Every section is a frozen pydantic model that forbids
unknown keys, so a typo in params.yaml stops the run with an error naming the key, the bad
value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from mammoflow.models.backbones import BACKBONE_NAMES, PAPER_BACKBONES  # the registry: pure data

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names each bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PipelineConfig(_Section):
    """Which datasets a pipeline run processes."""

    datasets: list[str] = Field(
        default_factory=lambda: ["sample_mias", "sample_cmmd"], min_length=1
    )


class SampleConfig(_Section):
    """The embedded synthetic dataset."""

    seed: int = 20240601
    # up to hospital scale (CMMD: 1,775 women, 3,728 films) for the scale studies
    mias_patients: Annotated[int, Field(ge=6, le=5000)] = 20
    cmmd_patients: Annotated[int, Field(ge=4, le=5000)] = 12
    size: Annotated[int, Field(ge=64, le=4096)] = 256  # make_sample's own limit


class IngestConfig(_Section):
    """Ingestion: bad-file policy, acceptance rules for DICOM, pseudonymisation."""

    on_bad_file: Literal["fail", "quarantine"] = "fail"
    min_size: Annotated[int, Field(ge=1, le=65535)] = 256  # short side, pixels
    accept_for_processing: bool = False  # take FOR PROCESSING (raw detector) DICOMs too
    accept_burned_in: bool = False  # take DICOMs with BurnedInAnnotation YES (text in pixels)
    pseudonymize: Literal["none", "hmac"] = "none"  # hmac: key from MAMMOFLOW_PSEUDONYM_KEY


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
    k_folds: Annotated[int, Field(ge=2, le=20)] = 5
    group_by: Literal["patient", "image"] = "patient"
    seed: int = 42


class ModelConfig(_Section):
    """Backbones and the paper's classification head."""

    backbones: list[str] = Field(default_factory=lambda: list(PAPER_BACKBONES), min_length=1)
    weights: str = "imagenet"
    trainable_layers: Annotated[int, Field(ge=0, le=50)] = 3
    head_units: Annotated[int, Field(ge=8, le=8192)] = 512
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    input_size: Annotated[int, Field(ge=32, le=1024)] | None = None

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, value: list[str]) -> list[str]:
        unknown = [b for b in value if b not in BACKBONE_NAMES]
        if unknown:
            raise ValueError(
                f"unknown backbone(s) {unknown!r}; registered: {list(BACKBONE_NAMES)!r}"
            )
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
    feature_dtype: Literal["float16", "float32"] = "float32"
    augment: bool = False
    seed: int = 42


class _Override(BaseModel):
    """Keys of a section that one dataset sets differently; unset keys keep the global value.

    Each field has the global section's type and bounds; only the keys written are kept (and
    dumped), so ``input_size: null`` (native size) differs from not overriding it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}

    def given(self) -> dict[str, Any]:
        """The overridden keys and their values."""
        return {k: getattr(self, k) for k in self.model_fields_set}


def _override_of(section: type[_Section], exclude: tuple[str, ...] = ()) -> type[_Override]:
    """A partial copy of ``section``: every key optional, same types and bounds, no defaults."""
    fields: dict[str, Any] = {}
    for name, info in section.model_fields.items():
        if name in exclude:
            continue
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        fields[name] = (annotation, Field(default=None, validate_default=False))
    return create_model(
        f"{section.__name__}Override", __base__=_Override, __doc__=section.__doc__, **fields
    )


if TYPE_CHECKING:
    ModelOverride = _Override
    TrainOverride = _Override
else:
    #: ``datasets.<name>.model``: any model key but ``backbones`` (the DVC matrix is global)
    ModelOverride = _override_of(ModelConfig, exclude=("backbones",))
    #: ``datasets.<name>.train``: any train key
    TrainOverride = _override_of(TrainConfig)


class DatasetConfig(_Section):
    """One dataset's origin, and its own model / train keys (see :meth:`Config.for_dataset`)."""

    kind: Literal["mias", "cmmd"]
    acquire: Literal["sample", "local"] = "local"
    #: acquire: sample only — standard, or vendor_b (MIAS-shaped films of "another vendor":
    #: 12-bit, another detector curve and noise, other women; for external validation)
    variant: Literal["standard", "vendor_b"] = "standard"
    source: Path | None = None
    clinical: Path | None = None
    #: this dataset's model / train settings where they differ from the global ones
    model: ModelOverride = Field(default_factory=ModelOverride)
    train: TrainOverride = Field(default_factory=TrainOverride)

    @model_validator(mode="after")
    def _local_needs_source(self) -> DatasetConfig:
        if self.acquire == "local" and self.source is None:
            raise ValueError("a dataset with acquire: local needs 'source' (archive or folder)")
        if self.acquire == "local" and self.kind == "cmmd" and self.clinical is None:
            raise ValueError("a cmmd dataset needs 'clinical' (the clinical .xlsx or .csv)")
        if self.variant != "standard" and (self.acquire != "sample" or self.kind != "mias"):
            raise ValueError(
                f"variant {self.variant!r} is a generated MIAS sample: use it with kind: mias "
                "and acquire: sample"
            )
        return self


class EvaluateConfig(_Section):
    """Metrics on the held-out test set."""

    bootstrap: Annotated[int, Field(ge=0, le=100_000)] = 1000
    ci: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    #: refit: a model trained on every CV row; ensemble: the mean of the K fold models
    test_model: Literal["refit", "ensemble"] = "ensemble"


#: tracking.registry_metric: a CV aggregate (``cv_<metric>_mean|_std``) or a test metric
REGISTRY_METRIC_PATTERN = r"cv_\w+_(mean|std)|test_\w+"


class TrackingConfig(_Section):
    """MLflow logging and the model registry."""

    log_models: Literal["all", "final", "none"] = "all"
    #: cv_<metric>_mean: chosen without the test set (the default); test_<metric> peeks
    registry_metric: str = "cv_f1_macro_mean"

    @field_validator("registry_metric")
    @classmethod
    def _registry_metric(cls, v: str) -> str:
        if not re.fullmatch(REGISTRY_METRIC_PATTERN, v):
            raise ValueError(
                f"{v!r}: use cv_<metric>_mean (cross-validated, e.g. 'cv_f1_macro_mean') or "
                "test_<metric> (held-out test, optimistic when used to select)"
            )
        return v


#: Validation metrics a tuning study can optimise (keys of ``metrics.compute_metrics``; a
#: per-class ``f1_<class>`` / ``precision_<class>`` / ``recall_<class>`` is accepted as well).
TUNE_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "f1_macro",
    "f1_weighted",
    "precision_macro",
    "precision_weighted",
    "recall_macro",
    "recall_weighted",
)


class FloatRange(_Section):
    """A float search range; ``log: true`` samples log-uniformly (``low`` must be > 0)."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


def _range_within(rng: FloatRange, name: str, low: float, high: float, high_open: bool) -> None:
    too_high = rng.high >= high if high_open else rng.high > high
    if rng.low < low or too_high:
        bound = f"{high})" if high_open else f"{high}]"
        raise ValueError(f"{name} range [{rng.low}, {rng.high}] must lie in [{low}, {bound}")


_CLASS_WEIGHTS: tuple[Literal["balanced", "none"], ...] = ("balanced", "none")


class TuneSpace(_Section):
    """The Optuna search space: lists are categorical choices, ranges are floats."""

    head_units: list[Annotated[int, Field(ge=8, le=8192)]] = Field(
        default_factory=lambda: [128, 256, 512, 1024], min_length=1
    )
    dropout: FloatRange = Field(default_factory=lambda: FloatRange(low=0.1, high=0.6))
    learning_rate: FloatRange = Field(
        default_factory=lambda: FloatRange(low=1e-5, high=1e-1, log=True)
    )
    momentum: FloatRange = Field(default_factory=lambda: FloatRange(low=0.5, high=0.99))
    batch_size: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [8, 16, 32], min_length=1
    )
    trainable_layers: list[Annotated[int, Field(ge=0, le=50)]] = Field(
        default_factory=lambda: [1, 2, 3, 4], min_length=1
    )
    class_weight: list[Literal["balanced", "none"]] = Field(
        default_factory=lambda: list(_CLASS_WEIGHTS), min_length=1
    )

    @model_validator(mode="after")
    def _ranges_fit_the_model(self) -> TuneSpace:
        _range_within(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        if self.learning_rate.low <= 0:
            raise ValueError("learning_rate range must be above 0")
        _range_within(self.learning_rate, "learning_rate", 0.0, 1.0, high_open=False)
        _range_within(self.momentum, "momentum", 0.0, 1.0, high_open=True)
        for name in ("head_units", "batch_size", "trainable_layers", "class_weight"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a choice twice: {values!r}")
        return self


class TuneConfig(_Section):
    """Hyperparameter search (Optuna): space, objective, sampler, pruner and storage."""

    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str = "f1_macro"  # mean over the CV folds of this validation metric
    n_trials: Annotated[int, Field(ge=1, le=100_000)] = 20
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds per invocation; null = none
    seed: int = 42  # TPE seed (worker i of a parallel run uses seed + i)
    sampler_startup_trials: Annotated[int, Field(ge=0, le=1000)] = 5
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: Annotated[int, Field(ge=0, le=1000)] = 3
    pruner_warmup_folds: Annotated[int, Field(ge=0, le=20)] = 0
    storage: str = "sqlite:///optuna.db"  # env MAMMOFLOW_OPTUNA_STORAGE overrides
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    use_best: bool = False  # train stage: apply tuning/<dataset>-<backbone>.json
    space: TuneSpace = Field(default_factory=TuneSpace)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        per_class = value.startswith(("f1_", "precision_", "recall_"))
        if value not in TUNE_METRICS and not per_class:
            raise ValueError(f"unknown metric {value!r}; choose one of {list(TUNE_METRICS)!r}")
        return value

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(
                f"storage {value!r} is not a database URL; use e.g. sqlite:///optuna.db or "
                "postgresql://user:password@host:5432/optuna"
            )
        return value


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
    tune: TuneConfig = Field(default_factory=TuneConfig)

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

    def for_dataset(self, name: str) -> Config:
        """This config as ``name`` runs it: its ``datasets.<name>.model`` / ``.train`` applied.

        The result's override sections for ``name`` are empty, so resolving twice is the same
        as once, and keys set later on the result (command-line options) are not undone.
        """
        ds = self.dataset(name)
        if not ds.model.given() and not ds.train.given():
            return self
        model = ModelConfig.model_validate({**self.model.model_dump(), **ds.model.given()})
        train = TrainConfig.model_validate({**self.train.model_dump(), **ds.train.given()})
        plain = ds.model_copy(update={"model": ModelOverride(), "train": TrainOverride()})
        return self.model_copy(
            update={"model": model, "train": train, "datasets": {**self.datasets, name: plain}}
        )

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "options") -> Config:
        """A copy with dotted ``section.key`` overrides applied, validated like params.yaml."""
        raw = apply_overrides(self.model_dump(mode="json", by_alias=True), overrides)
        return parse_config(raw, source=source)

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
    if kind == "extra_forbidden" and loc.startswith("datasets.") and loc.endswith(".backbones"):
        return (
            f"unknown key {loc!r} (value {value!r}): backbones are chosen for every dataset "
            "by model.backbones (the DVC train matrix); remove it"
        )
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


def parse_assignments(items: list[str], option: str = "--set") -> dict[str, Any]:
    """``["train.epochs=1", "model.backbones=[vgg16]"]`` → dotted overrides (values in YAML).

    Raises:
        ConfigError: an item without ``=`` or a key, or a value that is not valid YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. train.epochs=1")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{option} {item!r}: the value is not valid YAML: {exc}") from None
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
