"""The tuning package without training: surface, config, search space, best params, sampler,
pruner, storage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from pydantic import ValidationError

from mammoflow import tuning
from mammoflow.config import Config, ConfigError, TuneConfig, TuneSpace, load_config, parse_config
from mammoflow.paths import Layout
from mammoflow.tuning import params as tuned

ROOT = Path(__file__).resolve().parents[2]
BEST = {
    "head_units": 256,
    "dropout": 0.25,
    "trainable_layers": 2,
    "learning_rate": 0.003,
    "momentum": 0.8,
    "batch_size": 32,
    "class_weight": "none",
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cfg(**tune_section: Any) -> Config:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tune"] = {**raw.get("tune", {}), **tune_section}
    return parse_config(raw)


# ----------------------------------------------------------------------------- the package


def test_every_public_name_resolves_from_its_room() -> None:
    import importlib

    for name in tuning.__all__:
        value = getattr(tuning, name)
        home = getattr(value, "__module__", None)
        if home is not None and home.startswith("mammoflow.tuning."):  # functions, classes
            assert getattr(importlib.import_module(home), name) is value, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tuning.nope


def test_the_tuned_values_import_without_the_tuner() -> None:
    """training/inputs imports tuning.params: that must not load Optuna, MLflow or Keras."""
    code = (
        "import sys, mammoflow.tuning.params, mammoflow.tuning; "
        "print(sorted(m for m in ('optuna', 'mlflow', 'keras', 'tensorflow', "
        "'mammoflow.tuning.runner') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------- config


def test_params_yaml_tune_section_is_valid() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.tune.metric == "f1_macro" and cfg.tune.direction == "maximize"
    assert cfg.tune.storage == "sqlite:///optuna.db"
    assert cfg.tune.use_best is False
    assert cfg.tune.space.learning_rate.log is True
    assert cfg.flat()["tune.n_trials"] == cfg.tune.n_trials


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"metric": "f2_macro"}, "unknown metric"),
        ({"storage": "optuna.db"}, "not a database URL"),
        ({"pruner": "asha"}, "allowed values"),
        ({"space": {"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}}, "log range"),
        ({"space": {"dropout": {"low": 0.5, "high": 0.2}}}, "above high"),
        ({"space": {"dropout": {"low": 0.1, "high": 1.0}}}, "dropout range"),
        ({"space": {"momentum": {"low": 0.1, "high": 1.0}}}, "momentum range"),
        ({"space": {"batch_size": [8, 8]}}, "twice"),
        ({"space": {"batch_size": []}}, "at least 1"),
        ({"space": {"class_weight": ["sometimes"]}}, "allowed values"),
        ({"space": {"units": [8]}}, "unknown key"),
        ({"n_trials": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_tune_params_are_named(section: dict[str, Any], needle: str) -> None:
    raw = {"tune": section}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "tune" in str(err.value) and needle in str(err.value)


def test_per_class_metric_accepted() -> None:
    assert TuneConfig(metric="f1_malignant").metric == "f1_malignant"


# ----------------------------------------------------------------------------- search space


def test_suggest_samples_inside_the_space() -> None:
    space = TuneSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = tuning.suggest(trial, space)
        study.tell(trial, 0.0)
        assert set(params) == set(tuning.PARAM_NAMES)
        assert params["head_units"] in space.head_units
        assert params["batch_size"] in space.batch_size
        assert params["trainable_layers"] in space.trainable_layers
        assert params["class_weight"] in space.class_weight
        for name in ("dropout", "learning_rate", "momentum"):
            rng = getattr(space, name)
            assert rng.low <= params[name] <= rng.high
    dists = study.trials[0].distributions
    assert dists["learning_rate"].log is True and dists["dropout"].log is False
    assert isinstance(dists["trainable_layers"], optuna.distributions.CategoricalDistribution)


def test_fixed_point_and_single_choice() -> None:
    space = TuneSpace.model_validate(
        {"head_units": [64], "learning_rate": {"low": 0.01, "high": 0.01}}
    )
    fixed = optuna.trial.FixedTrial({**BEST, "head_units": 64, "learning_rate": 0.01})
    params = tuning.suggest(fixed, space)
    assert params["head_units"] == 64 and params["learning_rate"] == 0.01
    assert params["dropout"] == BEST["dropout"]


def test_seeded_tpe_is_reproducible_and_workers_differ() -> None:
    cfg = TuneConfig(seed=7, sampler_startup_trials=2)

    def run(worker: int) -> list[dict[str, Any]]:
        study = optuna.create_study(direction="maximize", sampler=tuning.make_sampler(cfg, worker))
        study.optimize(lambda t: tuning.suggest(t, cfg.space)["dropout"], n_trials=5)
        return [t.params for t in study.trials]

    assert run(0) == run(0)
    assert run(0) != run(1)


# ----------------------------------------------------------------------------- best params


def test_apply_params_writes_model_and_train() -> None:
    cfg = _cfg()
    out = tuning.apply_params(cfg, BEST)
    assert out.model.head_units == 256 and out.model.trainable_layers == 2
    assert out.model.dropout == 0.25
    assert out.train.learning_rate == 0.003 and out.train.batch_size == 32
    assert out.train.momentum == 0.8 and out.train.class_weight == "none"
    assert out.train.epochs == cfg.train.epochs and out.model.backbones == cfg.model.backbones
    assert cfg.model.head_units == 512  # the input is untouched (frozen config)
    assert tuning.overrides(BEST)["model.head_units"] == 256
    assert tuning.overrides(BEST)["train.class_weight"] == "none"


def test_apply_params_rejects_unknown_and_out_of_range() -> None:
    with pytest.raises(tuning.TuneError, match="epochs"):
        tuning.apply_params(_cfg(), {"epochs": 3})
    with pytest.raises(ValidationError):
        tuning.apply_params(_cfg(), {"dropout": 1.5})


def _write_best(path: Path, dataset: str = "sample_mias", backbone: str = "vgg16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": dataset, "backbone": backbone, "params": BEST}))
    return path


def test_apply_best_round_trip(tmp_path: Path) -> None:
    layout = Layout(root=tmp_path)
    path = tuning.best_params_path("sample_mias", "vgg16", layout)
    assert path == tmp_path / "tuning" / "sample_mias-vgg16.json"
    _write_best(path)
    out = tuned.apply_best(_cfg(use_best=True), "sample_mias", "vgg16", path)
    assert out.model.head_units == 256 and out.train.learning_rate == 0.003


def test_apply_best_refuses_other_dataset_and_missing_file(tmp_path: Path) -> None:
    path = _write_best(tmp_path / "best.json", backbone="resnet50")
    with pytest.raises(tuning.TuneError, match="resnet50"):
        tuned.apply_best(_cfg(), "sample_mias", "vgg16", path)
    with pytest.raises(FileNotFoundError, match="mammoflow tune"):
        tuned.apply_best(_cfg(), "sample_mias", "vgg16", tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(tuning.TuneError, match="not valid JSON"):
        tuned.apply_best(_cfg(), "sample_mias", "vgg16", bad)
    bad.write_text("[1, 2]")
    with pytest.raises(tuning.TuneError, match="params"):
        tuned.apply_best(_cfg(), "sample_mias", "vgg16", bad)


# ----------------------------------------------------------------------------- pruner


def test_pruner_choice() -> None:
    median = tuning.make_pruner(TuneConfig(pruner="median", pruner_warmup_folds=1), n_folds=5)
    assert isinstance(median, optuna.pruners.MedianPruner)
    hyper = tuning.make_pruner(TuneConfig(pruner="hyperband"), n_folds=5)
    assert isinstance(hyper, optuna.pruners.HyperbandPruner)
    assert hyper._max_resource == 5 and hyper._min_resource == 1
    assert isinstance(tuning.make_pruner(TuneConfig(pruner="none"), 5), optuna.pruners.NopPruner)


def _median_study(warmup_folds: int) -> optuna.Study:
    cfg = TuneConfig(pruner="median", pruner_startup_trials=2, pruner_warmup_folds=warmup_folds)
    study = optuna.create_study(direction="maximize", pruner=tuning.make_pruner(cfg, 3))
    for value in (0.8, 0.7):
        trial = study.ask()
        for step in (1, 2, 3):
            trial.report(value, step)
        study.tell(trial, value)
    return study


@pytest.mark.parametrize(("warmup", "pruned_at"), [(0, 1), (1, 2), (2, 3)])
def test_median_pruner_warmup_counts_folds(warmup: int, pruned_at: int) -> None:
    study = _median_study(warmup)
    trial = study.ask()
    for step in (1, 2, 3):
        trial.report(0.1, step)
        if trial.should_prune():
            break
    assert step == pruned_at


# ----------------------------------------------------------------------------- storage


def test_default_sqlite_resolves_under_the_project_root(tmp_path: Path) -> None:
    url = tuning.resolve_storage("sqlite:///optuna.db", tmp_path, env={})
    assert url == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    assert url.startswith("sqlite:////")
    assert not tuning.is_server_storage(url)


def test_absolute_sqlite_and_memory_unchanged(tmp_path: Path) -> None:
    absolute = f"sqlite:///{tmp_path}/x.db"
    assert tuning.resolve_storage(absolute, "/elsewhere", env={}) == absolute
    assert tuning.resolve_storage("sqlite:///:memory:", tmp_path, env={}) == "sqlite:///:memory:"


def test_env_overrides_params_and_postgres_gets_psycopg3(tmp_path: Path) -> None:
    env = {tuning.STORAGE_ENV: "postgresql://mf:s3cret@127.0.0.1:15432/optuna"}
    url = tuning.resolve_storage("sqlite:///optuna.db", tmp_path, env=env)
    assert url == "postgresql+psycopg://mf:s3cret@127.0.0.1:15432/optuna"
    assert tuning.is_server_storage(url)
    assert (
        tuning.resolve_storage("postgres://h/db", tmp_path, env={}) == "postgresql+psycopg://h/db"
    )
    explicit = "postgresql+psycopg2://h/db"
    assert tuning.resolve_storage(explicit, tmp_path, env={}) == explicit
    empty = {tuning.STORAGE_ENV: ""}
    assert tuning.resolve_storage("sqlite:////a.db", tmp_path, env=empty) == "sqlite:////a.db"
    with pytest.raises(tuning.TuneError, match="not a database URL"):
        tuning.resolve_storage("optuna.db", tmp_path, env={})


def test_env_var_is_read_from_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.STORAGE_ENV, "postgresql://u:p@db:5432/optuna")
    assert tuning.resolve_storage("sqlite:///optuna.db").startswith("postgresql+psycopg://u:p@db")


def test_redact_url_hides_the_password() -> None:
    red = tuning.redact_url("postgresql+psycopg://mf:s3cret@127.0.0.1:15432/optuna")
    assert "s3cret" not in red and "mf:" in red and "127.0.0.1:15432/optuna" in red
    assert tuning.redact_url("sqlite:////tmp/o.db") == "sqlite:////tmp/o.db"


def test_several_workers_need_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tuning.STORAGE_ENV, raising=False)
    with pytest.raises(tuning.TuneError, match="PostgreSQL"):
        tuning.run_tuning(_cfg(), "sample_mias", "vgg16", workers=2, layout=Layout(tmp_path))
    with pytest.raises(tuning.TuneError, match="unknown backbone"):
        tuning.run_tuning(_cfg(), "sample_mias", "alexnet", layout=Layout(tmp_path))


# ----------------------------------------------------------------------------- study identity


def test_study_name_tracks_the_objective_not_the_tuned_values() -> None:
    cfg = _cfg()
    name = tuning.study_name(cfg, "sample_mias", "vgg16", "data", "split")
    assert name.startswith("sample_mias-vgg16-") and len(name) == len("sample_mias-vgg16-") + 12
    same = [
        tuning.apply_params(cfg, BEST),  # tuned values do not define the study
        _cfg(n_trials=99, workers=3, seed=1, pruner="hyperband", storage="sqlite:////x.db"),
    ]
    for other in same:
        assert tuning.study_name(other, "sample_mias", "vgg16", "data", "split") == name
    different = [
        _cfg(space={"head_units": [64, 128]}),
        _cfg(metric="balanced_accuracy"),
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})}),
    ]
    for other in different:
        assert tuning.study_name(other, "sample_mias", "vgg16", "data", "split") != name
    assert tuning.study_name(cfg, "sample_mias", "resnet50", "data", "split") != name
    assert tuning.study_name(cfg, "sample_mias", "vgg16", "data2", "split") != name
    assert tuning.study_name(cfg, "sample_mias", "vgg16", "data", "split2") != name
