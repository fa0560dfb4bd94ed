"""The dataset registry and the in-memory data containers.

Each dataset is a :class:`DatasetInfo` registered in :data:`DATASETS` under its ``dataset.name`` by
the module that loads it (:mod:`.tabular`, :mod:`.torchvision`); the metadata (kind, classes, input
shape, normalisation statistics) is readable without loading anything, e.g. by config validation.
This module imports only :mod:`sparsebench.core`.

Adding a dataset: register a :class:`DatasetInfo` with a ``load(cfg, seed) -> DataBundle`` function
in a loader module (and write ``conf/dataset/<name>.yaml``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from sparsebench.core.registry import Registry
from sparsebench.core.seeding import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sparsebench.config.schemas import DatasetConfig


@dataclass
class Split:
    """Features ``x``: float32 ``(N, F)`` (tabular) or ``(N, C, H, W)`` (images); labels ``y``: int64 ``(N,)``."""

    x: "torch.Tensor"
    y: "torch.Tensor"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    """A loaded dataset: seeded train/val/test splits of tensors, ``kind`` ``"tabular"`` | ``"image"``."""

    name: str
    kind: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one sample, without the batch dimension (after padding)."""
        return tuple(self.train.x.shape[1:])

    def to(self, device) -> "DataBundle":
        return DataBundle(self.name, self.kind, self.train.to(device), self.val.to(device), self.test.to(device),
                          self.num_classes)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset before loading it.

    Attributes:
        kind: ``"tabular"`` (features ``(N, F)``) or ``"image"`` (``(N, C, H, W)``).
        num_classes: number of labels.
        input_shape: shape of one raw sample (images before ``dataset.pad_to``).
        load: ``load(cfg: DatasetConfig, seed: int) -> DataBundle``.
        source: where the data come from (scikit-learn loader or torchvision class name).
        mean, std: per-channel statistics of the training images (image normalisation), else None.
    """

    kind: str
    num_classes: int
    input_shape: Tuple[int, ...]
    load: Callable[["DatasetConfig", int], DataBundle]
    source: str
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None


DATASETS: Registry = Registry("dataset.name")


def register_dataset(name: str, info: DatasetInfo) -> DatasetInfo:
    """Register ``info`` under ``dataset.name=name`` (metadata ``kind`` mirrors ``info.kind``)."""
    return DATASETS.register(name, kind=info.kind)(info)


def load_dataset(cfg: "DatasetConfig", seed: int = 0) -> DataBundle:
    """Load the configured dataset as tensors.

    Args:
        cfg: the validated ``dataset`` config.
        seed: seeds the train/val(/test) split when ``cfg.split_seed`` is null.

    Returns:
        DataBundle with train/val/test splits; images are ``(N, C, H, W)`` float32, normalised.

    Raises:
        ConfigError: unknown ``dataset.name``.
        DataError: files missing, corrupted (md5) or unreadable; the message names the file(s).
    """
    return DATASETS.get(cfg.name).load(cfg, seed)


def subset(split: Split, n: Optional[int], seed: int) -> Split:
    """The first ``n`` samples of a seeded permutation of ``split`` (``derive_seed(seed, "subset")``), or ``split`` itself."""
    import torch

    if not n or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(derive_seed(seed, "subset")))[:n]
    return Split(split.x[idx], split.y[idx])


def default_data_root() -> str:
    """``$SPARSEBENCH_DATA`` if set, else ``./data``."""
    return os.environ.get("SPARSEBENCH_DATA", "./data")


def cache_dir() -> Path:
    """``$SPARSEBENCH_CACHE``, else ``~/.cache/sparsebench`` (extracted IDX files, numba cache)."""
    return Path(os.environ.get("SPARSEBENCH_CACHE", Path.home() / ".cache" / "sparsebench"))
