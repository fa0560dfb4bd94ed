"""Dynamic sparse training on truly sparse layers (issue 14, ``trainer.sparse_kernels=true``): the one generic
drop/grow update through its SparseLayer adapter picks what the masked-dense update picks, tracks its loss,
zeroes regrown weights and their optimizer state, keeps density exact, resumes exactly, computes RigL's dense
gradient in row blocks, syncs data-parallel ranks and exports.

Data are Gaussian, units tanh, and every unit keeps inputs and outputs: no exactly tied |w| (weights into or out
of a dead unit -- ReLU, or no outgoing connection -- get zero gradients and stay exactly 0, and which of several
tied zeros is dropped depends on the slot order, which differs between the storages: row-major values vs. the
masked updater's in-place slot list; both are "the n smallest |w|").
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.config import TrainerConfig
from sparsebench.core.threads import scoped_threads
from sparsebench.data import DataBundle, Split
from sparsebench.dst.grow import GROW_CRITERIA, GradientGrow, LayerUpdate, blocked_topn, gradient_rows
from sparsebench.dst.updater import DSTUpdater
from sparsebench.models import MLP
from sparsebench.sparsity.export import SparseLinear, export_sparse
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import num_to_keep, topk_mask
from sparsebench.sparsity.sparse_linear import SparseTrainLinear, sparsify_for_training
from sparsebench.training.callbacks import Callback
from sparsebench.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
GROWS = {"set": ("random", {}), "rigl": ("gradient", {}),
         "similarity": ("similarity", {"metric": "abs_ip", "search": "faiss"}),
         "similarity_brute": ("similarity", {"metric": "abs_ip", "search": "brute"}),
         "similarity_blocked": ("similarity", {"metric": "abs_ip", "search": "faiss"})}  # small search blocks


def gaussian_bundle(n=384, d=60, classes=5, seed=5):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataBundle("gaussian", "tabular", Split(x, y), Split(x[:64], y[:64]), Split(x[64:192], y[64:192]), classes)


DENSITIES = {"layers.0.weight": 0.1, "layers.2.weight": 0.2, "layers.4.weight": 0.8}


def masked_mlp(seed=0):
    """60-100-40-5 tanh MLP; densities such that every unit keeps inputs and outputs (no dead units)."""
    torch.manual_seed(seed)
    model = MLP(60, 5, hidden=[100, 40], activation="tanh")
    masking = Masking(model)
    g = torch.Generator().manual_seed(seed)
    for name, w, _ in masking.items():
        masking.set_mask(name, topk_mask(torch.rand(w.shape, generator=g), num_to_keep(w.numel(), DENSITIES[name])))
    return model, masking


def updater(masking, grow, **kw):
    name, params = GROWS[grow]
    crit = GROW_CRITERIA.get(name)(torch.Generator().manual_seed(0), **params)
    if grow == "similarity_blocked":
        crit.block_elements = 700  # sparse layers search (and score the recall) a few queries / rows at a time
    args = dict(d0=0.3, schedule="cosine", delta_t=2, t_end=1.0)
    args.update(kw)
    return DSTUpdater(masking, crit, **args)


class Record(Callback):
    """After every step (after the updater): each layer's active positions, its values there and the
    optimizer state there, and the loss. Supports sparse mode (``adopt_sparse_layers``)."""

    def __init__(self):
        self.conversion, self.masking, self.history = None, None, []

    def adopt_sparse_layers(self, conversion):
        self.conversion = conversion

    def on_train_start(self, trainer):
        self.masking = trainer.masking

    def on_step_end(self, trainer):
        snap = {"loss": float(trainer.loss), "layers": {}}
        if self.conversion is not None:
            for name, layer in self.conversion.sparse.items():
                st = trainer.optimizer.state.get(layer.values, {})
                snap["layers"][name] = (layer.structure.flat().clone(), layer.values.detach().clone(),
                                        {k: v.clone() for k, v in st.items() if torch.is_tensor(v) and v.dim()})
        else:
            for name, w, m in self.masking.items():
                flat = m.reshape(-1).nonzero().squeeze(1)
                st = trainer.optimizer.state.get(w, {})
                snap["layers"][name] = (flat, w.detach().reshape(-1)[flat].clone(),
                                        {k: v.reshape(-1)[flat].clone() for k, v in st.items()
                                         if torch.is_tensor(v) and v.dim()})
        self.history.append(snap)


def train(sparse, grow, optimizer="sgd", iterations=16, seed=0, checkpoint=None, extra=(), **upd_kw):
    model, masking = masked_mlp(seed)
    upd = updater(masking, grow, **upd_kw)
    rec = Record()
    lr = 0.05 if optimizer == "sgd" else 5e-3
    cfg = TrainerConfig(iterations=iterations, batch_size=32, lr=lr, optimizer=optimizer, momentum=0.9,
                        device="cpu", sparse_kernels=sparse, checkpoint_every=1, sparse_max_density=1.0)
    tr = Trainer(cfg, model, gaussian_bundle(), torch.device("cpu"), masking=masking,
                 callbacks=[upd, rec, *extra], seed=0, checkpoint=checkpoint)
    if sparse:
        assert len(tr.sparse.sparse) == 3 and tr.sparse.masking is None  # every layer truly sparse
        assert not any(isinstance(m, nn.Linear) for m in tr.model.modules())
    final = tr.fit()
    return tr, upd, rec, final


# --------------------------------------------------------------------------- same positions, same losses
@pytest.mark.parametrize("grow", ["set", "similarity", "similarity_blocked", "similarity_brute", "rigl"])
def test_updates_pick_the_same_positions_in_sparse_and_masked_mode(grow):
    _, upd_d, rec_d, _ = train(False, grow)
    _, upd_s, rec_s, _ = train(True, grow)
    assert upd_s.updates == upd_d.updates == 8 and upd_s.changed == upd_d.changed > 0
    for step, (a, b) in enumerate(zip(rec_d.history, rec_s.history)):
        for name in a["layers"]:
            assert torch.equal(a["layers"][name][0], b["layers"][name][0]), (step, name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("grow", ["set", "rigl"])
def test_training_tracks_the_masked_dense_run(grow, optimizer):
    _, _, rec_d, fin_d = train(False, grow, optimizer=optimizer, iterations=24)
    _, _, rec_s, fin_s = train(True, grow, optimizer=optimizer, iterations=24)
    for a, b in zip(rec_d.history, rec_s.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
        for name, (flat, vals, state) in a["layers"].items():
            torch.testing.assert_close(b["layers"][name][1], vals, rtol=1e-3, atol=1e-5)
            for k, v in state.items():
                torch.testing.assert_close(b["layers"][name][2][k], v, rtol=1e-3, atol=1e-6)
    assert abs(fin_d["test_loss"] - fin_s["test_loss"]) < 1e-4


@pytest.mark.parametrize("grow", ["set", "rigl", "similarity"])
def test_regrown_weights_and_their_adam_state_start_at_zero_and_density_is_exact(grow):
    tr, upd, rec, _ = train(True, grow, optimizer="adam", delta_t=1, schedule="constant")
    assert upd.updates == 16
    nnz = {n: layer.nnz for n, layer in tr.sparse.sparse.items()}
    assert all(v == num_to_keep(tr.sparse.counts()[n][1], DENSITIES[n]) for n, v in nnz.items())
    prev = {n: rec.history[0]["layers"][n][0] for n in nnz}
    for snap in rec.history[1:]:
        for name, (flat, vals, state) in snap["layers"].items():
            assert flat.numel() == nnz[name] and flat.unique().numel() == nnz[name]  # density exact
            grown = ~torch.isin(flat, prev[name])
            assert int(grown.sum()) > 0
            assert torch.all(vals[grown] == 0) and torch.all(vals[~grown] != 0)
            assert set(state) == {"exp_avg", "exp_avg_sq"}
            for v in state.values():
                assert torch.all(v[grown] == 0) and torch.any(v[~grown] != 0)
            prev[name] = flat
    assert tr.sparse.density() == pytest.approx(sum(nnz.values()) / sum(t for _, t in tr.sparse.counts().values()))


@pytest.mark.parametrize("grow", ["set", "rigl", "similarity"])
def test_tensor_code_path_used_on_cuda_gives_the_same_topology_on_cpu(grow):
    # On CUDA host_view returns the tensors and the update runs in torch; forcing that path on the CPU must give
    # the same sparse topology as the numpy path (RigL with allow_regrow: dropped positions compete again).
    from sparsebench.dst import search, selection, updater

    def positions(force_tensors):
        with pytest.MonkeyPatch.context() as mp:
            if force_tensors:
                for mod in (search, selection, updater):
                    mp.setattr(mod, "host_view", lambda t: t)
            _, upd, rec, _ = train(True, grow, iterations=8, allow_regrow=(grow == "rigl"))
        return [{n: v[0] for n, v in h["layers"].items()} for h in rec.history], upd.changed

    (a, ca), (b, cb) = positions(False), positions(True)
    assert ca == cb > 0
    for step, (pa, pb) in enumerate(zip(a, b)):
        for n in pa:
            assert torch.equal(pa[n], pb[n]), (step, n)


# --------------------------------------------------------------------------- resume
class Crash(Callback):
    """Simulates a killed process at step ``at`` (after the epoch-1 checkpoint)."""

    def __init__(self, at):
        self.at = at

    def adopt_sparse_layers(self, conversion):
        pass

    def on_step_end(self, trainer):
        if trainer.step == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.parametrize("grow", ["set", "rigl", "similarity"])
def test_resume_from_a_mid_training_checkpoint_continues_identically(grow, tmp_path):
    kw = dict(iterations=36, delta_t=3, t_end=0.9, optimizer="adam")  # 12 steps per epoch
    ref, ref_upd, _, ref_final = train(True, grow, checkpoint=str(tmp_path / "ref.pt"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(True, grow, checkpoint=str(tmp_path / "cut.pt"), extra=[Crash(18)], **kw)
    tr, upd, _, final = train(True, grow, checkpoint=str(tmp_path / "cut.pt"), **kw)
    assert upd.updates == ref_upd.updates == 10 and upd.changed == ref_upd.changed
    a, b = tr.model.state_dict(), ref.model.state_dict()
    assert list(a) == list(b) and any(k.endswith(".col") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p, q in zip(tr.optimizer.state.values(), ref.optimizer.state.values()):
        for k in p:
            assert torch.equal(p[k], q[k]), k
    assert final["test_loss"] == ref_final["test_loss"]


# --------------------------------------------------------------------------- RigL in row blocks
def test_rigl_row_blocked_gradient_equals_the_full_dense_gradient():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(70, 90)
    mask = topk_mask(torch.rand(90, 70, generator=g), 500)
    layer = SparseTrainLinear(lin.weight.detach() * mask, mask, lin.bias)
    x = torch.randn(40, 70, generator=g)
    dz = torch.randn(40, 90, generator=g)
    full = (dz.t() @ x).abs()  # |dL/dW| of the layer, dense
    excluded = layer.structure.flat()
    lu = LayerUpdate("l", layer, None, None, 300, x, dz, shape=(90, 70), excluded=excluded)
    rows = gradient_rows(lu)
    blocks = [rows(r, min(90, r + 7)).clone() for r in range(0, 90, 7)]  # a block is valid until the next call
    torch.testing.assert_close(torch.cat(blocks), dz.t() @ x)  # signed: blocked_topn ranks it by magnitude
    first = rows(0, 7)
    assert rows(7, 14).data_ptr() == first.data_ptr()  # one reused buffer, no fresh block per call
    ref = full.reshape(-1).masked_fill(mask.reshape(-1) != 0, -float("inf"))
    want = set(torch.topk(ref, 300).indices.tolist())
    for block in (70, 7 * 70, 1000, 90 * 70):  # one row, 7 rows, a non-multiple, everything at once
        vals, flat = blocked_topn(gradient_rows(lu), lu, 300, block_elements=block, absolute=True)
        assert set(flat.tolist()) == want, block
        torch.testing.assert_close(torch.sort(vals).values, torch.sort(ref[flat]).values)
    # the criterion on the sparse layer == the criterion on the dense weight.grad of the masked layer
    crit = GradientGrow(torch.Generator().manual_seed(0), block_elements=700)
    got = crit.grow(lu)
    assert set(got.tolist()) == want and torch.all(mask.reshape(-1)[got] == 0)
    lu_masked = LayerUpdate("m", lin, lin.weight, mask.reshape(-1), 300)
    lin.weight.grad = dz.t() @ x
    crit.prepare(type("M", (), {"weight": staticmethod(lambda n: lin.weight)})(), ["m"])
    assert set(crit.grow(lu_masked).tolist()) == want


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_topn_on_large_blocks_equals_the_full_topk(threads):
    # blocks of 16k+ scores take the sampled threshold and the native select (abs taken in the pass, run on
    # `threads` threads); the kept entries are cut back as blocks arrive; the set equals torch.topk's
    g = torch.Generator().manual_seed(5)
    n_out, n_in, n = 600, 500, 1500
    x, dz = torch.randn(64, n_in, generator=g), torch.randn(64, n_out, generator=g)
    dz[:, :40] = 0.0  # dead units: zero rows
    mask = topk_mask(torch.rand(n_out, n_in, generator=g), 3000)
    full = (dz.t() @ x).abs().reshape(-1).masked_fill(mask.reshape(-1) != 0, -float("inf"))
    lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, x, dz, shape=(n_out, n_in),
                     excluded=mask.reshape(-1).nonzero().squeeze(1))
    want = set(torch.topk(full, n).indices.tolist())
    with scoped_threads(threads, torch.get_num_threads, torch.set_num_threads):
        for block in (n_in * 40, n_in * 100, n_out * n_in):
            vals, flat = blocked_topn(gradient_rows(lu), lu, n, block_elements=block, absolute=True, memo={})
            assert set(flat.tolist()) == want, block
            torch.testing.assert_close(torch.sort(vals).values, torch.sort(full[flat]).values)
        # more wanted than there are non-zero growable scores: zeros fill up, never an excluded position
        m2 = n_out * n_in - 3000 - 40 * n_in + 10
        vals, flat = blocked_topn(gradient_rows(lu), lu, m2, block_elements=n_in * 100, absolute=True)
        assert flat.numel() == m2 and torch.all(mask.reshape(-1)[flat] == 0) and flat.unique().numel() == m2


def test_the_nonzero_part_of_a_product_gives_the_full_topn_and_grow_fills_zero_ties_at_random(monkeypatch):
    """blocked_topn(positive=True) on a product with zero rows (output units no gradient reaches) and zero
    columns (inputs zero on the batch) scores only the nonzero part (nonzero_part) and returns torch.topk's
    set over the full masked |dz^T x|; asked for more than the growable nonzero scores it returns exactly
    those (all > 0); GradientGrow then fills the rest among the tied zeros at random: n distinct growable
    positions, counted in stats['zero_ties'], and a different draw under another generator."""
    import sparsebench.dst.grow as grow_mod

    parts = []
    real = grow_mod.nonzero_part
    monkeypatch.setattr(grow_mod, "nonzero_part", lambda *a, **k: parts.append(real(*a, **k)) or parts[-1])
    g = torch.Generator().manual_seed(8)
    n_out, n_in, n = 600, 500, 1500
    x, dz = torch.randn(64, n_in, generator=g), torch.randn(64, n_out, generator=g)
    dz[:, torch.randperm(n_out, generator=g)[:450]] = 0.0  # 3/4 of the rows zero
    x[:, ::3] = 0.0  # a third of the columns zero
    mask = topk_mask(torch.rand(n_out, n_in, generator=g), 3000)
    full = (dz.t() @ x).abs().reshape(-1).masked_fill(mask.reshape(-1) != 0, -float("inf"))
    ex = mask.reshape(-1).nonzero().squeeze(1)
    lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, x, dz, shape=(n_out, n_in), excluded=ex)
    for block in (n_in * 40, n_out * n_in):
        vals, flat = blocked_topn(gradient_rows(lu), lu, n, block_elements=block, absolute=True, memo={}, positive=True)
        assert parts[-1] is not None and parts[-1][3].numel() == 150 and parts[-1][4].numel() == 333
        assert set(flat.tolist()) == set(torch.topk(full, n).indices.tolist()), block
        torch.testing.assert_close(torch.sort(vals).values, torch.sort(full[flat]).values)
    positive = set((full > 0).nonzero().squeeze(1).tolist())
    m2 = len(positive) + 700
    vals, flat = blocked_topn(gradient_rows(lu), lu, m2, absolute=True, memo={}, positive=True)
    assert set(flat.tolist()) == positive and bool((vals > 0).all())
    draws = []
    for seed in (0, 1):
        crit = GradientGrow(torch.Generator().manual_seed(seed))
        lu2 = LayerUpdate("l", lu.module, None, None, m2, x, dz, shape=(n_out, n_in), excluded=ex)
        got = crit.grow(lu2)
        assert got.numel() == m2 and got.unique().numel() == m2 and not bool(mask.reshape(-1)[got].any())
        assert positive <= set(got.tolist()) and crit.stats["zero_ties"] == 700
        draws.append(set(got.tolist()) - positive)
    assert draws[0] != draws[1]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bf16", [True, False])
def test_scanned_topn_equals_the_full_topk_and_a_missed_estimate_falls_back(monkeypatch, threads, bf16):
    """blocked_topn on a sparse layer larger than a scan block takes the scan (a threshold from a grid of
    the scores, each row block selected while in cache, the excluded positions dropped by one merge): the
    set equals torch.topk's. A threshold set too high (fewer than n pass) is counted as a miss, widens the
    layer's margin, and the row-block path still returns the exact set; the grid stratified by the norms
    always samples the strongest row."""
    import sparsebench.dst.grow as grow_mod
    from sparsebench.dst.selection import sample_grid

    from sparsebench.sparsity import native

    monkeypatch.setattr(grow_mod, "SCAN_ELEMENTS", 500 * 37)  # blocks of 37 rows, off a multiple of 600
    monkeypatch.setattr(grow_mod, "SCAN_MIN_ELEMENTS", 500 * 37)  # and the layer large enough to be scanned
    import sparsebench.dst.selection as sel

    monkeypatch.setattr(sel, "bf16_matmul_fast", lambda: bf16)  # the bf16 prefilter on or off
    prefiltered = []
    real = sel.rows_above_bounded
    monkeypatch.setattr(sel, "rows_above_bounded", lambda *a, **k: prefiltered.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(6)
    n_out, n_in, n = 600, 500, 1500
    x, dz = torch.randn(64, n_in, generator=g), torch.randn(64, n_out, generator=g)
    dz[:, 100:140] = 0.0  # dead units: zero rows
    mask = topk_mask(torch.rand(n_out, n_in, generator=g), 3000)
    ex = mask.reshape(-1).nonzero().squeeze(1)

    def exact(dz):
        full = (dz.t() @ x).abs().reshape(-1).masked_fill(mask.reshape(-1) != 0, -float("inf"))
        return full, set(torch.topk(full, n).indices.tolist())

    with scoped_threads(threads, torch.get_num_threads, torch.set_num_threads):
        full, want = exact(dz)
        lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, x, dz, shape=(n_out, n_in), excluded=ex)
        memo = {}
        vals, flat = blocked_topn(gradient_rows(lu), lu, n, absolute=True, memo=memo)
        assert set(flat.tolist()) == want and memo.get("scan_misses", 0) == 0
        assert len(prefiltered) == (1 if bf16 and native.load() is not None else 0)
        assert flat.dtype == torch.long and vals.dtype == torch.float32
        torch.testing.assert_close(torch.sort(vals).values, torch.sort(full[flat]).values)
        # an estimate that lets fewer than n pass (a grid that overweighted strong rows): counted, the layer's
        # margin doubled for its next scans, and the row-block path still returns the exact set
        nth = float(torch.topk(full, n).values.min())
        monkeypatch.setattr(grow_mod, "sampled_threshold", lambda *a, **k: 1.5 * nth)
        vals, flat = blocked_topn(gradient_rows(lu), lu, n, absolute=True, memo=memo)
        assert memo["scan_misses"] == 1 and set(flat.tolist()) == want
        assert memo[("scan_margin", "l")] == 2 * grow_mod.SCAN_MARGIN
    norms = (torch.arange(n_out).flip(0).double().numpy(), torch.ones(n_in).double().numpy())
    ri, ci = sample_grid(n_out, n_in, norms=norms)  # stratified: the strongest row (0) is always sampled
    assert ri[0] == 0 and len(ri) == 256 and bool((ri[1:] > ri[:-1]).all()) and len(ci) == 256


def _sparse_layer_600x500(seed):
    """A sparse 600 x 500 layer's captured vectors at batch 64, 3000 active positions, n = 1500 to grow:
    ``(LayerUpdate, n, the set of torch.topk over the masked |dz^T x|)``."""
    g = torch.Generator().manual_seed(seed)
    n_out, n_in, n = 600, 500, 1500
    x, dz = torch.randn(64, n_in, generator=g), torch.randn(64, n_out, generator=g)
    mask = topk_mask(torch.rand(n_out, n_in, generator=g), 3000)
    ex = mask.reshape(-1).nonzero().squeeze(1)
    full = (dz.t() @ x).abs().reshape(-1).masked_fill(mask.reshape(-1) != 0, -float("inf"))
    lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, x, dz, shape=(n_out, n_in), excluded=ex)
    return lu, n, set(torch.topk(full, n).indices.tolist())


def test_a_layer_below_scan_min_elements_takes_the_row_blocks_one_above_the_scan(monkeypatch):
    """blocked_topn scans a sparse layer (grid, threshold, bf16 prefilter) only above SCAN_MIN_ELEMENTS
    scores, where the bf16 product saves more than the grid costs; a layer of more than one scan block but
    at most SCAN_MIN_ELEMENTS scores (fc5's 1000 x 1000) takes the float32 row blocks. Both return
    torch.topk's set."""
    import sparsebench.dst.grow as grow_mod

    scanned = []
    real = grow_mod._scanned_topn
    monkeypatch.setattr(grow_mod, "_scanned_topn", lambda *a, **k: scanned.append(1) or real(*a, **k))
    monkeypatch.setattr(grow_mod, "SCAN_ELEMENTS", 500 * 37)
    lu, n, want = _sparse_layer_600x500(8)
    for scan_min, scans in [(600 * 500, 0), (600 * 500 - 1, 1)]:  # at the limit: row blocks; above: the scan
        monkeypatch.setattr(grow_mod, "SCAN_MIN_ELEMENTS", scan_min)
        scanned.clear()
        _, flat = blocked_topn(gradient_rows(lu), lu, n, absolute=True, memo={})
        assert len(scanned) == scans and set(flat.tolist()) == want


@pytest.mark.parametrize("native_built", [True, False])
def test_rows_above_equals_the_compare_over_the_whole_matrix(monkeypatch, native_built):
    """rows_above (native select per row block, hits at their flat positions; numpy without the library)
    equals flat_nonzero over the whole matrix for s > t and |s| > t (values |s|), with blocks off a multiple of
    the rows and a first buffer far too small (grown, the block selected again)."""
    import numpy as np

    from sparsebench.dst.selection import rows_above
    from sparsebench.sparsity import native

    if native_built and native.load() is None:
        pytest.skip("native kernels not built")
    if not native_built:
        monkeypatch.setattr(native, "load", lambda: None)
    g = torch.Generator().manual_seed(9)
    S = torch.randn(301, 257, generator=g)
    buf = torch.empty(23 * 257)

    def score_rows(r0, r1):  # one reused buffer, as the callers' products
        out = buf[:(r1 - r0) * 257].view(r1 - r0, 257)
        out.copy_(S[r0:r1])
        return out

    flat = S.reshape(-1)
    for absolute, thr in ((False, 1.5), (True, 0.3), (True, 2.0), (True, 5.0)):  # 0.3: 76% pass, far over the buffer
        ranked = flat.abs() if absolute else flat
        want = torch.nonzero(ranked > thr).squeeze(1)
        f, v = rows_above(score_rows, 301, 257, 23, thr, absolute, expect=10)
        assert np.array_equal(f.astype(np.int64), want.numpy()), (absolute, thr)
        assert np.array_equal(v, ranked[want].numpy())


@pytest.mark.parametrize("batch", [100, 1024])
def test_bf16_rows_stay_within_the_rounding_bound(batch):
    """GradientRows.approx_rows (bf16 copies of the vectors, a bf16 product) differs from the float32 rows by
    at most rounding_bound's rb[i] * cb[j] everywhere, for vectors of widely different scales (columns
    scaled over six decades, a dead row), at batch 100 and 1024; ``at`` gives the float32 rows' values."""
    import numpy as np

    g = torch.Generator().manual_seed(12)
    n_out, n_in = 300, 203
    x = torch.randn(batch, n_in, generator=g) * torch.logspace(-3, 3, n_in)[torch.randperm(n_in, generator=g)]
    dz = torch.randn(batch, n_out, generator=g).exp() * (torch.rand(n_out, generator=g) * 4).exp()
    dz[:, 7] = 0.0
    lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, 10, x, dz, shape=(n_out, n_in),
                     excluded=torch.empty(0, dtype=torch.long))
    rows = gradient_rows(lu)
    exact = (dz.t().double() @ x.double()).numpy()
    approx = torch.cat([rows.approx_rows(r, min(n_out, r + 64)).float() for r in range(0, n_out, 64)]).double()
    rb, cb = rows.rounding_bound()
    assert rb.dtype == np.float32 and rb.shape == (n_out,) and cb.shape == (n_in,)
    err = np.abs(approx.numpy() - exact)
    assert (err <= np.outer(rb, cb)).all()
    assert err.max() > 0  # the bf16 product is not the float32 one: the bound is exercised
    pos = np.array([0, 5, 7 * n_in + 3, 123 * n_in + 200, n_out * n_in - 1])
    np.testing.assert_allclose(rows.at(pos), exact.reshape(-1)[pos], rtol=1e-5, atol=1e-6 * np.abs(exact).max())


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_above_bounded_equals_the_compare_over_the_whole_matrix(threads):
    """The native bounded select of bf16 blocks (|a| + rb[i] cb[j] > t, rows of 203 scores: not a multiple of
    its 32-score steps) equals the same compare in numpy over the whole matrix, with blocks off a multiple of
    the rows and a first buffer far too small."""
    import numpy as np

    from sparsebench.dst.selection import rows_above_bounded
    from sparsebench.sparsity import native

    if native.load() is None:
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(13)
    n_out, n_in = 301, 203
    A = torch.randn(n_out, n_in, generator=g).bfloat16()
    rb, cb = torch.rand(n_out, generator=g).numpy(), torch.rand(n_in, generator=g).numpy()
    want_all = A.float().abs().numpy() + np.outer(rb, cb).astype(np.float32)
    with scoped_threads(threads, torch.get_num_threads, torch.set_num_threads):
        for t in (0.5, 2.0, 3.5):  # 0.5: most entries pass, far over the first buffer
            got = rows_above_bounded(lambda r0, r1: A[r0:r1].contiguous(), n_out, n_in, 23, t, rb, cb, expect=5)
            assert got.dtype == np.int32
            assert np.array_equal(got.astype(np.int64), np.flatnonzero(want_all > np.float32(t))), t


def test_bf16_switch_follows_the_environment_and_the_cpu(monkeypatch):
    """SPARSEBENCH_BF16=0 / 1 turns the bf16 prefilter off / on; unset, it follows the CPU's flags
    (avx512_bf16 or amx_bf16) and oneDNN's bf16 support."""
    from pathlib import Path

    import sparsebench.dst.selection as sel

    def fresh(value):
        if value is None:
            monkeypatch.delenv("SPARSEBENCH_BF16", raising=False)
        else:
            monkeypatch.setenv("SPARSEBENCH_BF16", value)
        sel.bf16_matmul_fast.cache_clear()
        return sel.bf16_matmul_fast()

    try:
        assert fresh("0") is False and fresh("1") is True
        try:
            flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
        except (OSError, StopIteration):
            flags = set()
        want = bool(flags & {"avx512_bf16", "amx_bf16"}) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        assert fresh(None) is want
    finally:
        sel.bf16_matmul_fast.cache_clear()


def test_prefilter_declines_a_bound_too_coarse_to_prune(monkeypatch):
    """With the grid predicting more than PREFILTER_MAX x the expected hits as bf16 candidates (a bound
    inflated a million times), the scan scores in float32 instead, and the set is still torch.topk's."""
    import sparsebench.dst.grow as grow_mod
    import sparsebench.dst.selection as sel

    monkeypatch.setattr(grow_mod, "SCAN_ELEMENTS", 500 * 37)
    monkeypatch.setattr(grow_mod, "SCAN_MIN_ELEMENTS", 500 * 37)
    monkeypatch.setattr(sel, "bf16_matmul_fast", lambda: True)
    monkeypatch.setattr(sel, "BF16_ROUNDING", 1e6 * sel.BF16_ROUNDING)
    called = []
    monkeypatch.setattr(sel, "rows_above_bounded", lambda *a, **k: called.append(1))
    lu, n, want = _sparse_layer_600x500(14)
    vals, flat = blocked_topn(gradient_rows(lu), lu, n, absolute=True, memo={})
    assert called == [] and set(flat.tolist()) == want


def test_sampled_threshold_ranks_the_growable_grid_scores_only():
    """sampled_threshold takes the grid's growable score at rank e + 4 sqrt(e) + 1 (e: margin x the share of
    the growable entries): excluded positions inside the grid are left out however high they score, those
    outside it do not count; None when the rank exceeds the grid."""
    import math

    import numpy as np

    from sparsebench.dst.selection import sample_grid, sampled_threshold

    rng = np.random.default_rng(0)
    n_out, n_in = 1000, 800
    ri, ci = sample_grid(n_out, n_in, size=100)
    assert len(ri) == len(ci) == 100 and ri[0] == 0 and ri[-1] == n_out - 1 and ci[-1] == n_in - 1
    sample = rng.random((100, 100)).astype(np.float32)
    top_cells = [(3, 7), (50, 50), (99, 0)]
    ex = sorted({int(ri[r] * n_in + ci[c]) for r, c in top_cells} | {5 * n_in + 1, 999 * n_in + 3})
    for r, c in top_cells:
        sample[r, c] = 10.0  # excluded and on the grid: must not set the threshold
    ex = np.asarray(ex, dtype=np.int64)
    n, N = 2000, n_out * n_in
    t = sampled_threshold(sample, ri, ci, n_in, n, N, ex, margin=1.5)
    kept = np.delete(sample.reshape(-1), [r * 100 + c for r, c in top_cells])
    e = 1.5 * n / (N - ex.size) * kept.size
    k = int(math.ceil(e + 4 * math.sqrt(e))) + 1
    assert t == float(np.sort(kept)[::-1][k - 1])
    assert sampled_threshold(sample, ri, ci, n_in, N * 7 // 10, N, ex, margin=1.5) is None  # 1.05 x the grid


def test_similarity_grow_from_the_weight_gradient_equals_the_captured_vector_search():
    # masked-dense layers: search=faiss abs_ip searches S = weight.grad (no capture); sparse layers: the captured
    # vectors (no dense gradient exists). Both give the set the vector search gives on the masked layer.
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(70, 90)
    mask = topk_mask(torch.rand(90, 70, generator=g), 600)
    x, dz = torch.randn(40, 70, generator=g), torch.randn(40, 90, generator=g)
    lin.weight.grad = dz.t() @ x
    make = lambda: GROW_CRITERIA.get("similarity")(torch.Generator().manual_seed(0), metric="abs_ip", search="faiss")
    crit = make()
    assert crit.from_scores and crit.needs_gradients and not crit.needs_activations
    crit.prepare(type("M", (), {"weight": staticmethod(lambda n: lin.weight)})(), ["m"])
    from_grad = crit.grow(LayerUpdate("m", lin, lin.weight, mask.reshape(-1), 200))
    vectors = make()
    vectors.from_scores = False  # the captured-vector path on the same masked layer
    from_vec = vectors.grow(LayerUpdate("m", lin, lin.weight, mask.reshape(-1), 200, x, dz))
    layer = SparseTrainLinear(lin.weight.detach() * mask, mask, lin.bias)
    sparse = make().grow(LayerUpdate("s", layer, None, None, 200, x, dz, shape=(90, 70),
                                     excluded=layer.structure.flat()))
    assert set(from_grad.tolist()) == set(from_vec.tolist()) == set(sparse.tolist())
    assert crit.stats["recall_n"] == 200 and crit.stats["recall_hits"] > 150


@pytest.mark.parametrize("metric", ["abs_ip", "l2"])
def test_faiss_search_over_blocks_of_queries_equals_the_full_search(metric):
    # sparse layers search through find_bounded: blocks of queries (columns of S), never the (n_out, n_in) matrix
    from sparsebench.dst.search import SEARCHES
    from sparsebench.dst.similarity import METRICS

    g = torch.Generator().manual_seed(4)
    G, U = torch.randn(50, 90, generator=g), torch.randn(50, 70, generator=g)
    mask = (torch.rand(90 * 70, generator=g) < 0.1).to(torch.uint8)
    full = SEARCHES.get("faiss")(METRICS.get(metric)(), 0.15).find("l", G, U, mask, 300)
    for block in (90, 7 * 90, 1000):  # one query per block, 7, a non-multiple
        got = SEARCHES.get("faiss")(METRICS.get(metric)(), 0.15).find_bounded("l", G, U, mask, 300, block)
        assert got.numel() == 300 and set(got.tolist()) == set(full.tolist()), block
        assert torch.all(mask[got] == 0)


# --------------------------------------------------------------------------- trainer, export, DDP
def test_a_callback_without_sparse_support_is_refused():
    from sparsebench.core.errors import ConfigError

    model, masking = masked_mlp()
    cfg = TrainerConfig(iterations=2, batch_size=32, device="cpu", sparse_kernels=True)
    with pytest.raises(ConfigError, match="Callback would act on the replaced"):
        Trainer(cfg, model, gaussian_bundle(), torch.device("cpu"), masking=masking, callbacks=[Callback()])


def test_default_max_density_falls_with_the_batch_size():
    from sparsebench.sparsity.sparse_linear import DEFAULT_MAX_DENSITY, default_max_density

    assert default_max_density(1) == default_max_density(128) == DEFAULT_MAX_DENSITY == 0.15
    assert default_max_density(512) == pytest.approx(0.15 * 0.25 ** 0.15)  # 0.122
    assert default_max_density(1024) == pytest.approx(0.15 / 8 ** 0.15)  # 0.110: a 0.1 layer converts, 0.2 does not
    assert default_max_density(4096) < 0.1 < default_max_density(1024)
    with pytest.raises(ValueError, match="batch_size=0"):
        default_max_density(0)


@pytest.mark.parametrize("limit,batch", [(None, 32), (None, 1024), (0.2, 32), (1.0, 1024)])
def test_sparse_max_density_chooses_the_layers_trained_sparse(limit, batch):
    from sparsebench.sparsity.sparse_linear import default_max_density

    converted = [n for n, d in DENSITIES.items() if d <= (default_max_density(batch) if limit is None else limit)]
    assert converted == {(None, 32): ["layers.0.weight"], (None, 1024): ["layers.0.weight"], (0.2, 32): ["layers.0.weight", "layers.2.weight"],
                         (1.0, 1024): list(DENSITIES)}[(limit, batch)]
    model, masking = masked_mlp()  # densities 0.1, 0.2, 0.8
    upd = updater(masking, "set")
    cfg = TrainerConfig(iterations=4, batch_size=batch, device="cpu", sparse_kernels=True, sparse_max_density=limit)
    tr = Trainer(cfg, model, gaussian_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd])
    assert list(tr.sparse.sparse) == converted
    assert [n for n, t in upd.layers.items() if t.is_sparse] == converted  # the rest updates masked-dense
    tr.fit()
    assert upd.updates == 2 and tr.sparse.counts() == {n: (num_to_keep(t, DENSITIES[n]), t)
                                                       for n, (_, t) in tr.sparse.counts().items()}


def test_export_of_a_sparse_trained_model_equals_the_masked_export():
    tr_s, _, _, _ = train(True, "set", iterations=8)
    model, masking = masked_mlp()
    for name, layer in tr_s.sparse.sparse.items():  # the sparse run's topology and weights, masked-dense
        masking.set_mask(name, layer.mask())
        with torch.no_grad():
            masking.weight(name).copy_(layer.dense_weight())
        masking.module(name).bias.data.copy_(layer.bias.detach())
    x = torch.randn(50, 60)
    for layout in ("csr", "auto", "dense"):
        ex_s, ex_d = export_sparse(tr_s.model, layout), export_sparse(model, layout)
        lin_s = [m for m in ex_s.modules() if isinstance(m, SparseLinear)]
        lin_d = [m for m in ex_d.modules() if isinstance(m, SparseLinear)]
        assert len(lin_s) == 3 and [m.nnz for m in lin_s] == [m.nnz for m in lin_d]
        assert [m.weight.layout for m in lin_s] == [m.weight.layout for m in lin_d]
        with torch.no_grad():
            torch.testing.assert_close(ex_s(x), ex_d(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ex_s(x), tr_s.model.eval()(x), rtol=1e-5, atol=1e-5)


def test_sparsify_keeps_the_structure_buffers_in_place_across_updates():
    model, masking = masked_mlp()
    conv = sparsify_for_training(model, masking, max_density=1.0)
    layer = next(iter(conv.sparse.values()))
    before = {n: b.data_ptr() for n, b in layer.named_buffers()}
    from sparsebench.sparsity.sparse_linear import set_update

    set_update(conv.sparse, 0.3, None, generator=torch.Generator().manual_seed(0))
    assert {n: b.data_ptr() for n, b in layer.named_buffers()} == before  # DDP and checkpoints see the same tensors


def test_ddp_two_processes_keep_sparse_layers_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        __file__, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["updates"] == r1["updates"] > 0
    assert any(k.endswith(".values") for k in r0["state"])
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # structures, values identical on both ranks
    for a, b in zip(r0["opt"], r1["opt"]):
        assert torch.equal(a, b)
    assert r0["final"]["test_acc"] == r1["final"]["test_acc"]


def _ddp_worker(out):
    """torchrun worker: faiss_grow-style similarity growth (rank-local activations) on sparse layers."""
    from sparsebench.training.runtime import setup_run

    model, masking = masked_mlp()
    cfg = TrainerConfig(iterations=24, batch_size=64, lr=0.05, device="cpu", sparse_kernels=True, sparse_max_density=1.0)
    device = setup_run(cfg)  # joins the gloo process group (torchrun sets WORLD_SIZE=2)
    upd = updater(masking, "similarity", delta_t=4, schedule="constant")
    tr = Trainer(cfg, model, gaussian_bundle(), device, masking=masking, callbacks=[upd], seed=0)
    final = tr.fit()
    opt = [v for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    torch.save({"state": tr.model.state_dict(), "opt": opt, "final": final, "world": tr.world,
                "updates": upd.updates}, f"{out}/rank{tr.rank}.pt")


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


def test_random_growable_from_sorted_active_positions_equals_the_mask_draw():
    """SET's growth on a sparse layer tests its draws against the sorted active positions instead of a
    numel-byte mask: the same positions at the same generator state (with and without an exclude list),
    and the dense-layer fallback (fewer than a quarter growable) as well."""
    from sparsebench.dst.selection import random_growable

    g = torch.Generator().manual_seed(6)
    for numel, density, n in [(50_000, 0.02, 300), (4000, 0.8, 50)]:
        mask = (torch.rand(numel, generator=g) < density).to(torch.uint8)
        active = mask.nonzero().squeeze(1)
        exclude = torch.randint(0, numel, (40,), generator=g)
        for ex in (None, exclude):
            a = random_growable(mask, n, torch.Generator().manual_seed(1), exclude=ex)
            b = random_growable(None, n, torch.Generator().manual_seed(1), exclude=ex, active=active, numel=numel)
            assert torch.equal(a, b) and not bool(mask[b].any())
