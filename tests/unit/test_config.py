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
