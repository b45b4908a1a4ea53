"""The tracking package against a real temporary SQLite MLflow store (no mocks, no server)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mammoflow import tracking
from mammoflow.tracking import Tracker, TrackingUnavailable
from mammoflow.tracking import retry as retry_mod


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    import mlflow

    root = tmp_path_factory.mktemp("store")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield Tracker(root=root)
    mlflow.set_tracking_uri(before[0])  # promote() points MLflow's globals at this store
    mlflow.set_registry_uri(before[1])


def _fake_model(tracker: Tracker, run_id: str) -> None:
    """A model directory the registry accepts (an MLmodel file), named by the run's tag."""
    tracker.log_text(run_id, "flavors: {}\n", "model/MLmodel")
    tracker.set_tags(run_id, {"mammoflow.model_uri": f"runs:/{run_id}/model"})


def test_names_and_the_embedded_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.experiment_name("mias") == "mammoflow-mias"
    assert tracking.tuning_experiment_name("mias") == "mammoflow-mias-tuning"
    assert tracking.registered_model_name("cmmd") == "mammoflow-cmmd"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.artifact_root(tmp_path) == (tmp_path / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://mlflow.example:5000"
    assert tracking.artifact_root(tmp_path) is None


def test_config_hash_is_stable_and_sensitive() -> None:
    from mammoflow.provenance import config_hash

    base = config_hash({"b": 1, "a": [1, 2]}, "data1", "split1")
    # the value tracking.config_hash gave before it moved to provenance: resume keys unchanged
    assert base == "ff851ce4a3e88f10c4dc3c296f7b6ff81c8e5c2c25cb3f7df2864abe8b98b3f2"
    assert base == config_hash({"a": [1, 2], "b": 1}, "data1", "split1")
    assert len(base) == 64
    assert base != config_hash({"b": 2, "a": [1, 2]}, "data1", "split1")
    assert base != config_hash({"b": 1, "a": [1, 2]}, "data2", "split1")
    assert base != config_hash({"b": 1, "a": [1, 2]}, "data1", "split2")


def test_experiments_are_reused_and_restored(tracker: Tracker) -> None:
    exp = tracker.experiment_id("exp_ds")
    assert tracker.experiment_id("exp_ds") == exp
    tracker.client.delete_experiment(exp)
    assert tracker.experiment_id("exp_ds") == exp
    assert tracker.client.get_experiment(exp).lifecycle_stage == "active"
    tuning = tracker.tuning_experiment_id("exp_ds")
    assert tuning != exp
    assert tracker.client.get_experiment(tuning).name == "mammoflow-exp_ds-tuning"
    assert tracker.seconds > 0


def test_parent_is_resumed_by_its_config_key(tracker: Tracker) -> None:
    exp = tracker.experiment_id("parent_ds")
    params = {"lr": 0.01, "backbones": ["vgg16", "resnet50"], "long": "x" * 7000}
    run_id, resumed = tracker.open_parent(exp, "vgg16", "key1", {"t": "1"}, params)
    assert not resumed
    run = tracker.client.get_run(run_id)
    assert run.data.params["lr"] == "0.01"
    assert run.data.params["backbones"] == '["vgg16", "resnet50"]'
    assert len(run.data.params["long"]) == 6000
    assert run.data.tags[tracking.TAG_ROLE] == "parent" and run.data.tags["t"] == "1"
    tracker.end(run_id)
    again, resumed = tracker.open_parent(exp, "vgg16", "key1", {"t": "2"}, params)
    assert (again, resumed) == (run_id, True)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["t"] == "2"
    other, resumed = tracker.open_parent(exp, "vgg16", "key2", {}, {})
    assert other != run_id and not resumed
    many = {f"p{i:03d}": i for i in range(250)}  # three log_batch calls
    third, _ = tracker.open_parent(exp, "resnet50", "key1", {}, many)
    assert len(tracker.client.get_run(third).data.params) == 250


def test_children_guard_and_stale_runs(tracker: Tracker) -> None:
    exp = tracker.experiment_id("child_ds")
    parent, _ = tracker.open_parent(exp, "vgg16", "k", {}, {})
    ok = tracker.start_child(exp, parent, "fold-1", "fold", {"x": "y"}, {"fold": 1})
    with tracker.run_guard(ok):
        tracker.log_metrics(ok, {"f1": 0.5, "auc": math.nan, "acc": 0.75}, prefix="val_")
    bad = tracker.start_child(exp, parent, "fold-2", "fold", {}, {"fold": 2})
    with pytest.raises(RuntimeError, match="boom"), tracker.run_guard(bad):
        raise RuntimeError("boom")
    stale = tracker.start_child(exp, parent, "test", "test", {}, {})
    children = tracker.children(exp, parent)
    assert sorted(children) == ["fold-1", "fold-2", "test"]
    assert children["fold-1"].info.status == "FINISHED"
    assert children["fold-1"].data.metrics == {"val_f1": 0.5, "val_acc": 0.75}  # NaN skipped
    assert children["fold-1"].data.tags["mlflow.parentRunId"] == parent
    assert children["fold-2"].info.status == "FAILED"
    assert tracker.fail_stale_children(exp, parent) == ["test"]
    assert tracker.client.get_run(stale).info.status == "FAILED"
    assert tracker.fail_stale_children(exp, parent) == []


def test_history_tags_and_json_artifacts(tracker: Tracker) -> None:
    exp = tracker.experiment_id("log_ds")
    run_id, _ = tracker.open_parent(exp, "vgg16", "k", {}, {})
    tracker.log_history(run_id, {"loss": [1.0, 0.5, math.inf, 0.25], "val_loss": [2.0]})
    history = tracker.client.get_metric_history(run_id, "epoch_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (3, 0.25)]
    assert [m.value for m in tracker.client.get_metric_history(run_id, "epoch_val_loss")] == [2.0]
    tracker.set_tags(run_id, {"a": "1", "b": "2"})
    assert {"a": "1", "b": "2"}.items() <= tracker.client.get_run(run_id).data.tags.items()
    tracker.log_dict(run_id, {"image_id": ["i1"], "prob": [[0.25, 0.75]]}, "predictions.json")
    assert tracker.load_json_artifact(run_id, "predictions.json") == {
        "image_id": ["i1"],
        "prob": [[0.25, 0.75]],
    }


def test_parents_and_study_rows(tracker: Tracker) -> None:
    assert tracker.parents("nothing_here") == []
    exp = tracker.experiment_id("rows_ds")
    old, _ = tracker.open_parent(exp, "vgg16", "old", {}, {})
    tracker.log_metrics(old, {"f1_macro_mean": 0.4})
    tracker.end(old)
    new, _ = tracker.open_parent(exp, "vgg16", "new", {}, {})
    tracker.log_metrics(
        new,
        {
            "f1_macro_mean": 0.6,
            "f1_macro_std": 0.1,
            "test_f1_macro": 0.55,
            "test_f1_macro_ci_low": 0.5,
            "test_f1_macro_ci_high": 0.6,
        },
    )
    tracker.end(new)
    running, _ = tracker.open_parent(exp, "resnet50", "r", {}, {})  # not FINISHED: left out
    assert [r.info.run_id for r in tracker.parents("rows_ds")] == [new]
    rows = tracker.study_rows("rows_ds", {"vgg16": None, "resnet50": None})
    assert rows == [
        {
            "backbone": "vgg16",
            "run_id": new,
            "cv": {"f1_macro_mean": 0.6, "f1_macro_std": 0.1},
            "test": {"f1_macro": 0.55},
            "test_ci": {"f1_macro": {"low": 0.5, "high": 0.6}},
        }
    ]
    chosen = tracker.study_rows("rows_ds", {"vgg16": old, "resnet50": running})
    assert [(r["backbone"], r["run_id"]) for r in chosen] == [("vgg16", old), ("resnet50", running)]
    gone = tracker.study_rows("rows_ds", {"vgg16": "0" * 32})  # another store's run: the latest
    assert [r["run_id"] for r in gone] == [new]


def test_a_metrics_files_missing_run_is_substituted_visibly(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    """The comparison shows the latest parent in place of the run a metrics file names only
    with a warning naming the file, the missing run and the substitute."""
    exp = tracker.experiment_id("sub_ds")
    latest, _ = tracker.open_parent(exp, "vgg16", "k", {}, {})
    tracker.end(latest)
    sources = {"vgg16": "metrics/sub_ds/vgg16.json", "resnet50": "metrics/sub_ds/resnet50.json"}
    with caplog.at_level("WARNING", logger="mammoflow.tracking.readback"):
        rows = tracker.study_rows("sub_ds", {"vgg16": "0" * 32, "resnet50": None}, sources)
    assert [(r["backbone"], r["run_id"]) for r in rows] == [("vgg16", latest)]
    vgg, resnet = (r.getMessage() for r in caplog.records)
    assert vgg.startswith("metrics/sub_ds/vgg16.json: MLflow parent run " + "0" * 32)
    assert f"shows the latest FINISHED parent {latest} instead" in vgg
    assert resnet.startswith("metrics/sub_ds/resnet50.json: no MLflow parent run of resnet50")
    assert "resnet50 is left out of the comparison" in resnet
    caplog.clear()
    with caplog.at_level("WARNING", logger="mammoflow.tracking.readback"):
        tracker.study_rows("sub_ds", {"vgg16": latest, "resnet50": None})  # asked: no warning
    assert caplog.records == []


def test_metrics_run_id_reads_the_train_stages_file(tmp_path: Path) -> None:
    import json

    from mammoflow.paths import Layout
    from mammoflow.tracking import metrics_run_id

    layout = Layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `mammoflow train --dataset d --backbone b`"):
        metrics_run_id(layout, "d", "b")
    path = layout.metrics("d", "b")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"mlflow_parent_run_id": "p1", "mlflow_test_run_id": "t1"}))
    assert metrics_run_id(layout, "d", "b") == "t1"
    assert metrics_run_id(layout, "d", "b", "parent") == "p1"
    path.write_text(json.dumps({"mlflow_parent_run_id": "p1"}))
    with pytest.raises(
        ValueError, match=r"b\.json: no 'mlflow_test_run_id'; rerun `mammoflow train"
    ):
        metrics_run_id(layout, "d", "b")


def test_study_parent_is_reopened_only_in_its_experiment(tracker: Tracker) -> None:
    exp = tracker.tuning_experiment_id("tune_ds")
    run_id, resumed = tracker.open_study_parent(exp, "study-1", {"s": "1"}, {"n_trials": 4})
    assert not resumed
    assert tracker.client.get_run(run_id).data.tags[tracking.TAG_STUDY] == "study-1"
    assert tracker.open_study_parent(exp, "study-1", {}, {}, run_id=run_id) == (run_id, True)
    other_exp = tracker.tuning_experiment_id("tune_other")
    moved, resumed = tracker.open_study_parent(other_exp, "study-1", {}, {}, run_id=run_id)
    assert moved != run_id and not resumed
    fresh, resumed = tracker.open_study_parent(exp, "study-1", {}, {}, run_id="f" * 32)
    assert fresh != run_id and not resumed


def test_promote_champion_and_challenger(tracker: Tracker) -> None:
    exp = tracker.experiment_id("reg_ds")
    first, _ = tracker.open_parent(exp, "vgg16", "a", {}, {})
    with pytest.raises(ValueError, match=rf"run {first} has no logged model to register"):
        tracker.promote("reg_ds", first, "f1", 0.5)
    _fake_model(tracker, first)
    assert tracker.promote("reg_ds", first, "f1", 0.5) == {
        "name": "mammoflow-reg_ds",
        "version": 1,
        "alias": "champion",
        "new": True,
        "reason": "first champion, f1 0.5000",
    }
    assert tracker.promote("reg_ds", first, "f1", 0.5)["new"] is False
    worse, _ = tracker.open_parent(exp, "resnet50", "b", {}, {})
    _fake_model(tracker, worse)
    assert tracker.promote("reg_ds", worse, "f1", 0.4)["alias"] == "challenger"
    better, _ = tracker.open_parent(exp, "inception_v3", "c", {}, {})
    _fake_model(tracker, better)
    assert tracker.promote("reg_ds", better, "f1", 0.7)["version"] == 3
    client = tracker.client
    assert client.get_model_version_by_alias("mammoflow-reg_ds", "champion").version == 3
    assert client.get_model_version_by_alias("mammoflow-reg_ds", "challenger").version == 1
    # the history: each version says when, by whom and why it got (or lost) its alias
    tags = {v: client.get_model_version("mammoflow-reg_ds", v).tags for v in (1, 2, 3)}
    assert "challenger (f1 0.4000 vs v1's 0.5000)" in tags[2][tracking.TAG_PROMOTION]
    assert "champion (f1 0.7000 vs v1's 0.5000)" in tags[3][tracking.TAG_PROMOTION]
    assert "champion → challenger, beaten by v3" in tags[1][tracking.TAG_DISPLACED]
    assert tags[3][tracking.TAG_SELECTION] == "f1"
    names = {m.name for m in client.search_registered_models()}
    assert "mammoflow-reg_ds" + tracking.LOCK_SUFFIX not in names  # the lock was released


def test_promote_keeps_a_champion_that_lacks_the_metric(tracker: Tracker) -> None:
    exp = tracker.experiment_id("tagless_ds")
    old, _ = tracker.open_parent(exp, "vgg16", "a", {}, {})
    _fake_model(tracker, old)
    assert tracker.promote("tagless_ds", old, "test_f1_macro", 0.9)["alias"] == "champion"
    new, _ = tracker.open_parent(exp, "resnet50", "b", {}, {})
    _fake_model(tracker, new)
    out = tracker.promote("tagless_ds", new, "cv_f1_macro_mean", 0.99)  # never compared
    assert out["alias"] == "challenger" and out["version"] == 2
    assert "champion v1 has no cv_f1_macro_mean tag" in out["warning"]
    assert "the champion is kept" in out["warning"]
    client = tracker.client
    assert client.get_model_version_by_alias("mammoflow-tagless_ds", "champion").version == 1


def test_promotion_decision_rule() -> None:
    decide = tracking.promotion_decision
    assert decide("m", 0.5, None, None)[0] == "champion"
    assert decide("m", 0.5, "1", 0.5)[0] == "champion"  # a tie goes to the newer model
    assert decide("m", 0.4, "1", 0.5)[0] == "challenger"
    assert decide("m", 0.4, "1", 0.5, higher_is_better=False)[0] == "champion"
    assert decide("m", math.nan, "1", 0.5)[0] == "challenger"
    alias, _, warning = decide("m", 0.9, "1", None)
    assert alias == "challenger" and warning is not None


def test_a_held_promotion_lock_blocks_until_its_lease_runs_out(tracker: Tracker) -> None:
    import time

    client, name = tracker.client, "mammoflow-lock_ds"
    with tracking.registry_lock(client, name, lease_s=60) as holder:
        assert client.get_registered_model(name + tracking.LOCK_SUFFIX).tags["holder"] == holder
        blocked = tracking.registry_lock(client, name, wait_s=1.0)
        with pytest.raises(tracking.PromotionLockedError, match="stayed held for 1 s"), blocked:
            pass
    with tracking.registry_lock(client, name, lease_s=0.5):  # a holder that died holding it
        t0 = time.monotonic()
        with tracking.registry_lock(client, name, wait_s=10.0):
            assert time.monotonic() - t0 >= 0.3  # waited for the lease, then broke the lock


def test_unreachable_server_fails_fast() -> None:
    with pytest.raises(TrackingUnavailable) as err:
        tracking.check_server("http://127.0.0.1:9", timeout=2)
    text = str(err.value)
    assert text.startswith("cannot reach the MLflow tracking server http://127.0.0.1:9")
    assert "unset MLFLOW_TRACKING_URI to track into ./mlflow.db" in text
    assert os.environ.get("MLFLOW_TRACKING_URI") != "http://127.0.0.1:9"


def test_calibration_is_logged_and_carried_by_the_registered_version(tracker: Tracker) -> None:
    from mammoflow.evaluation.calibration import calibrate, reliability_figure

    study = tracking.StudyRun.open(
        tracker, dataset="cal_ds", backbone="vgg16", key="k", tags={}, params={"lr": 0.1}
    )
    test_id = study._child("test", "test", {}, {})
    rng = np.random.default_rng(0)
    prob = rng.dirichlet([0.3, 0.3], size=40)
    y = rng.integers(0, 2, 40)
    res = calibrate(y[:20], prob[:20], y[20:], prob[20:], [str(i) for i in range(20)], n=20)
    figure = reliability_figure(res.bins)
    study.log_calibration(test_id, res.metrics(), res.to_dict(), figure)
    for run_id in (study.parent_id, test_id):
        run = tracker.client.get_run(run_id)
        assert run.data.metrics["temperature"] == pytest.approx(res.temperature)
        assert {"test_ece", "test_calibrated_ece", "test_ece_ci_low"} <= set(run.data.metrics)
        assert float(run.data.tags[tracking.TAG_TEMPERATURE]) == pytest.approx(res.temperature)
    sidecar = tracker.load_json_artifact(test_id, tracking.CALIBRATION_FILE)
    assert sidecar["temperature"] == pytest.approx(res.temperature)
    _fake_model(tracker, test_id)
    version = tracker.promote("cal_ds", test_id, "f1", 0.5)["version"]
    tags = tracker.client.get_model_version("mammoflow-cal_ds", version).tags
    assert float(tags[tracking.TAG_TEMPERATURE]) == pytest.approx(res.temperature)


def test_model_cards_for_champion_and_challenger(tracker: Tracker) -> None:

    exp = tracker.experiment_id("card_ds")
    assert tracker.write_model_cards("card_ds") == {}  # nothing registered yet
    for backbone, f1 in (("vgg16", 0.6), ("resnet50", 0.4)):
        study = tracking.StudyRun.open(
            tracker, dataset="card_ds", backbone=backbone, key=backbone, tags={}, params={}
        )
        test_id = study._child("test", "test", {}, {"model.weights": "none"})
        tracker.log_metrics(study.parent_id, {"test_f1_macro": f1, "f1_macro_mean": f1})
        _fake_model(tracker, test_id)
        if backbone == "vgg16":
            study.log_subgroups({}, "### Test\n\n| group | n |\n|---|---|\n| fatty | 7 |\n")
        tracker.promote("card_ds", test_id, "f1", f1)
    assert tracker.client.get_experiment(exp).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    written = tracker.write_model_cards("card_ds")
    assert written == {"champion": "1", "challenger": "2"}
    for alias, backbone in (("champion", "vgg16"), ("challenger", "resnet50")):
        mv = tracker.client.get_model_version_by_alias("mammoflow-card_ds", alias)
        assert f"({backbone})" in mv.description and f"alias `{alias}`" in mv.description
        arts = {a.path for a in tracker.client.list_artifacts(mv.tags["run_id"])}
        assert "model_card.md" in arts


def test_a_card_says_why_its_subgroup_table_is_missing(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    """The champion's subgroups.md is read from the tracker's store (not MLflow's default one);
    the challenger's parent has none: its card says so, and a warning names the run."""
    from mammoflow.reporting.card import model_card

    champion = tracker.card_facts("card_ds", "champion")
    assert champion is not None and "| fatty | 7 |" in model_card(champion)
    with caplog.at_level("WARNING", logger="mammoflow.tracking.cards"):
        challenger = tracker.card_facts("card_ds", "challenger")
    assert challenger is not None
    card = model_card(challenger)
    line = f"_No subgroup table: `subgroups.md` of the parent run {challenger.parent_run_id}"
    assert line in card
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(
        "model card without its subgroup table: subgroups.md of parent run "
        f"{challenger.parent_run_id} could not be read ("
    )


def test_an_uninstalled_package_is_named_not_silently_unpinned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from importlib.metadata import version

    from mammoflow.tracking.models import pinned_requirements

    with caplog.at_level("WARNING", logger="mammoflow.tracking.models"):
        reqs = pinned_requirements(("numpy", "no-such-package-mammoflow"))
    assert reqs == [f"numpy=={version('numpy')}"]
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("no-such-package-mammoflow is not installed here: the served model")


def test_logging_a_model_leaves_the_environment_alone(tmp_path: Path) -> None:
    """MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI; a Tracker must not leak its store
    into later Trackers of the same process."""
    import os

    import mlflow

    from mammoflow.tracking.store import _use_store

    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with _use_store(other):
        assert mlflow.get_tracking_uri() == other and mlflow.get_registry_uri() == other
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before


# ------------------------------------------------- a tracking server that goes away (real ports)


def _refusing_uri() -> str:
    """The URL of a local port nothing listens on: every connection is refused."""
    from infra.local.stack import free_port

    return f"http://127.0.0.1:{free_port()}"


def test_calls_retry_with_backoff_then_give_up_as_transient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from mlflow import MlflowClient

    from mammoflow.errors import is_transient

    uri = _refusing_uri()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # only our retries
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    retry = retry_mod._Retry(uri, budget_s=4.0, sleep=sleep)
    client = retry_mod._RetryingClient(MlflowClient(uri), retry)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnreachable) as err:
        client.get_experiment_by_name("mammoflow-x")
    elapsed = time.monotonic() - started
    assert 4.0 <= elapsed < 10.0, elapsed
    assert pauses[:2] == [1.0, 2.0] and 3.0 < sum(pauses) <= 4.0 + 1e-6, pauses  # then the rest
    text = str(err.value)
    assert text.startswith(
        f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) did not answer "
        "get_experiment_by_name for 4 s"
    ), text
    assert "Connection refused" in text and "MAMMOFLOW_TRACKING_RETRY_S=4" in text, text
    assert "resumes the folds that finished" in text
    # exit 75 in the CLI, retried by the flows; still a TrackingUnavailable for old callers
    assert is_transient(err.value) and isinstance(err.value, TrackingUnavailable)
    # after giving up, a call (the run guards marking runs FAILED on the way out) tries once
    tries = len(pauses)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnreachable):
        client.set_terminated("0" * 32, status="FAILED")
    assert time.monotonic() - started < 2.0 and len(pauses) == tries
    # run creation through the client goes through the same retries
    with pytest.raises(tracking.TrackingUnreachable, match="create_run"):
        client.create_run("0")


def test_errors_other_than_an_absent_server_are_not_retried(tracker: Tracker) -> None:
    import time

    from mlflow.exceptions import MlflowException

    retry = retry_mod._Retry("http://127.0.0.1:9", budget_s=60.0)
    started = time.monotonic()
    with pytest.raises(MlflowException) as err:
        retry.call("get_run", lambda: tracker.client.get_run("0" * 32))
    assert time.monotonic() - started < 5.0
    assert not tracking.server_unreachable(err.value)


def test_retry_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracking.RETRY_ENV, raising=False)
    assert tracking.retry_seconds() == 120.0
    monkeypatch.setenv(tracking.RETRY_ENV, "30")
    assert tracking.retry_seconds() == 30.0
    monkeypatch.setenv(tracking.RETRY_ENV, "two minutes")
    with pytest.raises(ValueError, match="MAMMOFLOW_TRACKING_RETRY_S='two minutes'"):
        tracking.retry_seconds()


class _NotMlflow:
    """A real local HTTP server that is not MLflow: every request gets 404."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class NotFound(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cli_exits_75_when_the_server_is_down_and_2_when_it_is_misconfigured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from mammoflow.cli import app

    runner = CliRunner()
    params = ["--params", str(Path(__file__).resolve().parents[2] / "params.yaml")]
    down = _refusing_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    result = runner.invoke(app, ["report", *params])
    assert result.exit_code == 75, result.output
    assert f"cannot reach the MLflow tracking server {down}" in " ".join(result.output.split())
    other = _NotMlflow()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other.uri)
        result = runner.invoke(app, ["report", *params])
    finally:
        other.close()
    assert result.exit_code == 2, result.output
    assert f"is {other.uri} an MLflow tracking server?" in " ".join(result.output.split())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://127.0.0.1:5000")  # a typo in the scheme
    result = runner.invoke(app, ["report", *params])
    assert result.exit_code == 2, result.output
    assert "MLFLOW_TRACKING_URI='htp://127.0.0.1:5000'" in " ".join(result.output.split())
