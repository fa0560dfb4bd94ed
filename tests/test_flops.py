"""FLOPs relative to the dense model (sparsebench.sparsity.flops; Evci et al. 2020, Appendix H)."""
import pytest
import torch

from sparsebench.api import execute
from sparsebench.config.schemas import ModelConfig
from sparsebench.models import build_model
from sparsebench.sparsity.distributions import layer_counts, random_masks
from sparsebench.sparsity.flops import dense_flops, flops_columns, inference_flops_rel, train_flops_rel
from sparsebench.sparsity.masking import Masking

DIGITS = ("dataset=digits", "trainer.epochs=1", "trainer.device=cpu", "model.hidden=[64,32]")


def _lenet() -> Masking:
    return Masking(build_model(ModelConfig(name="lenet", hidden=[300, 100]), (784,), 10))


def test_dense_model_counts_its_matmuls_and_is_one():
    masking = _lenet()
    total, per_layer = dense_flops(masking, (784,))
    assert per_layer == {"layers.0.weight": 2 * 784 * 300, "layers.2.weight": 2 * 300 * 100,
                         "layers.4.weight": 2 * 100 * 10}
    assert total == sum(per_layer.values())
    assert flops_columns(masking, (784,)) == {"inference_flops_rel": 1.0, "train_flops_rel": 1.0}
    assert flops_columns(None, ()) == {"inference_flops_rel": 1.0, "train_flops_rel": 1.0}


def test_uniform_ten_percent_mlp_is_about_a_tenth():
    masking = _lenet()
    masking.set_masks(random_masks(masking, layer_counts(masking, 0.1, "uniform"), torch.Generator().manual_seed(0)))
    rel = inference_flops_rel(masking, (784,))
    # FlopCounterMode counts the weighted layers only (bias adds and ReLU are 0 FLOPs), so the bias /
    # activation share is zero here and the ratio is the FLOP-weighted density, 0.1 to a weight.
    assert rel == pytest.approx(0.1, abs=1e-4)
    assert train_flops_rel(rel) == pytest.approx(rel)


def test_non_uniform_density_is_weighted_by_each_layers_flops():
    masking = _lenet()
    masks = {n: torch.zeros_like(m) for n, _, m in masking.items()}
    masks["layers.0.weight"].view(-1)[: 784 * 300 // 2] = 1  # first layer half dense, others empty
    masking.set_masks(masks)
    total, per_layer = dense_flops(masking, (784,))
    assert inference_flops_rel(masking, (784,)) == pytest.approx(0.5 * per_layer["layers.0.weight"] / total)


def test_rigl_dense_gradients_cost_less_the_larger_delta_t():
    s = 0.1
    costs = [train_flops_rel(s, dt) for dt in (1, 10, 100, 1000)]
    assert all(a > b for a, b in zip(costs, costs[1:]))  # larger ΔT -> closer to static
    assert all(c > s for c in costs)
    assert costs[-1] == pytest.approx(s, abs=1e-3)
    # Evci et al. 2020, Appendix H: (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) over 3 f_D
    assert train_flops_rel(s, 100) == pytest.approx((3 * s * 100 + 2 * s + 1) / (3 * 101))
    # after T_end the mask is fixed: only the first t_end of training pays the dense gradients
    assert train_flops_rel(s, 100, t_end=0.75) == pytest.approx(0.75 * train_flops_rel(s, 100) + 0.25 * s)
    assert train_flops_rel(s, 100, t_end=0.0) == pytest.approx(s)
    with pytest.raises(ValueError):
        train_flops_rel(s, 0)


def test_every_run_summary_has_both_columns(compose_cfg):
    dense = execute(compose_cfg(*DIGITS, "method=dense"), quiet=True)
    assert dense["inference_flops_rel"].tolist() == [1.0] and dense["train_flops_rel"].tolist() == [1.0]
    static = execute(compose_cfg(*DIGITS, "method=static_sparse", "method.density=0.2",
                                 "method.distribution=uniform"), quiet=True)
    rigl = execute(compose_cfg(*DIGITS, "method=rigl", "method.density=0.2", "method.distribution=uniform",
                               "method.delta_t=2"), quiet=True)
    s = float(static["inference_flops_rel"].iloc[0])
    assert s == pytest.approx(0.2, abs=0.01)
    assert float(static["train_flops_rel"].iloc[0]) == pytest.approx(s)
    r_inf, r_train = float(rigl["inference_flops_rel"].iloc[0]), float(rigl["train_flops_rel"].iloc[0])
    assert r_inf == pytest.approx(s, abs=0.01)
    assert r_train == pytest.approx(train_flops_rel(r_inf, 2, 0.75))
    assert r_train > r_inf


def test_t001_builders_show_the_flops_columns():
    import pandas as pd

    from sparsebench.tables.builders.t001 import compare_table, thesis_table
    from sparsebench.tables.spec import Cell

    spec = {"id": "T", "dataset_used": "digits", "scale": "quick"}
    fixed = Cell(0, "fixed", [], {"method": "static_sparse", "method.density": 0.1}, {}, {"role": "fixed"})
    dst = Cell(1, "rigl", [], {"method": "rigl", "method.density": 0.1, "method.delta_t": 100}, {}, {})
    runs = pd.DataFrame({"cell": [0, 1], "seed": [0, 0], "test_acc": [0.9, 0.91], "train_seconds": [1.0, 1.2],
                         "time_per_epoch": [1.0, 1.2], "density": [0.1, 0.1],
                         "inference_flops_rel": [0.1, 0.1], "train_flops_rel": [0.1, 0.11]})
    for out in (thesis_table({**spec, "cells": [fixed, dst]}, runs), compare_table({**spec, "cells": [fixed, dst]}, runs)):
        acc = out[out["metric"] == "acc"].set_index("setting")
        assert acc.loc["rigl", "train_flops_rel"] == pytest.approx(0.11)
        assert acc.loc["fixed", "inference_flops_rel"] == pytest.approx(0.1)
    old = runs.drop(columns=["inference_flops_rel", "train_flops_rel"])  # runs made before the columns
    assert thesis_table({**spec, "cells": [fixed, dst]}, old)["train_flops_rel"].isna().all()
