"""The `mammoflow` command line: each command loads the config and calls one stage function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import typer
from rich.console import Console

from mammoflow.config import Config, ConfigError, load_config, parse_assignments
from mammoflow.dvc_runner import DvcError
from mammoflow.errors import EX_TEMPFAIL, is_transient

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    name="mammoflow",
    help="MammoFlow: reproducible transfer-learning studies on mammograms (MIAS, CMMD).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ingest_app = typer.Typer(help="Ingest a raw dataset into a manifest.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
storage_app = typer.Typer(help="S3 storage of the team stack.", no_args_is_help=True)
app.add_typer(storage_app, name="storage")

console = Console(stderr=True)
out = Console()

P = ParamSpec("P")
R = TypeVar("R")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file.")]
OnBad = Literal["fail", "quarantine"]
Pseudonymize = Literal["none", "hmac"]
ServeFormat = Literal["file", "tensor"]


def _friendly(func: Callable[P, R]) -> Callable[P, R]:
    """Turn expected errors into one readable message and an exit code: 2 for bad input or
    params, 75 (EX_TEMPFAIL) for transient I/O that a scheduler may retry, 1 for other I/O."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (ConfigError, ValueError, FileNotFoundError) as exc:
            if is_transient(exc):  # tracking.TrackingUnreachable: a ValueError for old callers
                kind = "transient error (worth a retry)"
                console.print(f"[bold red]{kind}:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=EX_TEMPFAIL) from None
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except DvcError as exc:  # a stage run through DVC failed: its own lines say why
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except OSError as exc:
            transient = is_transient(exc)
            kind = "transient I/O error (worth a retry)" if transient else "I/O error"
            console.print(f"[bold red]{kind}:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=EX_TEMPFAIL if transient else 1) from None

    return wrapper


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler or `kill` stopping us) into KeyboardInterrupt, so open MLflow
    runs are marked FAILED on the way out instead of being left RUNNING."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _config(params: Path) -> Config:
    return load_config(params)


def _echo(summary: dict[str, Any]) -> None:
    out.print_json(json.dumps(summary, default=str))


@app.command()
@_friendly
def sample(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the sample into.")],
    seed: Annotated[int | None, typer.Option(help="Seed (default: params sample.seed).")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write the embedded synthetic sample: a MIAS-shaped folder and a CMMD-shaped DICOM tree."""
    from mammoflow.data.sample import make_sample

    s = _config(params).sample
    res = make_sample(
        out_dir,
        seed=s.seed if seed is None else seed,
        mias_patients=s.mias_patients,
        cmmd_patients=s.cmmd_patients,
        size=s.size,
    )
    _echo({"out": str(out_dir), "result": str(res)})


@ingest_app.command("mias")
@_friendly
def ingest_mias_cmd(
    source: Annotated[Path, typer.Argument(help="all-mias.tar.gz or an extracted folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder for manifest.parquet.")],
    dataset: Annotated[str, typer.Option(help="Dataset name recorded in the manifest.")] = "mias",
    on_bad_file: Annotated[OnBad, typer.Option(help="fail | quarantine")] = "fail",
) -> None:
    """Ingest the MIAS archive (or folder) into OUT/manifest.parquet."""
    from mammoflow.data.mias import ingest_mias

    res = ingest_mias(source, out_dir, dataset=dataset, on_bad_file=on_bad_file, interface="cli")
    _echo({"manifest": str(res.manifest_path), "images": len(res.frame), "bad": len(res.bad)})


@ingest_app.command("cmmd")
@_friendly
def ingest_cmmd_cmd(
    source: Annotated[
        Path, typer.Argument(help="TCIA tree: CMMD/<patient>/<study>/<series>/*.dcm")
    ],
    clinical: Annotated[
        Path, typer.Option(help="CMMD_clinicaldata_revision.xlsx or a CSV export.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder for manifest.parquet.")],
    dataset: Annotated[str, typer.Option(help="Dataset name recorded in the manifest.")] = "cmmd",
    on_bad_file: Annotated[OnBad, typer.Option(help="fail | quarantine")] = "fail",
    min_size: Annotated[
        int, typer.Option(min=1, help="Refuse images whose short side has fewer pixels.")
    ] = 256,
    accept_for_processing: Annotated[
        bool, typer.Option(help="Take FOR PROCESSING (raw detector) images too.")
    ] = False,
    accept_burned_in: Annotated[
        bool, typer.Option(help="Take images with BurnedInAnnotation YES (text in the pixels).")
    ] = False,
    pseudonymize: Annotated[
        Pseudonymize,
        typer.Option(help="none | hmac (PatientID → HMAC with env MAMMOFLOW_PSEUDONYM_KEY)."),
    ] = "none",
) -> None:
    """Ingest a CMMD DICOM tree joined with its clinical table."""
    from mammoflow.data.cmmd import ingest_cmmd
    from mammoflow.data.pseudonym import pseudonymizer

    res = ingest_cmmd(
        source,
        clinical,
        out_dir,
        dataset=dataset,
        on_bad_file=on_bad_file,
        min_size=min_size,
        accept_for_processing=accept_for_processing,
        accept_burned_in=accept_burned_in,
        pseudonymizer=pseudonymizer(pseudonymize),
        interface="cli",
    )
    _echo({"manifest": str(res.manifest_path), "images": len(res.frame), "bad": len(res.bad)})


@ingest_app.command("dataset")
@_friendly
def ingest_dataset_cmd(dataset: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Pipeline stage: ingest data/raw/DATASET into data/interim/DATASET."""
    from mammoflow.stages import ingest_stage

    _echo(ingest_stage(_config(params), dataset))


@app.command("source")
@_friendly
def source_cmd(dataset: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Pipeline stage: record DATASET's source files (names, sizes, times) for DVC."""
    from mammoflow.stages import source_stage

    _echo(source_stage(_config(params), dataset))


@app.command("acquire")
@_friendly
def acquire_cmd(dataset: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Pipeline stage: bring DATASET's raw files to data/raw/DATASET."""
    from mammoflow.stages import acquire_stage

    _echo(acquire_stage(_config(params), dataset))


@app.command("validate")
@_friendly
def validate_cmd(dataset: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Pipeline stage: Great Expectations checks on DATASET's manifest."""
    from mammoflow.stages import validate_stage

    _echo(validate_stage(_config(params), dataset))


@app.command("convert")
@_friendly
def convert_cmd(dataset: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Pipeline stage: raw images → padded PNGs in data/processed/DATASET."""
    from mammoflow.stages import convert_stage

    _echo(convert_stage(_config(params), dataset, progress=sys.stderr.isatty()))


@app.command("split")
@_friendly
def split_cmd(dataset: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Pipeline stage: held-out test set + K folds grouped by patient → data/splits/DATASET."""
    from mammoflow.stages import split_stage

    _echo(split_stage(_config(params), dataset))


@app.command("train")
@_friendly
def train_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (params.yaml datasets).")],
    backbone: Annotated[
        list[str] | None, typer.Option(help="Backbone(s); default: model.backbones.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """K-fold training + held-out test of each backbone, tracked in MLflow (resumable)."""
    from mammoflow.stages import train_stage

    _interrupt_on_sigterm()
    cfg = _config(params)
    for name in backbone or cfg.model.backbones:
        _echo(train_stage(cfg, dataset, name, progress=True))


@app.command("tune")
@_friendly
def tune_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (params.yaml datasets).")],
    backbone: Annotated[str, typer.Option(help="Backbone to tune (any registered one).")],
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials", min=1, help="Study size, complete + pruned (default: tune.n_trials)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Worker processes sharing the study (>1 needs PostgreSQL)."),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Optuna search over tune.space; best params → tuning/DATASET-BACKBONE.json (resumable)."""
    from mammoflow.stages import tune_stage

    _interrupt_on_sigterm()
    _echo(tune_stage(_config(params), dataset, backbone, n_trials=n_trials, workers=workers))


@app.command("evaluate")
@_friendly
def evaluate_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Rank the backbones by tracking.registry_metric (default: CV macro F1); promote the best."""
    from mammoflow.stages import evaluate_stage

    _echo(evaluate_stage(_config(params), dataset))


@app.command("compare")
@_friendly
def compare_cmd(
    dataset: Annotated[
        list[str] | None, typer.Option(help="Dataset(s); default: pipeline.datasets.")
    ] = None,
    write: Annotated[bool, typer.Option(help="Write reports/comparison.md and .html.")] = True,
    table: Annotated[bool, typer.Option(help="Print the comparison table.")] = True,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Print the paper-style comparison (from MLflow) and write the reports."""
    from mammoflow.stages import compare_stage

    _print_comparison(compare_stage(_config(params), dataset, write=write), table, write)


def _print_comparison(res: dict[str, Any], table: bool = True, write: bool = True) -> None:
    """The comparison tables, each titled with the settings its runs used, and where to look."""
    from mammoflow.reporting import figures as report

    wide = Console(width=max(out.width, 112))  # the paper's seven columns need the room
    for name, rows in res["tables"].items() if table else ():
        wide.print(report.console_table(name, rows, res["settings"].get(name)))
    if write:
        out.print(f"Reports: {res['markdown']} and {res['html']}")
        if res.get("studies"):
            out.print("Study reports: " + ", ".join(res["studies"].values()))
    out.print(
        "MLflow UI: run `make ui`, then open "
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    )


def _study_config(
    params: Path, dataset: str, weights: str | None, backbones: list[str], sets: list[str]
) -> Config:
    """params.yaml as ``dataset`` runs it, then the command line's options on top."""
    cfg = _config(params).for_dataset(dataset)
    overrides = parse_assignments(sets)
    if weights is not None:
        overrides["model.weights"] = weights
    if backbones:
        overrides["model.backbones"] = backbones
    return cfg.with_overrides(overrides, source="options") if overrides else cfg


@app.command("audit")
@_friendly
def audit_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (params.yaml datasets).")],
    backbone: Annotated[
        str | None, typer.Option(help="Backbone; default: the first of model.backbones.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Leakage audit: the study split by image and by patient, the inflation, split checks."""
    from mammoflow.stages import audit_stage

    _interrupt_on_sigterm()
    res = audit_stage(_config(params), dataset, backbone)
    typer.echo(res["summary"], nl=False)
    typer.echo(f"Written: reports/{dataset}/audit.json and audit.md; MLflow run {res['run_id']}")


@app.command("study")
@_friendly
def study_cmd(
    dataset: Annotated[
        str, typer.Option(help="Dataset to study (a key of params.yaml datasets): mias, cmmd, …")
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            help="imagenet | none | a weights file (default: the dataset's model.weights, "
            "imagenet for the real datasets). 'none' is recorded and labelled as not transfer "
            "learning."
        ),
    ] = None,
    backbone: Annotated[
        list[str] | None, typer.Option(help="Backbone(s) (default: model.backbones).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="KEY=VALUE over params.yaml, e.g. --set train.epochs=1 (repeatable)."
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The real study of one dataset with the paper's settings, to the comparison table.

    acquire → ingest → validate → convert → split → train each backbone → evaluate → compare;
    the weights are checked first, so a missing ImageNet file stops it before any work.
    """
    from mammoflow.paths import Layout
    from mammoflow.stages import study_overrides, study_stage

    _interrupt_on_sigterm()
    cfg = _study_config(params, dataset, weights, backbone or [], set_ or [])
    hint = (
        "To train without ImageNet weights on purpose (random initialisation: recorded as "
        "model.weights none and labelled 'a demo, not transfer learning' in the comparison): "
        f"mammoflow study --dataset {dataset} --weights none "
        f"(or: make study DATASET={dataset} WEIGHTS=none)."
    )
    overrides = study_overrides(dataset, weights, backbone or [], parse_assignments(set_ or []))
    res = study_stage(
        cfg,
        dataset,
        Layout(root=params.parent),
        overrides=overrides,
        on_line=lambda line: console.print(line, highlight=False, markup=False),
        hint=hint,
    )
    console.print(f"DVC experiment: {res['experiment']} (`dvc exp show` lists it)")
    _print_comparison(res)


@app.command("deploy")
@_friendly
def deploy_cmd(
    pool: Annotated[str, typer.Option(help="Prefect process work pool.")] = "mammoflow-pool",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Register the scheduled Prefect deployments (nightly validation, weekly retrain).

    flows/ belongs to the checkout, not to the installed package: this runs
    ``python -m flows.deploy`` in the current directory (the project root).
    """
    if not Path("flows/deploy.py").is_file():
        raise typer.BadParameter(
            f"no flows/deploy.py under {Path.cwd()}: run `mammoflow deploy` from the project root"
        )
    cmd = [sys.executable, "-m", "flows.deploy", "--pool", pool, "--params", str(params)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        console.print(done.stderr, end="", highlight=False)
        raise typer.Exit(code=done.returncode)
    _echo({"deployments": done.stdout.split()})


@storage_app.command("check")
@_friendly
def storage_check_cmd(
    bucket: Annotated[str, typer.Option(help="Bucket to check.")],
    prefix: Annotated[str, typer.Option(help="Key prefix for the round-trip object.")] = "",
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint (default: from env).")] = None,
) -> None:
    """Check credentials, bucket and a write/read/delete round trip before a long run."""
    from mammoflow.storage import check_storage

    report = check_storage(bucket, prefix, endpoint_url=endpoint)
    _echo(report.to_dict())
    report.raise_for_error()


@app.command("predict")
def predict_cmd(
    paths: Annotated[
        list[Path], typer.Argument(help="DICOM/PGM/PNG files or folders (recursive).")
    ],
    dataset: Annotated[str, typer.Option(help="Dataset whose classes and conversion apply.")],
    out_file: Annotated[Path, typer.Option("--out", help="Results file, .csv or .json.")],
    model: Annotated[
        str | None, typer.Option(help="MLflow model URI; default models:/mammoflow-D@champion.")
    ] = None,
    explain: Annotated[
        Path | None, typer.Option(help="Folder for Grad-CAM overlays (.png) and maps (.npy).")
    ] = None,
    target_layer: Annotated[
        str | None, typer.Option(help="Grad-CAM layer; default the last convolution.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    raw: Annotated[
        bool, typer.Option(help="Uncalibrated probabilities (default: the model's calibrated).")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score new mammograms with the dataset's champion (or --model); exit 1 if any file failed."""
    from mammoflow.serving.predict import predict_files

    try:
        res = predict_files(
            paths,
            _config(params),
            dataset,
            model_uri=model,
            out=out_file,
            explain_dir=explain,
            batch_size=batch_size,
            target_layer=target_layer,
            raw=raw,
        )
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(
        f"{len(res.rows)} images scored in {res.seconds:.1f} s ({res.images_per_s:.1f} images/s)"
        f" → {out_file}" + (f"; explanations in {explain}" if explain else ""),
        highlight=False,
    )
    if res.failures:
        console.print(f"[bold red]{len(res.failures)} file(s) failed:[/]", highlight=False)
        for f in res.failures:
            console.print(f"  - {f.path}: {f.reason}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


@app.command("external")
@_friendly
def external_cmd(
    model: Annotated[
        str, typer.Option(help="MLflow model URI, e.g. models:/mammoflow-D@champion.")
    ],
    dataset: Annotated[str, typer.Option(help="Labelled dataset the model never trained on.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """External validation: score DATASET with MODEL; metrics, calibration, shift; log, report."""
    from mammoflow.evaluation.external import run_external

    _echo(run_external(_config(params), model, dataset))


@app.command("explain-check")
@_friendly
def explain_check_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (MIAS-shaped: lesion circles).")],
    target_layer: Annotated[
        str | None, typer.Option(help="Grad-CAM layer; default the last convolution.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Pointing game: share of abnormal test images whose Grad-CAM peak is inside a lesion."""
    from mammoflow.explain.explain_check import explain_check

    _echo(explain_check(_config(params), dataset, target_layer=target_layer))


@app.command("serve")
@_friendly
def serve_cmd(
    dataset: Annotated[str, typer.Option(help="Serve this dataset's champion.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5001,
    model: Annotated[str | None, typer.Option(help="Another MLflow model URI.")] = None,
    fmt: Annotated[
        ServeFormat,
        typer.Option(
            "--format",
            help="file: requests carry image files (DICOM/PNG/PGM, base64), decoded and "
            "converted by the served wrapper; tensor: the model as registered, on converted "
            "pixels (`serve-request --format tensor`).",
        ),
    ] = "file",
    workers: Annotated[
        int, typer.Option(help="uvicorn worker processes (2: measured on 2 cores).")
    ] = 2,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the champion with `mlflow models serve` on 127.0.0.1 (POST /invocations).

    SIGTERM or SIGINT (Ctrl-C) stops the server and its uvicorn workers with it.
    """
    from mammoflow.procs import run_until_stopped
    from mammoflow.serving.predict import default_model_uri, serve_command
    from mammoflow.serving.serve import ensure_wrapper, serve_env

    uri = model or default_model_uri(dataset)
    served = uri
    if fmt == "file":
        folder, built = ensure_wrapper(_config(params), dataset, uri)
        console.print(
            f"{'built' if built else 'using'} the file-serving wrapper of {uri} in {folder}",
            highlight=False,
        )
        served = str(folder)
    cmd = serve_command(served, port, workers=workers)
    console.print(
        f"serving {uri} ({fmt} requests, {workers} worker(s)) on "
        f"http://127.0.0.1:{port}/invocations",
        highlight=False,
    )
    raise typer.Exit(code=run_until_stopped(cmd, env=serve_env()))


@app.command("serve-request")
@_friendly
def serve_request_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Image files (DICOM/PGM/PNG).")],
    out_file: Annotated[Path, typer.Option("--out", help="JSON request body to write.")],
    dataset: Annotated[
        str | None, typer.Option(help="Dataset whose conversion applies (--format tensor).")
    ] = None,
    fmt: Annotated[
        ServeFormat,
        typer.Option(
            "--format",
            help="file: the files' bytes, base64 (`serve --format file`, the default); tensor: "
            "the converted pixels, ~2 MB per image (`serve --format tensor`).",
        ),
    ] = "file",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write the /invocations body for PATHS (`mammoflow serve`'s --format)."""
    from mammoflow.files import atomic_write_text
    from mammoflow.serving.predict import request_body
    from mammoflow.serving.serve import file_body

    if fmt == "tensor":
        if dataset is None:
            raise typer.BadParameter(
                "--format tensor converts: name the --dataset", param_hint="--dataset"
            )
        body = request_body(paths, _config(params), dataset)
    else:
        body = file_body(paths)
    atomic_write_text(out_file, json.dumps(body))


@app.command("config")
@_friendly
def config_cmd(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and print the resolved configuration."""
    _echo(_config(params).model_dump(mode="json", by_alias=True))


@app.command("reproduce")
def reproduce_cmd(
    model_uri: Annotated[
        str, typer.Argument(help="models:/mammoflow-<ds>@champion, models:/<name>/<n>, runs:/<id>")
    ],
    tolerance: Annotated[
        float | None,
        typer.Option(
            help="Largest |logged - reproduced| per metric (default: 0 on the run's "
            "device and packages, else 0.02)."
        ),
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the scratch folder (printed).")] = False,
) -> None:
    """Re-run a model's study from its git commit and DVC data version; compare the metrics.

    Exit 0 when identical (or within the tolerance), 1 when they differ, 2 when the run, its
    commit or its data cannot be found. Runs go to MLflow experiment mammoflow-<ds>-reproduce.
    """
    from mammoflow.reproduce import ReproduceError, render, reproduce

    try:
        target, cmp = reproduce(model_uri, Path(), tolerance=tolerance, keep=keep)
    except ReproduceError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    typer.echo(render(target, cmp))
    if cmp.verdict == "DIFFERENT":
        raise typer.Exit(code=1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
