"""The Grad-CAM pointing game: does the explanation point at an annotated lesion?

For each backbone's test model, the share of abnormal held-out test images whose Grad-CAM
maximum (in the original geometry) falls inside an annotated lesion circle, with a patient
bootstrap CI, beside its chance level (the mean share of the breast mask inside the circles: a
uniformly random peak in the breast) and the share of maps that peak outside the breast — logged to MLflow and written to ``metrics/explain/<dataset>.json``. Images are read
and converted by :mod:`mammoflow.serving.predict` (the training conversion), maps computed by
:mod:`mammoflow.explain.gradcam`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mammoflow.config import Config
from mammoflow.explain.gradcam import bootstrap_rate, gradcam_batch, hit, peak, to_original
from mammoflow.paths import Layout


@dataclass(frozen=True)
class Annotated:
    """An abnormal test image with its lesion circles (MIAS coordinates)."""

    image_id: str
    patient_id: str
    raw: Path
    label_index: int
    lesions: tuple[Mapping[str, Any], ...]


def annotated_test_images(cfg: Config, dataset: str, layout: Layout) -> list[Annotated]:
    """The held-out test images of ``dataset`` with at least one lesion circle.

    Raises:
        FileNotFoundError: the converted manifest or the split is missing.
    """
    import json

    import pandas as pd

    from mammoflow.data.manifest import read_manifest
    from mammoflow.data.raw import raw_files

    manifest = layout.processed(dataset) / "manifest.parquet"
    split = layout.splits(dataset)
    for path in (manifest, split):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the pipeline up to split first")
    frame = read_manifest(manifest)
    test = set(pd.read_parquet(split).query("split == 'test'")["image_id"].astype(str))
    located = raw_files(cfg, dataset, layout) or {}
    out: list[Annotated] = []
    for row in frame.to_dict("records"):
        lesions = tuple(
            lesion
            for lesion in json.loads(str(row["extras"] or "{}")).get("lesions", [])
            if None not in (lesion.get("x"), lesion.get("y"), lesion.get("radius"))
        )
        if str(row["image_id"]) not in test or not lesions:
            continue
        raw = Path(located.get(str(row["raw_path"]), str(row["raw_path"])))
        out.append(
            Annotated(
                image_id=str(row["image_id"]),
                patient_id=str(row["patient_id"]),
                raw=raw if raw.is_absolute() else layout.root / raw,
                label_index=int(row["label_index"]),
                lesions=lesions,
            )
        )
    return out


def lesion_mask(lesions: Sequence[Mapping[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Pixels inside any lesion circle (MIAS x, y from the bottom-left), as ``hit`` tests them."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), bool)
    for lesion in lesions:
        x, y, r = lesion.get("x"), lesion.get("y"), lesion.get("radius")
        if x is None or y is None or r is None:
            continue
        out |= np.hypot(cols - float(x), rows - (h - 1 - float(y))) <= float(r)
    return out


def chance_and_outside(
    original: np.ndarray, lesions: Sequence[Mapping[str, Any]], point: tuple[int, int] | None
) -> tuple[float, bool]:
    """``(chance, outside)`` of one image: the share of the breast inside the lesion circles
    (the hit probability of a uniformly random peak in the breast), and whether the map's peak
    lies outside the breast mask (a shortcut signal: film edge, padding, labels)."""
    from mammoflow.data.images import breast_mask

    breast = breast_mask(np.asarray(original, np.float32))
    area = int(breast.sum())
    chance = float((breast & lesion_mask(lesions, breast.shape)).sum() / area) if area else 0.0
    outside = point is None or not bool(breast[point])
    return chance, outside


def pointing_game(
    model: Any, items: Sequence[Annotated], cfg: Config, dataset: str, target_layer: str | None
) -> list[dict[str, Any]]:
    """Per image: the map's peak in original pixels and whether it hits a lesion circle.

    The explained class is the image's true class (the pointing game asks where the evidence
    for the annotated finding is), in batches of ``train.batch_size``.
    """
    from mammoflow.data.prepare import acceptance, prepare

    rules = acceptance(cfg, dataset)
    rows: list[dict[str, Any]] = []
    size = max(1, cfg.train.batch_size)
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        prepared = [prepare(a.raw, cfg, rules) for a in chunk]
        cams = gradcam_batch(
            model,
            np.stack([p.pixels for p in prepared]),
            [a.label_index for a in chunk],
            target_layer,
        )
        for a, p, cam in zip(chunk, prepared, cams, strict=True):
            point = peak(to_original(cam, p.geometry))
            chance, outside = chance_and_outside(p.original, a.lesions, point)
            rows.append(
                {
                    "image_id": a.image_id,
                    "patient_id": a.patient_id,
                    "peak": list(point) if point else None,
                    "hit": hit(point, a.lesions, p.geometry.height),
                    "chance": chance,
                    "outside_breast": outside,
                }
            )
    return rows


def explain_check(
    cfg: Config, dataset: str, layout: Layout | None = None, target_layer: str | None = None
) -> dict[str, Any]:
    """Pointing-game hit rate per backbone on the annotated test images, logged to MLflow.

    Each backbone's test model (the one its metrics file names) explains each abnormal test
    image's true class; the rate's CI resamples patients (``evaluate.bootstrap``,
    ``evaluate.ci``). A dataset without lesion annotations (CMMD) is reported as skipped.
    Writes ``metrics/explain/<dataset>.json``.
    """
    from mammoflow.files import atomic_write_json
    from mammoflow.paths import Layout
    from mammoflow.tracking import Tracker, metrics_run_id

    layout = layout or Layout()
    cfg = cfg.for_dataset(dataset)
    out: dict[str, Any] = {"dataset": dataset, "backbones": {}}
    kind = cfg.dataset(dataset).kind
    items = annotated_test_images(cfg, dataset, layout) if kind == "mias" else []
    if items and cfg.tracking.log_models == "none":
        # a study run without models (to save time) has nothing to explain: say so, loudly
        out["skipped"] = "tracking.log_models is none: no test model was logged to explain"
        print(f"warning: Grad-CAM pointing game skipped: {out['skipped']}", file=sys.stderr)
    elif not items:
        out["skipped"] = "no abnormal test image with an annotated lesion circle"
    else:
        tracker = Tracker(root=layout.root)
        for backbone in cfg.model.backbones:
            run_id = metrics_run_id(layout, dataset, backbone)
            model = tracker.load_serving_model(tracker.model_uri_of(run_id)).model
            rows = pointing_game(model, items, cfg, dataset, target_layer)
            rate = bootstrap_rate(
                [r["hit"] for r in rows],
                [r["patient_id"] for r in rows],
                n=max(cfg.evaluate.bootstrap, 1),
                ci=cfg.evaluate.ci,
            )
            # beside the rate: what a random peak in the breast would score, and how often
            # the map points outside the breast at all
            rate["chance"] = float(np.mean([r["chance"] for r in rows]))
            rate["outside_breast"] = float(np.mean([r["outside_breast"] for r in rows]))
            tracker.log_pointing_game(run_id, rate, rows)
            out["backbones"][backbone] = {**rate, "mlflow_test_run_id": run_id}
    atomic_write_json(layout.explain_metrics(dataset), out)
    return out
