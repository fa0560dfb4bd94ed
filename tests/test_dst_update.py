"""Dynamic sparse training, the topology update: exact density, grown weights and optimizer state at zero,
masked weights at zero, schedules, update steps, regrowth, the CUDA (tensor) code path, resume."""
import math

import pytest
import torch
import torch.nn.functional as F

from dst_helpers import Check, digits_bundle, make_grow, sparse_mlp
from sparsebench.config import TrainerConfig
from sparsebench.data import DataBundle, Split
from sparsebench.dst.schedules import ConstantDrop, CosineDrop
from sparsebench.dst.updater import DSTUpdater
from sparsebench.models import WideResNet
from sparsebench.sparsity.distributions import layer_counts, random_masks
from sparsebench.sparsity.masking import Masking
from sparsebench.training.trainer import Callback, Trainer

torch.set_num_threads(1)



GROWS = [("random", {}), ("gradient", {}), ("similarity", {"metric": "abs_ip", "search": "faiss"}),
         ("similarity", {"metric": "abs_ip", "search": "brute"}), ("similarity", {"metric": "l2", "search": "faiss"}),
         ("similarity", {"metric": "lsh", "search": "faiss", "bits": 1.0})]


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


@pytest.mark.parametrize("name,kw", GROWS[:3], ids=["random", "gradient", "similarity"])
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
    upd = DSTUpdater(masking, make_grow("random"), d0=0.3, delta_t=5, t_end=0.5)

    class T:
        step, total_steps = 0, 40

    upd.on_train_start(T())
    assert [s for s in range(40) if upd.is_update_step(s)] == [4, 9, 14, 19]



def test_similarity_grow_updates_conv_layers_of_a_wrn():
    torch.manual_seed(0)
    model = WideResNet(1, 10, depth=10, width=1)
    masking = Masking(model)
    counts = layer_counts(masking, 0.3, "erk")
    masking.set_masks(random_masks(masking, counts, torch.Generator().manual_seed(0)))
    x = torch.randn(96, 1, 12, 12)
    y = torch.randint(0, 10, (96,))
    data = DataBundle(name="noise", train=Split(x, y), val=Split(x[:16], y[:16]), test=Split(x[:16], y[:16]), num_classes=10,
                      kind="image")
    upd = DSTUpdater(masking, make_grow("similarity", metric="abs_ip", search="faiss"), d0=0.1,
                     schedule="constant", delta_t=1, t_end=1.0, update_layers=["*conv*", "*shortcut*"])
    cfg = TrainerConfig(lr=0.05, batch_size=32, iterations=3, device="cpu")
    Trainer(cfg, model, data, torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
    assert "fc.weight" not in upd.names and "blocks.0.conv1.weight" in upd.names
    assert upd.updates == 3 and upd.summary()["random_fill"] < upd.changed
    assert {n: a for n, (a, _) in masking.counts().items()} == counts



def test_allow_regrow_keeps_density_and_may_regrow_dropped_positions():
    model, masking, counts = sparse_mlp(seed=2)
    upd = DSTUpdater(masking, make_grow("gradient"), d0=0.5, schedule="constant", delta_t=1, t_end=1.0, allow_regrow=True)
    check = Check(masking)
    cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=5, device="cpu")
    Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd, check]).fit()
    assert all(h == counts for h in check.history)
    for n, w, m in masking.items():
        assert torch.all(w[m == 0] == 0)
        assert sorted(upd.active_idx[n].tolist()) == m.reshape(-1).nonzero().squeeze(1).tolist()



@pytest.mark.parametrize("name,kw", [("gradient", {}), ("similarity", {"metric": "abs_ip", "search": "faiss"})],
                         ids=["gradient", "similarity"])
def test_tensor_code_path_used_on_cuda_gives_the_same_masks_on_cpu(name, kw, monkeypatch):
    # On CUDA host_view returns the tensors themselves and the update indexes them with torch; on CPU it
    # returns numpy views. Forcing the tensor path on CPU must give exactly the same topology here (SET is
    # left out: weights grown on always-zero inputs stay exactly 0, and the two paths break such |w| ties
    # differently, both exactly).
    from sparsebench.dst import search, selection, updater

    def train(force_tensors):
        if force_tensors:
            for mod in (search, selection, updater):
                monkeypatch.setattr(mod, "host_view", lambda t: t)
        model, masking, counts = sparse_mlp(seed=3)
        upd = DSTUpdater(masking, make_grow(name, **kw), d0=0.2, schedule="cosine", delta_t=2, t_end=1.0,
                         allow_regrow=(name == "gradient"))
        cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=10, device="cpu")
        Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
        assert masking.counts() == {n: (counts[n], w.numel()) for n, w, _ in masking.items()}
        monkeypatch.undo()
        return masking.masks(), upd.changed

    (numpy_masks, c1), (tensor_masks, c2) = train(False), train(True)
    assert c1 == c2 > 0
    for n in numpy_masks:
        assert torch.equal(numpy_masks[n], tensor_masks[n]), n



class _Crash(Callback):
    """Simulates a killed process: raises at step ``at`` (after an epoch checkpoint was written)."""

    def __init__(self, at=None):
        self.at = at

    def on_step_end(self, trainer):
        if self.at is not None and trainer.step == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.parametrize("name,kw", [("gradient", {}), ("random", {}), ("similarity", {"metric": "abs_ip", "search": "faiss"})],
                         ids=["gradient", "random", "similarity"])
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
