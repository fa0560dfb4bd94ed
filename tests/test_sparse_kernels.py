"""Truly sparse training (issue 14): kernels, SparseTrainLinear, conversion, training, SET updates."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.models import MLP
from sparsebench.core.errors import ConfigError
from sparsebench.core.threads import scoped_threads
from sparsebench.sparsity.kernels import (AUTO_ORDER, KERNELS, CSRStructure, TorchCSRKernels, available_kernels,
                                        get_kernels, resolve_kernels)
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import num_to_keep, topk_mask
from sparsebench.sparsity.sparse_linear import SparseTrainLinear, set_update, sparsify_for_training, state_bytes


def _random_mask(shape, density, g):
    return topk_mask(torch.rand(shape, generator=g), num_to_keep(shape[0] * shape[1], density))


BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(n not in available_kernels(), reason=f"{n} not installed"))
            for n in KERNELS.names()]


def _assert_matches_masked_dense(layer, w, b, mask, x, dy):
    """``layer``'s forward, input gradient, weight gradient at the active positions and bias gradient equal
    the masked-dense ``F.linear(x, w, b)``'s (``w`` already masked; any device: ``x``'s)."""
    (layer(x) * dy).sum().backward()
    wd = w.to(x.device).requires_grad_()
    bd = b.to(x.device).requires_grad_() if b is not None else None
    xd = x.detach().clone().requires_grad_()
    yd = F.linear(xd, wd, bd)
    (yd * dy).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x), yd, **tol)
    torch.testing.assert_close(x.grad, xd.grad, **tol)
    torch.testing.assert_close(layer.structure.to_dense(layer.values.grad), wd.grad * mask.to(x.device), **tol)
    if b is not None:
        torch.testing.assert_close(layer.bias.grad, bd.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.001])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_masked_dense(backend, density, bias):
    g = torch.Generator().manual_seed(int(density * 1e4) + bias)
    for trial in range(4):
        out, inp = (int(v) for v in torch.randint(1, 300, (2,), generator=g))
        batch = int(torch.randint(1, 300, (1,), generator=g))
        mask = _random_mask((out, inp), density, g)
        w = torch.randn(out, inp, generator=g) * mask
        b = torch.randn(out, generator=g) if bias else None
        layer = SparseTrainLinear(w, mask, b, kernels=backend)
        assert layer.kernels_name == backend
        if trial == 1 and backend == "torch_csr":  # large batches split into chunks
            layer.kernels = TorchCSRKernels(chunk=64)
        x = torch.randn(batch, inp, generator=g, requires_grad=True)
        if trial == 3:  # feature-major input, as a previous sparse layer returns it
            x = torch.randn(inp, batch, generator=g).t().requires_grad_()
        dy = torch.randn(batch, out, generator=g)
        _assert_matches_masked_dense(layer, w.clone(), b.clone() if bias else None, mask, x, dy)
        assert layer.nnz == int(mask.sum())
        torch.testing.assert_close(layer.dense_weight(), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["torch_csr", "auto"])
def test_cuda_sparse_layers_match_masked_dense_and_train_alike(backend):
    # on CUDA the products are cuSPARSE CSR (torch.sparse.mm, sampled_addmm); "auto" resolves to a compiled CPU
    # backend where one builds, which must hand CUDA tensors to those products: forward, dx and dv at the
    # active positions equal the masked-dense layer's, and 20 SGD-momentum steps track the masked-dense model
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(5)
    for density, bias in ((0.1, True), (0.01, False)):
        out, inp, batch = 300, 200, 64
        mask = _random_mask((out, inp), density, g)
        w = torch.randn(out, inp, generator=g) * mask
        b = torch.randn(out, generator=g) if bias else None
        layer = SparseTrainLinear(w, mask, b, kernels=backend).to(dev)
        assert layer.values.device.type == "cuda"
        x = torch.randn(batch, inp, generator=g).to(dev).requires_grad_()
        dy = torch.randn(batch, out, generator=g).to(dev)
        _assert_matches_masked_dense(layer, w, b, mask, x, dy)
    dense, masking, sparse, conv = _models(0.2, device=dev, kernels=backend)
    assert conv.masking is None and len(conv.sparse) == 3
    od = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    os_ = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    masking.attach(od)
    x, y = torch.randn(256, 20, generator=g).to(dev), torch.randint(0, 5, (256,), generator=g).to(dev)
    _assert_train_alike((dense, od), (sparse, os_), x, y, [torch.arange(step, 256, 8) for step in range(20)])


def test_structure_orders_and_errors():
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    s = CSRStructure.from_mask(mask)
    assert s.crow.tolist() == [0, 2, 3] and s.col.tolist() == [1, 2, 0]
    assert s.crow.dtype == torch.int32 and s.col.dtype == torch.int16 and s.cache_nbytes() == 0
    assert s.nbytes() == 3 * 4 + 3 * 2
    assert s.t_crow.tolist() == [0, 1, 2, 3] and s.t_col.tolist() == [1, 0, 0] and s.perm.tolist() == [2, 0, 1]
    assert s.flat().tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="duplicate"):
        CSRStructure.from_flat(torch.tensor([1, 1]), (2, 3))
    with pytest.raises(ValueError, match="range"):
        CSRStructure.from_flat(torch.tensor([6]), (2, 3))
    assert s.cache_nbytes() == 3 * 4 + 3 * 4 + 4 * 4  # transposed structure built on first use, then counted
    assert "torch_csr" in KERNELS and "torch_csr" in available_kernels() and AUTO_ORDER[-1] == "torch_csr"
    assert resolve_kernels("auto") == next(n for n in AUTO_ORDER if n in available_kernels())
    assert resolve_kernels("torch_csr") == "torch_csr"
    with pytest.raises(ConfigError, match="allowed"):
        get_kernels("nope")


def test_wide_inputs_use_int32_columns():
    g = torch.Generator().manual_seed(0)
    inp = 40000  # past int16
    flat = torch.randperm(3 * inp, generator=g)[:500]
    s = CSRStructure.from_flat(flat, (3, inp))
    assert s.col.dtype == torch.int32 and bool((s.flat() == torch.sort(flat).values).all())
    layer = SparseTrainLinear(s.to_dense(torch.randn(500, generator=g)), s.to_dense(torch.ones(500)), None,
                              kernels="torch_csr")
    x = torch.randn(4, inp, generator=g)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t(), rtol=1e-4, atol=1e-4)


def _models(density, seed=0, device="cpu", kernels="auto"):
    torch.manual_seed(seed)
    dense = MLP(20, 5, hidden=[64, 32]).to(device)
    masking = Masking(dense)
    g = torch.Generator().manual_seed(seed)
    for name, w, _ in masking.items():
        masking.set_mask(name, _random_mask(w.shape, density, g).to(device))
    sparse = copy.deepcopy(dense)
    conv = sparsify_for_training(sparse, Masking(sparse), max_density=1.0, kernels=kernels)
    return dense, masking, sparse, conv


def _assert_train_alike(dense_opt, sparse_opt, x, y, batches):
    """One optimizer step of both ``(model, optimizer)`` pairs per index tensor of ``batches``; the two losses
    agree to 1e-3 (relative above 1) at every step."""
    for step, idx in enumerate(batches):
        losses = []
        for model, o in (dense_opt, sparse_opt):
            o.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            o.step()
            losses.append(float(loss.detach()))
        assert abs(losses[0] - losses[1]) < 1e-3 * max(1.0, abs(losses[0])), (step, losses)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_tracks_masked_dense(opt):
    dense, masking, sparse, conv = _models(0.2)
    assert conv.masking is None and len(conv.sparse) == 3
    assert not any(isinstance(m, nn.Linear) for m in sparse.modules())

    def make(params):
        return (torch.optim.SGD(params, lr=0.05, momentum=0.9) if opt == "sgd"
                else torch.optim.Adam(params, lr=1e-2))

    od, os_ = make(dense.parameters()), make(sparse.parameters())
    masking.attach(od)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 20, generator=g), torch.randint(0, 5, (256,), generator=g)
    _assert_train_alike((dense, od), (sparse, os_), x, y, [torch.randint(0, 256, (32,), generator=g) for _ in range(30)])
    for name, layer in conv.sparse.items():
        torch.testing.assert_close(layer.dense_weight(), masking.weight(name).detach(), rtol=1e-3, atol=1e-4)
    # optimizer state lives on the values: no dense-shaped state for the sparse layers
    for p, st in os_.state.items():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == p.shape


def test_dense_fallback_by_density_and_memory():
    torch.manual_seed(0)
    model = MLP(100, 10, hidden=[200, 200])
    masking = Masking(model)
    g = torch.Generator().manual_seed(0)
    dens = {"layers.0.weight": 0.5, "layers.2.weight": 0.05, "layers.4.weight": 0.05}
    for name, w, _ in masking.items():
        masking.set_mask(name, _random_mask(w.shape, dens[name], g))
    before = state_bytes(model)
    conv = sparsify_for_training(model, masking, max_density=0.15)
    assert list(conv.sparse) == ["layers.2.weight", "layers.4.weight"]
    assert conv.dense == ["layers.0.weight"] and conv.masking.names == ["layers.0.weight"]
    assert isinstance(model.layers[0], nn.Linear) and isinstance(model.layers[2], SparseTrainLinear)
    assert abs(conv.density() - masking.density()) < 1e-12
    assert state_bytes(model) < before
    with pytest.raises(ValueError, match="max_density"):
        sparsify_for_training(model, conv.masking, max_density=0.0)


def test_set_update_exact_density_zero_state_and_drops_smallest():
    g = torch.Generator().manual_seed(3)
    mask = _random_mask((40, 30), 0.1, g)
    layer = SparseTrainLinear(torch.randn(40, 30, generator=g) * mask, mask, None)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    x = torch.randn(16, 30, generator=g)
    layer(x).sum().backward()
    opt.step()
    nnz, before = layer.nnz, layer.dense_weight()
    order = torch.argsort(layer.values.detach().abs())
    n = 12
    dropped = set(layer.structure.flat()[order[:n]].tolist())
    kept = set(layer.structure.flat().tolist()) - dropped
    counts = set_update({"l": layer}, n / nnz, opt, generator=torch.Generator().manual_seed(0))
    assert counts == {"l": n} and layer.nnz == nnz
    flat = layer.structure.flat()
    now = set(flat.tolist())
    assert kept <= now and not (dropped & now) and len(now) == nnz
    grown = torch.tensor(sorted(now - kept))
    pos = torch.isin(flat, grown)
    assert bool((layer.values.detach()[pos] == 0).all())
    for v in opt.state[layer.values].values():
        if torch.is_tensor(v) and v.dim() > 0:
            assert bool((v[pos] == 0).all()) and bool((v[~pos] != 0).any())
    kept_t = torch.tensor(sorted(kept))
    torch.testing.assert_close(layer.dense_weight().reshape(-1)[kept_t], before.reshape(-1)[kept_t])
    layer(x).sum().backward()  # the rebuilt structure trains
    opt.step()
    sd = layer.state_dict()
    assert set(sd) == {"values", "crow", "col"}  # the transposed structure is a cache, not state


def _trainer_run(sparse, checkpoint=None, iterations=12):
    from sparsebench.config.schemas import TrainerConfig
    from sparsebench.data.registry import DataBundle, Split
    from sparsebench.training.trainer import Trainer

    dense, masking, _, _ = _models(0.1, seed=4)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(96, 20, generator=g), torch.randint(0, 5, (96,), generator=g)
    data = DataBundle("synthetic", "tabular", Split(x, y), Split(x[:32], y[:32]), Split(x[32:64], y[32:64]), 5)
    cfg = TrainerConfig(iterations=iterations, batch_size=16, lr=0.05, device="cpu", sparse_kernels=sparse,
                        optimizer="adam")
    tr = Trainer(cfg, dense, data, torch.device("cpu"), masking=masking, seed=0, checkpoint=checkpoint)
    return tr, tr.fit()


def test_trainer_switch_tracks_masked_dense_and_resumes(tmp_path):
    tr_d, res_d = _trainer_run(False)
    tr_s, res_s = _trainer_run(True)
    assert tr_s.sparse is not None and len(tr_s.sparse.sparse) == 3 and tr_d.sparse is None
    assert not any(isinstance(m, nn.Linear) for m in tr_s.model.modules())
    assert abs(res_d["test_loss"] - res_s["test_loss"]) < 1e-3
    assert res_d["test_acc"] == res_s["test_acc"]
    ck = str(tmp_path / "ck.pt")
    _trainer_run(True, checkpoint=ck, iterations=6)  # writes a checkpoint at its end (6 steps = 1 epoch)
    tr_r, res_r = _trainer_run(True, checkpoint=ck)  # resumes from step 6
    assert abs(res_r["test_loss"] - res_s["test_loss"]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_and_cache_follow_the_structure(backend):
    """Parameters + gradient + momentum + indices after a step: <= 1.3 x density x dense for a
    transpose-free backend; torch_csr adds its cached transposed structure (counted). The cache is
    rebuilt after a topology update and after loading a checkpoint of the earlier layout."""
    g = torch.Generator().manual_seed(7)
    out, inp, density = 300, 200, 0.05
    mask = _random_mask((out, inp), density, g)
    w = torch.randn(out, inp, generator=g) * mask
    layer = SparseTrainLinear(w, mask, None, kernels=backend)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x, dy = torch.randn(64, inp, generator=g, requires_grad=True), torch.randn(64, out, generator=g)
    (layer(x) * dy).sum().backward()
    opt.step()
    dense_bytes = 3 * out * inp * 4  # weight + gradient + momentum, float32
    ratio = state_bytes(layer, opt) / (density * dense_bytes)
    cache = layer.structure.cache_nbytes()
    assert (cache > 0) == (backend == "torch_csr")
    assert ratio <= 1.3 if cache == 0 else ratio > 1.3
    s_before = layer.structure
    set_update({"l": layer}, 0.3, opt, generator=torch.Generator().manual_seed(1))
    assert layer.structure is not s_before and layer.structure.cache_nbytes() == 0
    wd = layer.dense_weight().requires_grad_()
    opt.zero_grad(set_to_none=True)
    (layer(x) * dy).sum().backward()
    (F.linear(x, wd) * dy).sum().backward()
    torch.testing.assert_close(layer.structure.to_dense(layer.values.grad), wd.grad * layer.mask(), rtol=1e-4, atol=1e-4)
    # a checkpoint of the earlier layout (int32 col plus the transposed structure) still loads
    s = layer.structure
    legacy = {"values": layer.values.detach().clone(), "crow": s.crow.clone(), "col": s.col.to(torch.int32),
              "t_crow": s.t_crow.clone(), "t_col": s.t_col.clone(), "perm": s.perm.clone()}
    fresh = SparseTrainLinear(w, mask, None, kernels=backend)
    fresh.load_state_dict(legacy)
    assert fresh.col.dtype == torch.int16
    torch.testing.assert_close(fresh.dense_weight(), layer.dense_weight())
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.skipif("sparseprop" not in available_kernels(), reason="sparseprop not installed")
def test_sparseprop_small_rows_run_on_one_thread_and_restore_the_setting():
    g = torch.Generator().manual_seed(2)
    mask = _random_mask((50, 40), 0.05, g)  # 2 weights per row x batch 8: far below MIN_WORK_PER_ROW
    layer = SparseTrainLinear(torch.randn(50, 40, generator=g) * mask, mask, None, kernels="sparseprop")
    assert layer.nnz * 8 < layer.kernels.MIN_WORK_PER_ROW * 50
    seen = []
    fused = layer.kernels._fused
    layer.kernels._fused = lambda *a: (seen.append(torch.get_num_threads()), fused(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(8, 40, generator=g, requires_grad=True)
        layer(x).sum().backward()
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert x.grad is not None and layer.values.grad is not None


def test_update_topology_merges_sorted_and_refuses_bad_edits():
    """A topology update keeps the row-major value order without re-sorting (``from_flat(is_sorted=True)``),
    moves kept values with their momentum, zeroes grown ones, and refuses a grow onto a kept active
    position, a repeated drop slot and mismatched lengths with ValueError."""
    from sparsebench.sparsity.sparse_linear import SparseTrainLinear

    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(7, 9, generator=g) < 0.3).float()
    w = torch.randn(7, 9, generator=g) * mask
    layer = SparseTrainLinear(w, mask, None, kernels="torch_csr")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(4, 9, generator=g)).sum().backward()
    opt.step()
    before = dict(zip(layer.structure.flat().tolist(), layer.values.detach().tolist()))
    mom = dict(zip(layer.structure.flat().tolist(), opt.state[layer.values]["momentum_buffer"].tolist()))
    flat = layer.structure.flat()
    inactive = torch.tensor([p for p in range(63) if p not in set(flat.tolist())])
    drop, grow = torch.tensor([0, 3]), inactive[[1, -1]]
    with pytest.raises(ValueError):
        layer.update_topology(drop, flat[[5, 6]], opt)  # onto kept active positions
    with pytest.raises(ValueError):
        layer.update_topology(torch.tensor([1, 1]), grow, opt)
    with pytest.raises(ValueError):
        layer.update_topology(drop, grow[:1], opt)
    layer.update_topology(drop, grow, opt)
    new = layer.structure.flat()
    assert bool((new[1:] > new[:-1]).all()) and new.numel() == flat.numel()
    dropped, grown = set(flat[drop].tolist()), set(grow.tolist())
    assert set(new.tolist()) == (set(flat.tolist()) - dropped) | grown
    vals = dict(zip(new.tolist(), layer.values.detach().tolist()))
    m2 = dict(zip(new.tolist(), opt.state[layer.values]["momentum_buffer"].tolist()))
    for p in new.tolist():
        assert vals[p] == (0.0 if p in grown else before[p]) and m2[p] == (0.0 if p in grown else mom[p])
    with pytest.raises(ValueError, match="ascending"):
        CSRStructure.from_flat(torch.tensor([4, 2]), (2, 3), is_sorted=True)


_NATIVE = pytest.mark.skipif("native" not in available_kernels(), reason="native kernels not buildable here (AVX-512 + c++)")


@_NATIVE
@pytest.mark.parametrize("shape,in_dtype", [((300, 500), torch.int16), ((40, 40000), torch.int32)])
def test_native_topology_merge_equals_the_torch_merge(shape, in_dtype, monkeypatch):
    """update_topology's native merge (sb_merge + sb_remap) leaves the same structure, values, momentum and
    gradient as the torch merge it replaces on the CPU (forced by disabling the native path), for int16
    and int32 column indices, rows emptied and filled; and refuses the same bad edits (grown position
    repeated, on a kept one, out of range; drop slot repeated or out of range)."""
    from sparsebench.sparsity.sparse_linear import SparseTrainLinear

    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(*shape, generator=g) < 0.02).float()
    mask[3] = 0.0  # an empty row that will be grown into
    mask[5, :] = 0.0
    mask[5, :7] = 1.0  # a row that is dropped whole
    w = torch.randn(*shape, generator=g) * mask

    def fresh():
        layer = SparseTrainLinear(w, mask, None, kernels="torch_csr")
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        layer(torch.randn(4, shape[1], generator=torch.Generator().manual_seed(1))).sum().backward()
        opt.step()
        return layer, opt

    ref, ref_opt = fresh()
    got, got_opt = fresh()
    assert got.structure.col.dtype == in_dtype
    flat = ref.structure.flat()
    n = flat.numel() // 3
    start5 = int(ref.structure.crow[5])
    drop = torch.cat([torch.arange(start5, start5 + 7), torch.randperm(flat.numel(), generator=g)[:3 * n]])
    drop = torch.unique(drop)[:n]
    free = torch.ones(shape[0] * shape[1], dtype=torch.bool)
    free[flat] = False
    free[3 * shape[1]:3 * shape[1] + 5] = False  # grown below explicitly
    cand = free.nonzero().squeeze(1)
    grow = torch.cat([torch.arange(3 * shape[1], 3 * shape[1] + 5), cand[torch.randperm(cand.numel(), generator=g)[:n - 5]]])
    monkeypatch.setattr(SparseTrainLinear, "_merge_native", lambda self, s, d, gr: None)
    ref.update_topology(drop, grow, ref_opt)
    monkeypatch.undo()
    got.update_topology(drop, grow, got_opt)
    assert torch.equal(got.crow, ref.crow) and torch.equal(got.col, ref.col)
    assert torch.equal(got.values.detach(), ref.values.detach())
    assert torch.equal(got.values.grad, ref.values.grad)
    assert torch.equal(got_opt.state[got.values]["momentum_buffer"], ref_opt.state[ref.values]["momentum_buffer"])
    flat2 = got.structure.flat()
    keep = torch.arange(2)
    for bad_drop, bad_grow in [(keep, grow[[0, 0]]), (keep, flat2[[5, 6]]), (keep, torch.tensor([0, shape[0] * shape[1]])),
                               (torch.tensor([1, 1]), grow[:2]), (torch.tensor([0, flat2.numel()]), grow[:2])]:
        with pytest.raises(ValueError):
            got.update_topology(bad_drop, bad_grow, got_opt)


@_NATIVE
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernels_equal_torch_csr_at_every_chunking(threads):
    """The native products equal torch CSR's (forward with and without bias, fused dx + dv, dv alone, dx
    alone) on shapes that exercise every register-block width (batch 1 .. 1024: one partial vector up to 8
    per chunk, chunks split across threads), the backward's one-thread fused pass and its split one (dx by
    batch chunks, dv by rows: 400 x 300 at 20%, batch 130, above 2M products), int16 and int32 column
    indices, batch- and feature-major inputs; repeated calls give bit-identical results (fixed summation
    order)."""
    nk, tk = get_kernels("native"), TorchCSRKernels()
    g = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out, inp, density, batch in [(7, 5, 0.5, 1), (33, 17, 0.3, 3), (100, 40000, 0.001, 17),
                                         (257, 129, 0.05, 100), (400, 300, 0.2, 130), (64, 64, 1.0, 300),
                                         (50, 60, 0.05, 1024)]:
            mask = _random_mask((out, inp), density, g)
            s = CSRStructure.from_mask(mask)
            assert s.col.dtype == (torch.int32 if inp > 32767 else torch.int16)
            v = torch.randn(s.nnz, generator=g)
            x, dy = torch.randn(batch, inp, generator=g), torch.randn(batch, out, generator=g)
            for xx, dd in [(x, dy), (x.t().contiguous().t(), dy.t().contiguous().t())]:
                tol = dict(rtol=1e-4, atol=1e-3)
                y = nk.spmm(s, v, xx)
                torch.testing.assert_close(y, tk.spmm(s, v, xx), **tol)
                b = torch.randn(out, generator=g)
                torch.testing.assert_close(nk.spmm(s, v, xx, b), y + b, **tol)
                dx, dv = nk.backward(s, v, xx, dd, True, True)
                rdx, rdv = tk.backward(s, v, xx, dd, True, True)
                torch.testing.assert_close(dx, rdx, **tol)
                torch.testing.assert_close(dv, rdv, **tol)
                assert nk.backward(s, v, xx, dd, True, False)[1] is None
                torch.testing.assert_close(nk.backward(s, v, xx, dd, True, False)[0], rdx, **tol)
                none, dv_only = nk.backward(s, v, xx, dd, False, True)
                assert none is None
                torch.testing.assert_close(dv_only, rdv, **tol)
                assert torch.equal(nk.spmm(s, v, xx), y) and torch.equal(nk.backward(s, v, xx, dd, True, True)[1], dv)
    finally:
        torch.set_num_threads(before)


@_NATIVE
def test_native_library_is_cached_per_source_and_cpu_and_can_be_disabled(tmp_path, monkeypatch):
    """The library is built into $SPARSEBENCH_CACHE/native under a key of source + flags + compiler + CPU
    (another CPU gets another file), written whole (no temporary left), reused by the next load;
    SPARSEBENCH_NATIVE=0 makes the backend unavailable with the reason and `auto` picks the next one."""
    from sparsebench.sparsity import native

    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path))
    cxx = native._compiler()
    path = native.library_path(cxx)
    assert path.parent == tmp_path / "native" and not path.exists()
    native.load.cache_clear()
    try:
        assert native.load() is not None and path.exists()
        assert [p.name for p in (tmp_path / "native").iterdir() if p.suffix == ".tmp"] == []
        mtime = path.stat().st_mtime_ns
        native.load.cache_clear()
        assert native.load() is not None and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
        monkeypatch.setattr(native, "_cpu_id", lambda: "model name: another CPU")
        assert native.library_path(cxx) != path
        monkeypatch.setenv("SPARSEBENCH_NATIVE", "0")
        native.load.cache_clear()
        assert native.load() is None and "SPARSEBENCH_NATIVE=0" in native.unavailable_reason()
        assert "native" not in available_kernels() and resolve_kernels("auto") != "native"
        with pytest.raises(ImportError, match="SPARSEBENCH_NATIVE=0"):
            get_kernels("native")
    finally:
        monkeypatch.delenv("SPARSEBENCH_NATIVE", raising=False)
        native.load.cache_clear()
        native.load()


@_NATIVE
def test_native_transposed_workspace_is_the_transposed_structure():
    """The per-call counting-sort transpose equals CSRStructure.transposed(): same row pointers, same
    column-major order (rows ascending within a column), values gathered through perm."""
    g = torch.Generator().manual_seed(3)
    nk = get_kernels("native")
    for out, inp, density in [(1, 1, 1.0), (40, 33000, 0.002), (300, 200, 0.05)]:
        s = CSRStructure.from_mask(_random_mask((out, inp), density, g))
        v = torch.randn(s.nnz, generator=g)
        t_crow, t_col, t_val = nk.transposed_workspace(s, v)
        assert torch.equal(t_crow, s.t_crow) and torch.equal(t_col, s.t_col)
        assert torch.equal(t_val, v[s.perm.long()])


@_NATIVE
def test_native_large_batch_backward_fused_or_transposed_by_vendor_and_threads(monkeypatch):
    """Above SMALL_BATCH the backward takes the fused scatter pass when the thread count is at most
    FUSED_LARGE_THREADS (by vendor: AMD 1, others 0), else the transposed gather; both give the dense
    reference's dx and dv, and the choice follows the rule (the transposed path is the one building W^T)."""
    from sparsebench.sparsity import native
    from sparsebench.sparsity.kernels import NativeKernels

    g = torch.Generator().manual_seed(5)
    w = torch.randn(120, 90, generator=g) * (torch.rand(120, 90, generator=g) < 0.08)
    s = CSRStructure.from_mask(w != 0)
    v = w[w != 0]
    x, dy = torch.randn(300, 90, generator=g), torch.randn(300, 120, generator=g)
    ref_dx, ref_dv = dy @ w, (dy.t() @ x)[w != 0]
    built = []
    orig = NativeKernels.transposed_workspace
    monkeypatch.setattr(NativeKernels, "transposed_workspace", lambda self, *a: built.append(1) or orig(self, *a))
    for vendor, fused_up_to in (("AuthenticAMD", 1), ("SomeOtherVendor", 0)):
        monkeypatch.setattr(native, "cpu_vendor", lambda vendor=vendor: vendor)
        k = NativeKernels()
        assert k.FUSED_LARGE_THREADS == fused_up_to
        for nt in (1, 2):
            built.clear()
            with scoped_threads(nt, torch.get_num_threads, torch.set_num_threads):
                dx, dv = k.backward(s, v, x, dy, True, True)
            assert bool(built) == (nt > fused_up_to), (vendor, nt)
            torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dv, ref_dv, rtol=1e-4, atol=1e-4)


@_NATIVE
def test_native_chunk_widths_follow_the_cpu_vendor(monkeypatch):
    """NativeKernels takes the register-block widths measured for this CPU's vendor (CHUNKS), else the class
    defaults; both give the same products (the widths only change the blocking)."""
    from sparsebench.sparsity import native
    from sparsebench.sparsity.kernels import NativeKernels

    monkeypatch.setattr(native, "cpu_vendor", lambda: "AuthenticAMD")
    amd = NativeKernels()
    assert (amd.FWD_CHUNK, amd.FWD_CHUNK_LARGE, amd.BWD_CHUNK, amd.BWD_CHUNK_LARGE) == NativeKernels.CHUNKS["AuthenticAMD"]
    monkeypatch.setattr(native, "cpu_vendor", lambda: "SomeOtherVendor")
    other = NativeKernels()
    assert (other.FWD_CHUNK_LARGE, other.BWD_CHUNK) == (NativeKernels.FWD_CHUNK_LARGE, NativeKernels.BWD_CHUNK)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 90, generator=g) * (torch.rand(70, 90, generator=g) < 0.1)
    rows, cols = w.nonzero(as_tuple=True)  # row-major order
    crow = torch.zeros(71, dtype=torch.int32)
    crow[1:] = torch.bincount(rows, minlength=70).cumsum(0)
    s = CSRStructure((70, 90), crow, cols.to(torch.int16))
    v = w[rows, cols]
    for batch in (100, 300):
        x = torch.randn(batch, 90, generator=g)
        torch.testing.assert_close(amd.spmm(s, v, x), other.spmm(s, v, x))
        torch.testing.assert_close(amd.spmm(s, v, x), x @ w.t(), rtol=1e-4, atol=1e-4)
