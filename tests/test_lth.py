"""Lottery-ticket IMP: per-layer densities after each round, exact rewinding, Algorithm 1 schedule."""
import pandas as pd
import pytest
import torch

from sparsebench.api import execute
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import num_to_keep
from sparsebench.methods.lottery import LthImpConfig, RewindCapture, imp_round_densities, imp_round_target, rewind
from sparsebench.models import MLP


def _expected_counts(total, rounds, rate):
    active = total
    for _ in range(rounds):
        active = num_to_keep(active, 1 - rate)
    return active


def test_imp_densities_exact_per_layer_each_round(compose_cfg):
    cfg = compose_cfg("method.rounds=3", "trainer.epochs=1", "dataset=digits", "model.hidden=[32,16]")
    df = execute(cfg, quiet=True)
    run_dir = cfg.out_dir + "/" + df["run_id"][0]
    assert list(df["round"]) == [0, 1, 2, 3]
    # rebuild expected per-layer counts: hidden layers 20% / round, output 10% / round
    sizes = {"layers.0.weight": 64 * 32, "layers.2.weight": 32 * 16, "layers.4.weight": 16 * 10}
    for rnd in range(4):
        exp = {n: _expected_counts(t, rnd, 0.1 if n == "layers.4.weight" else 0.2) for n, t in sizes.items()}
        assert df["density"][rnd] == pytest.approx(sum(exp.values()) / sum(sizes.values()), abs=1e-12)
    assert (pd.read_csv(f"{run_dir}/metrics.csv")["name"] == "round3/test_acc").any()


def test_imp_round_densities_per_layer_and_algorithm1():
    torch.manual_seed(0)
    masking = Masking(MLP(64, 10, [32]))
    dens = imp_round_densities(masking, LthImpConfig())
    assert dens["layers.0.weight"] == num_to_keep(64 * 32, 0.8) / (64 * 32)
    assert dens["layers.2.weight"] == num_to_keep(320, 0.9) / 320
    alg1 = LthImpConfig(rounds=4, target_density=0.0625)
    d = imp_round_densities(masking, alg1)  # keeps 0.0625 ** (1/4) = 0.5 per round
    assert d["layers.0.weight"] == 0.5 and d["layers.2.weight"] == 0.5
    assert imp_round_target(masking, alg1) == d  # scope=layer: per-layer densities
    assert imp_round_target(masking, LthImpConfig(scope="global")) == pytest.approx(0.8)  # one rate overall


def test_rewinding_restores_saved_weights_exactly():
    torch.manual_seed(0)
    model = MLP(8, 3, [6])
    masking = Masking(model)

    class T:  # minimal trainer stand-in
        step = 0
    T.model = model
    cap = RewindCapture(0)
    cap.on_train_start(T)
    saved = {k: v.clone() for k, v in cap.weights.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mask = (torch.rand(6, 8) > 0.5).float()
    masking.set_mask("layers.0.weight", mask)
    rewind(model, masking, cap.weights)
    assert torch.equal(model.layers[0].weight, saved["layers.0.weight"] * mask)
    assert torch.equal(model.layers[2].weight, saved["layers.2.weight"])
    assert torch.equal(model.layers[0].bias, saved["layers.0.bias"])
    assert torch.equal(masking.mask("layers.0.weight"), mask)  # the mask is not rewound


def test_late_rewinding_captures_step_k(compose_cfg):
    cfg = compose_cfg("method.rounds=1", "method.rewind_step=5", "trainer.iterations=20", "model.hidden=[16]")
    df = execute(cfg, quiet=True)
    assert df["steps"].tolist() == [20, 20]  # round 1 resumes the schedule at step 5 and ends at 20


def test_reinit_control_adds_columns(compose_cfg):
    df = execute(compose_cfg("method.rounds=1", "method.reinit_control=true", "trainer.epochs=1",
                             "model.hidden=[16]"), quiet=True)
    assert "reinit_test_acc" in df.columns and df["reinit_test_acc"].notna().sum() == 1


def test_global_scope_imp_and_bad_scope(compose_cfg):
    from sparsebench.core.errors import ConfigError

    df = execute(compose_cfg("method.rounds=2", "method.scope=global", "trainer.epochs=1", "model.hidden=[16]"),
                 quiet=True)
    total = 64 * 16 + 16 * 10
    for rnd, want in ((1, round(0.8 * total)), (2, round(0.8 * round(0.8 * total)))):
        assert round(df["density"][rnd] * total) == want  # 20% of the remaining weights, network-wide
    with pytest.raises(ConfigError, match="^method.scope='layerwise': unknown"):
        execute(compose_cfg("method.scope=layerwise"), quiet=True)
