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
from sparsebench.api import validate
from sparsebench.config import DatasetConfig
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
    # issue 12: every range checked at start-up
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["trainer.eval_every=0"], "trainer.eval_every=0: must be >= 1"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: must be >= 1"),
    (["trainer.num_threads=-1"], "trainer.num_threads=-1: must be >= 1 or null"),
    (["trainer.num_threads=0"], "trainer.num_threads=0: must be >= 1 or null"),
    (["trainer.gamma=-0.1"], "trainer.gamma=-0.1: must be > 0"),
    (["trainer.device=cudax"], "trainer.device='cudax': unknown (allowed: auto, cpu, cuda, cuda:N)"),
    (["trainer.device=cuda:x"], "trainer.device='cuda:x': unknown"),
    (["trainer.momentum=1.5"], "trainer.momentum=1.5: must be in [0, 1)"),
    (["trainer.weight_decay=-1"], "trainer.weight_decay=-1.0: must be >= 0"),
    (["trainer.milestones=[0.5,1.5]"], "trainer.milestones=[0.5, 1.5]: must be fractions of training"),
    (["trainer.iterations=0"], "trainer.iterations=0: must be >= 1"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be >= 1"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1: must be >= 0"),
    (["trainer.checkpoint_every_steps=0"], "trainer.checkpoint_every_steps=0: must be >= 1 or null"),
    (["trainer.lr=inf"], "trainer.lr=inf: must be > 0"),
    (["trainer.optimizer=rmsprop"], "trainer.optimizer='rmsprop': unknown"),
    (["trainer.loss=hinge"], "trainer.loss='hinge': unknown"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction=1.0: must be in [0, 1)"),
    (["dataset.cutout=0"], "dataset.cutout=0: must be >= 1"),
    (["dataset.train_subset=0"], "dataset.train_subset=0: must be a positive integer or null"),
    (["dataset.augment=nope"], "dataset.augment='nope': unknown"),
    (["model.dropout=1.0"], "model.dropout=1.0: must be in [0, 1)"),
    (["model.hidden=[0]"], "model.hidden=[0]: widths must be positive"),
    (["logger=wandb", "logger.init_timeout=0"], "logger.init_timeout=0.0: must be > 0"),
    (["lock_timeout=-1"], "lock_timeout=-1.0: must be >= 0 seconds or null"),
    (["out_dir="], "out_dir=''"),
    (["method=set", "method.delta_t=0"], "method.delta_t=0: must be >= 1"),
    (["method=rigl", "method.drop_fraction=1.5"], "method.drop_fraction=1.5: must be in [0, 1)"),
    (["method=set", "method.t_end=2"], "method.t_end=2.0: must be in (0, 1]"),
    (["method=static_sparse", "method.distribution=global"], "method.distribution='global': 'global' is a selection"),
    (["method=lth_imp", "method.prune_rate=1.0"], "method.prune_rate=1.0: must be in [0, 1)"),
    (["method=lth_imp", "method.rewind_step=-1"], "method.rewind_step=-1: must be >= 0"),
    (["method=magnitude", "method.scope=weird"], "method.scope='weird': unknown"),
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


# ----------------------------------------------------------------------------- issue 12: start-up checks
def _cli(tmp_path, *args, env_extra=None):
    env = {**os.environ, "SPARSEBENCH_OUT": str(tmp_path / "runs"), **(env_extra or {})}
    flags = [a for a in args if a.startswith("--")]
    args = [a for a in args if not a.startswith("--")]
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *flags, "method=dense", "trainer.epochs=1", *args],
                       capture_output=True, text=True, env=env, timeout=120)
    return p.returncode, p.stderr.strip().splitlines()


@pytest.mark.parametrize("args,prefix", [
    (["seed=-1"], "error: seed=-1: must be >= 0"),
    (["trainer.device=cudax"], "error: trainer.device='cudax': unknown"),
    (["trainer.num_threads=-1"], "error: trainer.num_threads=-1"),
    (["dataset=iris", "dataset.val_fraction=0.99"], "error: dataset.val_fraction=0.99: dataset iris"),
], ids=["seed", "device", "threads", "iris-val"])
def test_cli_one_line_exit_2(tmp_path, args, prefix):
    rc, lines = _cli(tmp_path, *args)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(prefix), (rc, lines)


def test_out_dir_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, lines = _cli(tmp_path, f"out_dir={f}")
    assert rc == 2 and lines == [f"error: out_dir='{f}': is a file, not a directory"], lines


def test_out_dir_cannot_be_created(tmp_path):
    from sparsebench.api import check_out_dir

    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"^out_dir=.*: cannot create the directory"):
        check_out_dir(str(f / "sub"))


def test_out_dir_not_writable(tmp_path, monkeypatch):
    from sparsebench.api import check_out_dir

    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(ConfigError, match=r"^out_dir=.*: directory is not writable"):
        check_out_dir(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_does_not_report_an_old_cpu_result(tmp_path):
    assert _cli(tmp_path, "trainer.device=cpu")[0] == 0  # a finished CPU run with the same run id
    cfg = compose([f"out_dir={tmp_path / 'runs'}", "method=dense", "trainer.epochs=1", "trainer.device=cuda"])
    with pytest.raises(ConfigError, match=r"^trainer.device='cuda': CUDA is not available"):
        execute(cfg, quiet=True)


def test_sweep_goes_on_and_lists_failed_cells(tmp_path):
    rc, lines = _cli(tmp_path, "--multirun", "seed=0,-1", "trainer.iterations=5")
    assert rc == 2, lines
    assert any(l.startswith("error: 1 sweep cell(s) failed") for l in lines), lines
    assert any(l.startswith("  job 1: ") and l.endswith("seed=-1: must be >= 0") for l in lines), lines
    assert list((tmp_path / "runs").glob("*/summary.csv")), "the good cell must have run"


def test_torch_save_failure_is_the_disk_full_message(tmp_path, monkeypatch):
    from sparsebench.core.io import atomic_torch_save

    def enforce_fail(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", enforce_fail)
    with pytest.raises(WriteError, match=r"^could not write .*ck.pt: disk full"):
        atomic_torch_save(tmp_path / "ck.pt", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_layer_without_active_weight_is_a_warning_naming_it(tmp_path, capfd):
    from sparsebench.training.trainer import Trainer

    orig = Trainer.fit

    def fit(self):
        if self.masking is not None:
            name = self.masking.names[0]
            self.masking.set_masks({name: torch.zeros_like(self.masking.mask(name))})
        return orig(self)

    import pytest as _pt

    with _pt.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "fit", fit)
        execute(compose([f"out_dir={tmp_path}", "method=static_sparse", "trainer.epochs=1"]), quiet=True)
    err = capfd.readouterr().err
    assert "warning: layer" in err and "has no active weight" in err, err


def test_rigl_with_no_update_step_warns(tmp_path, capfd):
    execute(compose([f"out_dir={tmp_path}", "method=rigl", "trainer.iterations=20", "method.delta_t=100"]), quiet=True)
    err = capfd.readouterr().err
    assert "method.delta_t=100" in err and "no topology update" in err, err
