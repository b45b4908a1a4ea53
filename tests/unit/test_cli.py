from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mammoflow.cli import app
from tests.helpers import scratch_params

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project dir with a small params.yaml."""
    scratch_params(
        tmp_path, sample={"mias_patients": 8, "cmmd_patients": 6, "size": 64}, convert={"size": 64}
    )
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


@pytest.mark.slow  # ~11 s: both sample datasets through four commands
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
    result = runner.invoke(app, ["convert", "sample_mias", "--json"])
    assert json.loads(result.stdout)["skipped"] == 16


def test_ingest_reports_missing_raw(project: Path) -> None:
    result = runner.invoke(app, ["ingest", "dataset", "sample_mias"])
    assert result.exit_code == 2
    assert "raw data missing; run `mammoflow acquire sample_mias` first" in result.output


def _flat_field(root: Path) -> int:
    """Mark every DICOM under ``root`` as a flat-field QC image; return how many."""
    import pydicom

    files = sorted(root.rglob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ViewPosition = "FLATFIELD"
        ds.save_as(path, enforce_file_format=True)
    return len(files)


def test_ingest_hints_and_exit_codes_per_interface(project: Path) -> None:
    """CLI ingest hints at --on-bad-file, the pipeline stage at the params key; quarantine of
    every file exits non-zero."""
    from mammoflow.data.sample import make_sample

    sample = make_sample(project / "s", seed=1, mias_patients=2, cmmd_patients=2, size=64)
    n = _flat_field(sample.cmmd_dir)
    base = ["ingest", "cmmd", str(sample.cmmd_dir), "--clinical", str(sample.clinical_path)]
    result = runner.invoke(app, [*base, "--out", "o", "--min-size", "32"])
    assert result.exit_code == 2
    assert "rerun with --on-bad-file quarantine" in result.output
    assert "on_bad_file=" not in result.output and "ingest.on_bad_file" not in result.output
    result = runner.invoke(
        app, [*base, "--out", "o", "--min-size", "32", "--on-bad-file", "quarantine"]
    )
    assert result.exit_code == 2
    assert f"0 images ingested, {n} quarantined" in " ".join(result.output.split())
    assert not (project / "o" / "manifest.parquet").exists()

    assert runner.invoke(app, ["acquire", "sample_cmmd"]).exit_code == 0
    _flat_field(project / "data/raw/sample_cmmd")
    result = runner.invoke(app, ["ingest", "dataset", "sample_cmmd"])
    assert result.exit_code == 2
    assert "set ingest.on_bad_file: quarantine in params.yaml" in " ".join(result.output.split())
    assert "--on-bad-file" not in result.output


def test_study_offline_without_imagenet_stops_at_once(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ImageNet file and no network: the files, the folder and `--weights none`, nothing run."""
    from mammoflow.models import weights

    def offline(backbone: str, keras_home: Path) -> Path:
        raise OSError("Name or service not known")

    monkeypatch.setattr(weights, "_download", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    result = runner.invoke(app, ["study", "--dataset", "mias", "--backbone", "vgg16"])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in out
    assert str(tmp_path / "keras" / "models") in out
    assert "mammoflow study --dataset mias --weights none" in out
    assert "Traceback" not in result.output
    assert not (project / "data").exists()  # stopped before acquire


def test_study_options_over_the_dataset_settings(project: Path) -> None:
    from mammoflow.cli import _study_config

    params = project / "params.yaml"
    cfg = _study_config(params, "mias", None, [], [])
    assert (cfg.model.weights, cfg.model.input_size) == ("imagenet", None)
    cfg = _study_config(
        params, "sample_mias", "none", ["vgg16"], ["train.epochs=1", "model.input_size=96"]
    )
    assert cfg.model.backbones == ["vgg16"] and cfg.train.epochs == 1
    assert (cfg.model.weights, cfg.model.input_size) == ("none", 96)  # options beat the dataset's
    assert cfg.for_dataset("sample_mias").model.input_size == 96
    result = runner.invoke(app, ["study", "--dataset", "mias", "--set", "train.epochs=0"])
    assert result.exit_code == 2 and "'train.epochs': bad value 0" in result.output
    result = runner.invoke(app, ["study", "--dataset", "mias", "--set", "epochs"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output
    result = runner.invoke(app, ["study", "--dataset", "nope"])
    assert result.exit_code == 2 and "unknown dataset 'nope'" in result.output
