from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mammoflow.config import ConfigError, apply_overrides, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.split.k_folds >= 3
    assert cfg.train.batch_size >= 8
    assert set(cfg.pipeline.datasets) <= set(cfg.datasets)
    assert cfg.flat()["train.learning_rate"] == pytest.approx(1e-4)


def test_unknown_key_is_named() -> None:
    raw = _raw()
    raw["train"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch' \(value 3\)"):
        parse_config(raw)


def test_wrong_type_and_range_are_named_together() -> None:
    raw = _raw()
    raw["train"]["batch_size"] = 0
    raw["split"]["k_folds"] = "five"
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    msg = str(exc.value)
    assert "'train.batch_size': bad value 0" in msg
    assert "greater than or equal to 1" in msg
    assert "'split.k_folds': bad value 'five'" in msg


def test_literal_lists_allowed_values() -> None:
    raw = _raw()
    raw["split"]["group_by"] = "study"
    with pytest.raises(
        ConfigError,
        match=r"'split.group_by': bad value 'study': allowed values are 'patient' or 'image'",
    ):
        parse_config(raw)


def test_unknown_backbone() -> None:
    raw = _raw()
    raw["model"]["backbones"] = ["vgg17"]
    with pytest.raises(ConfigError, match=r"vgg17"):
        parse_config(raw)


def test_pipeline_dataset_must_be_defined() -> None:
    raw = _raw()
    raw["pipeline"]["datasets"] = ["nope"]
    with pytest.raises(ConfigError, match=r"pipeline.datasets names \['nope'\]"):
        parse_config(raw)


def test_cmmd_needs_clinical() -> None:
    raw = _raw()
    del raw["datasets"]["cmmd"]["clinical"]  # a local CMMD needs its clinical table
    with pytest.raises(ConfigError, match="clinical"):
        parse_config(raw)


def test_typo_in_params_file(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text().replace("learning_rate:", "learning_rat:")
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides() -> None:
    raw = apply_overrides(_raw(), {"train.epochs": 2, "model.backbones": ["vgg16"]})
    cfg = parse_config(raw)
    assert cfg.train.epochs == 2
    assert cfg.model.backbones == ["vgg16"]


def test_config_is_frozen() -> None:
    cfg = load_config(ROOT / "params.yaml")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        cfg.train.epochs = 3  # type: ignore[misc]


def test_ingest_keys_defaults_and_bad_values() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert (cfg.ingest.min_size, cfg.ingest.accept_for_processing, cfg.ingest.pseudonymize) == (
        256,
        False,
        "none",
    )
    raw = _raw()
    raw["ingest"].update({"pseudonymize": "sha1", "min_size": 0, "accept_for_processing": "maybe"})
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    msg = str(exc.value)
    assert "'ingest.pseudonymize': bad value 'sha1': allowed values are 'none' or 'hmac'" in msg
    assert "'ingest.min_size': bad value 0" in msg
    assert "'ingest.accept_for_processing': bad value 'maybe'" in msg


def test_demo_settings_live_with_the_sample_datasets() -> None:
    """The sample datasets keep today's demo settings; mias / cmmd get the paper's."""
    cfg = load_config(ROOT / "params.yaml")
    assert (cfg.model.weights, cfg.model.input_size) == ("imagenet", None)
    for name in ("sample_mias", "sample_cmmd"):
        resolved = cfg.for_dataset(name)
        assert (resolved.model.weights, resolved.model.input_size) == ("none", 80)
        assert resolved.model.backbones == ["vgg16", "vgg19", "resnet50", "inception_v3"]
        assert (resolved.model.trainable_layers, resolved.model.head_units) == (3, 512)
        assert (resolved.train.epochs, resolved.train.batch_size) == (10, 16)
        assert resolved.train.learning_rate == pytest.approx(1e-4)
        assert resolved.split.k_folds == 5
        assert resolved.for_dataset(name) == resolved  # resolving twice is resolving once
    for name in ("mias", "cmmd"):
        resolved = cfg.for_dataset(name)
        assert (resolved.model.weights, resolved.model.input_size) == ("imagenet", None)
        assert (resolved.train.epochs, resolved.train.batch_size) == (10, 16)
        assert resolved.train.learning_rate == pytest.approx(1e-4)
        assert resolved.split.k_folds == 5


def test_native_sizes_for_the_real_datasets() -> None:
    from mammoflow.models.backbones import input_size_for

    cfg = load_config(ROOT / "params.yaml").for_dataset("mias")
    sizes = {b: input_size_for(b, cfg.model.input_size) for b in cfg.model.backbones}
    assert sizes == {"vgg16": 224, "vgg19": 224, "resnet50": 224, "inception_v3": 299}


def test_study_params_are_the_resolved_ones() -> None:
    """MLflow params (and the resume key) hold what each dataset actually ran with."""
    from mammoflow.provenance import study_params

    cfg = load_config(ROOT / "params.yaml")
    demo = study_params(cfg, "sample_mias")
    assert (demo["model.weights"], demo["model.input_size"]) == ("none", 80)
    real = study_params(cfg, "mias")
    assert (real["model.weights"], real["model.input_size"]) == ("imagenet", None)
    assert not any(k.startswith("datasets.") for k in demo)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("model", "input_size", 10, r"'datasets\.sample_mias\.model\.input_size': bad value 10"),
        ("model", "weights", None, r"'datasets\.sample_mias\.model\.weights': bad value None"),
        ("model", "dropuot", 0.2, r"unknown key 'datasets\.sample_mias\.model\.dropuot'"),
        (
            "model",
            "backbones",
            ["vgg16"],
            r"'datasets\.sample_mias\.model\.backbones'.*model\.backbones",
        ),
        ("train", "epochs", 0, r"'datasets\.sample_mias\.train\.epochs': bad value 0"),
        (
            "train",
            "precision",
            "fp8",
            r"'datasets\.sample_mias\.train\.precision': bad value 'fp8'",
        ),
    ],
)
def test_bad_dataset_override_is_named(
    section: str, key: str, value: object, expected: str
) -> None:
    raw = _raw()
    raw["datasets"]["sample_mias"].setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=expected):
        parse_config(raw)


def test_override_keeps_only_the_keys_written() -> None:
    raw = _raw()
    raw["datasets"]["mias"]["model"] = {"input_size": None}  # native, explicitly
    raw["datasets"]["mias"]["train"] = {"epochs": 2}
    cfg = parse_config(raw)
    dumped = cfg.model_dump(mode="json", by_alias=True)["datasets"]["mias"]
    assert dumped["model"] == {"input_size": None} and dumped["train"] == {"epochs": 2}
    assert parse_config(cfg.model_dump(mode="json", by_alias=True)) == cfg  # round trip
    resolved = cfg.for_dataset("mias")
    assert resolved.train.epochs == 2 and resolved.model.weights == "imagenet"
    assert cfg.for_dataset("sample_mias").train.epochs == 10


def test_options_set_after_resolution_win() -> None:
    cfg = load_config(ROOT / "params.yaml").for_dataset("sample_mias")
    opt = cfg.with_overrides({"model.input_size": 96, "train.epochs": 1})
    assert opt.for_dataset("sample_mias").model.input_size == 96
    assert opt.for_dataset("sample_mias").train.epochs == 1
    with pytest.raises(ConfigError, match=r"'train\.epochs': bad value 0"):
        cfg.with_overrides({"train.epochs": 0})
