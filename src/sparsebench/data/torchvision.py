"""Image datasets through torchvision: MNIST, FashionMNIST (IDX files) and CIFAR-100 (pickles).

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
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparsebench.core.errors import DataError
from sparsebench.core.io import atomic_write
from sparsebench.data._torchvision import import_torchvision
from sparsebench.data.registry import DATASETS, DataBundle, DatasetInfo, Split, cache_dir, register_dataset, subset

if TYPE_CHECKING:  # pragma: no cover
    from sparsebench.config.schemas import DatasetConfig

def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing_message(cfg: "DatasetConfig", root: Path, files) -> str:
    return (f"dataset {cfg.name}: missing {', '.join(files)} under {root} "
            f"(place the files there, set SPARSEBENCH_DATA or dataset.root to their parent directory, "
            f"or use dataset.download=true where a network is available)")


def _prepare_idx_root(cfg: "DatasetConfig", root: Path, tv_cls) -> Path:
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


def load_torchvision(cfg: "DatasetConfig", seed: int) -> DataBundle:
    """Load ``cfg.name`` with its torchvision class (:attr:`DatasetInfo.source`) from ``cfg.root``.

    Pixels are scaled to [0, 1], normalised with the dataset's ``mean``/``std`` (``standardize``) and
    zero-padded to ``pad_to``; ``val_fraction`` of the training images (seeded permutation) form the
    validation split. Images float32 ``(N, C, H, W)``, labels int64 ``(N,)``.

    Raises:
        DataError: files missing, corrupted (md5) or unreadable; the message names the file(s).
    """
    import_torchvision()
    from torchvision import datasets

    root = Path(cfg.root).expanduser()
    info = DATASETS.get(cfg.name)
    tv_cls = getattr(datasets, info.source)
    try:
        if hasattr(tv_cls, "train_list"):  # CIFAR: pickled batches
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
    except (ValueError, EOFError, OSError, KeyError, AssertionError, pickle.UnpicklingError) as err:
        raise DataError(f"dataset {cfg.name} under {root}: unreadable file ({type(err).__name__}: {err})") from err
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise DataError(f"dataset {cfg.name} under {root}: {xtr.shape[0]} images but {ytr.shape[0]} labels")

    mean, std = info.mean, info.std

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
    test = subset(Split(prep(xte), yte.long()), cfg.test_subset, split_seed)
    return DataBundle(cfg.name, "image", train, val, test, num_classes)


def _unverified_cifar100(base):
    class UnverifiedCIFAR100(base):  # md5=None: torchvision's check_integrity then only checks existence
        train_list = [[n, None] for n, _ in base.train_list]
        test_list = [[n, None] for n, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return UnverifiedCIFAR100


register_dataset("mnist", DatasetInfo("image", 10, (1, 28, 28), load_torchvision, source="MNIST",
                                      mean=(0.1307,), std=(0.3081,)))
register_dataset("fashion_mnist", DatasetInfo("image", 10, (1, 28, 28), load_torchvision, source="FashionMNIST",
                                              mean=(0.2860,), std=(0.3530,)))
register_dataset("cifar100", DatasetInfo("image", 100, (3, 32, 32), load_torchvision, source="CIFAR100",
                                         mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)))
