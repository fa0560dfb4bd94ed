"""Datasets as in-memory tensors: Iris/Digits (scikit-learn) and MNIST/FashionMNIST/CIFAR-100 (torchvision).

All datasets become a :class:`DataBundle` of float32 feature tensors and int64 labels with a seeded
train/val/test split, small enough to keep on the training device (no DataLoader workers).

Image data live under ``dataset.root`` (default ``$SPARSEBENCH_DATA``, else ``./data``) in
torchvision's layout: ``<root>/MNIST/raw/*-ubyte[.gz]``, ``<root>/FashionMNIST/raw/...``,
``<root>/cifar-100-python/{train,test,meta}``. torchvision's MNIST reader wants the uncompressed IDX
files; when only the ``.gz`` files exist (e.g. a read-only shared copy) they are md5-checked against
torchvision's published sums and extracted once into ``$SPARSEBENCH_CACHE`` (default
``~/.cache/sparsebench``). Without the files and without ``dataset.download=true`` a
:class:`~sparsebench.core.errors.DataError` names the missing files and where they go.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from sparsebench.data._torchvision import import_torchvision
from sparsebench.config import DatasetConfig
from sparsebench.core.errors import DataError
from sparsebench.core.io import atomic_write

IMAGE_STATS = {  # per-channel mean/std of the training images (standard values)
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Split:
    """Features ``x``: float32 ``(N, F)`` (tabular) or ``(N, C, H, W)`` (images); labels ``y``: int64 ``(N,)``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    name: str
    kind: str  # "tabular" | "image"
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device) -> "DataBundle":
        return DataBundle(self.name, self.kind, self.train.to(device), self.val.to(device), self.test.to(device),
                          self.num_classes)


def default_data_root() -> str:
    """``$SPARSEBENCH_DATA`` if set, else ``./data``."""
    return os.environ.get("SPARSEBENCH_DATA", "./data")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEBENCH_CACHE", Path.home() / ".cache" / "sparsebench"))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- tabular
def _load_tabular(cfg: DatasetConfig, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits, load_iris
    from sklearn.model_selection import train_test_split

    loader = {"iris": load_iris, "digits": load_digits}[cfg.name]
    x, y = loader(return_X_y=True)
    x = x.astype(np.float32)
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.test_fraction, random_state=split_seed, stratify=y)
    if cfg.val_fraction > 0:
        x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=cfg.val_fraction, random_state=split_seed,
                                                  stratify=y_tr)
    else:
        x_va, y_va = x_tr[:0], y_tr[:0]
    if cfg.standardize:
        mu, sd = x_tr.mean(0), x_tr.std(0)
        sd[sd == 0] = 1.0
        x_tr, x_va, x_te = [(a - mu) / sd for a in (x_tr, x_va, x_te)]

    def mk(a, b):
        return Split(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), torch.from_numpy(b.astype(np.int64)))

    train, val, test = mk(x_tr, y_tr), mk(x_va, y_va), mk(x_te, y_te)
    train = _subset(train, cfg.train_subset, split_seed)
    test = _subset(test, cfg.test_subset, split_seed)
    return DataBundle(cfg.name, "tabular", train, val, test, int(y.max()) + 1)


# --------------------------------------------------------------------------- images
_TV_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar100": "CIFAR100"}


def _missing_message(cfg: DatasetConfig, root: Path, files) -> str:
    return (f"dataset {cfg.name}: missing {', '.join(files)} under {root} "
            f"(place the files there, set SPARSEBENCH_DATA or dataset.root to their parent directory, "
            f"or use dataset.download=true where a network is available)")


def _prepare_idx_root(cfg: DatasetConfig, root: Path, tv_cls) -> Path:
    """Return a root under which ``<Class>/raw`` holds the uncompressed IDX files torchvision reads."""
    folder = tv_cls.__name__
    raw = root / folder / "raw"
    names = [Path(url).name for url, _ in tv_cls.resources]  # *.gz
    plain = [n[:-3] for n in names]
    if all((raw / p).is_file() for p in plain):
        return root
    missing = [n for n, p in zip(names, plain) if not (raw / n).is_file() and not (raw / p).is_file()]
    if missing:
        if cfg.download:
            tv_cls(str(root), train=True, download=True)
            return root
        raise DataError(_missing_message(cfg, raw, missing))
    # only .gz present (possibly read-only): verify and extract into the cache
    key = hashlib.md5(str(raw.resolve()).encode()).hexdigest()[:12]  # one cache per source directory
    target = cache_dir() / "extracted" / key / folder / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for (name, md5), p in zip(tv_cls.resources, plain):
        src = raw / p if (raw / p).is_file() else raw / name
        out, stamp = target / p, target / (p + ".src")
        ident = f"{src}:{src.stat().st_size}:{src.stat().st_mtime_ns}:{cfg.verify_md5}"
        if out.is_file() and stamp.is_file() and stamp.read_text() == ident:
            continue  # extracted before from this very file
        if src.suffix == ".gz":
            if cfg.verify_md5 and _md5(src) != md5:
                raise DataError(f"dataset {cfg.name}: {src} is corrupted (md5 {_md5(src)} != published {md5}); "
                                f"replace it with the original file")
            with gzip.open(src, "rb") as fin:
                atomic_write(out, lambda f: shutil.copyfileobj(fin, f, 1 << 20))
        else:
            out.write_bytes(src.read_bytes())
        stamp.write_text(ident)
    return target.parent.parent


def _load_torchvision(cfg: DatasetConfig, seed: int) -> DataBundle:
    import_torchvision()
    from torchvision import datasets

    root = Path(cfg.root).expanduser()
    tv_cls = getattr(datasets, _TV_CLASS[cfg.name])
    try:
        if cfg.name == "cifar100":
            base = root / tv_cls.base_folder
            need = [n for n, _ in tv_cls.train_list + tv_cls.test_list] + [tv_cls.meta["filename"]]
            missing = [n for n in need if not (base / n).is_file()]
            if missing and not cfg.download:
                raise DataError(_missing_message(cfg, base, missing))
            cls = tv_cls if cfg.verify_md5 else _unverified_cifar100(tv_cls)
            tr = cls(str(root), train=True, download=cfg.download)
            te = cls(str(root), train=False, download=False)
            xtr = torch.from_numpy(tr.data).permute(0, 3, 1, 2).contiguous()
            xte = torch.from_numpy(te.data).permute(0, 3, 1, 2).contiguous()
            ytr, yte = torch.as_tensor(tr.targets), torch.as_tensor(te.targets)
            num_classes = len(tr.classes)
        else:
            use_root = _prepare_idx_root(cfg, root, tv_cls)
            tr = tv_cls(str(use_root), train=True, download=False)
            te = tv_cls(str(use_root), train=False, download=False)
            xtr, xte = tr.data.unsqueeze(1), te.data.unsqueeze(1)
            ytr, yte = tr.targets, te.targets
            num_classes = len(tr.classes)
    except DataError:
        raise
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted", bad magic numbers, ...
        raise DataError(f"dataset {cfg.name} under {root}: {str(err).splitlines()[0]}") from err
    except (ValueError, EOFError, OSError, KeyError, AssertionError, __import__("pickle").UnpicklingError) as err:
        raise DataError(f"dataset {cfg.name} under {root}: unreadable file ({type(err).__name__}: {err})") from err
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise DataError(f"dataset {cfg.name} under {root}: {xtr.shape[0]} images but {ytr.shape[0]} labels")

    mean, std = IMAGE_STATS[cfg.name]

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).div_(255.0)
        if cfg.standardize:
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        if cfg.pad_to and cfg.pad_to > x.shape[-1]:
            p = cfg.pad_to - x.shape[-1]
            x = torch.nn.functional.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
        return x.contiguous()

    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(xtr.shape[0], generator=g)
    n_val = int(round(cfg.val_fraction * xtr.shape[0]))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    if cfg.train_subset:
        tr_idx = tr_idx[: cfg.train_subset]
    train = Split(prep(xtr[tr_idx]), ytr[tr_idx].long())
    val = Split(prep(xtr[val_idx]), ytr[val_idx].long())
    test = _subset(Split(prep(xte), yte.long()), cfg.test_subset, split_seed)
    return DataBundle(cfg.name, "image", train, val, test, num_classes)


def _unverified_cifar100(base):
    class UnverifiedCIFAR100(base):  # md5=None: torchvision's check_integrity then only checks existence
        train_list = [[n, None] for n, _ in base.train_list]
        test_list = [[n, None] for n, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return UnverifiedCIFAR100


def _subset(split: Split, n: Optional[int], seed: int) -> Split:
    if not n or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))[:n]
    return Split(split.x[idx], split.y[idx])


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> DataBundle:
    """Load the configured dataset as tensors.

    Args:
        cfg: the validated ``dataset`` config.
        seed: seeds the train/val(/test) split when ``cfg.split_seed`` is null.

    Returns:
        DataBundle with train/val/test splits; images are ``(N, C, H, W)`` float32, normalised.

    Raises:
        DataError: files missing, corrupted (md5) or unreadable; the message names the file(s).
    """
    if cfg.name in ("iris", "digits"):
        return _load_tabular(cfg, seed)
    return _load_torchvision(cfg, seed)
