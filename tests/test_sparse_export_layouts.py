"""BSR and 2:4 semi-structured export layouts, and N:M masks (issue 6)."""
import pytest
import torch
from torch import nn

from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import magnitude_masks, nm_masks
from sparsebench.models import MLP
from sparsebench.sparsity.export import SparseLinear, export_sparse, nm_violations, sparse_size_bytes
from test_sparse_export import masked_mlp

CUDA_24 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 24), nn.ReLU(),
                         nn.Linear(24, 12))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 4)])
def test_nm_masks_keep_exactly_n_largest_of_every_m(n, m):
    model = small_net()
    mk = Masking(model)
    masks = nm_masks(mk, n, m)
    assert list(masks) == mk.names == ["0.weight", "3.weight", "5.weight"]
    for name, w, _ in mk.items():
        mask = masks[name]
        assert mask.shape == w.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
        g = mask.reshape(w.shape[0], -1, m)
        assert (g.sum(-1) == n).all()
        assert float(mask.mean()) == n / m
        a = w.detach().abs().reshape(w.shape[0], -1, m)
        if n < m:  # the kept weights are the n largest |w| of their group
            kept_min = torch.where(g > 0, a, torch.full_like(a, float("inf"))).amin(-1)
            dropped_max = torch.where(g == 0, a, torch.full_like(a, -1.0)).amax(-1)
            assert (kept_min >= dropped_max).all()
    mk.set_masks(masks)
    assert mk.density() == n / m
    assert all(nm_violations(w.detach(), n, m) == 0 for _, w, _ in mk.items())
    assert nm_violations(torch.randn(8, 16), n, m) > 0 or n == m


def test_nm_masks_reject_indivisible_input_dim_and_bad_nm():
    torch.manual_seed(0)
    mk = Masking(MLP(30, 10, [20]))  # layers.0.weight is (20, 30): 30 % 4 != 0
    with pytest.raises(ConfigError, match=r"layers\.0\.weight.*\(20, 30\)"):
        nm_masks(mk, 2, 4)
    assert set(nm_masks(mk, 1, 2)) == set(mk.names)  # 30 and 20 are even
    with pytest.raises(ConfigError, match="0 < n <= m"):
        nm_masks(mk, 3, 2)


@pytest.mark.parametrize("blocksize", [None, (2, 2), (1, 1)])
def test_bsr_export_matches_dense_outputs(blocksize):
    model, mk = masked_mlp(0.1)
    x = torch.randn(64, 1, 28, 28)
    bsr = export_sparse(model, "bsr", blocksize=blocksize)
    lin = [m for m in bsr.modules() if isinstance(m, SparseLinear)]
    assert len(lin) == 3 and all(m.weight.layout == torch.sparse_bsr for m in lin)
    expected = [(4, 4), (4, 4), (2, 2)] if blocksize is None else [blocksize] * 3  # 300x784, 100x300, 10x100
    assert [m.blocksize for m in lin] == expected
    assert [tuple(m.weight.values().shape[1:]) for m in lin] == expected
    assert [m.nnz for m in lin] == [a for a, _ in mk.counts().values()]
    with torch.no_grad():
        assert (bsr(x) - model(x)).abs().max() < 1e-5
        assert (bsr(x[:1]) - model(x[:1])).abs().max() < 1e-5  # batch 1


def test_bsr_stores_only_non_zero_blocks():
    torch.manual_seed(0)
    model = MLP(64, 16, [32]).eval()
    mk = Masking(model)
    masks = {}
    for name, w, _ in mk.items():  # keep one 4x4 block in every second block row
        mask = torch.zeros_like(w)
        for r in range(0, w.shape[0], 8):
            mask[r:r + 4, 4:8] = 1.0
        masks[name] = mask
    mk.set_masks(masks)
    bsr = export_sparse(model, "bsr", blocksize=(4, 4))
    for m in (m for m in bsr.modules() if isinstance(m, SparseLinear)):
        assert m.weight.values().shape[0] == m.out_features // 8 and m.nnz == m.weight.values().numel()
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert (bsr(x) - model(x)).abs().max() < 1e-5
    assert sparse_size_bytes(bsr) < sparse_size_bytes(export_sparse(model, "dense")) / 4


def test_bsr_blocksize_errors_name_layer_and_shape():
    model, _ = masked_mlp(0.1)
    with pytest.raises(ConfigError, match=r"blocksize=\(16, 16\).*layers\.0\.weight of shape \(300, 784\)"):
        export_sparse(model, "bsr", blocksize=(16, 16))
    for bad in [(0, 0), (2,), "4", (2.0, 2.0), (1, 4)]:
        with pytest.raises(ConfigError, match="blocksize"):
            export_sparse(model, "bsr", blocksize=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_semi_structured_refused_on_cpu(dtype):
    torch.manual_seed(0)
    model = MLP(784, 10, [64, 32]).to(dtype)  # a CPU model: refused whether or not a GPU is present
    mk = Masking(model)
    mk.set_masks(nm_masks(mk))
    with pytest.raises(ConfigError, match=r"^layout=semi_structured needs a CUDA GPU with compute capability "
                                          r">= 8\.0 \(found: cpu\)$"):
        export_sparse(model, "semi_structured")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not CUDA_24, reason="2:4 sparse tensor cores need compute capability >= 8.0")
def test_semi_structured_cuda_matches_dense_fp16():
    torch.manual_seed(0)
    model = MLP(784, 10, [1000, 500])  # 1000 x 784 etc.: padded to the 2:4 kernels' shape multiples
    mk = Masking(model)
    mk.set_masks(nm_masks(mk))
    model = model.cuda().half().eval()
    ex = export_sparse(model, "semi_structured")
    lin = [m for m in ex.modules() if isinstance(m, SparseLinear)]
    assert len(lin) == 3 and all(isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor) for m in lin)
    x = torch.randn(100, 1, 28, 28, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref, out = model(x).float(), ex(x).float()
        assert out.shape == ref.shape == (100, 10)
        assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2), float((out - ref).abs().max())
        assert torch.allclose(ex(x[:1]).float(), ref[:1], atol=2e-2, rtol=2e-2)
    assert sparse_size_bytes(ex) < 0.75 * sparse_size_bytes(export_sparse(model, "dense"))
    mk2 = Masking(MLP(784, 10, [64]).cuda().half())  # magnitude-pruned, not 2:4: refused
    mk2.set_masks(magnitude_masks(mk2, {n: 0.5 for n in mk2.names}))
    with pytest.raises(ConfigError, match="2:4 pattern"):
        export_sparse(mk2.model, "semi_structured")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_csr_and_bsr_exports_on_cuda_match_dense():
    model32, _ = masked_mlp(0.1)
    model32 = model32.cuda()
    x32 = torch.randn(64, 1, 28, 28, device="cuda")
    with torch.no_grad():
        for lay in ("csr", "bsr"):
            assert (export_sparse(model32, lay)(x32) - model32(x32)).abs().max() < 1e-4, lay
