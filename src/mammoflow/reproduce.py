"""``mammoflow reproduce MODEL_URI``: re-run a logged study from its commit and data version.

1. The model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/…``) leads to the
   study's parent run: its ``git_commit``, ``dvc_data_hash`` / ``dvc_split_hash``, params and
   metrics (:func:`resolve_target`).
2. In a scratch folder, ``git worktree add`` checks the commit out; a DVC repo of its own, given
   the checkout's cache folder and remotes, pulls the two data versions **by hash** (a Prefect
   run may have left dvc.lock uncommitted, so the commit's dvc.lock need not name them).
3. The backbone's train stage runs there — the commit's code in this environment — with the
   params the run logged (:func:`logged_config`), its MLflow runs in ``<experiment>-reproduce``.
4. Logged and reproduced parent metrics side by side with a verdict (:func:`compare`).

Nothing tracked by git or DVC in the checkout changes (the DVC cache gains what was pulled).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mammoflow.dvcdata import IN_REMOTE, LOCAL_ONLY, DvcSetup, dvc_hash, dvc_setup, locate
from mammoflow.provenance import STUDY_PARAM_PREFIXES, packages
from mammoflow.tracking.tags import TAG_DATA, TAG_SPLIT

#: the experiment of reproductions: ``mammoflow-<dataset>-reproduce``
SUFFIX = "-reproduce"
#: parent metrics that measure time, not results (never compared)
_TIMING = ("time_", "seconds")


class ReproduceError(RuntimeError):
    """Something the reproduction needs is missing; the message names it and the fix."""


@dataclass(frozen=True)
class Target:
    """The logged study a model came from."""

    uri: str
    parent_id: str
    dataset: str
    backbone: str
    commit: str
    data_hash: str
    split_hash: str | None  # DVC md5 of the split file; None for runs older than the tag
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass
class Comparison:
    """Logged vs reproduced metrics, and the verdict."""

    rows: list[tuple[str, float, float]]  # (metric, logged, reproduced)
    tolerance: float
    only_logged: list[str] = field(default_factory=list)  # logged by later stages
    param_diffs: list[tuple[str, str, str]] = field(default_factory=list)
    package_diffs: list[tuple[str, str, str]] = field(default_factory=list)
    run_id: str = ""

    @property
    def worst(self) -> float:
        """The largest absolute difference (0 when every metric is bit-identical)."""
        return max((_diff(a, b) for _, a, b in self.rows), default=0.0)

    @property
    def verdict(self) -> str:
        """``identical`` | ``within tolerance <t>`` | ``DIFFERENT``."""
        if not self.rows or self.param_diffs:
            return "DIFFERENT"
        if self.worst == 0.0:
            return "identical"
        return (
            f"within tolerance {self.tolerance:g}" if self.worst <= self.tolerance else "DIFFERENT"
        )


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) if math.isfinite(a - b) else math.inf


# ------------------------------------------------------------------------------ pure parts


def parse_param(text: str) -> Any:
    """A logged MLflow param (``str(value)`` or JSON for lists and dicts) back to its value."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def logged_config(
    raw: Mapping[str, Any], params: Mapping[str, str], dataset: str, backbone: str
) -> dict[str, Any]:
    """The commit's params.yaml ``raw`` with the study params the run logged put back.

    The logged values are the ones the run used (the dataset's own model / train keys and the
    tuned params already applied), so those overrides are dropped and ``tune.use_best`` is off.
    """
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(raw))) or {}
    out.setdefault("pipeline", {})["datasets"] = [dataset]
    datasets = out.setdefault("datasets", {})
    kind = params.get("dataset.kind", "mias")
    entry = datasets.setdefault(dataset, {"kind": kind, "acquire": "sample"})
    entry.pop("model", None)
    entry.pop("train", None)
    out.setdefault("tune", {})["use_best"] = False
    for key, text in params.items():
        if not key.startswith(STUDY_PARAM_PREFIXES) or key == "model.backbones":
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_param(text)
    out.setdefault("model", {})["backbones"] = [backbone]
    return out


def compare(
    logged: Mapping[str, float], reproduced: Mapping[str, float], tolerance: float
) -> Comparison:
    """Every non-timing metric of the logged parent next to the reproduced one."""
    keys = sorted(k for k in logged if not any(t in k for t in _TIMING))
    rows = [(k, float(logged[k]), float(reproduced[k])) for k in keys if k in reproduced]
    only = [k for k in keys if k not in reproduced]
    return Comparison(rows, tolerance, only)


def package_drift(tags: Mapping[str, str], now: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``(package, logged, installed)`` for each package whose version changed since the run."""
    logged: dict[str, str] = {}
    with contextlib.suppress(ValueError):
        logged = dict(json.loads(tags.get("mammoflow.packages", "{}")))
    for name in ("tensorflow", "keras"):  # runs older than mammoflow.packages
        if f"{name}_version" in tags:
            logged.setdefault(name, tags[f"{name}_version"])
    return [
        (k, v, now.get(k, "not installed")) for k, v in sorted(logged.items()) if now.get(k) != v
    ]


def render(target: Target, cmp: Comparison) -> str:
    """The report: metrics side by side, what differs, the verdict."""
    lines = [
        f"{target.uri}: {target.dataset} / {target.backbone}, run {target.parent_id}, "
        f"commit {target.commit[:12]}, data {target.data_hash}",
        f"reproduced as run {cmp.run_id} (experiment mammoflow-{target.dataset}{SUFFIX})",
        "",
        f"{'metric':<40} {'logged':>22} {'reproduced':>22} {'difference':>12}",
    ]
    for key, a, b in cmp.rows:
        lines.append(f"{key:<40} {a!r:>22} {b!r:>22} {_diff(a, b):>12.3g}")
    if cmp.only_logged:
        lines.append(f"not made by the train stage (not compared): {', '.join(cmp.only_logged)}")
    for key, was, now in cmp.param_diffs:
        lines.append(f"PARAM DIFFERS {key}: logged {was!r}, reproduced {now!r}")
    for name, was, now in cmp.package_diffs:
        lines.append(f"package {name}: logged {was}, installed {now}")
    if not cmp.package_diffs:
        lines.append("packages: the versions the run logged")
    if target.tags.get("git_dirty") == "true":
        lines.append(
            "WARNING: the run was made with code or params changed from its commit (git_dirty); "
            "the commit alone may not reproduce it"
        )
    lines.append(
        f"verdict: {cmp.verdict} ({len(cmp.rows)} metrics, largest difference "
        f"{cmp.worst:.3g}, tolerance {cmp.tolerance:g})"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ MLflow


def resolve_target(tracker: Any, uri: str) -> Target:
    """The study parent run behind ``uri`` (a registered version, or a run).

    Raises:
        ReproduceError: the URI names nothing in the store, or its run lacks the lineage tags.
    """
    from mammoflow.tracking import TAG_BACKBONE, TAG_DATASET

    try:
        parent = tracker.study_parent(uri)
    except ValueError as exc:
        raise ReproduceError(str(exc)) from None
    parent_id = parent.info.run_id
    tags = dict(parent.data.tags)
    missing = [
        k
        for k in ("git_commit", TAG_DATA, TAG_DATASET, TAG_BACKBONE)
        if tags.get(k, "unknown") == "unknown"
    ]
    if missing:
        raise ReproduceError(
            f"run {parent_id} ({uri}) does not record {', '.join(missing)}: it cannot be reproduced"
        )
    return Target(
        uri=uri,
        parent_id=parent_id,
        dataset=tags[TAG_DATASET],
        backbone=tags[TAG_BACKBONE],
        commit=tags["git_commit"],
        data_hash=tags[TAG_DATA],
        split_hash=tags.get(TAG_SPLIT) if tags.get(TAG_SPLIT, "unknown") != "unknown" else None,
        tags=tags,
        params=dict(parent.data.params),
        metrics=dict(parent.data.metrics),
    )


def retire_earlier(tracker: Any, dataset: str, key: str) -> None:
    """Earlier reproductions of configuration ``key`` stop being resumable (their tag is renamed),
    so this one trains every fold again instead of reusing theirs."""
    from mammoflow.tracking import experiment_name

    tracker.retire_config(experiment_name(dataset) + SUFFIX, key)


# ------------------------------------------------------------------------------ git and DVC


def _run(
    cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=dict(env) if env else None, capture_output=True, text=True
    )


@contextlib.contextmanager
def worktree(root: Path, commit: str, scratch: Path, keep: bool = False) -> Iterator[Path]:
    """The project at ``commit`` in ``scratch`` (a git worktree), removed afterwards.

    Raises:
        ReproduceError: ``root`` is not in git, or the commit is not in its repository.
    """
    top = _run(["git", "rev-parse", "--show-toplevel", "--show-prefix"], root)
    if top.returncode != 0:
        raise ReproduceError(f"{root.resolve()} is not a git checkout: no commit to check out")
    prefix = (top.stdout.splitlines()[1:] or [""])[0].strip()
    if _run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], root).returncode != 0:
        raise ReproduceError(
            f"commit {commit} is not in this repository; `git fetch` the branch that has it"
        )
    tree = scratch / "tree"
    res = _run(["git", "worktree", "add", "--detach", str(tree), commit], root)
    if res.returncode != 0:
        raise ReproduceError(f"git worktree add {commit} failed: {res.stderr.strip()}")
    try:
        yield tree / prefix
    finally:
        if not keep:
            _run(["git", "worktree", "remove", "--force", str(tree)], root)
            _run(["git", "worktree", "prune"], root)


def fetch_data(setup: DvcSetup, scratch: Path, target: Target, project: Path) -> None:
    """Put the run's data versions, by hash, into ``project``'s data/ folder.

    A DVC repo of its own in ``scratch/fetch`` (the checkout's cache folder and remotes) gets
    ``.dvc`` files naming the hashes and checks them out — pulling from the default remote
    what the cache lacks.

    Raises:
        ReproduceError: a version is in neither the cache nor the remote (its hash named).
    """
    from mammoflow.dvc_runner import dvc_command

    dvc = dvc_command()
    fetch = scratch / "fetch"
    fetch.mkdir(parents=True)
    _run([*dvc, "init", "-q", "--no-scm"], fetch)
    from mammoflow.dvcdata import write_local_config

    write_local_config(fetch, setup)
    wanted = {"processed": target.data_hash}
    if target.split_hash:
        wanted["split.parquet"] = target.split_hash
    for path, md5 in wanted.items():
        record = {"outs": [{"md5": md5, "path": path, "hash": "md5"}]}
        (fetch / f"{path}.dvc").write_text(yaml.safe_dump(record), encoding="utf-8")
    where = locate(fetch, list(wanted.values()))
    if where not in (IN_REMOTE, LOCAL_ONLY):
        raise ReproduceError(
            f"data version {' and '.join(wanted.values())} of {target.dataset} (run "
            f"{target.parent_id}) is in neither the DVC cache {setup.cache_dir} nor the remote "
            f"{setup.remote_url or '(none set)'}: it was never pushed, or was garbage-collected"
        )
    targets = [f"{p}.dvc" for p in wanted]
    res = _run([*dvc, "checkout", *targets], fetch)
    if res.returncode != 0:
        res = _run([*dvc, "pull", *targets], fetch)
    if res.returncode != 0:
        raise ReproduceError(
            f"dvc pull of {', '.join(wanted.values())} failed: {(res.stderr or res.stdout).strip()[-2000:]}"
        )
    dest = project / "data" / "processed" / target.dataset
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(fetch / "processed", dest)
    if target.split_hash:
        split = project / "data" / "splits" / f"{target.dataset}.parquet"
        split.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(fetch / "split.parquet", split)
    if (got := dvc_hash(dest)) != target.data_hash:
        raise ReproduceError(f"{dest}: DVC hash {got} after checkout, not {target.data_hash}")


# ------------------------------------------------------------------------------ the command

#: default |logged - reproduced| allowed per metric when the run's device or packages differ
#: from this machine's (float32 vs bf16 / another TensorFlow); on the same machine: 0
OTHER_MACHINE_TOLERANCE = 0.02


def reproduce(
    uri: str, root: Path = Path(), tolerance: float | None = None, keep: bool = False
) -> tuple[Target, Comparison]:
    """Reproduce the study behind ``uri`` (see module doc); ``keep``: leave the scratch folder.

    Raises:
        ReproduceError: the run, its commit or its data version cannot be found (named).
    """
    from mammoflow.tracking import TAG_KEY, Tracker

    tracker = Tracker(root=root)
    target = resolve_target(tracker, uri)
    setup = dvc_setup(root)
    if setup is None:
        raise ReproduceError(
            f"{root.resolve()} is not a DVC repo: no cache or remote to fetch from"
        )
    scratch = Path(tempfile.mkdtemp(prefix="mammoflow-reproduce-"))
    try:
        with worktree(root, target.commit, scratch, keep) as project:
            params = _prepare(project, scratch, setup, target)
            tracker.suffixed_experiment_id(
                target.dataset, SUFFIX
            )  # artifacts where the store's are
            retire_earlier(tracker, target.dataset, target.tags.get(TAG_KEY, ""))
            run_id = _train(project, params, target, tracker.uri)
    finally:
        if keep:
            print(f"scratch folder kept: {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    rep = tracker.run(run_id)
    same_machine = rep.data.tags.get("device") == target.tags.get("device")
    drift = package_drift(target.tags, packages())
    if tolerance is None:
        tolerance = 0.0 if same_machine and not drift else OTHER_MACHINE_TOLERANCE
    cmp = compare(target.metrics, rep.data.metrics, tolerance)
    cmp.run_id, cmp.package_diffs = run_id, drift
    got = {**rep.data.params, **{f"tag {k}": v for k, v in rep.data.tags.items()}}
    want = {
        **target.params,
        **{f"tag {k}": target.tags.get(k, "") for k in ("split_hash", TAG_DATA)},
    }
    cmp.param_diffs = [
        (k, v, got.get(k, "(missing)")) for k, v in sorted(want.items()) if got.get(k) != v
    ]
    tracker.set_tags(
        run_id, {"mammoflow.reproduces": target.parent_id, "mammoflow.verdict": cmp.verdict}
    )
    return target, cmp


def _prepare(project: Path, scratch: Path, setup: DvcSetup, target: Target) -> Path:
    """Data fetched into ``project``, DVC configured there, the logged params written; their path."""
    from mammoflow.dvcdata import write_local_config
    from mammoflow.tracking import EXPERIMENT_SUFFIX_ENV

    package = project / "src" / "mammoflow"
    tracking = [package / "tracking.py", *sorted((package / "tracking").glob("*.py"))]
    if not any(p.is_file() and EXPERIMENT_SUFFIX_ENV in p.read_text("utf-8") for p in tracking):
        raise ReproduceError(
            f"commit {target.commit} predates `mammoflow reproduce` (its train stage cannot log "
            "to a separate experiment); check it out and rerun it by hand"
        )
    if (project / ".dvc").is_dir():
        write_local_config(project, setup)  # so the reproduced run's lineage sees the cache
    fetch_data(setup, scratch, target, project)
    committed = project / "params.yaml"
    raw = yaml.safe_load(committed.read_text(encoding="utf-8")) if committed.is_file() else {}
    params = scratch / "params.yaml"
    config = logged_config(raw or {}, target.params, target.dataset, target.backbone)
    params.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return params


def _train(project: Path, params: Path, target: Target, uri: str) -> str:
    """The commit's train stage (and split stage, for runs without ``dvc_split_hash``) in this
    environment; the reproduced parent run's id."""
    from mammoflow.tracking import EXPERIMENT_SUFFIX_ENV

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(project / "src"), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_TRACKING_URI": uri,
        EXPERIMENT_SUFFIX_ENV: SUFFIX,
    }
    for key, value in (("PYTHONHASHSEED", "0"), ("TF_CPP_MIN_LOG_LEVEL", "2")):
        env.setdefault(key, value)  # what bin/mammoflow (dvc.yaml's commands) sets
    env.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    base = [sys.executable, "-m", "mammoflow"]
    steps = [["train", "--dataset", target.dataset, "--backbone", target.backbone]]
    if not target.split_hash:
        steps.insert(0, ["split", target.dataset])
    for step in steps:
        print(f"reproduce: mammoflow {' '.join(step)} at {target.commit[:12]}", flush=True)
        res = subprocess.run([*base, *step, "--params", str(params)], cwd=project, env=env)
        if res.returncode != 0:
            raise ReproduceError(f"`mammoflow {' '.join(step)}` at commit {target.commit} failed")
    from mammoflow.paths import Layout
    from mammoflow.tracking import metrics_run_id

    return metrics_run_id(Layout(project), target.dataset, target.backbone, "parent")
