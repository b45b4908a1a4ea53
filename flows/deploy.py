"""Prefect deployments of the flows in ``pipeline.py`` beside this file, run from the checkout.

One table (:data:`DEPLOYMENTS`) names every deployment, its flow entrypoint and its schedule;
``prefect.yaml`` mirrors it for ``prefect deploy --all``. Deployments are created with
``flow.from_source(<project dir>, entrypoint)`` on a *process* work pool, so a
``prefect worker start --pool mammoflow-pool`` on the same machine (or a machine with the same
checkout at the same path) runs them in the project folder: no image, no remote storage.

The Prefect API is whatever ``PREFECT_API_URL`` points at: the local server of ``make serve`` or
a team server.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_POOL = "mammoflow-pool"
FLOWS_FILE = "flows/pipeline.py"

# Set in every flow run a worker starts (quiet TensorFlow, no GX analytics calls).
RUN_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GX_ANALYTICS_ENABLED": "false"}


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: a flow function of flows/pipeline.py and an optional cron schedule."""

    name: str
    flow: str
    cron: str | None
    description: str
    parameters: tuple[tuple[str, Any], ...] | None = None  # None: params_path and datasets

    @property
    def entrypoint(self) -> str:
        """``flows/pipeline.py:<flow function>``."""
        return f"{FLOWS_FILE}:{self.flow}"


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        "nightly-validation",
        "data_flow",
        "0 2 * * *",
        "Every night at 02:00: acquire, ingest, validate (Great Expectations) and convert.",
    ),
    DeploymentSpec(
        "weekly-retrain",
        "pipeline_flow",
        "0 3 * * 0",
        "Sundays at 03:00: the whole study (data, K-fold training of every backbone, report).",
    ),
    DeploymentSpec("on-demand", "train_flow", None, "Split and train, when asked."),
    DeploymentSpec(
        "on-demand",
        "evaluate_flow",
        None,
        "Promote each dataset's best backbone in the MLflow registry; comparison report.",
    ),
    DeploymentSpec(
        "nightly-scoring",
        "score_flow",
        "0 4 * * *",
        "Every night at 04:00: score the new images in data/incoming with the champion.",
        (("folder", "data/incoming"), ("dataset", "sample_mias")),
    ),
)


def ensure_work_pool(name: str = DEFAULT_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; return whether it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
        return True


def deploy_all(
    work_pool: str = DEFAULT_POOL,
    project_dir: Path | str | None = None,
    params_path: str = "params.yaml",
    datasets: list[str] | None = None,
    timezone: str | None = None,
    paused: bool = False,
    create_pool: bool = True,
) -> dict[str, UUID]:
    """Create or update every deployment of :data:`DEPLOYMENTS` on ``work_pool``.

    Args:
        work_pool: A process work pool (created if missing and ``create_pool``).
        project_dir: The checkout the worker runs flows in (default: the current folder).
        params_path: The flows' ``params_path`` parameter (relative to ``project_dir``).
        datasets: The flows' ``datasets`` parameter (None: ``pipeline.datasets``).
        timezone: IANA zone of the cron schedules (default UTC).
        paused: Create the schedules paused.
        create_pool: Create the work pool when it does not exist.

    Returns:
        ``"<flow name>/<deployment name>"`` → deployment id.
    """
    from prefect import flow
    from prefect.schedules import Cron

    root = Path(project_dir or Path.cwd()).resolve()
    if not (root / FLOWS_FILE).is_file():
        raise FileNotFoundError(f"{root / FLOWS_FILE}: not a MammoFlow checkout")
    if create_pool:
        ensure_work_pool(work_pool)
    ids: dict[str, UUID] = {}
    for spec in DEPLOYMENTS:
        parameters: dict[str, Any] = {"params_path": params_path}
        parameters.update(dict(spec.parameters) if spec.parameters else {"datasets": datasets})
        schedules = [Cron(spec.cron, timezone=timezone)] if spec.cron else None
        # from_source/to_deployment/apply are sync here (no running event loop).
        source = cast("Flow[..., Any]", flow.from_source(str(root), entrypoint=spec.entrypoint))
        runner = cast(
            "RunnerDeployment",
            source.to_deployment(
                name=spec.name,
                schedules=schedules,
                paused=paused,
                parameters=parameters,
                description=spec.description,
                tags=["mammoflow"],
                job_variables={"env": RUN_ENV},
            ),
        )
        # apply() raises on an error, where prefect.deploy() only prints a table of them.
        ids[f"{runner.flow_name}/{spec.name}"] = cast(UUID, runner.apply(work_pool_name=work_pool))
    return ids


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flows.deploy`` (from the project root): register the deployments (serve.sh)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool", default=DEFAULT_POOL, help="process work pool")
    parser.add_argument("--project-dir", default=None, help="checkout to run in (default: .)")
    parser.add_argument("--params", default="params.yaml", help="params_path of the flows")
    parser.add_argument("--timezone", default=None, help="IANA zone of the schedules")
    parser.add_argument("--paused", action="store_true", help="create the schedules paused")
    parser.add_argument("--json", action="store_true", help="print {name: id} as one JSON line")
    args = parser.parse_args(argv)
    ids = deploy_all(
        args.pool,
        project_dir=args.project_dir,
        params_path=args.params,
        timezone=args.timezone,
        paused=args.paused,
    )
    if args.json:  # the last line of stdout (`mammoflow deploy` reads it)
        print(json.dumps({name: str(uid) for name, uid in ids.items()}))
        return
    for name in ids:
        print(name)


if __name__ == "__main__":
    main()
