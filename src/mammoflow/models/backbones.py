"""Backbone registry: name → Keras constructor, native input size, preprocess function, weights file.

This module imports no Keras at import time, so ``config.py`` and the CLI can validate backbone
names (:data:`BACKBONE_NAMES`) cheaply. Constructors and ``preprocess_input`` functions are named
by dotted import paths and resolved lazily by :func:`constructor` and :func:`preprocess_function`.

Adding a backbone is one :class:`BackboneSpec` entry in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Where keras.utils.get_file keeps downloaded weights, below the Keras home directory.
KERAS_CACHE_SUBDIR = "models"


class BackboneError(ValueError):
    """An unknown backbone name or an unusable backbone setting."""


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one ``keras.applications`` backbone.

    Attributes:
        name: MammoFlow's name (what params.yaml uses).
        constructor: dotted path of the ``keras.applications`` constructor.
        preprocess: dotted path of the backbone's own ``preprocess_input``.
        input_size: native square input size in pixels.
        min_input_size: smallest input the architecture accepts.
        weights_file: the exact file name Keras caches the ImageNet no-top weights under.
        weights_url: where Keras downloads that file from.
        weights_md5: the hash Keras checks the download against.
        last_block: name prefix of the last block's layers (where the trainable tail lives).
        display: human-readable name for reports.
    """

    name: str
    constructor: str
    preprocess: str
    input_size: int
    min_input_size: int
    weights_file: str
    weights_url: str
    weights_md5: str
    last_block: str
    display: str


_GCS = "https://storage.googleapis.com/tensorflow/keras-applications"

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vgg16",
            constructor="keras.applications.VGG16",
            preprocess="keras.applications.vgg16.preprocess_input",
            input_size=224,
            min_input_size=32,
            weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_GCS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_md5="6d6bbae143d832006294945121d1f1fc",
            last_block="block5",
            display="VGG16",
        ),
        BackboneSpec(
            name="vgg19",
            constructor="keras.applications.VGG19",
            preprocess="keras.applications.vgg19.preprocess_input",
            input_size=224,
            min_input_size=32,
            weights_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_GCS}/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_md5="253f8cb515780f3b799900260a226db6",
            last_block="block5",
            display="VGG19",
        ),
        BackboneSpec(
            name="resnet50",
            constructor="keras.applications.ResNet50",
            preprocess="keras.applications.resnet50.preprocess_input",
            input_size=224,
            min_input_size=32,
            weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_GCS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_md5="4d473c1dd8becc155b73f8504c6f6626",
            last_block="conv5_block3",
            display="ResNet50",
        ),
        BackboneSpec(
            name="inception_v3",
            constructor="keras.applications.InceptionV3",
            preprocess="keras.applications.inception_v3.preprocess_input",
            input_size=299,
            min_input_size=75,
            weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_GCS}/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_md5="bcbd6486424b2319ff4ef7d526e38f63",
            last_block="mixed10",
            display="InceptionV3",
        ),
        BackboneSpec(
            name="efficientnet_b0",
            constructor="keras.applications.EfficientNetB0",
            preprocess="keras.applications.efficientnet.preprocess_input",
            input_size=224,
            min_input_size=32,
            weights_file="efficientnetb0_notop.h5",
            weights_url="https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
            weights_md5="50bc09e76180e00e4465e1a485ddc09d",
            last_block="top",
            display="EfficientNetB0",
        ),
    )
}

#: Every registered backbone name (config.py validates ``model.backbones`` against this).
BACKBONE_NAMES: tuple[str, ...] = tuple(REGISTRY)

#: The four backbones compared in the paper.
PAPER_BACKBONES: tuple[str, ...] = ("vgg16", "vgg19", "resnet50", "inception_v3")


def get_spec(name: str) -> BackboneSpec:
    """Return the registry entry for ``name``.

    Raises:
        BackboneError: for an unknown name, listing the known ones.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of {list(BACKBONE_NAMES)!r} "
            "(model.backbones in params.yaml)"
        ) from None


def input_size_for(name: str, override: int | None = None) -> int:
    """The input size to use: ``override`` (model.input_size) or the backbone's native size.

    Raises:
        BackboneError: if ``override`` is below what the architecture accepts.
    """
    spec = get_spec(name)
    if override is None:
        return spec.input_size
    if override < spec.min_input_size:
        raise BackboneError(
            f"model.input_size={override} is too small for {name!r}; it needs at least "
            f"{spec.min_input_size} px (native {spec.input_size})"
        )
    return override


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def constructor(name: str) -> Callable[..., Any]:
    """The ``keras.applications`` constructor of backbone ``name`` (imports Keras)."""
    fn: Callable[..., Any] = _resolve(get_spec(name).constructor)
    return fn


def preprocess_function(name: str) -> Callable[[Any], Any]:
    """The backbone's own ``preprocess_input`` (expects RGB in [0, 255]; imports Keras)."""
    fn: Callable[[Any], Any] = _resolve(get_spec(name).preprocess)
    return fn
