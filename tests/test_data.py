"""Loaders: tiny files in the real on-disk formats (IDX gzip, CIFAR-100 pickle), real MNIST, clear errors."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsebench.config import DatasetConfig
from sparsebench.data import load_dataset
from sparsebench.core.errors import DataError

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def write_idx(raw: Path, n_train=30, n_test=10, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        blobs = {f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes(),
                 f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes()}
        for name, blob in blobs.items():
            if gz:
                with gzip.open(raw / f"{name}.gz", "wb") as f:
                    f.write(blob)
            else:
                (raw / name).write_bytes(blob)
        data[split] = (imgs, labels)
    return data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_reads_gzip_and_plain_files(tmp_path, name, folder, gz):
    data = write_idx(tmp_path / folder / "raw", gz=gz)
    b = load_dataset(DatasetConfig(name=name, root=str(tmp_path), val_fraction=0.2, standardize=False,
                                   verify_md5=False), seed=0)
    assert b.train.x.shape == (24, 1, 28, 28) and len(b.val) == 6 and b.test.x.shape == (10, 1, 28, 28)
    assert b.num_classes == 10 and b.kind == "image"
    # test split is in file order and pixels are scaled to [0, 1]
    assert torch.equal(b.test.y, torch.from_numpy(data["t10k"][1].astype(np.int64)))
    assert torch.allclose(b.test.x[:, 0] * 255, torch.from_numpy(data["t10k"][0]).float())


def test_gz_md5_is_checked(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is corrupted \(md5"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)), seed=0)


def test_missing_files_message_names_them_and_the_place(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path)), seed=0)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "SPARSEBENCH_DATA" in msg and "\n" not in msg


def test_truncated_idx_file_is_a_data_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, gz=False)
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DataError, match="mnist"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), verify_md5=False), seed=0)


def write_cifar100(root: Path, n_train=20, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": list(np.arange(n) % 100), "coarse_labels": [0] * n, "filenames": [b"x"] * n}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    return base


def test_cifar100_pickle_loader(tmp_path):
    write_cifar100(tmp_path)
    b = load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path), val_fraction=0.0, verify_md5=False), seed=0)
    assert b.train.x.shape == (20, 3, 32, 32) and b.test.x.shape == (8, 3, 32, 32) and b.num_classes == 100
    assert b.train.x.dtype == torch.float32


def test_cifar100_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match=r"missing train, test, meta under .*cifar-100-python"):
        load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path)), seed=0)
    write_cifar100(tmp_path)
    with pytest.raises(DataError, match="cifar100"):  # md5 of the tiny files differs from the published one
        load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path)), seed=0)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="unreadable"):
        load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path), verify_md5=False), seed=0)


def test_padding_for_wrn(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", gz=False)
    b = load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), pad_to=32, verify_md5=False), seed=0)
    assert b.train.x.shape[-2:] == (32, 32)


@pytest.mark.parametrize("name,n,classes", [("iris", 150, 3), ("digits", 1797, 10)])
def test_tabular_split_is_seeded_and_standardised(name, n, classes):
    cfg = DatasetConfig(name=name)
    a, b, c = load_dataset(cfg, seed=0), load_dataset(cfg, seed=0), load_dataset(cfg, seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == n and a.num_classes == classes
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert torch.allclose(a.train.x.mean(0), torch.zeros(a.train.x.shape[1]), atol=1e-5)


def test_real_mnist(mnist_root):
    b = load_dataset(DatasetConfig(name="mnist", root=mnist_root, val_fraction=0.0, standardize=False), seed=0)
    assert b.train.x.shape == (60000, 1, 28, 28) and b.test.x.shape == (10000, 1, 28, 28)
    counts = torch.bincount(b.test.y, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(b.train.x.mean()) - 0.1307) < 1e-3


FASHION_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
               "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
               "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
               "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}  # torchvision's published sums


@pytest.fixture
def fashion_mnist_root():
    """``$SPARSEBENCH_DATA`` (tests/conftest.py points it at ../shared/data) when it holds the four
    FashionMNIST .gz files (the shared copy, or Debian's dataset-fashion-mnist linked there), else skip."""
    import os

    root = os.environ.get("SPARSEBENCH_DATA")
    if not root or not all((Path(root) / "FashionMNIST" / "raw" / f).is_file() for f in FASHION_MD5):
        pytest.skip("real FashionMNIST not present (set SPARSEBENCH_DATA)")
    return root


def test_real_fashion_mnist(fashion_mnist_root):
    import hashlib

    raw = Path(fashion_mnist_root) / "FashionMNIST" / "raw"
    assert {f: hashlib.md5((raw / f).read_bytes()).hexdigest() for f in FASHION_MD5} == FASHION_MD5
    b = load_dataset(DatasetConfig(name="fashion_mnist", root=fashion_mnist_root, val_fraction=0.0,
                                   standardize=False), seed=0)  # verify_md5 (default) checks them again
    assert b.train.x.shape == (60000, 1, 28, 28) and b.test.x.shape == (10000, 1, 28, 28)
    assert b.num_classes == 10 and b.kind == "image"
    assert torch.bincount(b.train.y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(b.test.y, minlength=10).tolist() == [1000] * 10
    assert abs(float(b.train.x.mean()) - 0.2860) < 1e-3 and abs(float(b.test.x.mean()) - 0.2868) < 1e-3


def test_torchvision_imports_on_cpu_build():
    from sparsebench.data._torchvision import import_torchvision

    tv = import_torchvision()
    from torchvision import datasets, transforms  # noqa: F401

    assert hasattr(tv.datasets, "MNIST")
    x = transforms.Normalize((0.5,), (0.5,))(torch.ones(1, 2, 2))
    assert torch.allclose(x, torch.ones(1, 2, 2))
