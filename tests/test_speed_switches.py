"""Speed switches must not change results beyond numerical tolerance (CPU)."""
import pytest
import torch

from sparsebench.config import DatasetConfig, TrainerConfig
from sparsebench.data import load_dataset
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import magnitude_masks
from sparsebench.models import MLP, WideResNet
from sparsebench.core.seeding import set_seed
from sparsebench.training.trainer import Trainer


def _losses(model_fn, data, steps=12, **switches):
    set_seed(0)
    model = model_fn()
    masking = Masking(model)
    masking.set_masks(magnitude_masks(masking, {n: 0.2 for n in masking.names}))
    cfg = TrainerConfig(iterations=steps, batch_size=32, lr=0.05, device="cpu", **switches)
    t = Trainer(cfg, model, data, torch.device("cpu"), masking=masking, seed=0)
    losses = []
    for i in range(steps):
        idx = torch.arange(i * 32, (i + 1) * 32) % len(t.data.train)
        losses.append(float(t.train_step(t.data.train.x[idx], t.data.train.y[idx])))
    for name, w, m in masking.items():
        assert torch.all(w[m == 0] == 0)
    return torch.tensor(losses)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetConfig(name="digits"), seed=0)


@pytest.fixture(scope="module")
def tiny_images():
    from sparsebench.data import DataBundle, Split

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 12, 12, generator=g)
    y = torch.randint(0, 4, (128,), generator=g)
    return DataBundle("synthetic", "image", Split(x, y), Split(x[:16], y[:16]), Split(x[:16], y[:16]), 4)


@pytest.mark.parametrize("switch,tol", [({"amp": True}, 0.05), ({"data_on_device": False}, 0.0),
                                        ({"cudnn_benchmark": True}, 0.0)])
def test_switches_on_mlp(digits, switch, tol):
    base = _losses(lambda: MLP(64, 10, [64]), digits)
    other = _losses(lambda: MLP(64, 10, [64]), digits, **switch)
    assert torch.allclose(base, other, atol=tol, rtol=tol), (base, other)


def test_channels_last_on_wrn(tiny_images):
    base = _losses(lambda: WideResNet(1, 4, depth=10, width=1), tiny_images, steps=4)
    other = _losses(lambda: WideResNet(1, 4, depth=10, width=1), tiny_images, steps=4, channels_last=True)
    assert torch.allclose(base, other, atol=1e-4, rtol=1e-4), (base, other)


def test_torch_compile(digits):
    # aot_eager traces forward and backward like inductor but skips C++ code generation (which takes a
    # minute on 2 cores); scripts/bench_train.py runs the inductor backend
    base = _losses(lambda: MLP(64, 10, [64]), digits, steps=6)
    other = _losses(lambda: MLP(64, 10, [64]), digits, steps=6, compile=True, compile_backend="aot_eager")
    assert torch.allclose(base, other, atol=1e-4, rtol=1e-4), (base, other)
