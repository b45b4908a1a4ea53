"""Optuna tuning end to end on a tiny sample project: a study, pruning, PostgreSQL workers.

The project (12 synthetic MIAS women, 64 px, 3 folds, VGG16 at 32 px, 2 epochs) is built with
the stage functions in a temporary working directory; Optuna and MLflow use their default
SQLite stores there. The PostgreSQL test starts a real server through the team stack module
(infra/local/stack.py: initdb in a temporary directory, as a non-root user when run as root,
127.0.0.1, a free port) and runs one study with two worker processes against it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from infra.local import stack as stack_mod
from optuna.trial import TrialState

from mammoflow import tuning
from mammoflow.config import Config, parse_config
from mammoflow.data.acquire import acquire_stage
from mammoflow.data.convert import convert_stage
from mammoflow.data.ingest import ingest_stage
from mammoflow.data.split import split_stage
from mammoflow.paths import Layout
from mammoflow.tuning import params as tuned
from tests.helpers import mlflow_client, prepare_data, project_dir, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "sample_mias"
BACKBONE = "vgg16"
SPACE = {
    "head_units": [16, 32],
    "dropout": {"low": 0.1, "high": 0.5},
    "learning_rate": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
    "momentum": {"low": 0.5, "high": 0.95},
    "batch_size": [8],
    "trainable_layers": [1, 2],
    "class_weight": ["balanced", "none"],
}
GOOD = {
    "head_units": 16,
    "dropout": 0.1,
    "trainable_layers": 1,
    "momentum": 0.9,
    "batch_size": 8,
    "class_weight": "balanced",
}


def _params() -> dict[str, Any]:
    raw = tiny_params(
        [DATASET],
        [BACKBONE],
        sample={"mias_patients": 12},
        split={"k_folds": 3, "test_size": 0.2},
        train={"epochs": 2, "precision": "float32"},
        bootstrap=None,
        log_models=None,
    )
    raw["tune"].update(
        {
            "n_trials": 4,
            "sampler_startup_trials": 2,
            "pruner": "median",
            "pruner_startup_trials": 2,
            "pruner_warmup_folds": 0,
            "space": SPACE,
        }
    )
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config]]:
    root = tmp_path_factory.mktemp("tune")
    with project_dir(root, _params(), unset=("MLFLOW_TRACKING_URI", tuning.STORAGE_ENV)) as cfg:
        prepare_data(cfg, DATASET)
        yield root, cfg


def _study_runs(root: Path, parent_id: str) -> tuple[Any, list[Any]]:
    """A study's parent run and its nested trial runs (by trial number)."""
    client = mlflow_client(root)
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        max_results=500,
    )
    return parent, sorted(runs, key=lambda r: int(r.data.tags["mammoflow.trial"]))


def test_tiny_study_completes_and_records_best(project: tuple[Path, Config]) -> None:
    root, cfg = project
    res = tuning.run_tuning(cfg, DATASET, BACKBONE, n_trials=4)
    trials = res["trials"]
    assert trials["complete"] + trials["pruned"] == 4 and trials["fail"] == 0
    assert trials["complete"] >= 2  # the pruner waits for 2 complete trials
    assert res["trials_per_min"] > 0 and (root / "optuna.db").is_file()

    # the Optuna study holds the same best trial as the file the train stage reads
    study = optuna.load_study(study_name=res["study_name"], storage=f"sqlite:///{root}/optuna.db")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert study.best_value == max(t.value for t in complete)
    best_file = root / "tuning" / f"{DATASET}-{BACKBONE}.json"
    best = json.loads(best_file.read_text())
    assert best["best_value"] == pytest.approx(study.best_value)
    assert best["best_trial"] == study.best_trial.number == res["best_trial"]
    assert best["params"] == study.best_params
    assert set(best["params"]) == set(tuning.PARAM_NAMES)
    assert best["params"]["head_units"] in SPACE["head_units"]
    assert 1e-4 <= best["params"]["learning_rate"] <= 0.1
    assert best["metric"] == "f1_macro" and best["direction"] == "maximize"

    # with tune.use_best the train stage's config takes the tuned values
    tuned_cfg = tuned.apply_best(cfg, DATASET, BACKBONE, best_file)
    assert tuned_cfg.model.head_units == best["params"]["head_units"]
    assert tuned_cfg.train.learning_rate == pytest.approx(best["params"]["learning_rate"])
    assert tuned_cfg.model.trainable_layers == best["params"]["trainable_layers"]

    # MLflow: a parent per study, a nested run per trial with params, steps and final state
    parent, runs = _study_runs(root, res["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mammoflow.study"] == res["study_name"]
    assert parent.data.metrics["best_f1_macro"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in mlflow_client(root).list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "best_params.json", "intermediate_values.png"} <= artifacts
    assert "param_importances.png" in artifacts or "param_importances.txt" in artifacts
    assert [int(r.data.tags["mammoflow.trial"]) for r in runs] == [t.number for t in study.trials]
    client = mlflow_client(root)
    for run, trial in zip(runs, study.trials, strict=True):
        assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
        steps = client.get_metric_history(run.info.run_id, "running_f1_macro")
        assert [m.step for m in steps] == sorted(trial.intermediate_values)
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.tags["mammoflow.trial_state"] == "complete"
            assert run.data.metrics["f1_macro"] == pytest.approx(trial.value)
            assert len(steps) == 3
        else:
            assert run.info.status == "KILLED"
            assert run.data.tags["mammoflow.trial_state"] == "pruned"

    # the same configuration again: the study is reopened and already has its trials
    again = tuning.run_tuning(cfg, DATASET, BACKBONE, n_trials=4)
    assert again["resumed"] and again["new_trials"] == 0
    assert again["study_name"] == res["study_name"]
    assert again["parent_run_id"] == res["parent_run_id"]


@pytest.fixture(scope="module")
def learnable(
    project: tuple[Path, Config], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Config]:
    """The same tiny project with every image's grey level set by its class (plus noise).

    On the sample itself (small lesions seen at 32 px through random weights) a head that does
    not learn scores about as well as one that does. Here a trained head reaches F1 = 1 on the
    first fold in two epochs, while the classes are close enough in grey level (100/125/150,
    noise 4) that an untrained (random) head is no better than chance: a region of the space
    where the head cannot learn is unambiguously bad. Initialisation is seeded (train.seed).
    """
    import numpy as np
    from PIL import Image

    from mammoflow.data.manifest import read_manifest, write_manifest
    from mammoflow.files import sha256_file

    root = tmp_path_factory.mktemp("tune-learnable")
    raw = _params()
    raw["tune"]["space"] = {
        **SPACE,
        "learning_rate": {"low": 1e-4, "high": 1.0, "log": True},
        "momentum": {"low": 0.0, "high": 0.99},
    }
    raw["tune"]["sampler_startup_trials"] = 10
    cfg = parse_config(raw)
    layout = Layout(root)
    for stage in (acquire_stage, ingest_stage, convert_stage):
        stage(cfg, DATASET, layout)
    frame = read_manifest(layout.processed(DATASET))
    rng = np.random.default_rng(0)
    for path, label in zip(frame["converted_path"], frame["label_index"], strict=True):
        with Image.open(path) as im:
            shape = np.asarray(im).shape
        grey = np.clip(100 + 25 * int(label) + rng.normal(0, 4, shape), 0, 255)
        Image.fromarray(grey.astype(np.uint8)).save(path)
    frame["converted_sha256"] = [sha256_file(Path(p)) for p in frame["converted_path"]]
    write_manifest(frame, layout.processed(DATASET) / "manifest.parquet")
    split_stage(cfg, DATASET, layout)
    return root, cfg


def test_pruning_stops_a_trial_in_a_bad_region(learnable: tuple[Path, Config]) -> None:
    """Two sound trials complete; a learning rate of 1 with momentum 0.99 (SGD diverges: the weights blow up and
    every image gets the same class) is pruned after its first fold, its running F1 being below
    the median of the complete trials. (A tiny learning rate is not reliably bad here: with
    seeded weights an untrained head can already separate three grey levels.)"""
    root, cfg = learnable
    layout = Layout(root)
    name, storage, _ = tuning.study_identity(cfg, DATASET, BACKBONE, layout)
    assert storage == f"sqlite:///{root.resolve()}/optuna.db"
    study = tuning.open_study(cfg, name, storage)
    study.enqueue_trial({**GOOD, "learning_rate": 0.05})
    study.enqueue_trial({**GOOD, "learning_rate": 0.02})
    study.enqueue_trial({**GOOD, "learning_rate": 1.0, "momentum": 0.99})
    res = tuning.run_tuning(cfg, DATASET, BACKBONE, n_trials=3, layout=layout)
    assert res["study_name"] == name

    study = optuna.load_study(study_name=name, storage=storage)
    good1, good2, bad = study.trials
    first = {t.number: t.intermediate_values[1] for t in study.trials}
    assert good1.state == good2.state == TrialState.COMPLETE, first
    assert bad.state == TrialState.PRUNED, (
        f"lr=1, momentum=0.99 not pruned; fold-1 F1 per trial: {first}"
    )
    assert len(bad.intermediate_values) < 3  # it really stopped before the last fold
    assert bad.params["learning_rate"] == 1.0
    _, runs = _study_runs(root, res["parent_run_id"])
    pruned = runs[bad.number]
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["mammoflow.trial_state"] == "pruned"
    assert pruned.data.metrics["folds_done"] == len(bad.intermediate_values)
    assert "f1_macro" not in pruned.data.metrics  # a partial CV is not a final value
    assert res["trials"]["pruned"] == 1 and res["best_trial"] in (good1.number, good2.number)


# ----------------------------------------------------------------------------- PostgreSQL


def _pg_skip_reason() -> str | None:
    if stack_mod.find_pg_bin() is None:
        return (
            "PostgreSQL server binaries (initdb/postgres) not installed "
            "(apt-get install postgresql-15, or set MAMMOFLOW_PG_BIN)"
        )
    return None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    reason = _pg_skip_reason()
    if reason:
        pytest.skip(reason)
    # Not pytest's tmp_path: its parents are mode 0700 and PostgreSQL runs as another user.
    state = Path(tempfile.mkdtemp(prefix="mammoflow-tune-pg-"))
    state.chmod(0o755)
    lines: list[str] = []
    st = stack_mod.Stack(stack_mod.free_port_config(state), echo=lines.append)
    try:
        st.start_service("postgres")
        st.ensure_databases()
        yield st.db_url("optuna")
    finally:
        st.down()
        shutil.rmtree(state, ignore_errors=True)


def test_postgres_study_shared_by_two_worker_processes(
    project: tuple[Path, Config], postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cfg = project
    password = postgres_url.split(":")[2].split("@")[0]
    monkeypatch.setenv(tuning.STORAGE_ENV, postgres_url)
    res = tuning.run_tuning(cfg, DATASET, BACKBONE, n_trials=4, workers=2)
    assert res["workers"] == 2
    assert res["storage"].startswith("postgresql+psycopg://") and password not in res["storage"]
    best = (root / "tuning" / f"{DATASET}-{BACKBONE}.json").read_text()
    assert password not in best

    storage = tuning.resolve_storage(cfg.tune.storage)  # the env URL, with the psycopg 3 driver
    study = optuna.load_study(study_name=res["study_name"], storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # the quota counts running trials of the other worker
    assert not [t for t in study.trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, f"trials came from {workers}"
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in workers}
    assert study.best_value == pytest.approx(res["best_value"])

    # both processes logged their trials under the one parent run
    parent, runs = _study_runs(root, res["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert len(runs) == len(study.trials)
    assert {r.data.tags["worker"] for r in runs} == workers
