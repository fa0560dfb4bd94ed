"""Unit vs weight pruning (002), least-squares unit pruning (004) and their tables (quick, real MNIST)."""
import pandas as pd
import pytest
import torch

from sparsebench.api import execute
from sparsebench.data import DataBundle, Split
from sparsebench.sparsity.masking import Masking
from sparsebench.methods.post_training import resplit
from sparsebench.sparsity.units import LS_UPDATES, UNIT_CRITERIA, zero_dead_unit_biases
from sparsebench.models import MLP
from sparsebench.tables.schema import TABLE_COLUMNS

from test_static import quick_table

DIGITS = ("dataset=digits", "trainer.epochs=1", "trainer.device=cpu", "model.hidden=[64,32]")


def test_weight_and_unit_masks_per_layer():
    torch.manual_seed(0)
    mk = Masking(MLP(20, 5, [16, 8]))
    names = mk.names[:-1]
    wm = UNIT_CRITERIA.get("weight")().masks(mk, names, 0.75)
    for n in names:
        w, m = mk.weight(n).abs(), wm[n]
        assert int((m == 0).sum()) == round(0.75 * w.numel())
        assert w[m == 0].max() <= w[m == 1].min()  # the smallest |w| of the layer
    um = UNIT_CRITERIA.get("unit")().masks(mk, names, 0.5)
    for n in names:
        w, m = mk.weight(n), um[n]
        rows_kept = m.all(dim=1)
        assert bool(((m == 1).all(dim=1) | (m == 0).all(dim=1)).all())  # whole units (rows)
        assert int((~rows_kept).sum()) == w.shape[0] // 2
        norms = w.norm(dim=1)
        assert norms[~rows_kept].max() <= norms[rows_kept].min()  # smallest L2 norm
    mk.set_masks(um)
    assert zero_dead_unit_biases(mk, names) == 8 + 4
    assert float(mk.module("layers.0.weight").bias.detach()[~um["layers.0.weight"].all(dim=1)].abs().sum()) == 0.0


def test_unit_prune_method_rows_and_magnitudes(compose_cfg):
    cfg = compose_cfg(*DIGITS, "method=unit_prune", "method.ks=[0.0,0.5,0.9]")
    df = execute(cfg, quiet=True)
    assert len(df) == 6
    w, u = df[df.criterion == "weight"].set_index("k"), df[df.criterion == "unit"].set_index("k")
    assert w.loc[0.0, "test_acc"] == pytest.approx(w.loc[0.0, "dense_test_acc"])
    assert u.loc[0.5, "units_removed"] == 32 + 16 and w.loc[0.5, "units_removed"] == 0
    assert w.loc[0.9, "pruned_layer_density"] == pytest.approx(0.1, abs=1e-3)
    # weight pruning separates pruned from surviving |w| completely; unit pruning does not
    assert w.loc[0.5, "ks_mean"] == pytest.approx(1.0)
    assert u.loc[0.5, "ks_mean"] < 0.9
    assert w.loc[0.5, "mean_abs_pruned"] < w.loc[0.5, "mean_abs_surviving"]
    mags = pd.read_csv(f"{cfg.out_dir}/{df['run_id'][0]}/magnitudes.csv")
    g = mags[(mags.criterion == "weight") & (mags.layer == "layers.0.weight")]
    assert g["pruned"].sum() + g["surviving"].sum() == 64 * 64 and g["pruned"].sum() == 2048


def test_ls_update_reproduces_outputs_when_unit_is_redundant():
    torch.manual_seed(0)
    y = torch.randn(200, 5)
    y[:, 4] = 0.5 * y[:, 0] - 2.0 * y[:, 2] + 0.3  # unit 4 = linear combination of units 0, 2 and a constant
    w = torch.randn(3, 5)
    b = torch.randn(3)
    before = y @ w.t() + b
    rest = torch.tensor([0, 1, 2, 3])
    w_ls, b_ls = w.clone(), b.clone()
    LS_UPDATES.get("ls")(y, w_ls, b_ls, rest, 4, True)
    after = y[:, rest] @ w_ls[:, rest].t() + b_ls
    assert torch.allclose(after, before, atol=1e-4)  # the least squares absorbs the removed unit exactly
    none = y[:, rest] @ w[:, rest].t() + b
    assert (none - before).norm() > 1.0
    # without the bias column the constant part cannot be absorbed, but the error still shrinks
    w2, b2 = w.clone(), b.clone()
    LS_UPDATES.get("ls")(y, w2, b2, rest, 4, False)
    err = (y[:, rest] @ w2[:, rest].t() + b2 - before).norm()
    assert 1e-3 < err < (none - before).norm()


def test_resplit_30_70_disjoint():
    x = torch.arange(100, dtype=torch.float32).view(100, 1)
    y = torch.arange(100) % 3
    d = DataBundle("m", "image", Split(x[:80], y[:80]), Split(x[80:], y[80:]), Split(x[:5], y[:5]), 3)
    r = resplit(d, 0.3, seed=0)
    assert len(r.train) == 30 and len(r.test) == 70 and len(r.val) == 0
    assert set(r.train.x.view(-1).tolist()).isdisjoint(r.test.x.view(-1).tolist())


def test_ls_unit_prune_method_iris(compose_cfg):
    cfg = compose_cfg("dataset=iris", "dataset.test_fraction=0.1", "dataset.val_fraction=0", "method=ls_unit_prune",
                      "method.curve_every=100", "model.hidden=[6]", "model.activation=bipolar_sigmoid",
                      "trainer.loss=mse", "trainer.batch_size=1", "trainer.momentum=0", "trainer.lr=0.05",
                      "trainer.epochs=5", "trainer.device=cpu")
    df = execute(cfg, quiet=True)
    m = pd.read_csv(f"{cfg.out_dir}/{df['run_id'][0]}/metrics.csv")
    curve = m[m["name"] == "curve/test_acc"]["step"].tolist()
    assert curve[:3] == [0, 100, 200] and len(curve) == 1 + 5 * 135 // 100
    assert len(df) == 2 * 6 and set(df["update"]) == {"ls", "none"}
    for _, g in df.groupby("update"):
        assert list(g["units_left"]) == [6, 5, 4, 3, 2, 1]
        assert g["n_train"].iloc[0] == 135 and g["n_test"].iloc[0] == 15
    # the first removal picks the same unit in both variants (same trained net, same criterion)
    assert df[(df.removed == 1)]["removed_unit"].nunique() == 1


def test_t002_tables_quick(mnist_root, out_dir, tmp_path):
    w, runs = quick_table("T002-weight", tmp_path)
    assert set(TABLE_COLUMNS) <= set(w.columns) and "ordering_holds" in w
    assert set(w["metric"]) == {"test_acc", "test_loss"} and set(w["criterion"]) == {"weight"}
    u, _ = quick_table("T002-unit", tmp_path, runs=runs)
    assert set(u["criterion"]) == {"unit"}
    m, _ = quick_table("T002-magnitudes", tmp_path, runs=runs)
    assert m[(m.criterion == "weight") & (m.metric == "ks_mean")]["measured"].iloc[0] == pytest.approx(1.0)
    t, _ = quick_table("T002-time", tmp_path)
    assert {"forward_ms", "speedup_vs_dense"} == set(t["metric"]) and set(t["layout"]) == {"csr", "coo"}


def test_t004_tables_quick(mnist_root, out_dir, tmp_path):
    t, runs = quick_table("T004-train", tmp_path)
    assert set(t["dataset"]) == {"iris", "digits", "mnist"}
    assert t[(t.dataset == "mnist") & (t.metric == "test_acc")]["setting"].iloc[0].startswith("mnist, ")
    p, _ = quick_table("T004-prune", tmp_path, runs=runs)
    assert set(p["update"]) == {"ls", "none"} and p["removed"].max() == 3 and "ordering_holds" in p


def test_ls_unit_prune_trains_through_the_shared_trainer_and_resumes(compose_cfg):
    cfg = compose_cfg("dataset=iris", "method=ls_unit_prune", "model.hidden=[4]", "trainer.epochs=3",
                      "trainer.device=cpu")
    df = execute(cfg, quiet=True)
    run_dir = f"{cfg.out_dir}/{df['run_id'][0]}"
    import os

    assert os.path.isfile(f"{run_dir}/checkpoints/train.pt")  # the trainer's checkpoint: resumable
    os.remove(f"{run_dir}/summary.csv")  # as if interrupted after training: resumes from the checkpoint
    again = execute(cfg, quiet=True)
    cols = [c for c in df.columns if c not in ("train_seconds",)]
    pd.testing.assert_frame_equal(df[cols], again[cols])
