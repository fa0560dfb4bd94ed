"""trainer.restore_best (issue 16, document 002): at the end of fit the weights of the evaluated epoch with
the lowest loss on the named split are restored, also across a resume from a checkpoint."""
import math

import pytest
import torch
from torch import nn

from sparsebench.config import TrainerConfig
from sparsebench.core.errors import ConfigError
from sparsebench.core.io import MetricsLog
from sparsebench.data import DataBundle, Split
from sparsebench.training.callbacks import Callback
from sparsebench.training.trainer import Trainer


def _bundle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    # test labels shifted: the better the net fits the training labels, the worse its test loss, so the
    # lowest test loss is at an early epoch, not the last
    return DataBundle("toy", "tabular", Split(x, y), Split(x[:0], y[:0]), Split(x[:32], (y[:32] + 1) % 4), 4)


class Snapshots(Callback):
    """The weights at the end of every epoch (those the trainer evaluates right after)."""

    def __init__(self):
        self.states = []

    def on_epoch_end(self, trainer):
        self.states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def _fit(restore, epochs=5, checkpoint=None, callbacks=(), log=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = TrainerConfig(epochs=epochs, batch_size=16, lr=0.1, device="cpu", restore_best=restore)
    metrics = MetricsLog(log) if log else None
    tr = Trainer(cfg, model, _bundle(), torch.device("cpu"), callbacks=callbacks, seed=0, metrics=metrics,
                 checkpoint=checkpoint)
    return tr, tr.fit(), metrics


def test_restores_the_lowest_loss_epoch(tmp_path):
    snap = Snapshots()
    _, plain, metrics = _fit(None, callbacks=[snap], log=tmp_path / "metrics.csv")
    losses = [v for _, name, v in metrics.rows if name == "test_loss"]
    assert len(losses) == 5
    tr, best, _ = _fit("test")
    e = best["best_loss_epoch"]
    assert 1 <= e < 5 and best["restored_epoch"] == e  # an early epoch, not the last
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, snap.states[e - 1][k]), k
    assert best["test_loss"] == pytest.approx(best["best_loss"])
    assert best["test_loss"] < plain["test_loss"]
    assert best["best_loss"] == pytest.approx(min(losses)) and e == losses.index(min(losses)) + 1
    assert "best_loss" not in plain  # off by default: the last epoch is kept, summaries unchanged


def test_empty_split_never_selects_and_keeps_the_last_epoch():
    _, plain, _ = _fit(None)
    _, r, _ = _fit("val")  # the toy val split is empty: NaN losses
    assert r["restored_epoch"] == 5 and r["best_loss_epoch"] == 0 and math.isinf(r["best_loss"])
    assert r["test_loss"] == pytest.approx(plain["test_loss"])


def test_resume_keeps_the_best_state(tmp_path):
    ck = str(tmp_path / "ck.pt")
    _fit("test", epochs=2, checkpoint=ck)  # stops after epoch 2; the checkpoint holds the best state
    tr, resumed, _ = _fit("test", epochs=5, checkpoint=ck)
    tr2, straight, _ = _fit("test", epochs=5)
    assert resumed["best_loss_epoch"] == straight["best_loss_epoch"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"])
    for k, v in tr.model.state_dict().items():
        assert torch.allclose(v, tr2.model.state_dict()[k]), k


def test_unknown_split_is_rejected():
    with pytest.raises(ConfigError):
        TrainerConfig(restore_best="train")
