"""Helpers shared by the integration tests: tiny projects, subprocesses, servers, buckets."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mammoflow.config import Config, parse_config
from mammoflow.data.acquire import acquire_stage
from mammoflow.data.convert import convert_stage
from mammoflow.data.ingest import ingest_stage
from mammoflow.data.split import split_stage
from mammoflow.evaluation.evaluate import evaluate_stage
from mammoflow.paths import Layout
from mammoflow.training.train import train_stage

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ tiny projects


def scratch_params(root: Path, **sections: Mapping[str, Any]) -> Path:
    """The project's params.yaml with ``sections``' keys written over, saved in ``root``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, keys in sections.items():
        raw[name].update(keys)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def project_dir(
    root: Path, raw: dict[str, Any], unset: Sequence[str] = ("MLFLOW_TRACKING_URI",)
) -> Iterator[Config]:
    """Work in ``root`` as a project with params ``raw``; cwd and environment restored after.

    Args:
        root: the project folder; ``params.yaml`` is written there.
        raw: the parsed params (validated by :func:`parse_config`).
        unset: environment variables removed meanwhile (a tracking URI would send runs away).
    """
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    old = Path.cwd()
    saved = {key: os.environ.pop(key, None) for key in unset}
    os.chdir(root)
    try:
        yield cfg
    finally:
        os.chdir(old)
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value


def tiny_params(
    datasets: Sequence[str],
    backbones: Sequence[str] = ("vgg16",),
    *,
    sample: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
    bootstrap: int | None = 20,
    log_models: str | None = "final",
    base: Path = ROOT / "params.yaml",
) -> dict[str, Any]:
    """``base`` (the repo's params.yaml) shrunk for a test: 64 px sample images and PNGs, the
    ``backbones`` at 32 px with random weights, 1 epoch of batch 8; ``sample``, ``split`` and
    ``train`` update their sections; ``bootstrap`` / ``log_models`` None keep ``base``'s."""
    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    raw["pipeline"]["datasets"] = list(datasets)
    raw["sample"].update({"size": 64, **(sample or {})})
    raw["convert"].update({"size": 64, "workers": 1})
    raw["split"].update(split or {})
    raw["model"].update({"backbones": list(backbones), "input_size": 32, "weights": "none"})
    for ds in raw["datasets"].values():  # the demo's own 80 px would win
        ds.pop("model", None)
    raw["train"].update({"epochs": 1, "batch_size": 8, **(train or {})})
    if bootstrap is not None:
        raw["evaluate"]["bootstrap"] = bootstrap
    if log_models is not None:
        raw["tracking"]["log_models"] = log_models
    return raw


def prepare_data(cfg: Config, dataset: str) -> None:
    """Run acquire → ingest → convert → split of ``dataset`` in the working directory."""
    for stage in (
        acquire_stage,
        ingest_stage,
        convert_stage,
        split_stage,
    ):
        stage(cfg, dataset, Layout())


@contextlib.contextmanager
def trained_project(root: Path, raw: dict[str, Any], dataset: str) -> Iterator[Config]:
    """A project in ``root`` with ``dataset`` prepared, every backbone of ``raw`` trained and
    the champion evaluated; its registered models and experiments are removed afterwards."""
    with project_dir(root, raw) as cfg:
        try:
            prepare_data(cfg, dataset)
            for backbone in cfg.model.backbones:
                train_stage(cfg, dataset, backbone, Layout())
            evaluate_stage(cfg, dataset, Layout())
            yield cfg
        finally:
            delete_mlflow_models_and_experiments(root)


def mlflow_client(root: Path) -> Any:
    """An MLflow client on the project's SQLite store (``root/mlflow.db``)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


# ------------------------------------------------------------------------------ subprocesses


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_tree(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop a subprocess started in its own session, its group and every process it started.

    SIGTERM to the group, SIGKILL after ``grace`` seconds; children that left the group (a
    flow run, a worker's job) are killed too.
    """
    import psutil

    try:
        kids = list(psutil.Process(proc.pid).children(recursive=True))
    except psutil.Error:
        kids = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            kid.kill()
    psutil.wait_procs(kids, timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def drain_prefect_workers() -> None:
    """Flush the in-process Prefect log and event workers while their server is still up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for pending in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
            if inspect.isawaitable(pending):
                await pending

    with contextlib.suppress(RuntimeError):
        run_coro_as_sync(drain())


# ------------------------------------------------------------------------------ buckets


@dataclass(frozen=True)
class ScanHit:
    """One occurrence of a forbidden string in an object."""

    key: str
    needle: str


def scan_bucket(
    bucket: str,
    needles: Iterable[str],
    *,
    prefix: str = "",
    client: Any = None,
    max_object_bytes: int = 64 * 1024 * 1024,
) -> list[ScanHit]:
    """Every (object key, needle) where a needle occurs in an object's key or content.

    Proves that no PHI (e.g. a DICOM PatientName) reached the artifact store. Objects larger
    than ``max_object_bytes`` are scanned by key only.
    """
    from mammoflow.storage import s3_client

    s3 = client or s3_client()
    wanted = [n for n in needles if n]
    encoded = [(n, n.encode("utf-8")) for n in wanted]
    hits: list[ScanHit] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []) or []:
            key = obj["Key"]
            found = {n for n in wanted if n in key}
            if obj.get("Size", 0) <= max_object_bytes:
                data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                found |= {n for n, raw in encoded if raw in data}
            hits.extend(ScanHit(key, n) for n in sorted(found))
    return hits


# ------------------------------------------------------------------------------ scoring


TINY_TEMPERATURE = 0.5  # tiny_champion's calibration layer


def dicom_bytes(image: Any, encoding: int = 0) -> bytes:
    """One For Presentation mammogram of ``image`` (2-D in [0, 1]) as the sample writes it
    (``encoding``: 0 12-bit MONOCHROME2, 1 MONOCHROME1, 2 16-bit windowed, 3 rescaled)."""
    from pydicom.uid import generate_uid

    from mammoflow.data.sample import mammogram_dicom

    return mammogram_dicom(
        seed=1,
        image=image,
        encoding=encoding,
        special=0,
        patient="T-1",
        side="L",
        view="CC",
        number=1,
        study_uid=generate_uid(entropy_srcs=["study"]),
        series_uid=generate_uid(entropy_srcs=["series"]),
    )


def tiny_champion(root: Path, dataset: str = "sample_mias", n_classes: int = 3) -> str:
    """Register a tiny untrained VGG16 ensemble (32 px, 2 folds) as ``dataset``'s champion.

    The store is ``root/mlflow.db`` (artifacts under ``root/mlartifacts``); returns the logged
    model's URI. The model is the serving graph the study logs (``ensemble_model`` with a
    temperature, :data:`TINY_TEMPERATURE`).
    """
    import numpy as np

    from mammoflow.models.build import ensemble_model, load_backbone, trainable_tail_and_head
    from mammoflow.tracking import Tracker

    bb = load_backbone("vgg16", weights="none", trainable_layers=2, input_size=32)
    heads = [
        trainable_tail_and_head(bb, n_classes, head_units=8, seed=i, name=f"vgg16_fold_{i}")
        for i in (1, 2)
    ]
    model = ensemble_model(bb, heads, TINY_TEMPERATURE)
    tracker = Tracker(root=root)
    parent, _ = tracker.open_parent(tracker.experiment_id(dataset), "vgg16", "tiny", {}, {})
    example = np.zeros((1, 40, 40, 1), np.float32)
    uri = tracker.log_model(parent, model, example)
    tracker.promote(dataset, parent, "f1", 0.5)
    return uri


def delete_mlflow_models_and_experiments(root: Path) -> None:
    """Remove what a test project registered and tracked in its store (``root/mlflow.db``)."""
    client = mlflow_client(root)
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    for exp in client.search_experiments():
        if exp.name.startswith("mammoflow-"):
            client.delete_experiment(exp.experiment_id)


def copy_project(dest: Path) -> None:
    """The tracked (and not ignored) project files into ``dest``, without DVC's lock and outputs."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("metrics/", "plots/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def replace_film(film: Path) -> None:
    """Re-export one film (a brighter patch inside the breast) as a new file moved over the
    old one, the way an export tool replaces it: a new inode, so the hard link in data/raw
    still holds the old film."""
    from mammoflow.data.pgm import read_pgm, write_pgm

    image = read_pgm(film)
    pixels = image.pixels.copy()
    h, w = pixels.shape
    pixels[h // 3 : h // 2, w // 3 : w // 2] = image.maxval
    fresh = film.with_suffix(".new")
    write_pgm(fresh, pixels, image.maxval)
    fresh.replace(film)


# ------------------------------------------------------------------------------ DVC

GIT_ID = ["-c", "user.email=test@mammoflow.invalid", "-c", "user.name=test"]


def dvc_project(dest: Path, raw: Mapping[str, Any], remote: Path | None = None) -> Path:
    """A project checkout in ``dest`` as a user has it: the tracked files with params ``raw``,
    committed in a fresh git repo, with a local-directory DVC remote (``remote``, default
    ``dest/../dvc-remote``) as its default. Returns the params.yaml path."""
    copy_project(dest)
    params = dest / "params.yaml"
    params.write_text(yaml.safe_dump(dict(raw), sort_keys=False), encoding="utf-8")
    remote = remote or dest.parent / "dvc-remote"
    dvc = str(Path(sys.executable).with_name("dvc"))
    for cmd in (
        ["git", "init", "-q"],
        ["git", *GIT_ID, "add", "-A"],
        ["git", *GIT_ID, "commit", "-qm", "project"],
        [dvc, "remote", "add", "-d", "-f", "--local", "test", str(remote)],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return params


def dvc_status(root: Path, targets: Sequence[str] = ("dvc.yaml",)) -> dict[str, Any]:
    """`dvc status --json` of ``targets`` (default: the pipeline, not tuning/ or audit/) without
    DVC's always-changed source checks."""
    from mammoflow.dvc_runner import changed_stages

    changed = changed_stages(root, targets)
    return {k: v for k, v in changed.items() if v != ["always changed"]}


def dvc_add_hash(folder: Path) -> str:
    """The ``md5`` that `dvc add` records for ``folder``, computed by DVC itself on a copy.

    The copy sits in a scratch DVC repository, so the project (and its dvc.lock) is untouched.
    """
    dvc = str(Path(sys.executable).with_name("dvc"))
    with tempfile.TemporaryDirectory(prefix="mammoflow-dvc-add-") as tmp:
        shutil.copytree(folder, Path(tmp) / "data")
        subprocess.run([dvc, "init", "-q", "--no-scm"], cwd=tmp, check=True)
        subprocess.run([dvc, "add", "-q", "data"], cwd=tmp, check=True)
        record = yaml.safe_load((Path(tmp) / "data.dvc").read_text(encoding="utf-8"))
    return str(record["outs"][0]["md5"])
