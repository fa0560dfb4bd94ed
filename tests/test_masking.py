"""Mask invariants: exact densities, pruned weights stay zero through optimizer steps, mask state in checkpoints."""
import pytest
import torch

from sparsebench.sparsity.masking import Masking, global_magnitude_masks, magnitude_masks, num_to_keep, topk_mask
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
    g = global_magnitude_masks(masking, 0.05)
    total = sum(t for _, t in masking.counts().values())
    assert sum(int(m.sum()) for m in g.values()) == round(0.05 * total)


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
