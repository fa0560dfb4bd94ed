"""Batch augmentation on the device (sparsebench.data.augment): shapes, crop offsets inside the pad,
flip correctness, cutout, seeding, checkpoint/resume, no augmentation at evaluation; the CIFAR-100
config (crop_flip, 45k/5k validation split), the WRN recipe presets and a few steps of
``run.py dataset=cifar100 model=wrn28x5`` on tiny CIFAR files in torchvision's format."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sparsebench.config import DatasetConfig, TrainerConfig
from sparsebench.core.errors import ConfigError
from sparsebench.data import DataBundle, Split
from sparsebench.data.augment import (AUGMENTATIONS, CropFlip, CropFlipCutout, augment_generator, build_augmentation,
                                      check_augment, cutout, random_crop, random_flip)
from sparsebench.models import WideResNet
from sparsebench.training.optim import lr_lambda
from sparsebench.core.seeding import set_seed
from sparsebench.training.callbacks import Callback
from sparsebench.training.trainer import Trainer
from test_data import write_cifar100

ROOT = Path(__file__).resolve().parents[1]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n=16, c=3, h=8, w=8):
    # every pixel distinct and non-zero, so a crop window identifies its offset uniquely
    return (torch.arange(n * c * h * w, dtype=torch.float32) + 1).view(n, c, h, w)


def test_registry_and_build():
    assert AUGMENTATIONS.names() == ["crop_flip", "crop_flip_cutout", "none"]
    assert build_augmentation(DatasetConfig(name="mnist")) is None  # default: none
    aug = build_augmentation(DatasetConfig(name="cifar100", augment="crop_flip_cutout", augment_pad=2, cutout=5))
    assert isinstance(aug, CropFlipCutout) and aug.pad == 2 and aug.size == 5
    with pytest.raises(ConfigError, match=r"dataset.augment='rot90': unknown \(allowed: crop_flip, crop_flip_cutout"):
        build_augmentation(DatasetConfig(name="cifar100", augment="rot90"))
    with pytest.raises(ConfigError, match="dataset.augment_pad=-1"):
        DatasetConfig(name="cifar100", augment="crop_flip", augment_pad=-1)
    with pytest.raises(ConfigError, match="dataset.cutout=0"):
        DatasetConfig(name="cifar100", augment="crop_flip_cutout", cutout=0)
    with pytest.raises(ConfigError, match="dataset.augment='crop_flip'.*tabular"):
        check_augment({"dataset": DatasetConfig(name="digits", augment="crop_flip")})
    check_augment({"dataset": DatasetConfig(name="cifar100", augment="crop_flip")})
    with pytest.raises(ConfigError, match=r"needs image batches"):
        CropFlip()(torch.zeros(4, 10), _gen())


@pytest.mark.parametrize("name", ["crop_flip", "crop_flip_cutout"])
def test_shapes_dtype_and_input_unchanged(name):
    x = _images()
    before = x.clone()
    out = AUGMENTATIONS.get(name)(pad=4, cutout=3)(x, _gen())
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(x, before)


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_crop_offsets_stay_inside_the_pad(pad):
    x = _images(n=64, c=2, h=6, w=7)
    out = random_crop(x, pad, _gen(pad))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    seen = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(padded[i, :, dy:dy + 6, dx:dx + 7], out[i])]
        assert len(hits) == 1, f"image {i}: not a window of the padded image"
        seen.add(hits[0])
    assert len(seen) > 2 * pad  # offsets vary over the batch (64 draws of (2 pad + 1)^2 equally likely ones)
    assert torch.equal(random_crop(x, 0, _gen()), x)


def test_flip_is_either_identity_or_mirror_and_matches_the_draw():
    x = _images(n=64)
    out = random_flip(x, _gen(3))
    expect = torch.rand(64, generator=_gen(3)) < 0.5  # the same generator stream decides the flips
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if expect[i] else x[i])
    assert 10 < int(expect.sum()) < 54
    assert torch.equal(out[expect][:, :, :, 0], x[expect][:, :, :, -1])  # mirrored along the width


def test_cutout_zeroes_one_clipped_square():
    x = _images(n=32, c=3, h=10, w=10)
    out = cutout(x, 4, _gen(1))
    for i in range(32):
        hole = (out[i] == 0).all(0)  # (H, W): zeroed in every channel
        assert torch.equal(out[i][:, ~hole], x[i][:, ~hole])
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4  # square of side 4, clipped at the border
        assert int(hole.sum()) == len(rows) * len(cols)


def test_determinism_under_a_seed():
    x = _images(n=32)
    aug = CropFlipCutout(pad=4, cutout=3)
    a, b, c = aug(x, _gen(7)), aug(x, _gen(7)), aug(x, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = augment_generator(5, "cpu"), augment_generator(5, "cpu")
    assert torch.equal(aug(x, g1), aug(x, g2)) and torch.equal(aug(x, g1), aug(x, g2))  # streams advance alike


# --------------------------------------------------------------------------- in the trainer
def _bundle(n=24):
    g = _gen(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return DataBundle("synthetic", "image", Split(x, y), Split(x[:8], y[:8]), Split(x[8:16], y[8:16]), 5)


class Record(Callback):
    def __init__(self):
        self.batches = []

    def on_after_backward(self, trainer):
        self.batches.append(trainer.batch[0].clone())


class Counting(CropFlip):
    def __init__(self):
        super().__init__(pad=2)
        self.rows = 0

    def __call__(self, x, generator):
        self.rows += len(x)
        return super().__call__(x, generator)


def _trainer(tmp_path, iterations, aug, rec, checkpoint=True, name="ck.pt"):
    set_seed(0)
    model = WideResNet(3, 5, depth=10, width=1)
    cfg = TrainerConfig(iterations=iterations, batch_size=8, lr=0.05, device="cpu")  # 3 steps per epoch
    return Trainer(cfg, model, _bundle(), torch.device("cpu"), callbacks=[rec], seed=0, augment=aug,
                   checkpoint=str(tmp_path / name) if checkpoint else None)


def test_trainer_augments_training_batches_only(tmp_path):
    aug, rec = Counting(), Record()
    t = _trainer(tmp_path, 6, aug, rec, checkpoint=False)
    res = t.fit()
    assert aug.rows == 6 * 8  # every training row once; the evaluations (val, test, final) drew none
    plain = _trainer(tmp_path, 6, None, Record(), checkpoint=False)
    plain.model.load_state_dict(t.model.state_dict())
    assert plain.evaluate(plain.data.test) == t.evaluate(t.data.test)  # evaluation ignores the augmentation
    # the recorded (augmented) batches are not the raw rows
    assert not any(torch.equal(rec.batches[0], t.data.train.x[i:i + 8]) for i in range(0, 24, 8))
    assert {"best_val_acc", "best_epoch", "test_acc_at_best_val"} <= set(res)
    assert 1 <= res["best_epoch"] <= 2 and 0 <= res["best_val_acc"] <= 1


def test_resume_draws_the_same_crops(tmp_path):
    ref = Record()
    full = _trainer(tmp_path, 6, CropFlip(pad=2), ref, name="full.pt").fit()
    # an "interrupted" run: 3 steps (one epoch), checkpointed; then a new trainer continues to 6 steps
    first = Record()
    _trainer(tmp_path, 3, CropFlip(pad=2), first, name="part.pt").fit()
    state = torch.load(tmp_path / "part.pt", weights_only=False)
    assert state["aug_generator"] is not None and "best" in state
    second = Record()
    resumed = _trainer(tmp_path, 6, CropFlip(pad=2), second, name="part.pt").fit()
    assert len(first.batches) == 3 and len(second.batches) == 3
    for a, b in zip(ref.batches, first.batches + second.batches):
        assert torch.equal(a, b)
    assert resumed["test_acc"] == full["test_acc"] and resumed["best_epoch"] == full["best_epoch"]


# --------------------------------------------------------------------------- configs and the CLI
def test_cifar100_config_and_presets(compose_cfg):
    from sparsebench.api import validate

    with pytest.raises(ConfigError, match=r"dataset.augment='rot90': unknown"):
        validate(compose_cfg("dataset=cifar100", "model=wrn28x5", "method=dense", "dataset.augment=rot90"))
    with pytest.raises(ConfigError, match="dataset.augment='crop_flip'.*tabular"):
        validate(compose_cfg("dataset=digits", "method=dense", "dataset.augment=crop_flip"))

    c = validate(compose_cfg("dataset=cifar100", "model=wrn28x5", "method=dense", "trainer=wrn_cifar"))
    assert c.dataset.augment == "crop_flip" and c.dataset.augment_pad == 4 and c.dataset.val_fraction == 0.1
    t = c.trainer
    assert (t.optimizer, t.nesterov, t.momentum, t.lr, t.weight_decay, t.batch_size, t.epochs, t.gamma) == \
        ("sgd", True, 0.9, 0.1, 0.0005, 128, 200, 0.2)
    steps = 391  # ceil(50000 / 128)
    f = lr_lambda(TrainerConfig(**{k: t[k] for k in ("schedule", "milestones", "gamma")}), 200 * steps)
    for epoch, factor in ((59, 1.0), (60, 0.2), (119, 0.2), (120, 0.04), (160, 0.008), (199, 0.008)):
        assert f(epoch * steps) == pytest.approx(factor), epoch
    th = validate(compose_cfg("dataset=cifar100", "model=wrn28x5", "method=dense", "trainer=thesis_wrn")).trainer
    assert (th.epochs, th.batch_size, th.schedule, th.nesterov) == (70, 256, "cosine", True)
    assert validate(compose_cfg("dataset=mnist", "method=dense")).dataset.augment == "none"


def _run(args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_run_py_cifar100_wrn_few_steps_and_missing_data(tmp_path):
    write_cifar100(tmp_path / "data", n_train=40, n_test=8)
    args = [f"out_dir={tmp_path / 'runs'}", "dataset=cifar100", "model=wrn28x5", "model.depth=10", "model.width=1",
            "method=dense", "trainer=thesis_wrn", "trainer.iterations=2", "trainer.batch_size=8",
            "trainer.device=cpu", "trainer.num_threads=1", f"dataset.root={tmp_path / 'data'}",
            "dataset.verify_md5=false"]
    p = _run(args)
    assert p.returncode == 0, p.stderr
    (summary,) = (tmp_path / "runs").glob("*/summary.csv")
    row = pd.read_csv(summary).iloc[0]
    assert row["steps"] == 2 and {"best_val_acc", "best_epoch", "test_acc_at_best_val"} <= set(row.index)
    # 40 * 0.1 = 4 validation images: the split exists
    assert 0 <= row["val_acc"] <= 1
    keep = [a for a in args if not a.startswith(("dataset.root", "out_dir"))]  # root is not in the run hash
    missing = _run(keep + [f"out_dir={tmp_path / 'runs2'}", f"dataset.root={tmp_path / 'none'}"])
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr
    assert lines[0].startswith("error: dataset cifar100: missing train, test, meta under") and "none" in lines[0]
