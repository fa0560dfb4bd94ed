"""Document 000's randomized pruning (T000-random-prune): every strategy removes the same number of
connections, round(fraction * n) of the chosen layers' n weights; the method's layer x fraction sweep on
one trained net; the table builder's best-matching point and verdicts (fast: digits, synthetic runs)."""
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.api import execute
from sparsebench.core.errors import ConfigError
from sparsebench.methods.post_training import RandomizedPruneConfig
from sparsebench.sparsity.randomized import PRUNE_STRATEGIES, n_prune
from sparsebench.tables.builders import t000

PRUNING = ["threshold", "random", "importance_random", "fractional_threshold"]
DIGITS = ("dataset=digits", "trainer.epochs=1", "trainer.device=cpu", "model.hidden=[64,32]")


def _cfg(**kw):
    return OmegaConf.structured(RandomizedPruneConfig(**kw))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.3, 0.5, 0.7, 0.9])
def test_every_strategy_removes_the_same_count(fraction):
    torch.manual_seed(0)
    w = torch.randn(37, 53)  # n = 1961: round(fraction * n) is not a multiple of anything convenient
    cfg = _cfg(fraction=fraction, random_part=0.5, temperature=0.5)
    k = n_prune(w.numel(), fraction)
    assert k == int(round(fraction * w.numel()))
    counts = {}
    for name in PRUNING:
        gen = torch.Generator().manual_seed(1)
        for mask in (PRUNE_STRATEGIES.get(name)().mask(w, cfg, gen),  # k from cfg.fraction
                     PRUNE_STRATEGIES.get(name)().mask(w.reshape(-1), cfg, gen, k=k)):  # explicit k, flat
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            counts.setdefault(name, set()).add(int((mask == 0).sum()))
    assert counts == {name: {k} for name in PRUNING}
    assert int((PRUNE_STRATEGIES.get("none")().mask(w, cfg, None) == 0).sum()) == 0


def test_strategies_pick_by_magnitude_as_defined():
    torch.manual_seed(0)
    w = torch.randn(40, 50)
    cfg = _cfg(fraction=0.2, random_part=0.5, temperature=0.5)
    gen = torch.Generator().manual_seed(0)
    thr = PRUNE_STRATEGIES.get("threshold")().mask(w, cfg, gen)
    assert w.abs()[thr == 0].max() <= w.abs()[thr == 1].min()
    rnd = PRUNE_STRATEGIES.get("random")().mask(w, cfg, gen)
    iw = PRUNE_STRATEGIES.get("importance_random")().mask(w, cfg, gen)
    assert w.abs()[iw == 0].mean() < w.abs()[rnd == 0].mean() - 0.1  # p(prune) falls with |w|
    frt = PRUNE_STRATEGIES.get("fractional_threshold")().mask(w, cfg, gen)
    cand = PRUNE_STRATEGIES.get("threshold")().mask(w, cfg, gen, k=800) == 0  # 400 / random_part smallest
    assert bool(cand[frt == 0].all()) and not torch.equal(frt, thr)
    # once the candidates are every weight the strategy is uniform random: still exactly k pruned
    full = PRUNE_STRATEGIES.get("fractional_threshold")().mask(w, _cfg(fraction=0.7, random_part=0.5), gen)
    assert int((full == 0).sum()) == 1400


def test_method_sweep_prunes_equal_counts_on_one_trained_net(compose_cfg):
    df = execute(compose_cfg(*DIGITS, "method=randomized_prune", "method.draws=2", "method.fractions=[0.3,0.5]",
                             "+method.layers={hidden: layers.0.weight, output: layers.4.weight, "
                             "both: 'layers.*.weight'}"), quiet=True)
    sizes = {"hidden": 64 * 64, "output": 32 * 10, "both": 64 * 64 + 64 * 32 + 32 * 10}
    assert len(df) == 3 * 2 * 5 and df["run_id"].nunique() == 1 and df["dense_test_acc"].nunique() == 1
    for (choice, fraction), g in df.groupby(["layer_choice", "fraction"]):
        pr = g.set_index("strategy")["pruned"]
        assert pr["none"] == 0
        assert set(pr[PRUNING]) == {int(round(fraction * sizes[choice]))}
        assert set(g["layer_size"]) == {sizes[choice]}
    assert df[df.strategy == "none"]["test_acc"].nunique() == 1  # unpruned = the same net every time
    assert list(df[df.layer_choice == "both"]["layer"].unique()) == ["layers.0.weight,layers.2.weight,layers.4.weight"]
    with pytest.raises(ConfigError, match="method.layer"):
        execute(compose_cfg(*DIGITS, "method=randomized_prune", "method.layer=nope*"), quiet=True)


def test_builder_best_match_and_verdicts(monkeypatch):
    monkeypatch.setattr(t000, "save_figure", lambda fig, spec, **kw: t000.pyplot().close(fig))
    rep = t000.T000_REPORTED
    rng = np.random.default_rng(0)
    recs = []
    for seed in range(4):
        for choice in ("hidden", "output"):
            for fraction in (0.3, 0.5):
                for strat in ["none"] + PRUNING:
                    # output f=0.5 reproduces the document's drops; the others are far off
                    base = rep[strat] if (choice, fraction) == ("output", 0.5) else rep["none"] - 0.002 * len(strat)
                    acc = rep["none"] if strat == "none" else base
                    recs.append(dict(seed=seed, layer_choice=choice, layer=f"{choice}.weight", fraction=fraction,
                                     strategy=strat, test_acc=acc + rng.normal(0, 1e-4), pruned=0 if strat == "none" else 5,
                                     layer_size=10, draws=1, test_acc_std=0.0))
    spec = {"id": "T000-random-prune", "dataset_used": "toy", "scale": "toy"}
    out = t000.t000_random_prune(spec, pd.DataFrame(recs))
    assert len(out) == 1 + 2 * 2 * 4
    best = out[out.best_match & (out.strategy != "none")]
    assert set(best.layer_choice) == {"output"} and set(best.fraction) == {0.5}
    assert dict(zip(best.strategy, best.reported)) == {k: rep[k] for k in PRUNING}
    assert (out[~out.best_match]["reported"] == "").all()
    assert set(best.ordering_holds) == {"holds"} and set(best.fractional_over_threshold) == {"holds"}
    assert set(out.n_seeds) == {4}
