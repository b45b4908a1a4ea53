from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mammoflow.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project dir with a small params.yaml."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sample"].update({"mias_patients": 8, "cmmd_patients": 6, "size": 64})
    raw["convert"]["size"] = 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_typo_in_params_is_a_clear_error(project: Path) -> None:
    text = (project / "params.yaml").read_text().replace("batch_size:", "batchsize:")
    (project / "params.yaml").write_text(text)
    result = runner.invoke(app, ["acquire", "sample_mias"])
    assert result.exit_code == 2
    assert "unknown key 'train.batchsize'" in result.output
    assert "Traceback" not in result.output


def test_unknown_dataset(project: Path) -> None:
    result = runner.invoke(app, ["convert", "nope"])
    assert result.exit_code == 2
    assert "unknown dataset 'nope'" in result.output


def test_data_stages_end_to_end(project: Path) -> None:
    for dataset in ("sample_mias", "sample_cmmd"):
        for args in (
            ["acquire", dataset],
            ["ingest", "dataset", dataset],
            ["validate", dataset],
            ["convert", dataset],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
    summary = json.loads((project / "metrics/validation/sample_mias.json").read_text())
    assert summary["success"] is True and summary["failed"] == 0
    assert (project / "reports/validation/sample_cmmd/data_docs/index.html").is_file()
    pngs = sorted((project / "data/processed/sample_mias/images").glob("*.png"))
    assert len(pngs) == 16
    # a rerun converts nothing again
    result = runner.invoke(app, ["convert", "sample_mias"])
    assert json.loads(result.stdout)["skipped"] == 16


def test_ingest_reports_missing_raw(project: Path) -> None:
    result = runner.invoke(app, ["ingest", "dataset", "sample_mias"])
    assert result.exit_code == 2
    assert "raw data missing; run `mammoflow acquire sample_mias` first" in result.output
