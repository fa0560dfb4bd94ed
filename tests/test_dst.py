"""Dynamic sparse training as methods: the ``dynamic_sparse`` schema and its presets (set, rigl,
faiss_grow), a grow criterion added by a test, the removed keys, dst_masked's threshold masks, real-data runs.

Update invariants live in test_dst_update.py, selection and similarity search in test_dst_search.py."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dst_helpers import digits_bundle, sparse_mlp
from sparsebench.api import CONF_DIR
from sparsebench.config import TrainerConfig
from sparsebench.core.errors import ConfigError, DataError
from sparsebench.dst.grow import GROW_CRITERIA, GrowCriterion
from sparsebench.dst.threshold import StepLTE, ThresholdMask, ThresholdMaskCallback, attach_threshold_masks, long_tailed_estimator
from sparsebench.methods.sparse_training import DynamicSparseConfig
from sparsebench.training.trainer import Trainer

torch.set_num_threads(1)

CONF = CONF_DIR / "method"
QUICK = ["trainer.iterations=12", "trainer.batch_size=64", "trainer.device=cpu", "trainer.num_threads=1",
         "method.delta_t=3"]
TIMING = ("train_seconds", "time_per_epoch", "update_seconds", "update_share")


def _validated(out_dir, *overrides):
    from sparsebench.api import compose, validate

    return validate(compose([f"out_dir={out_dir}", *overrides]))


def _run(out_dir, *overrides):
    from sparsebench.api import compose, execute

    return execute(compose([f"out_dir={out_dir}", *overrides]), quiet=True).iloc[0]


def test_set_with_gradient_grow_is_exactly_rigl(tmp_path):
    a = _validated(tmp_path / "a", "method=set", "method.grow=gradient", *QUICK)
    b = _validated(tmp_path / "b", "method=rigl", *QUICK)
    assert OmegaConf.to_container(a.method) == OmegaConf.to_container(b.method)
    s = OmegaConf.to_container(_validated(tmp_path, "method=set").method)
    r = OmegaConf.to_container(_validated(tmp_path, "method=rigl").method)
    assert {k for k in s if s[k] != r[k]} == {"grow"}  # the presets share RigL's schedule
    ra = _run(tmp_path / "a", "method=set", "method.grow=gradient", *QUICK)
    rb = _run(tmp_path / "b", "method=rigl", *QUICK)
    assert ra["run_id"] == rb["run_id"] and ra["grow"] == "gradient" and ra["updates"] == 3
    for col in ra.index:
        if col not in TIMING:
            assert ra[col] == rb[col] or (ra[col] != ra[col] and rb[col] != rb[col]), col
    rs = _run(tmp_path / "c", "method=set", *QUICK)  # random growth: another topology, another result
    assert rs["run_id"] != ra["run_id"] and rs["layer_active"] == ra["layer_active"]


def test_presets_restate_no_schema_default():
    defaults = {f.name: f.default for f in dataclasses.fields(DynamicSparseConfig)}
    for preset in ("set", "rigl", "faiss_grow", "dynamic_sparse"):
        values = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
        assert values["defaults"] == ["_schema_dynamic_sparse", "_self_"] and values["name"] == "dynamic_sparse"
        restated = {k for k, v in values.items() if k not in ("defaults", "name") and defaults.get(k) == v}
        assert not restated, (preset, restated)


def test_faiss_grow_preset_keeps_its_values(tmp_path):
    m = _validated(tmp_path, "method=faiss_grow").method
    assert (m.grow, m.drop_fraction, m.drop_fraction_anneal, m.delta_t, m.t_end, m.metric, m.search, m.k_similar,
            m.distribution, m.density) == ("similarity", 0.05, "constant", 1, 1.0, "abs_ip", "faiss", 0.15, "erk", 0.2)


@pytest.fixture
def toy_grow():
    """A grow criterion added in a few lines: the lowest flat growable positions."""
    calls = []

    @GROW_CRITERIA.register("toy_lowest")
    class LowestIndexGrow(GrowCriterion):
        def grow(self, layer):
            got = (layer.mask_flat == 0).nonzero().squeeze(1)[:layer.n]
            calls.append((layer.name, got.clone()))
            return got

    yield calls
    for table in (GROW_CRITERIA._entries, GROW_CRITERIA._schemas, getattr(GROW_CRITERIA, "_meta", {})):
        table.pop("toy_lowest", None)


def test_a_grow_criterion_added_in_a_test_is_selectable_by_config(tmp_path, toy_grow):
    row = _run(tmp_path, "method=dynamic_sparse", "method.grow=toy_lowest", *QUICK)
    assert row["grow"] == "toy_lowest" and row["updates"] == 3 and row["grown_total"] > 0
    assert row["density"] == pytest.approx(0.2, abs=1e-4)
    assert len(toy_grow) == 2 * 2  # updates at steps 3, 6, 9 (t_end = 0.75 of 12; d(9) = 0, cosine) x 2 layers
    for _, got in toy_grow:
        assert torch.equal(got, torch.sort(got).values) and got.numel() > 0
    with pytest.raises(ConfigError, match="method.grow='nope': unknown .*toy_lowest"):
        _validated(tmp_path, "method=set", "method.grow=nope")


def test_global_distribution_is_a_one_line_config_error(tmp_path):
    for method in ("set", "static_sparse"):
        with pytest.raises(ConfigError) as err:
            _validated(tmp_path, f"method={method}", "method.distribution=global")
        assert str(err.value).startswith("method.distribution") and "\n" not in str(err.value)


@pytest.mark.parametrize("method,key", [("faiss_grow", "K=0.05"), ("set", "budget=erk"), ("rigl", "schedule=constant"),
                                        ("static_sparse", "budget=er")])
def test_removed_keys_are_rejected(tmp_path, method, key):
    with pytest.raises(ConfigError, match=f"method.{key.split('=')[0]}"):
        _validated(tmp_path, f"method={method}", f"method.{key}")


@pytest.mark.parametrize("key,value", [("metric", "cosine"), ("search", "annoy"), ("drop_fraction_anneal", "linear"),
                                       ("search", "brute")])
def test_names_are_checked_against_the_registries(tmp_path, key, value):
    extra = ["method.metric=lsh"] if value == "brute" else []
    with pytest.raises(ConfigError, match=f"method.{key}"):
        _validated(tmp_path, "method=faiss_grow", f"method.{key}={value}", *extra)



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
