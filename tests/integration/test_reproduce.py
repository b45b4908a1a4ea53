"""`mammoflow reproduce` end to end: real git, DVC (a local-directory remote) and MLflow.

A site folder is run through `dvc repro` and pushed; one film changes; it runs and is pushed
again; the working data and the DVC cache are deleted. Reproducing the first run's registered
version fetches its data (not the current one) from the remote and gets identical metrics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    copy_project,
    delete_mlflow_models_and_experiments,
    mlflow_client,
    replace_film,
    tiny_params,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


MARKED: dict[str, list[str]] = {}  # run ids mark_pushed updated after each push


def _push(project: Path, after: str) -> None:
    """`dvc push`, then what a flow does after it: mark the runs whose data is now pushed."""
    from mammoflow.tracking import Tracker
    from mammoflow.tracking.lineage import mark_pushed

    _run(["dvc", "push"], project)
    tracker = Tracker(root=project, uri=f"sqlite:///{project / 'mlflow.db'}")
    MARKED[after] = mark_pushed(project, tracker)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two runs of the `site` dataset (one film changed between them), each pushed to a
    local-directory DVC remote."""
    from mammoflow.data.sample import make_sample

    base = tmp_path_factory.mktemp("reproduce")
    make_sample(base / "gen", seed=20240601, mias_patients=12, cmmd_patients=2, size=64)
    source = base / "hospital"
    shutil.copytree(base / "gen" / "mias", source)
    dest = base / "project"
    copy_project(dest)
    raw = tiny_params(
        ["site"], split={"k_folds": 2, "test_size": 0.2}, bootstrap=10, base=dest / "params.yaml"
    )
    raw["datasets"]["site"] = {"kind": "mias", "acquire": "local", "source": str(source)}
    raw["ingest"]["min_size"] = 64  # the films are 64 px
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], dest)
    _run([*GIT, "add", "-A"], dest)
    _run([*GIT, "commit", "-qm", "site study"], dest)
    _run(["dvc", "remote", "add", "-d", "-f", "--local", "test", str(base / "remote")], dest)

    _run(["dvc", "repro", "evaluate@site"], dest)
    _push(dest, "first")
    replace_film(source / "mdb003.pgm")
    _run(["dvc", "repro", "evaluate@site"], dest)
    _push(dest, "second")
    try:
        yield dest
    finally:
        delete_mlflow_models_and_experiments(dest)


def test_reproduce_fetches_the_first_runs_data_and_gets_identical_metrics(project: Path) -> None:
    client = mlflow_client(project)
    first, second = (client.get_model_version("mammoflow-site", v) for v in ("1", "2"))
    head = _run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert first.tags["git_commit"] == head
    assert first.tags["git_dirty"] == "false"  # dvc.lock, metrics/, plots/ are the pipeline's
    assert first.tags["dvc_data_hash"] != second.tags["dvc_data_hash"]  # the film changed
    assert first.tags["dvc_remote"] == str(project.parent / "remote")
    parents = [
        client.get_run(v.tags["run_id"]).data.tags["mlflow.parentRunId"] for v in (first, second)
    ]
    # trained before its push ("local cache only"), marked fetchable after it
    assert {"first": [parents[0]], "second": [parents[1]]} == MARKED
    for version, parent in zip((first, second), parents, strict=True):
        assert version.tags["dvc_data_location"] == "remote"
        assert client.get_run(parent).data.tags["dvc_data_location"] == "remote"
    inputs = client.get_run(parents[0]).inputs.dataset_inputs
    dvc_input = next(i.dataset for i in inputs if i.dataset.name == "site-dvc")
    assert dvc_input.digest == first.tags["dvc_data_hash"]
    assert str(project.parent / "remote" / "files" / "md5") in dvc_input.source

    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout
    lock = (project / "dvc.lock").read_text()

    t0 = time.perf_counter()
    res = _run(["mammoflow", "reproduce", "models:/mammoflow-site/1"], project, check=False)
    seconds = time.perf_counter() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "verdict: identical" in out, out[-6000:]
    assert first.tags["dvc_data_hash"] in out
    assert "test_f1_macro" in out
    print(f"{out}\nmammoflow reproduce took {seconds:.0f} s")

    assert _run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout == status
    assert (project / "dvc.lock").read_text() == lock
    assert not (project / "data").exists()  # fetched into the scratch tree, not here
    assert len(_run(["git", "worktree", "list"], project).stdout.splitlines()) == 1
    exp = client.get_experiment_by_name("mammoflow-site-reproduce")
    runs = client.search_runs([exp.experiment_id], "tags.`mammoflow.role` = 'parent'")
    parent = client.get_model_version("mammoflow-site", "1").tags["run_id"]
    assert [r.data.tags["mammoflow.verdict"] for r in runs] == ["identical"]
    assert (
        runs[0].data.tags["mammoflow.reproduces"]
        == client.get_run(parent).data.tags["mlflow.parentRunId"]
    )


def test_a_data_version_in_no_cache_or_remote_fails_naming_its_hash(project: Path) -> None:
    client = mlflow_client(project)
    wanted = client.get_model_version("mammoflow-site", "1").tags["dvc_data_hash"]
    remote = project.parent / "remote"
    shutil.move(remote, project.parent / "remote-away")
    shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)
    try:
        res = _run(["mammoflow", "reproduce", "models:/mammoflow-site/1"], project, check=False)
    finally:
        shutil.move(project.parent / "remote-away", remote)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-4000:]
    assert wanted in out and "neither the DVC cache" in out, out[-4000:]
    assert len(_run(["git", "worktree", "list"], project).stdout.splitlines()) == 1
