"""Datasets as in-memory tensors: :data:`DATASETS` (registry with metadata), :func:`load_dataset`,
:class:`DataBundle` / :class:`Split`; loaders in :mod:`.tabular` (scikit-learn) and :mod:`.torchvision`.

All datasets become a :class:`DataBundle` of float32 feature tensors and int64 labels with a seeded
train/val/test split, small enough to keep on the training device (no DataLoader workers).
Importing this package registers the built-in datasets.
"""
from sparsebench.data.registry import (DATASETS, DataBundle, DatasetInfo, Split, cache_dir, default_data_root,
                                       load_dataset, register_dataset)
from sparsebench.data import tabular, torchvision  # noqa: E402,F401  (register the built-in datasets)

__all__ = ["DATASETS", "DataBundle", "DatasetInfo", "Split", "cache_dir", "default_data_root", "load_dataset",
           "register_dataset"]
