"""``mammoflow study``: one dataset's whole pipeline as a DVC experiment.

The command line's ``--weights``/``--backbone``/``--set`` become ``dvc exp run -S`` values in the
dataset's own section, so the study is in ``dvc exp show`` with its params and metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout


def option_keys(dataset: str, weights: str | None, sets: Mapping[str, Any]) -> dict[str, Any]:
    """The command line's ``--weights`` and ``--set`` as params.yaml keys for ``dataset``:
    ``model.*`` and ``train.*`` go to the dataset's own section (they win over the global ones
    there, as on the command line); ``model.backbones`` and other sections stay global."""
    out: dict[str, Any] = {}
    if weights is not None:
        out[f"datasets.{dataset}.model.weights"] = weights
    for key, value in sets.items():
        own = key.startswith(("model.", "train.")) and key != "model.backbones"
        out[f"datasets.{dataset}.{key}" if own else key] = value
    return out


def study_overrides(
    dataset: str, weights: str | None, backbones: Sequence[str], sets: Mapping[str, Any]
) -> list[str]:
    """The `dvc exp run -S` overrides of a study: only ``dataset`` in the pipeline, and the
    command line's options as params.yaml keys (:func:`option_keys`)."""
    from mammoflow.dvc_runner import override

    out = [override("pipeline.datasets", [dataset])]
    if backbones:
        out.append(override("model.backbones", list(backbones)))
    out += [override(k, v) for k, v in option_keys(dataset, weights, sets).items()]
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
    from mammoflow.models.weights import check_weights
    from mammoflow.reporting.report import report_stage

    layout = layout or Layout()
    cfg = cfg.for_dataset(dataset)
    sources = check_weights(cfg, dataset, hint)
    if on_line is not None:
        on_line(f"weights: {sources}")
    root = layout.root.resolve()
    dvc_runner.check_project(root)
    # every stage of the dataset but the pipeline-wide report (the comparison is written below)
    name = dvc_runner.exp_run(root, overrides, [f"explain_check@{dataset}"], on_line=on_line)
    res = report_stage(cfg, [dataset], layout, name=f"study-{dataset}")
    return {**res, "experiment": name}
