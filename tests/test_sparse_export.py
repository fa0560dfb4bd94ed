"""Sparse export: exact outputs, true sparse storage, model untouched, auto layout, forward_time method."""
import pytest
import torch

from sparsebench.api import execute
from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import magnitude_masks
from sparsebench.models import MLP, WideResNet
from sparsebench.sparsity.export import SparseLinear, export_sparse, sparse_size_bytes


def masked_mlp(density):
    torch.manual_seed(0)
    model = MLP(784, 10, [300, 100])
    mk = Masking(model)
    mk.set_masks(magnitude_masks(mk, {n: density for n in mk.names}))
    return model.eval(), mk


@pytest.mark.parametrize("layout", ["csr", "coo", "dense", "auto"])
def test_export_matches_dense_outputs(layout):
    model, mk = masked_mlp(0.05)
    x = torch.randn(100, 1, 28, 28)
    sparse = export_sparse(model, layout)
    with torch.no_grad():
        assert torch.allclose(sparse(x), model(x), atol=1e-5)
    lin = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(lin) == 3
    expected = {"csr": torch.sparse_csr, "coo": torch.sparse_coo, "dense": torch.strided, "auto": torch.sparse_csr}
    assert all(m.weight.layout == expected[layout] for m in lin)
    assert [m.nnz for m in lin] == [a for a, _ in mk.counts().values()]


def test_export_does_not_touch_model_and_applies_mask():
    model, mk = masked_mlp(0.1)
    w = model.layers[0].weight
    with torch.no_grad():
        w.add_(1.0)  # weights no longer zero at pruned positions: the export must still apply the mask
    before = w.detach().clone()
    sparse = export_sparse(model, "csr")
    assert torch.equal(model.layers[0].weight, before) and isinstance(model.layers[0], torch.nn.Linear)
    assert sparse.layers[0].nnz == mk.counts()["layers.0.weight"][0]
    assert sparse_size_bytes(sparse) < 0.3 * sum(p.numel() * 4 for p in model.parameters())


def test_auto_layout_keeps_dense_layers_dense_and_convs_untouched():
    model, _ = masked_mlp(0.5)
    auto = export_sparse(model, "auto", max_density=0.3)
    assert all(m.layout == "dense" for m in auto.modules() if isinstance(m, SparseLinear))
    torch.manual_seed(0)
    wrn = WideResNet(3, 10, depth=10, width=1).eval()
    mk = Masking(wrn)
    mk.set_masks(magnitude_masks(mk, {n: 0.2 for n in mk.names}))
    ex = export_sparse(wrn, "csr")
    assert isinstance(ex.fc, SparseLinear) and isinstance(ex.conv1, torch.nn.Conv2d)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ex(x), wrn(x), atol=1e-4)
    with pytest.raises(ConfigError, match="layout"):
        export_sparse(wrn, "ell")


def test_forward_time_method_rows(compose_cfg):
    df = execute(compose_cfg("dataset=digits", "model.hidden=[64,32]", "method=forward_time", "method.repeats=2",
                             "method.ks=[0.0,0.9]", "method.batch_size=50", "trainer.device=cpu"), quiet=True)
    assert len(df) == 2 * 2 * 2  # criteria x ks x layouts (CPU only here)
    assert (df["seconds"] > 0).all() and (df["speedup"] > 0).all()
    assert df[df.k == 0.9]["density"].iloc[0] < 0.3
