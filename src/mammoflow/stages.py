"""Stage entry points: one function per pipeline stage, on the canonical layout.

The CLI (and so every DVC stage) and the Prefect tasks call exactly these functions, so the two
orchestrators share one implementation. Each function takes the validated :class:`Config`, a
dataset name and a :class:`Layout`, does the I/O, and returns a small summary dict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammoflow.config import Config
from mammoflow.paths import Layout

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def source_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Record what ``dataset``'s source holds now (data/sources/<dataset>.json): the acquire
    stage depends on it, so DVC re-acquires when a film of a local source is replaced."""
    from mammoflow.data.acquire import source_fingerprint
    from mammoflow.files import atomic_write_json

    layout = layout or Layout()
    record = {"dataset": dataset, **source_fingerprint(cfg.dataset(dataset))}
    atomic_write_json(layout.source(dataset), record)
    return {k: v for k, v in record.items() if k != "entries"}


def acquire_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Bring the raw files of ``dataset`` to ``data/raw/<dataset>``."""
    from mammoflow.data.acquire import acquire

    layout = layout or Layout()
    ds = cfg.dataset(dataset)
    target = acquire(ds, cfg.sample, layout.raw(dataset))
    n_files = sum(1 for p in target.rglob("*") if p.is_file())
    return {"dataset": dataset, "raw_dir": str(target), "files": n_files}


def min_size(cfg: Config, dataset: str) -> int:
    """``ingest.min_size``; for the embedded sample, at most its images' own short side.

    The sample is deliberately small (``sample.size``, 256 px by default) so that the pipeline
    runs on a laptop; the rule exists to refuse thumbnails and test patterns in real data.
    """
    ds = cfg.dataset(dataset)
    if ds.acquire != "sample":
        return cfg.ingest.min_size
    from mammoflow.data.sample import image_shape

    return min(cfg.ingest.min_size, *image_shape(ds.kind, cfg.sample.size))


def cmmd_root(dataset: str, layout: Layout | None = None) -> Path:
    """The source root of an acquired CMMD dataset; its manifest's ``raw_path`` is relative to it."""
    return (layout or Layout()).raw(dataset) / "CMMD"


def raw_files(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Path] | None:
    """Manifest ``raw_path`` → file on disk for a DICOM dataset (``None`` for MIAS).

    Raises:
        PseudonymKeyError: ``ingest.pseudonymize: hmac`` without the key in the environment.
    """
    if cfg.dataset(dataset).kind != "cmmd":
        return None
    from mammoflow.data.cmmd import dicom_files
    from mammoflow.data.pseudonym import locate_raw, pseudonymizer

    root = cmmd_root(dataset, layout)
    files = dicom_files(root) if root.is_dir() else []
    return locate_raw(files, root, pseudonymizer(cfg.ingest.pseudonymize))


def ingest_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Parse the raw files into ``data/interim/<dataset>/manifest.parquet``."""
    from mammoflow.data.acquire import find_clinical

    layout = layout or Layout()
    ds = cfg.dataset(dataset)
    raw = layout.raw(dataset)
    if not raw.exists():
        raise FileNotFoundError(f"{raw}: raw data missing; run `mammoflow acquire {dataset}` first")
    if ds.kind == "mias":
        from mammoflow.data.mias import ingest_mias

        result = ingest_mias(
            raw,
            layout.interim(dataset),
            dataset=dataset,
            on_bad_file=cfg.ingest.on_bad_file,
            interface="params",
        )
    else:
        from mammoflow.data.cmmd import ingest_cmmd
        from mammoflow.data.pseudonym import pseudonymizer

        result = ingest_cmmd(
            cmmd_root(dataset, layout),
            find_clinical(raw),
            layout.interim(dataset),
            dataset=dataset,
            on_bad_file=cfg.ingest.on_bad_file,
            min_size=min_size(cfg, dataset),
            accept_for_processing=cfg.ingest.accept_for_processing,
            accept_burned_in=cfg.ingest.accept_burned_in,
            pseudonymizer=pseudonymizer(cfg.ingest.pseudonymize),
            interface="params",
        )
    return {
        "dataset": dataset,
        "images": len(result.frame),
        "patients": int(result.frame["patient_id"].nunique()),
        "labels": result.frame["label"].value_counts().to_dict(),
        "bad_files": len(result.bad),
    }


def validate_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Run the Great Expectations suite on the ingested manifest.

    Writes the GE JSON result and data docs under ``reports/validation/<dataset>`` and a small
    DVC metrics file; raises :class:`ValidationFailed` listing the failed expectations.
    """
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.validate import ValidationFailed, validate_manifest
    from mammoflow.files import atomic_write_json

    kind = cfg.dataset(dataset).kind
    layout = layout or Layout()
    frame = read_manifest(layout.interim(dataset))
    summary: dict[str, Any] = {"dataset": dataset, "images": len(frame)}
    try:
        report = validate_manifest(
            frame,
            kind=kind,
            reports_dir=layout.validation(dataset),
            dataset=dataset,
            fail_on_error=cfg.validate_.fail_on_error,
            min_size=min_size(cfg, dataset),
            raw_files=raw_files(cfg, dataset, layout),
        )
    except ValidationFailed as exc:
        summary |= {"success": False, "failed": len(exc.report.failures)}
        atomic_write_json(layout.validation_metrics(dataset), summary)
        raise
    summary |= {
        "success": report.success,
        "expectations": len(report.outcomes),
        "failed": len(report.failures),
    }
    atomic_write_json(layout.validation_metrics(dataset), summary)
    return summary


def convert_stage(
    cfg: Config, dataset: str, layout: Layout | None = None, progress: bool = True
) -> dict[str, Any]:
    """Convert every ingested image to a padded PNG under ``data/processed/<dataset>``.

    Then checks every PNG against the converted manifest (present, readable, square, one
    size, sha256 as recorded): :func:`~mammoflow.data.validate.validate_converted` raises
    ``ConvertedImagesInvalid`` naming the images that fail.
    """
    from mammoflow.data.convert import convert_dataset
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.validate import validate_converted

    kind = cfg.dataset(dataset).kind
    layout = layout or Layout()
    result = convert_dataset(
        layout.interim(dataset) / "manifest.parquet",
        layout.processed(dataset),
        cfg.convert,
        progress=progress,
        raw_files=raw_files(cfg, dataset, layout),
    )
    validate_converted(read_manifest(result.manifest_path), kind, dataset)
    return {
        "dataset": dataset,
        "converted": len(result.converted),
        "skipped": len(result.skipped),
        "seconds": round(result.seconds, 2),
    }


def split_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Held-out test set + stratified K folds, grouped by patient; written to data/splits."""
    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.split import fold_summary, make_splits, write_splits

    cfg.dataset(dataset)
    layout = layout or Layout()
    frame = read_manifest(layout.processed(dataset))
    splits = make_splits(
        frame,
        test_size=cfg.split.test_size,
        k_folds=cfg.split.k_folds,
        group_by=cfg.split.group_by,
        seed=cfg.split.seed,
    )
    digest = write_splits(splits, layout.splits(dataset))
    return {"dataset": dataset, "split_hash": digest, "images": fold_summary(splits)}


def _check_backbone(cfg: Config, dataset: str, backbone: str) -> None:
    cfg.dataset(dataset)
    if backbone not in cfg.model.backbones:
        raise ValueError(
            f"backbone {backbone!r} is not in model.backbones {cfg.model.backbones!r}; add it there"
        )


def train_stage(
    cfg: Config,
    dataset: str,
    backbone: str,
    layout: Layout | None = None,
    progress: bool = False,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """K-fold training of one backbone on one dataset, tracked in MLflow (resumable).

    With ``dask_address`` or ``$MAMMOFLOW_DASK_ADDRESS`` set, the features are extracted here
    once and the fold tasks run on that Dask cluster, one task per fold (same numbers).
    """
    from mammoflow.training.train import run_study

    _check_backbone(cfg, dataset, backbone)
    result = run_study(
        cfg,
        dataset,
        backbone,
        layout=layout,
        progress=progress,
        dask=dask_address,
    )
    return {
        "dataset": dataset,
        "backbone": backbone,
        "trained_folds": result.trained_folds,
        "resumed_folds": result.resumed_folds,
        "test_model": result.test_model,
        "cv_f1_macro_mean": result.cv.get("f1_macro_mean"),
        "test_f1_macro": result.test.get("f1_macro"),
        "fold_metrics": result.fold_metrics,
        "parent_run_id": result.parent_run_id,
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
    }


def evaluate_stage(cfg: Config, dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Pick the best backbone of ``dataset`` and promote it in the MLflow registry."""
    import json

    from mammoflow.evaluation import champion
    from mammoflow.files import atomic_write_json
    from mammoflow.tracking import Tracker, metrics_run_id

    cfg.dataset(dataset)
    layout = layout or Layout()
    metric = cfg.tracking.registry_metric
    scores: dict[str, float] = {}
    runs: dict[str, str] = {}
    for backbone in cfg.model.backbones:
        path = layout.metrics(dataset, backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; run `mammoflow train --dataset {dataset} --backbone {backbone}`"
            )
        summary = json.loads(path.read_text(encoding="utf-8"))
        scores[backbone] = champion.value(summary, metric)
        runs[backbone] = metrics_run_id(layout, dataset, backbone)
    best = champion.rank(scores)[0]
    out: dict[str, Any] = {
        "dataset": dataset,
        "metric": metric,
        "scores": scores,
        "best": best,
        "rule": champion.rule_text(metric),
        "peeks_at_test": champion.peeks(metric),
    }
    warning = champion.warning_text(metric)
    if warning:
        out["warning"] = warning
        log.warning("%s", warning)
    if cfg.tracking.log_models != "none":
        out["registry"] = Tracker(root=layout.root).promote(
            dataset, runs[best], metric, scores[best]
        )

        out["model_cards"] = Tracker(root=layout.root).write_model_cards(dataset)
    atomic_write_json(layout.champion(dataset), out)
    return out


def _settings(cfg: Config, dataset: str, rows: list[dict[str, Any]], runs: list[Any]) -> str:
    """The settings line of ``dataset``: its rows' MLflow run params (else the resolved config)."""
    from mammoflow.reporting import figures as report

    by_id = {run.info.run_id: dict(run.data.params) for run in runs}
    fallback = cfg.for_dataset(dataset).flat()
    params: dict[str, dict[str, Any]] = {}
    missing = False
    for row in rows:
        logged = row.get("params") or by_id.get(row["run_id"])
        missing = missing or not logged
        params[row["backbone"]] = {k: (logged or fallback).get(k) for k in report.SETTING_KEYS}
    line = report.settings_line(params)
    return f"{line} (params.yaml; run params not found)" if missing else line


def compare_stage(
    cfg: Config,
    datasets: list[str] | None = None,
    layout: Layout | None = None,
    *,
    write: bool = True,
    name: str = "comparison",
) -> dict[str, Any]:
    """The paper-style comparison from MLflow: reports/<name>.md and .html.

    Each dataset's table is headed by the settings its runs used (weights, input size, epochs).
    """

    from mammoflow.files import atomic_write_text
    from mammoflow.reporting import figures as report
    from mammoflow.tracking import Tracker, metrics_run_id

    layout = layout or Layout()
    tracker = Tracker(root=layout.root)
    names = datasets or list(cfg.pipeline.datasets)
    tables: dict[str, list[list[str]]] = {}
    settings: dict[str, str] = {}
    figures: dict[str, bytes] = {}
    for dataset in names:
        cfg.dataset(dataset)
        wanted: dict[str, str | None] = {}
        for backbone in cfg.model.backbones:
            try:
                wanted[backbone] = metrics_run_id(layout, dataset, backbone, "parent")
            except (FileNotFoundError, ValueError):  # study_rows warns and names the file
                wanted[backbone] = None
        sources = {b: str(layout.metrics(dataset, b)) for b in wanted}
        rows = tracker.study_rows(dataset, wanted, sources)
        if not rows:
            continue
        tables[dataset] = report.comparison_table(rows)
        settings[dataset] = _settings(cfg, dataset, rows, tracker.parents(dataset))
        if write:
            figures[dataset] = report.figure_png(report.comparison_figure(rows, dataset))
    if not tables:
        raise ValueError(f"no finished MLflow runs for {names!r}; run the training first")
    notes = [
        f"Split: {cfg.split.group_by}-level, test {cfg.split.test_size:.0%}, "
        f"{cfg.split.k_folds} folds."
    ]
    md, page = layout.reports() / f"{name}.md", layout.reports() / f"{name}.html"
    studies: dict[str, str] = {}
    if write:
        atomic_write_text(md, report.markdown(tables, notes, settings))
        atomic_write_text(page, report.html_report(tables, figures, notes, settings))
        from mammoflow.reporting.report import write_report

        for dataset in tables:  # reports/<dataset>/report.html, the whole study's evidence
            studies[dataset] = write_report(cfg, dataset, layout, tracker)["html"]
    return {
        "tables": tables,
        "settings": settings,
        "markdown": str(md),
        "html": str(page),
        "studies": studies,
    }


def audit_stage(
    cfg: Config, dataset: str, backbone: str | None = None, layout: Layout | None = None
) -> dict[str, Any]:
    """Leakage audit of ``dataset``: image- vs patient-level study, inflation, split checks.

    Returns:
        ``{"dataset", "backbone", "inflation", "checks", "run_id", "summary"}`` (the summary is
        the printed text); the whole audit is in reports/<dataset>/audit.json.
    """
    from mammoflow.evaluation.audit import run_audit, summary_text

    res = run_audit(cfg, dataset, backbone, layout or Layout())
    keys = ("dataset", "backbone", "inflation", "checks")
    return {
        **{k: res[k] for k in keys},
        "run_id": res["mlflow_run_id"],
        "summary": summary_text(res),
    }


def tune_stage(
    cfg: Config,
    dataset: str,
    backbone: str,
    layout: Layout | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Optuna study of ``backbone`` on ``dataset``; best params → tuning/<dataset>-<backbone>.json."""
    from mammoflow.tuning.tune import run_tuning

    cfg = cfg.for_dataset(dataset)  # its own model / train keys, as the train stage uses them
    return run_tuning(cfg, dataset, backbone, n_trials, workers, layout or Layout())


def check_weights(cfg: Config, dataset: str, hint: str | None = None) -> dict[str, str]:
    """Resolve ``model.weights`` of ``dataset`` for every backbone now, before any long work.

    Args:
        cfg: the configuration (the dataset's own model keys are applied here).
        dataset: the dataset about to be studied.
        hint: how to run without ImageNet weights on purpose, for the error message.

    Returns:
        backbone → weights source (``imagenet``, ``file`` or ``none``).

    Raises:
        WeightsError: listing every missing file and the folder it belongs in, plus ``hint``.
    """
    from mammoflow.models.weights import WeightsError, resolve_weights

    cfg = cfg.for_dataset(dataset)
    sources: dict[str, str] = {}
    missing: list[str] = []
    for backbone in cfg.model.backbones:
        try:
            sources[backbone] = resolve_weights(backbone, cfg.model.weights).source
        except WeightsError as exc:
            missing.append(str(exc))
    if missing:
        lines = "\n  - ".join(missing)
        raise WeightsError(
            f"{dataset}: weights missing:\n  - {lines}" + (f"\n{hint}" if hint else "")
        )
    return sources


def study_overrides(
    dataset: str, weights: str | None, backbones: Sequence[str], sets: Mapping[str, Any]
) -> list[str]:
    """The `dvc exp run -S` overrides of a study: only ``dataset`` in the pipeline, and the
    command line's options as params.yaml keys. ``model.*`` and ``train.*`` go to the dataset's
    own section (they win over the global ones there, as on the command line)."""
    from mammoflow.dvc_runner import override

    out = [override("pipeline.datasets", [dataset])]
    if backbones:
        out.append(override("model.backbones", list(backbones)))
    if weights is not None:
        out.append(override(f"datasets.{dataset}.model.weights", weights))
    for key, value in sets.items():
        own = key.startswith(("model.", "train.")) and key != "model.backbones"
        out.append(override(f"datasets.{dataset}.{key}" if own else key, value))
    return out


def study_stage(
    cfg: Config,
    dataset: str,
    layout: Layout | None = None,
    *,
    overrides: Sequence[str] = (),
    on_line: Callable[[str], None] | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The whole study of one dataset through DVC, as an experiment: source → acquire → … →
    train each backbone → evaluate → Grad-CAM check, then the comparison.

    The weights are resolved first (:func:`check_weights`), so a missing ImageNet file stops the
    study before any data is touched. The stages run as `dvc exp run` with ``overrides`` (see
    :func:`study_overrides`), so the study is in DVC's experiment history (`dvc exp show`) and
    its data in the DVC cache, while the workspace's params.yaml and dvc.lock (the sample
    pipeline's) stay as they were.

    Args:
        cfg: the configuration with the command line's options applied (for the checks and
            the comparison; DVC applies the same options through ``overrides``).
        dataset: the dataset to study (a key of ``datasets``).
        layout: project layout (its root is the DVC project).
        overrides: `dvc exp run -S` values.
        on_line: called with each line DVC and the stages print.
        hint: how to run without ImageNet weights, for the missing-weights error.

    Returns:
        The comparison (``tables``, ``settings``), also written to reports/study-<dataset>.md
        and .html (reports/comparison.* stay the pipeline's), and the ``experiment`` name.
    """
    from mammoflow import dvc_runner

    layout = layout or Layout()
    cfg = cfg.for_dataset(dataset)
    sources = check_weights(cfg, dataset, hint)
    if on_line is not None:
        on_line(f"weights: {sources}")
    root = layout.root.resolve()
    dvc_runner.check_project(root)
    # every stage of the dataset but the pipeline-wide report (the comparison is written below)
    name = dvc_runner.exp_run(root, overrides, [f"explain_check@{dataset}"], on_line=on_line)
    res = compare_stage(cfg, [dataset], layout, name=f"study-{dataset}")
    return {**res, "experiment": name}
