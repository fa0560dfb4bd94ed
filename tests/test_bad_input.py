"""At least 20 bad inputs, each giving one clear line that names the key or file (issue: bad input and faults).

The table of cases below doubles as documentation: (what goes wrong, how it is triggered, the message).
"""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sparsebench.api import compose, execute
from sparsebench.sparsity.distributions import layer_counts
from sparsebench.config import DatasetConfig, validate
from sparsebench.data import load_dataset
from sparsebench.core.errors import ConfigError, DataError, SparsebenchError, TrainingError
from sparsebench.core.io import WriteError, atomic_write_csv
from sparsebench.sparsity.masking import Masking
from sparsebench.models import MLP

ROOT = Path(__file__).resolve().parents[1]

CONFIG_CASES = [
    # (overrides, message prefix)
    (["method=nope"], "method=nope: unknown option"),
    (["dataset=imagenet"], "dataset=imagenet: unknown option"),
    (["model=resnet50"], "model=resnet50: unknown option"),
    (["method.bogus=1"], "method.bogus: unknown key"),
    (["trainer.lrate=0.1"], "trainer.lrate: unknown key"),
    (["trainer.lr=abc"], "trainer.lr:"),
    (["trainer.epochs=1.5"], "trainer.epochs:"),
    (["method=magnitude", "method.density=1.5"], "method.density=1.5: density must be in (0, 1]"),
    (["method=magnitude", "method.density=-0.1"], "method.density=-0.1: density must be in (0, 1]"),
    (["trainer.lr=-1"], "trainer.lr=-1.0: must be > 0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be >= 1"),
    (["trainer.schedule=linear"], "trainer.schedule='linear': unknown"),
    (["trainer.device=tpu"], "trainer.device='tpu': unknown"),
    (["model=wrn28x5", "dataset=mnist", "model.depth=20"], "model.depth=20: WideResNet depth must be 6n+4"),
    (["model=wrn28x5"], "model=wrn28x5: a WideResNet needs image data; dataset=digits is tabular"),
    (["model.activation=swishy"], "model.activation='swishy': unknown"),
    (["dataset.test_fraction=1.0"], "dataset.test_fraction=1.0: must be in (0, 1)"),
    (["method.rounds=0"], "method.rounds=0: must be >= 1"),
    (["method.target_density=2"], "method.target_density=2.0: density must be in (0, 1]"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes': unknown"),
]


@pytest.mark.parametrize("overrides,prefix", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_config_errors_name_the_key(overrides, prefix):
    with pytest.raises(SparsebenchError) as err:
        from sparsebench.cli import check_group_overrides

        check_group_overrides(overrides)
        validate(compose(overrides))
    msg = str(err.value)
    assert msg.startswith(prefix), msg
    assert "\n" not in msg


def test_budget_that_cannot_be_met():
    masking = Masking(MLP(784, 10, [300, 100]))
    with pytest.raises(ConfigError, match=r"^method.density: a budget of 26620 active weights cannot be met"):
        layer_counts(masking, 0.1, "uniform+")  # first layer (235 200 weights) must stay dense


def test_missing_dataset_names_files(tmp_path):
    with pytest.raises(DataError, match=r"missing .*train-images-idx3-ubyte.gz.* under .*MNIST/raw"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))


def test_wrong_shapes_in_idx_file(tmp_path, monkeypatch):
    import gzip
    import struct

    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n_img, n_lab in (("train", 10, 7), ("t10k", 4, 4)):  # 10 images but 7 labels
        with gzip.open(raw / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n_img, 28, 28) + bytes(n_img * 784))
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n_lab) + bytes(n_lab))
    with pytest.raises(DataError, match="10 images but 7 labels"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), verify_md5=False))


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    cfg = compose([f"out_dir={tmp_path}", "method=dense", "trainer.lr=1e6", "trainer.epochs=5",
                   "trainer.momentum=0.99"])
    with pytest.raises(TrainingError) as err:
        execute(cfg, quiet=True)
    msg = str(err.value)
    assert msg.startswith("non-finite training loss") and "at step" in msg and "checkpoint" in msg


def test_full_disk_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    atomic_write_csv(path, pd.DataFrame({"a": [1, 2]}))
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match=r"could not write .*table.csv: disk full"):
        atomic_write_csv(path, pd.DataFrame({"a": [3, 4, 5]}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary left behind


def test_cli_exit_code_and_single_line_for_data_error(tmp_path):
    env = {**os.environ, "SPARSEBENCH_DATA": str(tmp_path / "nodata")}
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), f"out_dir={tmp_path}", "dataset=cifar100",
                        "model=wrn28x5", "method=dense"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset cifar100: missing train, test, meta under")


def test_gpu_out_of_memory_names_batch_size_and_model(tmp_path, monkeypatch):
    from sparsebench.models import MLP as _MLP

    def boom(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(_MLP, "forward", boom)
    cfg = compose([f"out_dir={tmp_path}", "method=dense", "trainer.batch_size=512"])
    with pytest.raises(TrainingError, match=r"out of GPU memory at step 0 with trainer.batch_size=512 and model MLP"):
        execute(cfg, quiet=True)
