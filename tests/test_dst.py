"""Dynamic sparse training: update invariants, grow criteria, similarity search, schedules, dst_masked."""
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from sparsebench.sparsity.distributions import layer_counts, random_masks
from sparsebench.config import TrainerConfig
from sparsebench.data import DataBundle, Split
from sparsebench.dst import (GROWTH, AbsInnerProduct, BruteForceSearch, CosineDrop, ConstantDrop, DSTUpdater,
                             FaissSearch, L2Similarity, LSHSimilarity, SimilarityGrow, StepLTE, ThresholdMask,
                             ThresholdMaskCallback, attach_threshold_masks, layer_vectors, long_tailed_estimator)
from sparsebench.core.errors import ConfigError, DataError
from sparsebench.sparsity.masking import Masking
from sparsebench.models import MLP, WideResNet
from sparsebench.training.trainer import Callback, Trainer

torch.set_num_threads(1)


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
    return GROWTH.get(name)(torch.Generator().manual_seed(0), **kw)


class Check(Callback):
    """Records per-layer active counts after every step (after the updater ran)."""

    def __init__(self, masking):
        self.masking, self.history = masking, []

    def on_step_end(self, trainer):
        self.history.append({n: a for n, (a, _) in self.masking.counts().items()})


GROWS = [("set", {}), ("rigl", {}), ("faiss_grow", {"metric": "abs_ip", "search": "faiss"}),
         ("faiss_grow", {"metric": "abs_ip", "search": "brute"}), ("faiss_grow", {"metric": "l2", "search": "faiss"}),
         ("faiss_grow", {"metric": "lsh", "search": "faiss", "bits": 1.0})]


@pytest.mark.parametrize("name,kw", GROWS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in GROWS])
def test_density_exactly_constant_across_updates(name, kw):
    model, masking, counts = sparse_mlp()
    upd = DSTUpdater(masking, make_grow(name, **kw), d0=0.3, schedule="cosine", delta_t=1, t_end=1.0)
    check = Check(masking)
    cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=12, device="cpu")
    Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd, check]).fit()
    assert upd.updates == 12 and upd.changed > 0
    for h in check.history:
        assert h == counts
    # masks really changed, weights at inactive positions are exactly zero
    for n, w, m in masking.items():
        assert torch.all(w[m == 0] == 0)


@pytest.mark.parametrize("name,kw", GROWS[:3], ids=["set", "rigl", "faiss"])
def test_grown_positions_were_inactive_and_start_at_zero_with_clean_state(name, kw):
    model, masking, counts = sparse_mlp(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    masking.attach(opt)
    upd = DSTUpdater(masking, make_grow(name, **kw), d0=0.25, schedule="constant", delta_t=1, t_end=1.0)
    data = digits_bundle()

    class FakeTrainer:
        step, total_steps, optimizer = 0, 10, opt

    ft = FakeTrainer()
    upd.on_train_start(ft)
    x, y = data.train.x[:128], data.train.y[:128]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    upd.on_after_backward(ft)
    opt.step()
    # make every optimizer buffer non-zero so a reset is visible
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                v.fill_(1.0)
    before = masking.masks()
    w_before = {n: w.detach().clone() for n, w, _ in masking.items()}
    ft.step = 1
    upd.on_step_end(ft)
    assert upd.updates == 1
    for n, w, m in masking.items():
        grown = (m > 0) & (before[n] == 0)
        dropped = (m == 0) & (before[n] > 0)
        assert int(grown.sum()) == int(dropped.sum()) == round(0.25 * counts[n])
        assert torch.all(w[grown] == 0)
        for v in opt.state[masking.weight(n)].values():
            if torch.is_tensor(v) and v.shape == w.shape:
                assert torch.all(v[grown] == 0) and torch.all(v[dropped] == 0)
                assert torch.all(v[(m > 0) & ~grown] == 1)  # survivors keep their state
        # dropped ones were the smallest |w| among the active
        active_before = before[n] > 0
        thr = w_before[n][dropped].abs().max()
        assert torch.all(w_before[n][active_before & ~dropped].abs() >= thr)


def test_weight_grad_is_dense_in_on_after_backward_and_equals_grad_out_x():
    model, masking, _ = sparse_mlp(density=0.1)
    data = digits_bundle()
    captured = {}

    layer = model.layers[0]
    store = {}

    def hook(mod, inputs, out):
        if not out.requires_grad:  # evaluation pass
            return
        store["x"] = inputs[0].detach()
        out.register_hook(lambda g: store.__setitem__("g", g))

    layer.register_forward_hook(hook)

    class Grab(Callback):
        def on_after_backward(self, trainer):
            captured["grad"] = layer.weight.grad.clone()

        def on_step_end(self, trainer):
            captured["after"] = layer.weight.detach().clone()

    cfg = TrainerConfig(lr=0.05, batch_size=256, iterations=1, device="cpu", momentum=0.0)
    Trainer(cfg, model, data, torch.device("cpu"), masking=masking, callbacks=[Grab()]).fit()
    g = captured["grad"]
    m = masking.mask("layers.0.weight")
    assert (g[m == 0] != 0).sum() > 0.5 * (m == 0).sum()  # dense: inactive positions have gradients
    torch.testing.assert_close(g, store["g"].t() @ store["x"], rtol=1e-4, atol=1e-6)
    assert torch.all(captured["after"][m == 0] == 0)  # the post-step hook zeroed what the dense step touched


def _fixed_vectors(seed=0, R=32, n_out=20, n_in=30):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(R, n_out, generator=gen), torch.randn(R, n_in, generator=gen)


@pytest.mark.parametrize("metric", [AbsInnerProduct(), L2Similarity()], ids=["abs_ip", "l2"])
def test_brute_force_and_faiss_flat_return_the_same_set(metric):
    G, U = _fixed_vectors()
    mask = torch.zeros(G.shape[1] * U.shape[1])
    mask[torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(1))[:120]] = 1
    blocked = mask.nonzero().squeeze(1)
    n = 50
    exact = BruteForceSearch(metric).find("l", G, U, mask, n)
    flat = FaissSearch(metric, k_similar=1.0).find("l", G, U, mask, n)
    assert set(exact.tolist()) == set(flat.tolist())
    assert not set(exact.tolist()) & set(blocked.tolist())
    # the brute-force set is the true top-n of the metric among growable pairs
    s = metric.exact(G, U).reshape(-1)
    s[blocked] = -float("inf")
    assert set(exact.tolist()) == set(torch.topk(s, n).indices.tolist())


def test_per_query_search_with_small_k_similar_can_miss_global_topk():
    # Figure 3.1: one input vector is very similar to every gradient vector; per-query top-k misses pairs
    G, U = _fixed_vectors(seed=3, R=16, n_out=20, n_in=30)
    U[:, 0] = 10 * G.sum(1)
    mask = torch.zeros(600)
    exact = set(BruteForceSearch(AbsInnerProduct()).find("l", G, U, mask, 30).tolist())
    approx = set(FaissSearch(AbsInnerProduct(), k_similar=0.1).find("l", G, U, mask, 30).tolist())
    assert len(approx) == 30 and len(exact & approx) < 30


def test_lsh_path_runs_and_reports_recall():
    G, U = _fixed_vectors(seed=2, R=64, n_out=40, n_in=50)
    mask = torch.zeros(2000)
    mask[::7] = 1
    for bits in (0.5, 2.0):
        got = FaissSearch(LSHSimilarity(bits), k_similar=0.2).find("l", G, U, mask, 40)
        assert got.numel() == 40 and got.unique().numel() == 40
        assert torch.all(mask[got] == 0)
    # through the grow strategy: recall is logged and lies in [0, 1]
    model, masking, counts = sparse_mlp()
    upd = DSTUpdater(masking, make_grow("faiss_grow", metric="lsh", bits=1.0), d0=0.1, schedule="constant",
                     delta_t=2, t_end=1.0)
    cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=6, device="cpu")
    Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
    s = upd.summary()
    assert upd.updates == 3 and 0.0 <= s["recall_mean"] <= 1.0
    assert masking.counts() == {n: (counts[n], w.numel()) for n, w, _ in masking.items()}


def test_lsh_with_brute_force_is_a_config_error():
    with pytest.raises(ConfigError, match="method.search"):
        SimilarityGrow(torch.Generator(), metric="lsh", search="brute")


def test_cosine_schedule_matches_formula_and_constant_stops_at_t_end():
    d0, t_end = 0.3, 1000
    cos = CosineDrop(d0, t_end)
    for t in (0, 1, 250, 500, 999, 1000):
        assert cos(t) == pytest.approx(d0 / 2 * (1 + math.cos(math.pi * t / t_end)))
    assert cos(0) == pytest.approx(d0) and cos(500) == pytest.approx(d0 / 2) and cos(1000) == pytest.approx(0.0)
    assert cos(1001) == 0.0
    const = ConstantDrop(d0, t_end)
    assert const(10) == d0 and const(t_end) == d0 and const(t_end + 1) == 0.0


def test_update_steps_follow_delta_t_and_t_end():
    model, masking, _ = sparse_mlp()
    upd = DSTUpdater(masking, make_grow("set"), d0=0.3, delta_t=5, t_end=0.5)

    class T:
        step, total_steps = 0, 40

    upd.on_train_start(T())
    assert [s for s in range(40) if upd.is_update_step(s)] == [4, 9, 14, 19]


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_unfold_vectors_give_the_weight_gradient(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=False)
    x = torch.randn(4, 3, 9, 9)
    out = conv(x)
    gout = torch.randn_like(out)
    out.backward(gout)
    U, G = layer_vectors(conv, x, gout)
    assert U.shape == (4 * out.shape[2] * out.shape[3], 27) and G.shape == (U.shape[0], 5)
    torch.testing.assert_close((G.t() @ U).view_as(conv.weight), conv.weight.grad, rtol=1e-4, atol=1e-5)


def test_faiss_grow_updates_conv_layers_of_a_wrn():
    torch.manual_seed(0)
    model = WideResNet(1, 10, depth=10, width=1)
    masking = Masking(model)
    counts = layer_counts(masking, 0.3, "erk")
    masking.set_masks(random_masks(masking, counts, torch.Generator().manual_seed(0)))
    x = torch.randn(96, 1, 12, 12)
    y = torch.randint(0, 10, (96,))
    data = DataBundle(name="noise", train=Split(x, y), val=Split(x[:16], y[:16]), test=Split(x[:16], y[:16]), num_classes=10,
                      kind="image")
    upd = DSTUpdater(masking, make_grow("faiss_grow", metric="abs_ip", search="faiss"), d0=0.1,
                     schedule="constant", delta_t=1, t_end=1.0, update_layers=["*conv*", "*shortcut*"])
    cfg = TrainerConfig(lr=0.05, batch_size=32, iterations=3, device="cpu")
    Trainer(cfg, model, data, torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
    assert "fc.weight" not in upd.names and "blocks.0.conv1.weight" in upd.names
    assert upd.updates == 3 and upd.summary()["random_fill"] < upd.changed
    assert {n: a for n, (a, _) in masking.counts().items()} == counts


def test_long_tailed_estimator_and_threshold_mask():
    x = torch.tensor([-1.5, -0.7, -0.4, -0.1, 0.0, 0.2, 0.5, 1.0, 1.2], requires_grad=True)
    y = StepLTE.apply(x)
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    y.sum().backward()
    expect = [0.0, 0.4, 2 - 1.6, 2 - 0.4, 2.0, 2 - 0.8, 0.4, 0.4, 0.0]
    torch.testing.assert_close(x.grad, torch.tensor(expect))
    torch.testing.assert_close(long_tailed_estimator(x.detach()), torch.tensor(expect))
    # the threshold receives a gradient and masks weights below it (per output neuron)
    pm = ThresholdMask(2, init=0.3)
    w = torch.tensor([[0.1, -0.5, 0.2], [0.9, 0.05, -0.4]], requires_grad=True)
    out = pm(w)
    assert (out != 0).tolist() == [[False, True, False], [True, False, True]]
    out.sum().backward()
    assert pm.threshold.grad is not None and torch.all(pm.threshold.grad != 0)


def test_dst_masked_trains_and_regulariser_prunes():
    model, masking, _ = sparse_mlp(density=1.0)
    masks = attach_threshold_masks(masking)
    cb = ThresholdMaskCallback(masking, masks, alpha=2e-2)
    cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=60, device="cpu")
    res = Trainer(cfg, model, digits_bundle(), torch.device("cpu"), callbacks=[cb]).fit()
    cb.sync()
    assert masking.density() < 0.6 and res["test_acc"] > 0.6
    assert float(masks["layers.0.weight"].threshold.detach().mean()) > 0


def test_cifar100_wrn_fails_only_for_missing_data(tmp_path):
    from sparsebench.api import compose, execute

    cfg = compose(["method=rigl", "dataset=cifar100", "model=wrn28x5", f"dataset.root={tmp_path}",
                   f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match="(?i)cifar"):
        execute(cfg, quiet=True)


MNIST = Path(os.environ.get("SPARSEBENCH_DATA", "data")) / "MNIST" / "raw"


@pytest.mark.skipif(not MNIST.is_dir(), reason="real MNIST not found under $SPARSEBENCH_DATA")
@pytest.mark.parametrize("method", ["rigl", "faiss_grow"])
def test_methods_run_on_real_mnist(tmp_path, method):
    from sparsebench.api import compose, execute

    df = execute(compose([f"method={method}", "dataset=mnist", "model=lenet300_100", "dataset.train_subset=600",
                          "dataset.test_subset=500", "trainer.iterations=20", "trainer.batch_size=64",
                          "method.delta_t=5", "method.t_end=1.0", "trainer.device=cpu", f"out_dir={tmp_path}"]), quiet=True)
    row = df.iloc[0]
    assert row["density"] == pytest.approx(0.2, abs=1e-5) and row["updates"] == 4
    assert row["test_acc"] > 0.3 and 0 <= row["update_share"] < 1


def test_allow_regrow_keeps_density_and_may_regrow_dropped_positions():
    model, masking, counts = sparse_mlp(seed=2)
    upd = DSTUpdater(masking, make_grow("rigl"), d0=0.5, schedule="constant", delta_t=1, t_end=1.0, allow_regrow=True)
    check = Check(masking)
    cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=5, device="cpu")
    Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd, check]).fit()
    assert all(h == counts for h in check.history)
    for n, w, m in masking.items():
        assert torch.all(w[m == 0] == 0)
        assert sorted(upd.active_idx[n].tolist()) == m.reshape(-1).nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("largest", [True, False])
def test_sampled_threshold_topk_is_exact(largest):
    from sparsebench.dst import topk_indices

    gen = torch.Generator().manual_seed(0)
    for N, n in [(200_000, 1), (200_000, 2000), (50_000, 3000), (1000, 10)]:
        s = torch.randn(N, generator=gen)
        s[torch.randint(0, N, (N // 5,), generator=gen)] = -float("inf")
        for scores in (s, s.round()):  # with many ties
            got = topk_indices(scores, n, largest=largest)
            assert got.numel() == n and got.unique().numel() == n
            ref = torch.topk(scores, n, largest=largest).values
            assert torch.equal(torch.sort(scores[got]).values, torch.sort(ref).values)
    # with a threshold hint carried between calls (CPU): exact even when the distribution shifts a lot
    hint = {}
    for shift in (0.0, 0.01, 3.0, -5.0, 0.0):
        scores = torch.randn(100_000, generator=gen) + shift
        scores[:50_000] *= 1 + abs(shift)
        got = topk_indices(scores, 1500, largest=largest, hint=hint)
        assert "t" in hint and got.numel() == 1500 and got.unique().numel() == 1500
        ref = torch.topk(scores, 1500, largest=largest).values
        assert torch.equal(torch.sort(scores[got]).values, torch.sort(ref).values)


def test_brute_abs_ip_reads_the_dense_gradient_and_matches_the_explicit_search():
    # faiss_grow search=brute metric=abs_ip takes |weight.grad| (== |G^T U|) instead of capturing vectors:
    # on a Linear and a Conv2d layer its chosen set equals the explicit brute-force search over the
    # captured (unfolded) vectors, up to float rounding at the n-th score.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
    masking = Masking(model)
    masking.set_masks(random_masks(masking, layer_counts(masking, 0.3, "uniform"), torch.Generator().manual_seed(0)))
    grow = make_grow("faiss_grow", metric="abs_ip", search="brute")
    assert grow.from_gradient and not grow.needs_activations and grow.needs_gradients
    assert not make_grow("faiss_grow", metric="abs_ip", search="brute", max_rows=10**6).from_gradient
    upd = DSTUpdater(masking, grow, d0=0.2, schedule="constant", delta_t=1, t_end=1.0)
    assert upd.capture is None
    data = digits_bundle()
    x, y = data.train.x[:200].reshape(-1, 1, 8, 8), data.train.y[:200]
    inputs, gouts = {}, {}
    def keep(name):
        def hook(mod, inp, out):
            inputs[name] = inp[0].detach()
            out.register_hook(lambda g: gouts.__setitem__(name, g))
        return hook

    for name in masking.names:
        masking.module(name).register_forward_hook(keep(name))
    F.cross_entropy(model(x), y).backward()

    class Updater:
        pass

    u = Updater()
    u.masking = masking
    grow.prepare(u, masking.names)
    from sparsebench.dst import LayerUpdate

    for name in masking.names:
        m_flat = masking.mask(name).reshape(-1)
        n = 20
        layer = LayerUpdate(name, masking.module(name), masking.weight(name), m_flat, n)
        got = grow.grow(layer, u)
        U, G = layer_vectors(masking.module(name), inputs[name], gouts[name])
        want = BruteForceSearch(AbsInnerProduct()).find(name, G, U, m_flat, n)
        assert got.numel() == n and got.unique().numel() == n and torch.all(m_flat[got] == 0)
        ref = (G.t() @ U).abs().reshape(-1)
        kth = torch.sort(ref[want]).values[0]
        assert torch.all(ref[got] >= kth * (1 - 1e-4)), name
        assert len(set(got.tolist()) & set(want.tolist())) >= n - 1, name
    assert grow.stats["recall_hits"] == grow.stats["recall_n"] == 2 * 20


@pytest.mark.parametrize("name,kw", [("rigl", {}), ("faiss_grow", {"metric": "abs_ip", "search": "faiss"})],
                         ids=["rigl", "faiss"])
def test_tensor_code_path_used_on_cuda_gives_the_same_masks_on_cpu(name, kw, monkeypatch):
    # On CUDA host_view returns the tensors themselves and the update indexes them with torch; on CPU it
    # returns numpy views. Forcing the tensor path on CPU must give exactly the same topology here (SET is
    # left out: weights grown on always-zero inputs stay exactly 0, and the two paths break such |w| ties
    # differently, both exactly).
    import sparsebench.dst as dst

    def train(force_tensors):
        if force_tensors:
            monkeypatch.setattr(dst, "host_view", lambda t: t)
        model, masking, counts = sparse_mlp(seed=3)
        upd = DSTUpdater(masking, make_grow(name, **kw), d0=0.2, schedule="cosine", delta_t=2, t_end=1.0,
                         allow_regrow=(name == "rigl"))
        cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=10, device="cpu")
        Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
        assert masking.counts() == {n: (counts[n], w.numel()) for n, w, _ in masking.items()}
        monkeypatch.undo()
        return masking.masks(), upd.changed

    (numpy_masks, c1), (tensor_masks, c2) = train(False), train(True)
    assert c1 == c2 > 0
    for n in numpy_masks:
        assert torch.equal(numpy_masks[n], tensor_masks[n]), n


def test_topk_indices_exclude_on_numpy_and_torch_paths():
    from sparsebench.dst import topk_indices

    gen = torch.Generator().manual_seed(5)
    for N, n in [(50_000, 700), (3000, 40)]:
        s = torch.rand(N, generator=gen)
        ex = (torch.rand(N, generator=gen) < 0.3).float()
        want = set(torch.topk(s.masked_fill(ex.bool(), -1.0), n).indices.tolist())
        got_np = topk_indices(s, n, exclude=ex)  # float32 on CPU: numpy path
        got_np2 = topk_indices(s.numpy(), n, exclude=ex.numpy(), hint={})
        got_t = topk_indices(s.double().to(torch.bfloat16).float(), n, exclude=ex)  # ties possible: check scores
        got_bf = topk_indices(s.to(torch.bfloat16), n, exclude=ex.to(torch.bfloat16))  # no numpy dtype: torch path
        assert set(got_np.tolist()) == want == set(got_np2.tolist())
        for g in (got_t, got_bf):
            assert g.numel() == n and g.unique().numel() == n and torch.all(ex[g] == 0)
        kth = s.to(torch.bfloat16)[list(want)].min()
        assert torch.all(s.to(torch.bfloat16)[got_bf] >= kth)
        with pytest.raises(ValueError, match="not excluded"):
            topk_indices(s, N, exclude=ex)


class _Crash(Callback):
    """Simulates a killed process: raises at step ``at`` (after an epoch checkpoint was written)."""

    def __init__(self, at=None):
        self.at = at

    def on_step_end(self, trainer):
        if self.at is not None and trainer.step == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.parametrize("name,kw", [("rigl", {}), ("set", {}), ("faiss_grow", {"metric": "abs_ip", "search": "faiss"})],
                         ids=["rigl", "set", "faiss"])
def test_dst_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(name, kw, tmp_path):
    # Before the updater kept a state, a resumed run silently stopped updating the topology.
    def run(ckpt, crash_at=None):
        model, masking, counts = sparse_mlp(seed=4)
        upd = DSTUpdater(masking, make_grow(name, **kw), d0=0.3, schedule="cosine", delta_t=3, t_end=0.9)
        cfg = TrainerConfig(lr=0.05, batch_size=64, epochs=3, device="cpu", checkpoint_every=1)
        tr = Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking,
                     callbacks=[upd, _Crash(crash_at)], seed=0, checkpoint=str(ckpt))
        final = tr.fit()
        return final, upd, masking, model

    ref_final, ref_upd, ref_masking, ref_model = run(tmp_path / "ref.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", crash_at=30)  # epoch 2 of 3 (22 steps per epoch)
    final, upd, masking, model = run(tmp_path / "cut.pt")
    assert upd.updates == ref_upd.updates == 19 and upd.changed == ref_upd.changed
    for n in masking.names:
        assert torch.equal(masking.mask(n), ref_masking.mask(n)), n
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert final["test_acc"] == ref_final["test_acc"]


def test_fig31_builder_recall_and_quick_figure_stays_out_of_results(tmp_path):
    # Figure 3.1 builder (calls the searches directly): schema, the toy example's 3 of 4, recall 1 at
    # k_similar = 1 (every pair returned), and in quick mode the figure goes to a temporary file.
    from sparsebench.tables import QUICK_PREFIX, RESULTS, TABLE_COLUMNS, figure_path, load_spec
    from sparsebench.tables.dst import fig31

    spec = load_spec("T001-fig3.1")
    spec.update(scale=f"{QUICK_PREFIX} (test); full: {spec['scale']}", warmup_steps=10, batches=1,
                k_similar=[0.1, 1.0])
    before = (RESULTS / "T001-fig3.1.png").stat().st_mtime_ns if (RESULTS / "T001-fig3.1.png").exists() else None
    t = fig31(spec, None)
    assert set(TABLE_COLUMNS) <= set(t.columns)
    assert float(t[t["layer"] == "toy"]["measured"].iloc[0]) == 0.75
    full = t[(t["layer"] != "toy") & (t["k_similar"] == 1.0)]
    assert len(full) == 3 and (full["measured"] == 1.0).all()
    path = figure_path(spec)
    assert path.parent != RESULTS and path.is_file()
    after = (RESULTS / "T001-fig3.1.png").stat().st_mtime_ns if (RESULTS / "T001-fig3.1.png").exists() else None
    assert after == before
