"""Lineage: DVC hashes and data locations (the real DVC), git_dirty, reproduce's pure parts."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mammoflow.config import parse_config
from mammoflow.dvcdata import (
    IN_REMOTE,
    LOCAL_ONLY,
    NOWHERE,
    UNKNOWN,
    dvc_hash,
    dvc_setup,
    locate,
    write_local_config,
)
from mammoflow.provenance import git_state, pipeline_outputs, study_params
from mammoflow.reproduce import compare, logged_config, package_drift, parse_param
from tests.helpers import ROOT, tiny_params

DVC = str(Path(sys.executable).with_name("dvc"))
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _dvc(*args: str, cwd: Path) -> None:
    subprocess.run([DVC, *args], cwd=cwd, check=True, capture_output=True)


def _added(repo: Path) -> str:
    """A folder of two files `dvc add`ed in ``repo``; its md5 as data.dvc records it."""
    (repo / "data").mkdir()
    (repo / "data" / "a.txt").write_text("a")
    (repo / "data" / "b.txt").write_text("b")
    _dvc("add", "-q", "data", cwd=repo)
    return str(yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"])


def test_hash_and_location_follow_the_cache_and_the_remote(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _dvc("init", "-q", "--no-scm", cwd=repo)
    _dvc("remote", "add", "-d", "r", "../remote", cwd=repo)
    md5 = _added(repo)
    assert dvc_hash(repo / "data") == md5 and md5.endswith(".dir")
    assert dvc_hash(repo / "missing") == UNKNOWN
    assert locate(repo, [md5]) == LOCAL_ONLY
    _dvc(
        "push",
        "-q",
        cwd=repo,
    )
    assert locate(repo, [md5]) == IN_REMOTE

    setup = dvc_setup(repo)
    assert setup is not None and setup.remote_url == str(tmp_path / "remote")  # resolved
    other = tmp_path / "other"
    other.mkdir()
    _dvc("init", "-q", "--no-scm", cwd=other)
    write_local_config(other, setup)
    assert dvc_setup(other) == setup
    assert locate(other, [md5]) == IN_REMOTE

    # one file of the folder gone from the cache and the remote: the version is incomplete
    a_md5 = dvc_hash(repo / "data" / "a.txt")
    for store in (repo / ".dvc" / "cache", tmp_path / "remote"):
        (store / "files" / "md5" / a_md5[:2] / a_md5[2:]).unlink()
    assert locate(repo, [md5]) == NOWHERE
    assert locate(repo, [UNKNOWN]) == UNKNOWN
    assert dvc_setup(tmp_path) is None


def test_pipeline_outputs_come_from_every_dvc_yaml() -> None:
    patterns = pipeline_outputs(ROOT)
    for wanted in (
        "dvc.lock",
        "metrics/*/*.json",
        "plots/*/*/roc.json",
        "reports/validation/*",
        "reports/comparison.md",
        "models/*/*",
        "tuning/dvc.lock",
        "tuning/*-*.json",
        "reports/*/audit.json",  # audit/dvc.yaml's wdir: ..
    ):
        assert wanted in patterns
    assert "params.yaml" not in patterns and not any(p.startswith("src") for p in patterns)


def test_git_dirty_means_code_or_params_changed(tmp_path: Path) -> None:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for rel, text in {
        "params.yaml": "a: 1\n",
        "dvc.lock": "x\n",
        "metrics/site/vgg16.json": "{}\n",
        "src/code.py": "x = 1\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("y\n")
    (tmp_path / "metrics/site/vgg16.json").write_text('{"f1": 1}\n')
    state = git_state(tmp_path)
    assert state["git_dirty"] == "false" and len(state["git_commit"]) == 40
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_state(tmp_path)["git_dirty"] == "true"
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "src/code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["git_dirty"] == "true"
    assert git_state(tmp_path / "..")["git_dirty"] in ("unknown", "true", "false")


def test_provenance_that_cannot_be_recorded_is_said(tmp_path: Path) -> None:
    from mammoflow.provenance import ProvenanceWarning, dvc_data_hash

    with pytest.warns(ProvenanceWarning, match="no git commit"):
        assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    with pytest.raises(FileNotFoundError, match=r"processed/site: no converted data.*convert"):
        dvc_data_hash("site", tmp_path)


def test_logged_params_rebuild_the_config_the_run_used() -> None:
    from mammoflow.tracking.record import _param_value

    raw = tiny_params(["sample_mias"], train={"epochs": 3})
    raw["datasets"]["sample_mias"]["train"] = {"epochs": 2}  # the dataset's own key wins
    cfg = parse_config(raw)
    logged = {k: _param_value(v) for k, v in study_params(cfg, "sample_mias").items()}
    today = tiny_params(["sample_cmmd"], train={"epochs": 9, "learning_rate": 0.5})
    today["datasets"]["sample_mias"]["train"] = {"epochs": 7}  # the checkout's own, since changed
    rebuilt = parse_config(logged_config(today, logged, "sample_mias", "vgg16"))
    assert study_params(rebuilt, "sample_mias") == study_params(cfg, "sample_mias")
    assert rebuilt.pipeline.datasets == ["sample_mias"] and rebuilt.model.backbones == ["vgg16"]
    assert rebuilt.tune.use_best is False
    assert [parse_param(s) for s in ("None", "True", "0.5", "[1, 2]", "auto")] == [
        None,
        True,
        0.5,
        [1, 2],
        "auto",
    ]


def test_verdicts_and_package_drift() -> None:
    logged = {"f1": 0.5, "test_auc": 0.7, "time_fold_s": 3.0, "pointing_game_n": 4.0}
    same = compare(logged, {"f1": 0.5, "test_auc": 0.7, "time_fold_s": 9.0}, 0.0)
    assert same.verdict == "identical" and same.only_logged == ["pointing_game_n"]
    close = compare(logged, {"f1": 0.51, "test_auc": 0.7}, 0.02)
    assert close.verdict == "within tolerance 0.02"
    assert compare(logged, {"f1": 0.51, "test_auc": 0.7}, 0.0).verdict == "DIFFERENT"
    assert compare(logged, {}, 1.0).verdict == "DIFFERENT"  # nothing to compare is no proof
    nan = compare({"f1": math.nan}, {"f1": math.nan}, 0.0)
    assert nan.verdict == "identical"
    tags = {"mammoflow.packages": '{"numpy": "2.0", "keras": "3.1"}', "tensorflow_version": "2.1"}
    now = {"numpy": "2.0", "keras": "3.2", "tensorflow": "2.1"}
    assert package_drift(tags, now) == [("keras", "3.1", "3.2")]


def test_earlier_reproductions_are_retired_and_unknown_runs_named(tmp_path: Path) -> None:
    from mammoflow.reproduce import ReproduceError, resolve_target, retire_earlier
    from mammoflow.tracking import TAG_KEY, Tracker

    tracker = Tracker(root=tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.suffixed_experiment_id("site", "-reproduce")
    assert tracker.client.get_experiment(exp).name == "mammoflow-site-reproduce"
    run = tracker.client.create_run(exp, tags={TAG_KEY: "k1"}).info.run_id
    other = tracker.client.create_run(exp, tags={TAG_KEY: "k2"}).info.run_id
    retire_earlier(tracker, "site", "k1")
    tags = tracker.client.get_run(run).data.tags
    assert TAG_KEY not in tags and tags["mammoflow.retired_config_hash"] == "k1"
    assert tracker.client.get_run(other).data.tags[TAG_KEY] == "k2"
    with pytest.raises(ReproduceError, match="does not record git_commit, dvc_data_hash"):
        resolve_target(tracker, f"runs:/{run}/model")
    with pytest.raises(ReproduceError, match="'runs:/0123abc' is not in the MLflow store"):
        resolve_target(tracker, "runs:/0123abc")
    with pytest.raises(ReproduceError, match="expected models:/"):
        resolve_target(tracker, "s3://bucket/model")


def test_a_commit_not_in_the_repository_is_named(tmp_path: Path) -> None:
    from mammoflow.reproduce import ReproduceError, worktree

    repo, plain = tmp_path / "repo", tmp_path / "plain"
    repo.mkdir()
    plain.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    missing = "0123456789abcdef" * 2 + "01234567"
    match = f"commit {missing} is not in this repository"
    with pytest.raises(ReproduceError, match=match), worktree(repo, missing, tmp_path / "s"):
        pass
    with (
        pytest.raises(ReproduceError, match="is not a git checkout"),
        worktree(plain, missing, tmp_path / "t"),
    ):
        pass


def test_a_version_whose_run_is_gone_keeps_its_tags_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mammoflow.tracking import Tracker
    from mammoflow.tracking.lineage import _mark_versions

    tracker = Tracker(root=tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracker.client
    client.create_registered_model("mammoflow-gone")
    gone = "0" * 32
    client.create_model_version("mammoflow-gone", (tmp_path / "m").as_uri(), tags={"run_id": gone})
    with caplog.at_level("WARNING", logger="mammoflow.tracking.lineage"):
        _mark_versions(client, {"some-parent": {"dvc_data_location": "remote"}})
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"mammoflow-gone v1: its run {gone} is not in the store")
    assert "dvc_data_location" not in client.get_model_version("mammoflow-gone", "1").tags
