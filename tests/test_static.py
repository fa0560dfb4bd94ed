"""Pruning at init (random pruning under distributions, SNIP), randomized strategies (000), IMP with neuron
accounting, and the T003 / T000 tables as quick smoke tests on real MNIST."""
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.api import execute
from sparsebench.sparsity.distributions import layer_counts
from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.scores import SnipScore
from sparsebench.sparsity.selection import select_masks
from sparsebench.methods.post_training import RandomizedPruneConfig
from sparsebench.sparsity.randomized import PRUNE_STRATEGIES
from sparsebench.models import MLP
from sparsebench.tables.runner import run_cells
from sparsebench.tables.schema import TABLE_COLUMNS, write_table
from sparsebench.tables.spec import describe, get_builder, load_spec, mode_cells

DIGITS = ("dataset=digits", "trainer.epochs=1", "trainer.device=cpu", "model.hidden=[64,32]")


def test_random_prune_erk_exact_density_and_fixed_mask(compose_cfg):
    df = execute(compose_cfg(*DIGITS, "method=random_prune", "method.distribution=erk", "method.density=0.2"),
                 quiet=True)
    total = 64 * 64 + 64 * 32 + 32 * 10
    assert abs(df["density"][0] * total - 0.2 * total) <= 1.0  # realised = target to one weight after training
    torch.manual_seed(0)
    counts = layer_counts(Masking(MLP(64, 10, [64, 32])), 0.2, "erk")
    for name, n in counts.items():
        assert df[f"density/{name}"][0] * Masking(MLP(64, 10, [64, 32])).weight(name).numel() == pytest.approx(n)
    assert df["density/layers.4.weight"][0] > df["density/layers.0.weight"][0]  # ERK: small layers denser


def test_random_prune_bad_distribution_is_config_error(compose_cfg):
    with pytest.raises(ConfigError, match="^method.distribution='erx': unknown"):
        execute(compose_cfg(*DIGITS, "method=random_prune", "method.distribution=erx"), quiet=True)


def test_snip_scores_are_abs_w_times_grad_and_topk_is_global():
    torch.manual_seed(0)
    model = MLP(8, 3, [5])
    mk = Masking(model)
    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    loss_fn = torch.nn.functional.cross_entropy
    s = SnipScore(model, x, y, loss_fn, batches=1, batch_size=20)(mk)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    for n, w, _ in mk.items():
        assert torch.allclose(s[n], (w * w.grad).abs())
        assert w.grad is not None
    masks = select_masks(mk, s, 0.3, scope="global")
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    flat = torch.cat([s[n].reshape(-1) for n in mk.names])
    assert int(kept.sum()) == round(0.3 * flat.numel())
    assert flat[kept > 0].min() >= flat[kept == 0].max()  # the global top-k
    masks = select_masks(mk, s, 0.5, scope="global", dense=["layers.2.weight"])
    assert bool(masks["layers.2.weight"].all())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * flat.numel())


def test_snip_ratio_distribution_takes_snip_layer_densities_with_random_positions(compose_cfg):
    a = execute(compose_cfg(*DIGITS, "method=snip", "method.density=0.1"), quiet=True)
    b = execute(compose_cfg(*DIGITS, "method=random_prune", "method.distribution=snip_ratio", "method.density=0.1"),
                quiet=True)
    for n in ("layers.0.weight", "layers.2.weight", "layers.4.weight"):
        assert a[f"density/{n}"][0] == pytest.approx(b[f"density/{n}"][0])
    assert a["density"][0] == pytest.approx(0.1, abs=1e-4)


def _cfg(**kw):
    return OmegaConf.structured(RandomizedPruneConfig(**kw))


def test_randomized_strategies_counts_and_bias():
    torch.manual_seed(0)
    w = torch.randn(40, 50)
    gen = torch.Generator().manual_seed(0)
    cfg = _cfg(fraction=0.5, random_part=0.5, temperature=0.5)
    thr = PRUNE_STRATEGIES.get("threshold")().mask(w, cfg, gen)
    assert int((thr == 0).sum()) == 1000 and w.abs()[thr == 0].max() <= w.abs()[thr == 1].min()
    rnd = PRUNE_STRATEGIES.get("random")().mask(w, cfg, gen)
    assert int((rnd == 0).sum()) == 1000
    iw = PRUNE_STRATEGIES.get("importance_random")().mask(w, cfg, gen)
    assert int((iw == 0).sum()) == 1000
    # probability of pruning falls with |w|: pruned weights are smaller on average than under random
    assert w.abs()[iw == 0].mean() < w.abs()[rnd == 0].mean() - 0.1
    frt = PRUNE_STRATEGIES.get("fractional_threshold")().mask(w, cfg, gen)
    assert int((frt == 0).sum()) == 1000  # the same count as every strategy (candidate rules: test_randomized_prune)


def test_randomized_prune_method_rows_and_bad_layer(compose_cfg):
    df = execute(compose_cfg(*DIGITS, "method=randomized_prune", "method.layer=layers.4.weight",
                             "method.draws=2"), quiet=True)
    assert list(df["strategy"]) == ["none", "threshold", "random", "importance_random", "fractional_threshold"]
    assert list(df["pruned"]) == [0, 160, 160, 160, 160]  # every strategy removes the same number
    assert list(df["draws"]) == [1, 1, 2, 2, 2]  # deterministic strategies are drawn once
    assert df["test_acc"][0] == pytest.approx(df["dense_test_acc"][0])
    with pytest.raises(ConfigError, match="method.layer"):
        execute(compose_cfg(*DIGITS, "method=randomized_prune", "method.layer=nope*"), quiet=True)


def test_lth_imp_neurons_rows_carry_accounting(compose_cfg):
    cfg = compose_cfg(*DIGITS, "method=lth_imp_neurons", "method.rounds=2", "method.target_density=0.05")
    df = execute(cfg, quiet=True)
    assert list(df["round"]) == [0, 1, 2]
    assert "hidden_dead/layers.0.weight" in df and df["hidden_dead_all"][0] == 0.0
    assert df["density/layers.0.weight"][2] == pytest.approx(0.05, abs=0.01)
    metrics = pd.read_csv(f"{cfg.out_dir}/{df['run_id'][0]}/metrics.csv")
    assert (metrics["name"] == "round2/hidden_dead_all").any()


def quick_table(table_id, tmp_path, sweep=None, runs=None):
    """The quick smoke test of a table (seed 0) through the tables runner, optionally with a row's sweep
    narrowed (``sweep={key: [values]}`` replaces those keys in every row that sweeps them), or with given
    runs. Returns (table, runs)."""
    spec = load_spec(table_id)
    if sweep:
        spec["rows"] = [{**r, "sweep": {**r["sweep"], **{k: v for k, v in sweep.items() if k in r["sweep"]}}}
                        if r.get("sweep") else r for r in spec["rows"]]
    spec = {**describe(spec, "quick"), "cells": mode_cells(spec, "quick")}
    if runs is None:
        runs, failed = run_cells(spec, "quick", seeds=[0], say=lambda _: None)
        assert not failed, failed
    table = get_builder(spec)(spec, runs)
    path = write_table(table, table_id, tmp_path)
    return pd.read_csv(path), runs


def test_t003_tables_quick(mnist_root, out_dir, tmp_path):
    t, runs = quick_table("T003-random", tmp_path, sweep={"method.density": [0.125]})
    assert set(TABLE_COLUMNS) <= set(t.columns) and "ordering_holds" in t
    assert set(runs["distribution"].dropna()) == {"uniform", "erk", "snip_ratio"}  # the summary-row column
    assert (runs[runs["method"] == "random_prune"]["target_density"] == 0.125).all()
    assert (t["dataset_used"].str.contains("mnist")).all()
    n, _ = quick_table("T003-neurons", tmp_path)
    assert {"hidden_dead", "units_no_in", "units_no_out"} <= set(n["metric"]) and "ordering_holds" in n


def test_t000_random_prune_quick(mnist_root, out_dir, tmp_path):
    t, _ = quick_table("T000-random-prune", tmp_path)
    assert t["setting"].iloc[0] == "none"
    assert sorted(t["reported"].dropna().tolist()) == sorted([0.8768, 0.8663, 0.6456, 0.7806, 0.8747])
    assert "ordering_holds" in t and "test" in t
    pruned = t[t["strategy"] != "none"].groupby(["layer_choice", "fraction"])["pruned"].nunique()
    assert (pruned == 1).all()  # every strategy removes the same number of connections at each point
