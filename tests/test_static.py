"""Static sparsity: random pruning under budgets, SNIP, randomized strategies (000), neuron accounting,
and the T003 / T000 tables as quick smoke tests on real MNIST."""
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.api import execute
from sparsebench.sparsity.distributions import layer_counts
from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking
from sparsebench.methods.static import (PRUNE_STRATEGIES, RandomizedPruneConfig, global_topk_masks,
                                        neuron_accounting, snip_scores)
from sparsebench.models import MLP
from sparsebench.tables import QUICK_PREFIX, TABLE_COLUMNS, get_builder, load_spec, run_spec, write_table

DIGITS = ("dataset=digits", "trainer.epochs=1", "trainer.device=cpu", "model.hidden=[64,32]")


def test_random_prune_erk_exact_density_and_fixed_mask(compose_cfg):
    df = execute(compose_cfg(*DIGITS, "method=random_prune", "method.budget=erk", "method.density=0.2"), quiet=True)
    total = 64 * 64 + 64 * 32 + 32 * 10
    assert abs(df["density"][0] * total - 0.2 * total) <= 1.0  # realised = target to one weight after training
    torch.manual_seed(0)
    counts = layer_counts(Masking(MLP(64, 10, [64, 32])), 0.2, "erk")
    for name, n in counts.items():
        assert df[f"density/{name}"][0] * Masking(MLP(64, 10, [64, 32])).weight(name).numel() == pytest.approx(n)
    assert df["density/layers.4.weight"][0] > df["density/layers.0.weight"][0]  # ERK: small layers denser


def test_random_prune_bad_budget_is_config_error(compose_cfg):
    with pytest.raises(ConfigError, match="method.budget"):
        execute(compose_cfg(*DIGITS, "method=random_prune", "method.budget=erx"), quiet=True)


def test_snip_scores_are_abs_w_times_grad_and_topk_is_global():
    torch.manual_seed(0)
    model = MLP(8, 3, [5])
    mk = Masking(model)
    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    loss_fn = torch.nn.functional.cross_entropy
    s = snip_scores(model, mk, x, y, loss_fn, batches=1, batch_size=20)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    for n, w, _ in mk.items():
        assert torch.allclose(s[n], (w * w.grad).abs())
        assert w.grad is not None
    masks = global_topk_masks(mk, s, 0.3)
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    flat = torch.cat([s[n].reshape(-1) for n in mk.names])
    assert int(kept.sum()) == round(0.3 * flat.numel())
    assert flat[kept > 0].min() >= flat[kept == 0].max()  # the global top-k
    masks = global_topk_masks(mk, s, 0.5, dense=["layers.2.weight"])
    assert bool(masks["layers.2.weight"].all())


def test_snip_ratio_budget_takes_snip_layer_densities_with_random_positions(compose_cfg):
    a = execute(compose_cfg(*DIGITS, "method=snip", "method.density=0.1"), quiet=True)
    b = execute(compose_cfg(*DIGITS, "method=random_prune", "method.budget=snip_ratio", "method.density=0.1"),
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
    thr = PRUNE_STRATEGIES.get("threshold")(w, cfg, gen)
    assert int((thr == 0).sum()) == 1000 and w.abs()[thr == 0].max() <= w.abs()[thr == 1].min()
    rnd = PRUNE_STRATEGIES.get("random")(w, cfg, gen)
    assert int((rnd == 0).sum()) == 1000
    iw = PRUNE_STRATEGIES.get("importance_random")(w, cfg, gen)
    assert int((iw == 0).sum()) == 1000
    # probability of pruning falls with |w|: pruned weights are smaller on average than under random
    assert w.abs()[iw == 0].mean() < w.abs()[rnd == 0].mean() - 0.1
    frt = PRUNE_STRATEGIES.get("fractional_threshold")(w, cfg, gen)
    assert int((frt == 0).sum()) == 500  # a random half of the 1000 candidates
    cand = thr == 0
    assert bool(cand[frt == 0].all())  # only candidates (smallest |w|) are pruned
    assert not bool((frt[cand] == 0).all())


def test_randomized_prune_method_rows_and_bad_layer(compose_cfg):
    df = execute(compose_cfg(*DIGITS, "method=randomized_prune", "method.layer=layers.4.weight",
                             "method.draws=2"), quiet=True)
    assert list(df["strategy"]) == ["none", "threshold", "random", "importance_random", "fractional_threshold"]
    assert list(df["pruned"]) == [0, 160, 160, 160, 80]
    assert df["test_acc"][0] == pytest.approx(df["dense_test_acc"][0])
    with pytest.raises(ConfigError, match="method.layer"):
        execute(compose_cfg(*DIGITS, "method=randomized_prune", "method.layer=nope*"), quiet=True)


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


def test_lth_imp_neurons_rows_carry_accounting(compose_cfg):
    cfg = compose_cfg(*DIGITS, "method=lth_imp_neurons", "method.rounds=2", "method.target_density=0.05")
    df = execute(cfg, quiet=True)
    assert list(df["round"]) == [0, 1, 2]
    assert "hidden_dead/layers.0.weight" in df and df["hidden_dead_all"][0] == 0.0
    assert df["density/layers.0.weight"][2] == pytest.approx(0.05, abs=0.01)
    metrics = pd.read_csv(f"{cfg.out_dir}/{df['run_id'][0]}/metrics.csv")
    assert (metrics["name"] == "round2/hidden_dead_all").any()


def quick_table(table_id, tmp_path, keep_runs=None, runs=None):
    """make_table(ID, quick=True, seeds=[0]) with, optionally, only some of the spec's runs, or (for a
    ``runs_from`` spec) given source runs. Returns (table, runs)."""
    spec = load_spec(table_id)
    spec["scale"] = f"{QUICK_PREFIX} (test); full: {spec['scale']}"
    if runs is None:
        if keep_runs is not None:
            spec["runs"] = [r for i, r in enumerate(spec["runs"]) if keep_runs(i, r)]
        runs, failed = run_spec(spec, quick=True, seeds=[0])
        assert not failed, failed
    else:
        spec.pop("runs_from", None)
    table = get_builder(spec)(spec, runs)
    path = write_table(table, table_id, tmp_path)
    return pd.read_csv(path), runs


def test_t003_tables_quick(mnist_root, out_dir, tmp_path):
    keep = lambda i, r: bool({"method.density=0.125", "method=lth_imp_neurons"} & set(r))  # noqa: E731
    t, runs = quick_table("T003-random", tmp_path, keep)
    assert set(TABLE_COLUMNS) <= set(t.columns) and "ordering_holds" in t
    assert set(t["budget"]) == {"uniform", "erk", "snip_ratio", "imp"}
    assert (t["dataset_used"].str.contains("mnist")).all()
    spec = load_spec("T003-neurons")
    own, failed = run_spec(spec, quick=True, seeds=[0])  # Frankle-rate IMP, 9 rounds
    assert not failed, failed
    both = pd.concat([own, runs.assign(spec_id="T003-random")], ignore_index=True)
    n, _ = quick_table("T003-neurons", tmp_path, runs=both)
    assert {"hidden_dead", "units_no_in", "units_no_out"} <= set(n["metric"]) and "ordering_holds" in n
    picked = n.groupby("schedule")["round"].first()
    assert picked[[s for s in picked.index if s.startswith("Frankle")][0]] == 9  # density 0.135
    assert picked[[s for s in picked.index if s.startswith("every layer")][0]] == 3  # density 0.125


def test_t000_random_prune_quick(mnist_root, out_dir, tmp_path):
    t, _ = quick_table("T000-random-prune", tmp_path)
    assert list(t["setting"]) == ["none", "threshold", "random", "importance_random", "fractional_threshold"]
    assert t["reported"].tolist() == [0.8768, 0.8663, 0.6456, 0.7806, 0.8747]
    assert t["dataset_used"].str.startswith("mnist").all() and "ordering_holds" in t
