"""The `mammoflow` command line: each command loads the config and calls one stage function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from mammoflow.config import Config, load_config, parse_assignments
from mammoflow.console import entry, err, finish, heartbeat, out, say

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

console = err  # the narrative (steps, progress, errors) on stderr; results on stdout (`out`)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="KEY=VALUE over params.yaml, e.g. --set train.epochs=1 (repeatable)."
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        help="imagenet | none | a weights file (default: the dataset's model.weights, "
        "imagenet for the real datasets). 'none' is recorded and labelled as not transfer "
        "learning."
    ),
]
OnBad = Literal["fail", "quarantine"]
Pseudonymize = Literal["none", "hmac"]
ServeFormat = Literal["file", "tensor"]


def _config(params: Path) -> Config:
    return load_config(params)


def _echo(summary: dict[str, Any]) -> None:
    out.print_json(json.dumps(summary, default=str))


def _counts(counts: dict[str, Any]) -> str:
    """``normal 24 / benign 18``: a label count in a step line."""
    return " / ".join(f"{k} {v}" for k, v in counts.items())


def _num(value: Any) -> str:
    """A score in a step line: 3 decimals, or ``n/a``."""
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


def _options_config(
    params: Path, dataset: str, weights: str | None, sets: list[str] | None
) -> Config:
    """params.yaml with the command line's ``--weights`` / ``--set`` applied as a study applies
    them (:func:`mammoflow.study.option_keys`); params.yaml itself without options."""
    from mammoflow.study import option_keys

    keys = option_keys(dataset, weights, parse_assignments(sets or []))
    cfg = _config(params)
    return cfg.with_overrides(keys, source="options") if keys else cfg


@app.command()
@entry
def sample(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the sample into.")],
    seed: Annotated[int | None, typer.Option(help="Seed (default: params sample.seed).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
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
    facts = [f"{len(res.files)} files", f"MIAS in {res.mias_dir}", f"CMMD in {res.cmmd_dir}"]
    finish("sample", facts, {"out": str(out_dir), "result": str(res)}, as_json)


@ingest_app.command("mias")
@entry
def ingest_mias_cmd(
    source: Annotated[Path, typer.Argument(help="all-mias.tar.gz or an extracted folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder for manifest.parquet.")],
    dataset: Annotated[str, typer.Option(help="Dataset name recorded in the manifest.")] = "mias",
    on_bad_file: Annotated[OnBad, typer.Option(help="fail | quarantine")] = "fail",
    as_json: JsonOpt = False,
) -> None:
    """Ingest the MIAS archive (or folder) into OUT/manifest.parquet."""
    from mammoflow.data.mias import ingest_mias

    res = ingest_mias(source, out_dir, dataset=dataset, on_bad_file=on_bad_file, interface="cli")
    summary = {"manifest": str(res.manifest_path), "images": len(res.frame), "bad": len(res.bad)}
    facts = [f"{len(res.frame)} images", f"{len(res.bad)} bad", f"manifest {res.manifest_path}"]
    finish(f"ingest {dataset}", facts, summary, as_json)


@ingest_app.command("cmmd")
@entry
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
    as_json: JsonOpt = False,
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
    summary = {"manifest": str(res.manifest_path), "images": len(res.frame), "bad": len(res.bad)}
    facts = [f"{len(res.frame)} images", f"{len(res.bad)} bad", f"manifest {res.manifest_path}"]
    finish(f"ingest {dataset}", facts, summary, as_json)


@ingest_app.command("dataset")
@entry
def ingest_dataset_cmd(
    dataset: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False
) -> None:
    """Pipeline stage: ingest data/raw/DATASET into data/interim/DATASET."""
    from mammoflow.data.ingest import ingest_stage

    res = ingest_stage(_config(params), dataset)
    facts = [
        f"{res['images']} images of {res['patients']} patients ({_counts(res['labels'])})",
        f"{res['bad_files']} bad files",
    ]
    finish(f"ingest {dataset}", facts, res, as_json)


@app.command("source")
@entry
def source_cmd(
    dataset: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False
) -> None:
    """Pipeline stage: record DATASET's source files (names, sizes, times) for DVC."""
    from mammoflow.data.acquire import source_stage

    res = source_stage(_config(params), dataset)
    facts = [f"{res['files']} source files" if res["acquire"] == "local" else "generated sample"]
    finish(f"source {dataset}", facts, res, as_json)


@app.command("acquire")
@entry
def acquire_cmd(
    dataset: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False
) -> None:
    """Pipeline stage: bring DATASET's raw files to data/raw/DATASET."""
    from mammoflow.data.acquire import acquire_stage

    res = acquire_stage(_config(params), dataset)
    facts = [f"{res['files']} files in {res['raw_dir']}"]
    finish(f"acquire {dataset}", facts, res, as_json)


@app.command("validate")
@entry
def validate_cmd(
    dataset: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False
) -> None:
    """Pipeline stage: Great Expectations checks on DATASET's manifest."""
    from mammoflow.data.validate import validate_stage

    res = validate_stage(_config(params), dataset)
    facts = [
        f"{res['expectations']} expectations on {res['images']} images",
        f"{res['failed']} failed",
    ]
    finish(f"validate {dataset}", facts, res, as_json)


@app.command("convert")
@entry
def convert_cmd(
    dataset: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False
) -> None:
    """Pipeline stage: raw images → padded PNGs in data/processed/DATASET."""
    from mammoflow.data.convert import convert_stage

    res = convert_stage(_config(params), dataset, progress=True)
    facts = [f"{res['converted']} images converted", f"{res['skipped']} unchanged"]
    finish(f"convert {dataset}", facts, res, as_json)


@app.command("split")
@entry
def split_cmd(
    dataset: str, params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False
) -> None:
    """Pipeline stage: held-out test set + K folds grouped by patient → data/splits/DATASET."""
    from mammoflow.data.split import split_stage

    res = split_stage(_config(params), dataset)
    facts = [f"{part} {sum(n.values())}" for part, n in res["images"].items()]
    finish(f"split {dataset}", facts, res, as_json)


@app.command("train")
@entry
def train_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (params.yaml datasets).")],
    backbone: Annotated[
        list[str] | None, typer.Option(help="Backbone(s); default: model.backbones.")
    ] = None,
    weights: WeightsOpt = None,
    set_: SetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """K-fold training + held-out test of each backbone, tracked in MLflow (resumable).

    With --json, one JSON object per backbone.
    """
    from mammoflow.training.train import train_stage

    cfg = _options_config(params, dataset, weights, set_)
    for name in backbone or cfg.model.backbones:
        with heartbeat(f"train {dataset} {name}"):
            res = train_stage(cfg, dataset, name, progress=True)
        folds = f"folds trained {res['trained_folds']}, resumed {res['resumed_folds']}"
        scores = f"CV F1 {_num(res['cv_f1_macro_mean'])}, test F1 {_num(res['test_f1_macro'])}"
        took = res["seconds"].get("total")
        finish(f"train {dataset} {name}", [folds, scores], res, as_json, seconds=took)


@app.command("tune")
@entry
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
    weights: WeightsOpt = None,
    set_: SetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Optuna search over tune.space; best params → tuning/DATASET-BACKBONE.json (resumable)."""
    from mammoflow.tuning.tune import tune_stage

    cfg = _options_config(params, dataset, weights, set_)
    with heartbeat(f"tune {dataset} {backbone}"):
        res = tune_stage(cfg, dataset, backbone, n_trials=n_trials, workers=workers)
    facts = [
        f"{res['new_trials']} new trials, {_counts(res['trials'])}",
        f"best {_num(res['best_value'])} (trial {res['best_trial']}): {res['best_params']}",
    ]
    finish(f"tune {dataset} {backbone}", facts, res, as_json)


@app.command("evaluate")
@entry
def evaluate_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Rank the backbones by tracking.registry_metric (default: CV macro F1); promote the best."""
    from mammoflow.evaluation.evaluate import evaluate_stage

    res = evaluate_stage(_config(params), dataset)
    scores = ", ".join(f"{b} {_num(v)}" for b, v in res["scores"].items())
    facts = [f"champion {res['best']} by {res['metric']} ({scores})"]
    if "registry" in res:
        facts.append("registered")
    finish(f"evaluate {dataset}", facts, res, as_json)


@app.command("report")
@app.command("compare", hidden=True, deprecated=True)  # the report stage's command before
@entry
def report_cmd(
    dataset: Annotated[
        list[str] | None, typer.Option(help="Dataset(s); default: pipeline.datasets.")
    ] = None,
    write: Annotated[bool, typer.Option(help="Write reports/comparison.md and .html.")] = True,
    table: Annotated[bool, typer.Option(help="Print the comparison table.")] = True,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """The report stage: print the paper-style comparison (from MLflow) and write the reports
    (reports/comparison.md and .html, each dataset's study report)."""
    from mammoflow.reporting.report import report_stage

    res = report_stage(_config(params), dataset, write=write)
    if as_json:
        finish("report", [f"{len(res['tables'])} dataset(s)"], res, as_json)
    else:
        _print_comparison(res, table, write)


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
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning",
        soft_wrap=True,
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
@entry
def audit_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (params.yaml datasets).")],
    backbone: Annotated[
        str | None, typer.Option(help="Backbone; default: the first of model.backbones.")
    ] = None,
    weights: WeightsOpt = None,
    set_: SetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Leakage audit: the study split by image and by patient, the inflation, split checks."""
    from mammoflow.evaluation.audit import audit_stage

    with heartbeat(f"audit {dataset}"):
        res = audit_stage(_options_config(params, dataset, weights, set_), dataset, backbone)
    if not as_json:
        typer.echo(res["summary"], nl=False)
    written = f"reports/{dataset}/audit.json and audit.md, MLflow run {res['run_id']}"
    finish(f"audit {dataset} {res['backbone']}", [written], res, as_json)


@app.command("study")
@entry
def study_cmd(
    dataset: Annotated[
        str, typer.Option(help="Dataset to study (a key of params.yaml datasets): mias, cmmd, …")
    ],
    weights: WeightsOpt = None,
    backbone: Annotated[
        list[str] | None, typer.Option(help="Backbone(s) (default: model.backbones).")
    ] = None,
    set_: SetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """The real study of one dataset with the paper's settings, to the comparison table.

    acquire → ingest → validate → convert → split → train each backbone → evaluate → compare;
    the weights are checked first, so a missing ImageNet file stops it before any work.
    """
    from mammoflow.paths import Layout
    from mammoflow.study import study_overrides, study_stage

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
        on_line=_narrate,
        hint=hint,
    )
    say(f"DVC experiment: {res['experiment']} (`dvc exp show` lists it)")
    compared = f"{len(res['tables'].get(dataset, [[]])) - 1} backbone(s) compared"  # less header
    finish(f"study {dataset}", [f"experiment {res['experiment']}", compared], res, as_json)
    if not as_json:
        _print_comparison(res)


def _narrate(line: str) -> None:
    """A line of the study's DVC run, as a person watching it needs it (or nothing)."""
    from mammoflow.dvc_runner import narrate

    shown = narrate(line)
    if shown is not None:
        say(shown)


@app.command("deploy")
@entry
def deploy_cmd(
    pool: Annotated[str, typer.Option(help="Prefect process work pool.")] = "mammoflow-pool",
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Register the scheduled Prefect deployments (nightly validation, weekly retrain).

    flows/ belongs to the checkout, not to the installed package: this runs
    ``python -m flows.deploy`` in the current directory (the project root).
    """
    if not Path("flows/deploy.py").is_file():
        raise typer.BadParameter(
            f"no flows/deploy.py under {Path.cwd()}: run `mammoflow deploy` from the project root"
        )
    cmd = [sys.executable, "-m", "flows.deploy", "--pool", pool, "--params", str(params), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        console.print(done.stderr, end="", highlight=False)
        raise typer.Exit(code=done.returncode)
    ids = json.loads(done.stdout.strip().splitlines()[-1])
    facts = [f"{len(ids)} deployments on pool {pool}: {', '.join(ids)}"]
    finish("deploy", facts, {"deployments": ids}, as_json)


@storage_app.command("check")
@entry
def storage_check_cmd(
    bucket: Annotated[str, typer.Option(help="Bucket to check.")],
    prefix: Annotated[str, typer.Option(help="Key prefix for the round-trip object.")] = "",
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint (default: from env).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check credentials, bucket and a write/read/delete round trip before a long run."""
    from mammoflow.storage import check_storage

    report = check_storage(bucket, prefix, endpoint_url=endpoint)
    say(report.summary())
    finish("storage check", ["OK" if report.ok else "FAILED"], report.to_dict(), as_json)
    report.raise_for_error()


@app.command("predict")
@entry
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
@entry
def external_cmd(
    model: Annotated[
        str, typer.Option(help="MLflow model URI, e.g. models:/mammoflow-D@champion.")
    ],
    dataset: Annotated[str, typer.Option(help="Labelled dataset the model never trained on.")],
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """External validation: score DATASET with MODEL; metrics, calibration, shift; log, report."""
    from mammoflow.evaluation.external import run_external

    res = run_external(_config(params), model, dataset)
    facts = [
        f"{res['images']} images",
        f"F1 {_num(res['f1_macro'])} (shift {_num(res['shift_f1_macro'])})",
        f"report {res['report']}",
    ]
    finish(f"external {dataset}", facts, res, as_json)


@app.command("explain-check")
@entry
def explain_check_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset name (MIAS-shaped: lesion circles).")],
    target_layer: Annotated[
        str | None, typer.Option(help="Grad-CAM layer; default the last convolution.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Pointing game: share of abnormal test images whose Grad-CAM peak is inside a lesion."""
    from mammoflow.explain.explain_check import explain_check

    res = explain_check(_config(params), dataset, target_layer=target_layer)
    facts = [
        f"{b} hit rate {_num(r['hit_rate'])} on {int(r['n'])} images, chance {_num(r['chance'])}"
        for b, r in res["backbones"].items()
    ]
    finish(f"explain-check {dataset}", facts or [f"skipped: {res.get('skipped')}"], res, as_json)


@app.command("serve")
@entry
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
@entry
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
    say(f"serve-request: {len(paths)} file(s) ({fmt}) → {out_file}")


@app.command("config")
@entry
def config_cmd(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and print the resolved configuration."""
    _echo(_config(params).model_dump(mode="json", by_alias=True))


@app.command("reproduce")
@entry
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
