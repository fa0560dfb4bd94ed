"""Shared fixtures of the dynamic-sparse-training tests (test_dst*.py): a Digits bundle, a sparse MLP."""
import torch

from sparsebench.data import DataBundle, Split
from sparsebench.dst.grow import GROW_CRITERIA
from sparsebench.models import MLP
from sparsebench.sparsity.distributions import layer_counts, random_masks
from sparsebench.sparsity.masking import Masking
from sparsebench.training.callbacks import Callback


def digits_bundle():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-6), dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    tr, te = Split(x[:1400], y[:1400]), Split(x[1400:], y[1400:])
    return DataBundle(name="digits", train=tr, val=te, test=te, num_classes=10, kind="tabular")


def sparse_mlp(density=0.2, seed=0):
    torch.manual_seed(seed)
    model = MLP(64, 10, [48, 32])
    masking = Masking(model)
    counts = layer_counts(masking, density, "erk")
    masking.set_masks(random_masks(masking, counts, torch.Generator().manual_seed(seed)))
    return model, masking, counts


def make_grow(name, **kw):
    return GROW_CRITERIA.get(name)(torch.Generator().manual_seed(0), **kw)


class Check(Callback):
    """Records per-layer active counts after every step (after the updater ran)."""

    def __init__(self, masking):
        self.masking, self.history = masking, []

    def on_step_end(self, trainer):
        self.history.append({n: a for n, (a, _) in self.masking.counts().items()})
