"""Tabular datasets from scikit-learn (Iris, Digits): a seeded, stratified train/val/test split,
z-scored with the training statistics."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sparsebench.data.registry import DataBundle, DatasetInfo, Split, register_dataset, subset

if TYPE_CHECKING:  # pragma: no cover
    from sparsebench.config.schemas import DatasetConfig


def _split(x, y, fraction: float, seed: int, key: str, name: str):
    """Stratified ``train_test_split``; a split too small for every class is a one-line ConfigError."""
    from sklearn.model_selection import train_test_split

    from sparsebench.core.errors import ConfigError

    try:
        return train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as err:
        raise ConfigError(f"{key}={fraction!r}: dataset {name} ({len(y)} samples to split, "
                          f"{len(np.unique(y))} classes) cannot be split stratified so: {err}") from None


def load_tabular(cfg: "DatasetConfig", seed: int) -> DataBundle:
    """Load ``cfg.name`` with its scikit-learn loader (:attr:`DatasetInfo.source`).

    Split: ``test_fraction`` of all samples, then ``val_fraction`` of the rest, both stratified and
    seeded with ``cfg.split_seed`` (else ``seed``); ``train_subset``/``test_subset`` keep seeded subsets.
    Features float32 ``(N, F)``, labels int64 ``(N,)``.
    """
    import sklearn.datasets

    from sparsebench.data.registry import DATASETS

    x, y = getattr(sklearn.datasets, DATASETS.get(cfg.name).source)(return_X_y=True)
    x = x.astype(np.float32)
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    x_tr, x_te, y_tr, y_te = _split(x, y, cfg.test_fraction, split_seed, "dataset.test_fraction", cfg.name)
    if cfg.val_fraction > 0:
        x_tr, x_va, y_tr, y_va = _split(x_tr, y_tr, cfg.val_fraction, split_seed, "dataset.val_fraction", cfg.name)
    else:
        x_va, y_va = x_tr[:0], y_tr[:0]
    if cfg.standardize:
        mu, sd = x_tr.mean(0), x_tr.std(0)
        sd[sd == 0] = 1.0
        x_tr, x_va, x_te = [(a - mu) / sd for a in (x_tr, x_va, x_te)]

    def mk(a, b):
        return Split(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), torch.from_numpy(b.astype(np.int64)))

    train, val, test = mk(x_tr, y_tr), mk(x_va, y_va), mk(x_te, y_te)
    train = subset(train, cfg.train_subset, split_seed)
    test = subset(test, cfg.test_subset, split_seed)
    return DataBundle(cfg.name, "tabular", train, val, test, int(y.max()) + 1)


register_dataset("iris", DatasetInfo("tabular", 3, (4,), load_tabular, source="load_iris"))
register_dataset("digits", DatasetInfo("tabular", 10, (64,), load_tabular, source="load_digits"))
