"""A study's inputs, prepared once: frame, splits, folds, hashes, backbone and cached features.

The train stage, the Prefect fold tasks and the tuner all start here, so they see the same rows,
the same identity (config hash) and the same feature cache entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from mammoflow.config import Config
from mammoflow.data.manifest import CLASSES, read_manifest
from mammoflow.paths import Layout
from mammoflow.provenance import dvc_data_hash, study_params
from mammoflow.quiet import load_keras

if TYPE_CHECKING:
    from mammoflow.models.build import BackboneModel
    from mammoflow.models.features import FeatureSet, ImageSet


class InputsError(ValueError):
    """A study's inputs are missing or unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class StudyInputs:
    """Everything a (dataset, backbone) study reads, and its identity.

    Attributes:
        cfg: the configuration in force: the dataset's own model / train keys applied, then the
            tuned params when ``tune.use_best``.
        dataset / backbone: what is studied.
        class_names: the dataset kind's classes.
        frame: the converted manifest.
        splits: test rows and the K CV folds.
        folds: the CV fold numbers.
        split_hash / data_hash: identities of the splits and the converted data.
        params: the flattened study params (logged; part of the key).
        key: the resume key (params + data hash + split hash).
        precision: the resolved Keras dtype policy.
    """

    cfg: Config
    dataset: str
    backbone: str
    class_names: tuple[str, ...]
    frame: pd.DataFrame
    splits: pd.DataFrame
    folds: tuple[int, ...]
    split_hash: str
    data_hash: str
    params: dict[str, Any]
    key: str
    precision: str

    @property
    def n_classes(self) -> int:
        """How many classes."""
        return len(self.class_names)

    def patients(self) -> dict[str, str]:
        """image_id → patient_id (for patient-level bootstrap CIs)."""
        return dict(zip(self.frame["image_id"], self.frame["patient_id"], strict=True))


def load_inputs(
    cfg: Config, dataset: str, backbone: str, layout: Layout | None = None
) -> StudyInputs:
    """Read the converted manifest and the splits of ``dataset`` for ``backbone``.

    Raises:
        InputsError: unconverted images, missing splits, or splits without CV folds.
    """
    from mammoflow.data.split import read_splits, split_hash
    from mammoflow.models.features import resolve_precision
    from mammoflow.provenance import config_hash

    layout = layout or Layout()
    cfg = cfg.for_dataset(dataset)  # datasets.<name>.model / .train over the global sections
    if cfg.tune.use_best:
        from mammoflow.tuning.params import apply_best, best_params_path

        cfg = apply_best(cfg, dataset, backbone, best_params_path(dataset, backbone, layout))
    frame = read_manifest(layout.processed(dataset))
    if frame["converted_path"].isna().any():
        raise InputsError(
            f"{layout.processed(dataset)}: manifest has unconverted images; run convert"
        )
    path = layout.splits(dataset)
    if not path.is_file():
        raise InputsError(f"{path}: missing; run `mammoflow split {dataset}` first")
    splits = read_splits(path)
    folds = tuple(sorted(int(f) for f in splits.loc[splits["split"] == "cv", "fold"].unique()))
    if not folds:
        raise InputsError(f"{path}: no CV folds; run `mammoflow split {dataset}`")
    s_hash, d_hash = split_hash(splits), dvc_data_hash(dataset, layout.root)
    params = study_params(cfg, dataset)
    return StudyInputs(
        cfg=cfg,
        dataset=dataset,
        backbone=backbone,
        class_names=CLASSES[cfg.dataset(dataset).kind],
        frame=frame,
        splits=splits,
        folds=folds,
        split_hash=s_hash,
        data_hash=d_hash,
        params=params,
        key=config_hash(params, d_hash, s_hash),
        precision=resolve_precision(cfg.train.precision),
    )


def load_features(
    inp: StudyInputs,
    layout: Layout | None = None,
    *,
    trainable_layers: int | None = None,
    progress: bool = False,
) -> tuple[BackboneModel, FeatureSet | ImageSet]:
    """Build the backbone and its inputs: cached prefix features (extracted on a miss) or images.

    The cache lives in ``layout.features()`` keyed on everything the features depend on, so every
    process that shares the folder (Dask workers, tuning workers) extracts a dataset once.

    Args:
        inp: the study's inputs.
        layout: project layout (cache folder).
        trainable_layers: N (default ``model.trainable_layers``; the tuner varies it).
        progress: show a progress bar while extracting.
    """
    keras = load_keras()

    from mammoflow.console import progress as shown
    from mammoflow.models.build import load_backbone
    from mammoflow.models.features import prepare_inputs

    layout = layout or Layout()
    cfg = inp.cfg
    # With model.weights: none the backbone is randomly initialised: seeded, so every process
    # builds the same one and a cached prefix meets the tail of the same initialisation.
    keras.utils.set_random_seed(cfg.train.seed)
    bb = load_backbone(
        inp.backbone,
        weights=cfg.model.weights,
        trainable_layers=cfg.model.trainable_layers
        if trainable_layers is None
        else trainable_layers,
        input_size=cfg.model.input_size,
        precision=inp.precision,
    )
    with shown(f"{inp.dataset}/{inp.backbone} features", enabled=progress) as ticker:
        data = prepare_inputs(
            inp.frame,
            bb,
            dataset=inp.dataset,
            feature_cache=cfg.train.feature_cache,
            augment=cfg.train.augment,
            cache_dir=layout.features(),
            batch_size=cfg.train.batch_size,
            progress=ticker.update if progress else None,
            dtype=cfg.train.feature_dtype,
        )
    return bb, data
