"""Sparsity distributions against hand-computed fixtures; exact global density; `global` is a scope, not a
distribution; a toy distribution registered in a test is selectable by config."""
import math
from dataclasses import dataclass

import pytest
import torch

from sparsebench.api import execute
from sparsebench.sparsity.distributions import (DISTRIBUTIONS, Distribution, layer_counts, layer_densities,
                                                random_masks, solve_densities)
from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking
from sparsebench.models import MLP, WideResNet


def lenet():
    torch.manual_seed(0)
    return Masking(MLP(784, 10, [300, 100]))


def wrn10_1():
    torch.manual_seed(0)
    return Masking(WideResNet(3, 10, depth=10, width=1))


def test_erk_lenet300_100_density_01_hand_computed():
    # N = 235200 + 30000 + 1000 = 266200, target = 26620 active weights.
    # ERK raw density (n_in + n_out) / (n_in n_out); raw * numel = n_in + n_out = 1084, 400, 110.
    # eps = 26620 / (1084 + 400 + 110) = 16.70 -> output layer 0.11 * 16.70 = 1.84 > 1: saturated, dense (1000).
    # re-solve: eps = 25620 / (1084 + 400) = 17.2642 -> 1084 eps = 18714.34, 400 eps = 6905.66 (< numel).
    # largest remainder: floors sum to 25619, the +1 goes to layer 2 (.66 > .34).
    counts = layer_counts(lenet(), 0.1, "erk")
    assert counts == {"layers.0.weight": 18714, "layers.2.weight": 6906, "layers.4.weight": 1000}
    assert sum(counts.values()) == 26620


def test_erk_wrn_saturates_layers_and_resolves_scale():
    # WRN-10-1: sum(shape) per layer (= raw ERK density * numel), kernels included:
    # conv1 25, b0.conv1 38, b0.conv2 38, b1.conv1 54, b1.conv2 70, b1.shortcut 50, b2.conv1 102,
    # b2.conv2 134, b2.shortcut 98, fc 74; sum 683; N = 77360, density 0.1 -> 7736.
    # eps = 7736/683 = 11.33: fc (0.1156 eps = 1.31) and b1.shortcut (0.0977 eps = 1.11) saturate.
    # re-solve: eps = (7736 - 640 - 512) / (683 - 74 - 50) = 6584 / 559 = 11.7782, nothing else saturates.
    # 25 eps = 294.45, 38 eps = 447.57, 54 eps = 636.02, 70 eps = 824.47, 102 eps = 1201.37,
    # 134 eps = 1578.28, 98 eps = 1154.26; floors sum to 6581, +1 to the three largest remainders
    # (b0.conv1 .57, b0.conv2 .57, b1.conv2 .47).
    counts = layer_counts(wrn10_1(), 0.1, "erk")
    assert counts == {"conv1.weight": 294, "blocks.0.conv1.weight": 448, "blocks.0.conv2.weight": 448,
                      "blocks.1.conv1.weight": 636, "blocks.1.conv2.weight": 825, "blocks.1.shortcut.weight": 512,
                      "blocks.2.conv1.weight": 1201, "blocks.2.conv2.weight": 1578,
                      "blocks.2.shortcut.weight": 1154, "fc.weight": 640}
    # density 0.3: conv1, b1.shortcut, b2.shortcut and fc saturate; eps = 19576 / 436 = 44.899
    c3 = layer_counts(wrn10_1(), 0.3, "erk")
    dense = {n for n, c in c3.items() if c == wrn10_1().weight(n).numel()}
    assert dense == {"conv1.weight", "blocks.1.shortcut.weight", "blocks.2.shortcut.weight", "fc.weight"}
    assert c3["blocks.1.conv2.weight"] == 3143 and c3["blocks.2.conv2.weight"] == 6016
    assert c3["blocks.1.conv1.weight"] == 2425 and c3["blocks.2.conv1.weight"] == 4580


def test_er_ignores_kernel_dims_and_uniform_plus_constraints():
    mk = wrn10_1()
    er = layer_densities(mk, 0.05, "er")
    erk = layer_densities(mk, 0.05, "erk")
    # ER uses (n_in + n_out)/(n_in n_out) only, so a 3x3 conv and a 1x1 shortcut with the same
    # channels (16 -> 32) get the same density; ERK adds the kernel dims: (32+16+2)/512 vs (32+16+6)/4608
    assert er["blocks.1.conv1.weight"] == pytest.approx(er["blocks.1.shortcut.weight"], abs=1e-3)
    assert erk["blocks.1.shortcut.weight"] > 5 * erk["blocks.1.conv1.weight"]
    # uniform+ at 0.9: first layer dense (235200), output 0.9 * 1000 = 900, layer 2 gets the rest:
    # 239580 - 236100 = 3480 of 30000
    up = layer_counts(lenet(), 0.9, "uniform+")
    assert up == {"layers.0.weight": 235200, "layers.2.weight": 3480, "layers.4.weight": 900}


def test_uniform_plus_infeasible_raises_config_error():
    # first layer alone (235200 of 266200 weights) exceeds a 10% budget
    with pytest.raises(ConfigError, match="method.density"):
        layer_counts(lenet(), 0.1, "uniform+")


@pytest.mark.parametrize("dist", ["uniform", "er", "erk", "erk+", "snip_ratio"])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.0317, 0.005])
def test_realised_global_density_exact_to_one_weight(dist, density):
    for mk in (lenet(), wrn10_1()):
        total = sum(w.numel() for _, w, _ in mk.items())
        scores = {n: torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) for n, w, _ in mk.items()}
        if dist == "erk+" and mk.weight(mk.output_layer).numel() > round(density * total):
            with pytest.raises(ConfigError, match="method.density"):  # dense output layer alone is over budget
                layer_counts(mk, density, dist)
            continue
        counts = layer_counts(mk, density, dist, scores=scores)
        assert sum(counts.values()) == round(density * total)
        masks = random_masks(mk, counts, torch.Generator().manual_seed(0))
        mk.set_masks(masks)
        assert abs(mk.density() * total - density * total) <= 1.0
        for n, w, m in mk.items():
            assert int(m.sum()) == counts[n] <= w.numel()


def test_erk_beats_uniform_on_small_layers_and_erk_plus_keeps_output_dense():
    u = layer_densities(lenet(), 0.05, "uniform")
    e = layer_densities(lenet(), 0.05, "erk")
    ep = layer_densities(lenet(), 0.05, "erk+")
    assert all(abs(d - 0.05) < 1e-3 for d in u.values())
    assert e["layers.0.weight"] < 0.05 < e["layers.2.weight"] < e["layers.4.weight"]
    assert ep["layers.4.weight"] == 1.0


def test_dense_patterns_and_snip_ratio():
    mk = lenet()
    c = layer_counts(mk, 0.2, "erk", dense=["layers.2.*"])
    assert c["layers.2.weight"] == 30000 and sum(c.values()) == round(0.2 * 266200)
    # snip_ratio: per-layer densities of the global top-k of the scores
    scores = {"layers.0.weight": torch.zeros(300, 784), "layers.2.weight": torch.ones(100, 300),
              "layers.4.weight": torch.full((10, 100), 2.0)}
    sr = layer_counts(mk, 0.2, "snip_ratio", scores=scores)
    assert sr == {"layers.0.weight": 53240 - 31000, "layers.2.weight": 30000, "layers.4.weight": 1000}
    with pytest.raises(ConfigError, match="snip_ratio"):
        layer_counts(mk, 0.2, "snip_ratio")


def test_bad_distribution_and_density_raise():
    with pytest.raises(ConfigError, match=r"^method.distribution='nope': unknown"):
        layer_counts(lenet(), 0.1, "nope")
    with pytest.raises(ConfigError, match="method.density"):
        layer_counts(lenet(), 1.5, "erk")
    assert set(DISTRIBUTIONS.names()) >= {"uniform", "uniform+", "er", "erk", "erk+", "snip_ratio"}
    assert "global" not in DISTRIBUTIONS
    assert math.isclose(sum(layer_counts(lenet(), 1.0, "erk").values()), 266200)
    with pytest.raises(TypeError, match="erk_power"):  # a parameter no distribution declares (typo)
        layer_counts(lenet(), 0.1, "erk", erk_power=2.0)


def test_distribution_parameters_are_their_own():
    # erk_power_scale 0 flattens ERK's raw ratio to 1 for every layer: uniform; uniform ignores it
    assert layer_counts(lenet(), 0.3, "erk", erk_power_scale=1e-12) == layer_counts(lenet(), 0.3, "uniform")
    assert layer_counts(lenet(), 0.9, "uniform", erk_power_scale=3.0) == layer_counts(lenet(), 0.9, "uniform")
    # uniform+'s output-layer floor: at density 0.9 the output layer sits at max(0.9, floor)
    up = layer_counts(lenet(), 0.9, "uniform+", output_floor=0.95)
    assert up["layers.4.weight"] == 950 and up["layers.0.weight"] == 235200


def test_global_distribution_is_a_one_line_config_error(compose_cfg):
    for method in ("random_prune", "static_sparse"):
        with pytest.raises(ConfigError) as err:
            execute(compose_cfg("method=" + method, "method.distribution=global"), quiet=True)
        msg = str(err.value)
        assert msg.startswith("method.distribution='global'") and "method.scope" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"^method.distribution='global'.*selection scope"):
        layer_counts(lenet(), 0.1, "global")


@dataclass
class FirstLayerHeavy(Distribution):
    """Toy: the first layer gets ``weight`` times the raw density of the others."""

    weight: float = 4.0

    def densities(self, masking, density, fixed, target):
        numel = {n: w.numel() for n, w, _ in masking.items()}
        raw = {n: self.weight if i == 0 else 1.0 for i, n in enumerate(numel)}
        return solve_densities(numel, raw, target, fixed)


def test_toy_distribution_registered_in_a_test_is_selectable_by_config(compose_cfg):
    DISTRIBUTIONS.register("toy_first_heavy")(FirstLayerHeavy)
    try:
        df = execute(compose_cfg("method=random_prune", "method.distribution=toy_first_heavy", "method.density=0.2",
                                 "trainer.epochs=1", "trainer.device=cpu", "model.hidden=[32]"), quiet=True)
    finally:
        for table in (DISTRIBUTIONS._entries, DISTRIBUTIONS._schemas, getattr(DISTRIBUTIONS, "_meta", {})):
            table.pop("toy_first_heavy", None)
    assert df["distribution"][0] == "toy_first_heavy"
    assert df["density"][0] == pytest.approx(0.2, abs=1e-3)
    assert df["density/layers.0.weight"][0] == pytest.approx(4 * df["density/layers.2.weight"][0], rel=0.02)
