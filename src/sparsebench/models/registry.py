"""Registries of the ``model`` group: network families (``model.arch``) and activations (``model.activation``).

An architecture is a builder ``build(cfg: ModelConfig, input_shape, num_classes) -> nn.Module``
registered with ``@ARCHS.register(name, input_kind=..., check=...)``:

* ``input_kind``: the dataset kind it needs (``"image"``), or None for any input; config validation
  compares it with the dataset's metadata (:data:`sparsebench.data.registry.DATASETS`).
* ``check``: optional ``check(cfg: ModelConfig)`` raising ConfigError for keys only this family reads.

Adding a network family: one module with its ``nn.Module`` and a registered builder, imported in
:mod:`sparsebench.models`, plus ``conf/model/<name>.yaml``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from sparsebench.config.schemas import DatasetConfig, ModelConfig

ARCHS: Registry = Registry("model.arch")
ACTIVATIONS: Registry = Registry("model.activation")


def check_model(cfg: "ModelConfig") -> None:
    """Run the architecture's own check (``model.arch`` must be registered)."""
    check = ARCHS.meta(cfg.arch).get("check")
    if check is not None:
        check(cfg)


def check_model_fits_dataset(model: "ModelConfig", dataset: "DatasetConfig") -> None:
    """Raise ConfigError when the architecture needs another kind of input than the dataset provides."""
    from sparsebench.data.registry import DATASETS

    need = ARCHS.meta(model.arch).get("input_kind")
    kind = DATASETS.get(dataset.name).kind
    if need is not None and need != kind:
        fits = [a for a in ARCHS.names() if ARCHS.meta(a).get("input_kind") in (None, kind)]
        raise ConfigError(f"model={model.name}: a {ARCHS.meta(model.arch).get('title', model.arch)} needs {need} "
                          f"data; dataset={dataset.name} is {kind} (use a model with model.arch in: {', '.join(fits)})")


def build_model(cfg: "ModelConfig", input_shape: Tuple[int, ...], num_classes: int) -> "nn.Module":
    """Build the configured network for inputs of ``input_shape`` (without batch dimension).

    Raises:
        ConfigError: unknown ``model.arch``, or an input the network cannot take (e.g. a WideResNet on 1-D input).
    """
    return ARCHS.get(cfg.arch)(cfg, tuple(input_shape), num_classes)
