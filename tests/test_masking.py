"""Mask invariants: exact densities, pruned weights stay zero through optimizer steps, mask state in checkpoints,
the one layer-wise / global top-k selection and the neuron accounting."""
import pytest
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking, neuron_accounting
from sparsebench.sparsity.selection import (SCOPES, global_topk_masks, magnitude_masks, num_to_keep, select_masks,
                                          topk_mask)
from sparsebench.models import MLP, WideResNet


def test_topk_mask_exact_count_even_with_ties():
    scores = torch.zeros(7, 9)  # all tied
    for k in (0, 1, 17, 63):
        assert int(topk_mask(scores, k).sum()) == k


def test_prunable_layers_and_exclusions():
    m = WideResNet(1, 10, depth=10, width=1)
    names = Masking(m).names
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert all(not n.startswith("bn") for n in names)
    assert "conv1.weight" not in Masking(WideResNet(1, 10, 10, 1), exclude=["conv1.*"]).names


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_masked_weights_stay_zero_after_optimizer_steps(opt):
    torch.manual_seed(0)
    model = MLP(20, 3, [16, 8])
    masking = Masking(model)
    masking.set_masks(magnitude_masks(masking, {n: 0.3 for n in masking.names}))
    optim = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2) if opt == "sgd"
             else torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=1e-2))
    masking.attach(optim)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    for _ in range(5):
        optim.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optim.step()
    for name, w, mask in masking.items():
        assert torch.all(w[mask == 0] == 0), name
        assert torch.any(w[mask == 1] != 0), name
    # without the hooks the dense gradient revives pruned weights: the check above can fail
    masking.detach()
    optim.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optim.step()
    assert any(torch.any(w[mask == 0] != 0) for _, w, mask in masking.items())


def test_layerwise_and_global_magnitude_densities_are_exact():
    torch.manual_seed(1)
    model = MLP(784, 10, [300, 100])
    masking = Masking(model)
    masking.set_masks(magnitude_masks(masking, {n: 0.2 for n in masking.names}))
    for name, (active, total) in masking.counts().items():
        assert active == num_to_keep(total, 0.2)
    # the smallest kept magnitude is >= the largest pruned one, per layer
    for name, w, mask in masking.items():
        assert w[mask == 1].abs().min() >= w[mask == 0].abs().max() if (mask == 0).any() else True
    g = magnitude_masks(masking, 0.05, scope="global")
    total = sum(t for _, t in masking.counts().values())
    assert sum(int(m.sum()) for m in g.values()) == round(0.05 * total)
    # global: one ranking over all layers; only weights active before can survive
    kept = torch.cat([w.detach().abs()[g[n] > 0] for n, w, _ in masking.items()])
    dropped = torch.cat([w.detach().abs()[(g[n] == 0) & (m > 0)] for n, w, m in masking.items()])
    assert kept.min() >= dropped.max()
    assert all(bool((g[n] <= m).all()) for n, _, m in masking.items())


def test_masks_are_saved_with_the_model_state():
    model = MLP(10, 2, [5])
    masking = Masking(model)
    masking.set_masks(magnitude_masks(masking, {n: 0.5 for n in masking.names}))
    state = model.state_dict()
    assert "layers.0.weight_mask" in state
    fresh = MLP(10, 2, [5])
    fm = Masking(fresh)
    fresh.load_state_dict(state)
    assert fm.counts() == masking.counts()


def test_dead_units_counts_unconnected_neurons():
    model = MLP(4, 2, [3])
    masking = Masking(model)
    mask = torch.ones(3, 4)
    mask[1] = 0  # hidden unit 1 has no incoming connection
    masking.set_mask("layers.0.weight", mask)
    assert masking.dead_units()["layers.0.weight"]["no_incoming"] == 1


def test_global_topk_splits_one_ranking_and_scopes_are_a_registry():
    scores = {"a": torch.tensor([[5.0, 1.0], [0.0, 3.0]]), "b": torch.tensor([4.0, 2.0, 6.0])}
    masks = global_topk_masks(scores, 3)
    assert masks["a"].tolist() == [[1.0, 0.0], [0.0, 0.0]] and masks["b"].tolist() == [1.0, 0.0, 1.0]
    assert set(SCOPES.names()) == {"layer", "global"}
    mk = Masking(MLP(6, 2, [4]))
    with pytest.raises(ConfigError, match="^method.scope='layerwise': unknown"):
        select_masks(mk, {n: w.abs() for n, w, _ in mk.items()}, 0.5, scope="layerwise")
    with pytest.raises(ConfigError, match="method.density"):  # the dense layer alone exceeds the budget
        select_masks(mk, {n: w.abs() for n, w, _ in mk.items()}, 0.2, scope="global", dense=["layers.0.weight"])


def test_neuron_accounting_hand_fixture():
    model = MLP(4, 2, [3])
    mk = Masking(model)
    m0 = torch.ones(3, 4)
    m0[1] = 0  # hidden unit 1: no incoming connection
    m0[:, 2] = 0  # input 2: no outgoing connection
    m1 = torch.ones(2, 3)
    m1[:, 2] = 0  # hidden unit 2: no outgoing connection
    mk.set_masks({"layers.0.weight": m0, "layers.2.weight": m1})
    acc = neuron_accounting(mk)
    assert acc["units_no_in/layers.0.weight"] == pytest.approx(1 / 3)
    assert acc["units_no_out/layers.0.weight"] == pytest.approx(1 / 4)
    assert acc["units_no_out/layers.2.weight"] == pytest.approx(1 / 3)
    assert acc["hidden_dead/layers.0.weight"] == pytest.approx(2 / 3)  # units 1 and 2
    assert acc["hidden_dead_all"] == pytest.approx(2 / 3)
    dead = mk.dead_units()  # the same accounting as counts
    assert dead["layers.0.weight"] == {"no_incoming": 1, "no_outgoing": 1, "units": 3}
    assert dead["layers.2.weight"]["no_outgoing"] == 1
