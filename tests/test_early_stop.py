"""trainer.early_stop_every_steps (issue 16, Frankle & Carbin 2019): every N steps val and test are
evaluated; the step of minimum validation loss and the test accuracy there are reported, also across a
resume from a mid-training checkpoint."""
import pytest
import torch
from torch import nn

from sparsebench.config import TrainerConfig
from sparsebench.core.errors import ConfigError
from sparsebench.data import DataBundle, Split
from sparsebench.training.trainer import Trainer


def _bundle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    # validation labels shifted: fitting the training labels raises the val loss after a few steps, so the
    # minimum is at an early step, not the last
    return DataBundle("toy", "tabular", Split(x[:64], y[:64]), Split(x[64:], (y[64:] + 1) % 4), Split(x[64:], y[64:]), 4)


def _trainer(every, iterations=40, checkpoint=None, checkpoint_every_steps=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = TrainerConfig(iterations=iterations, batch_size=16, lr=0.2, device="cpu", early_stop_every_steps=every,
                        checkpoint_every_steps=checkpoint_every_steps)
    return Trainer(cfg, model, _bundle(), torch.device("cpu"), seed=0, checkpoint=checkpoint)


def test_reports_the_step_of_minimum_validation_loss():
    periodic = []  # (step, metrics) of the periodic evaluations (epoch ends and fit's end also evaluate)
    tr = _trainer(every=5)
    orig, track = tr.evaluate_splits, tr._track_early_stop

    def record(splits=("val", "test")):
        periodic.append((tr.step, orig(splits)))
        return periodic[-1][1]

    def tracked():
        tr.evaluate_splits = record
        try:
            track()
        finally:
            tr.evaluate_splits = orig

    tr._track_early_stop = tracked
    final = tr.fit()
    assert [s for s, _ in periodic] == list(range(5, 41, 5))
    step, best = min(periodic, key=lambda t: t[1]["val_loss"])
    assert final["early_stop_step"] == step and 5 <= step < 40  # an early step, not the last
    assert final["early_stop_val_loss"] == pytest.approx(best["val_loss"])
    assert final["early_stop_test_acc"] == pytest.approx(best["test_acc"])
    assert final["early_stop_val_loss"] < final["val_loss"]


def test_off_by_default_and_validated():
    assert "early_stop_step" not in _trainer(every=None).fit()
    with pytest.raises(ConfigError, match="trainer.early_stop_every_steps"):
        TrainerConfig(early_stop_every_steps=0)


def test_survives_a_resume(tmp_path):
    whole = _trainer(every=5).fit()
    ck = str(tmp_path / "ck.pt")
    first = _trainer(every=5, iterations=40, checkpoint=ck, checkpoint_every_steps=20)
    first.total_steps = 20  # stop after the mid-training checkpoint, as a preempted job would
    first.fit()
    resumed = _trainer(every=5, iterations=40, checkpoint=ck, checkpoint_every_steps=20).fit()
    for k in ("early_stop_step", "early_stop_val_loss", "early_stop_test_acc"):
        assert resumed[k] == pytest.approx(whole[k]), k
