"""Builders for the dynamic-sparse-training tables of thesis 001 (T001-3.1 ... 3.5, fig3.1) and the
RigL / SET / static / dense comparison (T001-dst-compare).

Thesis tables: the spec's ``settings`` list (one entry per ``runs`` entry, same order) names each
row (``label``), its role (``dense`` | ``fixed`` | ``dst``), its hyper-parameters and the
document's values (``reported_acc`` in %, ``reported_hours`` for 70 epochs). Per setting the CSV
has three metrics:

* ``acc``: measured test accuracy (%) beside the reported validation accuracy (%) on CIFAR-100;
* ``acc_vs_fixed``: accuracy minus the fixed-mask row's (points), the comparison that transfers
  across datasets (reported: the same difference in the thesis);
* ``time_vs_fixed``: wall time / the fixed-mask row's wall time (per seed, then averaged; reported:
  hours / fixed-mask hours).

Extra columns: ``time_per_epoch_s``, ``update_share`` (topology-update time / training time),
``recall_mean`` (approximate vs exact top-n), the hyper-parameters, ``reported_hours`` and ``note``.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pandas as pd

from sparsebench.tables import RESULTS, pyplot, rows, save_figure

# settings key -> CSV column (``metric`` is taken by the long format, so the similarity is ``similarity``)
PARAMS = {"K": "K", "k_similar": "k_similar", "bits": "bits", "search": "search", "metric": "similarity",
          "delta_t": "delta_t"}


def _by_seed(g: pd.DataFrame, col: str) -> Dict[int, float]:
    return {int(s): float(v) for s, v in zip(g["seed"], g[col])}


def _mean(g: pd.DataFrame, col: str) -> float:
    return float(g[col].mean()) if (not g.empty and col in g) else float("nan")


def thesis_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """Long-format table for T001-3.1 ... T001-3.5 (see the module docstring)."""
    settings: List[dict] = spec["settings"]
    if len(settings) != len(spec["runs"]):
        raise ValueError(f"{spec['id']}: settings ({len(settings)}) and runs ({len(spec['runs'])}) differ in length")
    fixed_i = next(i for i, s in enumerate(settings) if s.get("role") == "fixed")
    rep_fixed = settings[fixed_i]
    empty = pd.DataFrame(columns=["run_index", "seed", "test_acc", "train_seconds"])
    runs = runs if not runs.empty else empty
    fixed = runs[runs["run_index"] == fixed_i]
    fixed_acc, fixed_time = _by_seed(fixed, "test_acc"), _by_seed(fixed, "train_seconds")
    out = []
    for i, s in enumerate(settings):
        g = runs[runs["run_index"] == i]
        acc = _by_seed(g, "test_acc")
        secs = _by_seed(g, "train_seconds")
        extra = {"role": s.get("role", "dst"), **{col: s.get(p, "") for p, col in PARAMS.items()},
                 "time_per_epoch_s": _mean(g, "time_per_epoch"),
                 "update_share": _mean(g, "update_share") if "update_share" in g else 0.0,
                 "recall_mean": _mean(g, "recall_mean"), "reported_hours": s.get("reported_hours", ""),
                 "note": s.get("note", "") if not g.empty else "missing run"}
        label = s["label"]
        out.append(rows(spec, label, "acc", [100 * v for v in acc.values()], s.get("reported_acc", ""), **extra))
        d = [100 * (acc[k] - fixed_acc[k]) for k in acc if k in fixed_acc]
        rep_d = (round(s["reported_acc"] - rep_fixed["reported_acc"], 2)
                 if "reported_acc" in s and "reported_acc" in rep_fixed else "")
        out.append(rows(spec, label, "acc_vs_fixed", d, rep_d, **extra))
        if "dt1_label" in s:
            base = _dt1_accuracy(s["dt1_label"])
            out.append(rows(spec, label, "acc_vs_dt1", [100 * v - base for v in acc.values()] if base == base else [],
                            s.get("reported_delta_vs_dt1", ""), **{**extra, "note": "measured: minus T001-3.1's "
                                                                  f"measured '{s['dt1_label']}' ({base:.2f}%)"}))
        r = [secs[k] / fixed_time[k] for k in secs if k in fixed_time and fixed_time[k] > 0]
        rep_r = (round(s["reported_hours"] / rep_fixed["reported_hours"], 3)
                 if "reported_hours" in s and "reported_hours" in rep_fixed else "")
        out.append(rows(spec, label, "time_vs_fixed", r, rep_r, **extra))
    return pd.DataFrame(out)


def _dt1_accuracy(label: str, table: str = "T001-3.1") -> float:
    """Measured accuracy (%) of row ``label`` in ``results/<table>.csv`` (NaN when absent)."""
    path = RESULTS / f"{table}.csv"
    if not path.is_file():
        return float("nan")
    df = pd.read_csv(path)
    hit = df[(df["setting"] == label) & (df["metric"] == "acc")]
    return float(hit["measured"].iloc[0]) if len(hit) else float("nan")


def compare_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """RigL vs SET vs static vs dense: test accuracy (%) per (method, density, budget), with the field's
    expected ordering as the reported value and whether it holds in the measurement."""
    settings: List[dict] = spec["settings"]
    out = []
    means = {}
    for i, s in enumerate(settings):
        g = runs[runs["run_index"] == i] if not runs.empty else runs
        acc = [100 * v for v in (g["test_acc"] if not g.empty else [])]
        means[(s["method"], s.get("density"), s.get("budget"))] = float(np.mean(acc)) if acc else float("nan")
        out.append(rows(spec, s["label"], "acc", acc, s.get("reported", ""), method=s["method"],
                        density=s.get("density", 1.0), budget=s.get("budget", ""),
                        time_per_epoch_s=_mean(g, "time_per_epoch"),
                        update_share=_mean(g, "update_share") if "update_share" in g else 0.0,
                        measured_density=_mean(g, "density"), note="" if acc else "missing run"))
    for dens in sorted({s.get("density") for s in settings if s.get("density")}):
        for budget in sorted({s.get("budget") for s in settings if s.get("budget")}):
            r, st, sf = (means.get((m, dens, budget), float("nan")) for m in ("rigl", "set", "static_sparse"))
            if np.isnan([r, st, sf]).any():
                continue
            holds = bool(r >= st - 0.1 and st >= sf - 0.1)
            out.append(rows(spec, f"ordering at density {dens}, {budget}", "rigl>=set>=static (0.1-point tolerance)",
                            [float(holds)], "holds (Evci et al. 2020, Table 1/Fig. 2)", method="", density=dens,
                            budget=budget, note=f"rigl {r:.2f}, set {st:.2f}, static {sf:.2f}"))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- Figure 3.1
def fig31(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """Figure 3.1, measured: per-query top-k (faiss, k = k_similar * a) merged vs the global top-n.

    (a) the thesis' toy case: a 5x6 similarity matrix, per-row top-2 merged, top-4 taken, against the
    global top-4; (b) recall of faiss_grow's per-query search (abs inner product, IndexFlatIP)
    against the exact top-n (n = K * active, K = 0.05) for each layer of a LeNet-300-100 at 80%
    (uniform random mask) after ``spec['warmup_steps']`` SGD steps on real MNIST (Digits if absent),
    for several k_similar, over ``spec['batches']`` batches of 128. Writes ``results/T001-fig3.1.png``.
    """
    import torch
    import torch.nn.functional as F

    from sparsebench.sparsity.distributions import layer_counts, random_masks
    from sparsebench.config import DatasetConfig
    from sparsebench.data import load_dataset
    from sparsebench.dst import AbsInnerProduct, BruteForceSearch, FaissSearch, layer_vectors
    from sparsebench.core.errors import DataError
    from sparsebench.sparsity.masking import Masking
    from sparsebench.models import MLP

    torch.manual_seed(0)
    import os

    try:
        data = load_dataset(DatasetConfig(name="mnist", root=os.environ.get("SPARSEBENCH_DATA", "data"),
                                          train_subset=6000, test_subset=100, val_fraction=0.0), seed=0)
        used = "mnist"
    except DataError:
        data = load_dataset(DatasetConfig(name="digits"), seed=0)
        used = "digits (MNIST not found)"
    x_all, y_all = data.train.x.flatten(1), data.train.y
    model = MLP(x_all.shape[1], 10, [300, 100])
    masking = Masking(model)
    masking.set_masks(random_masks(masking, layer_counts(masking, 0.2, "uniform"), torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masking.attach(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(int(spec.get("warmup_steps", 200))):
        idx = torch.randint(0, len(y_all), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
    store: Dict[str, tuple] = {}

    def hook(name):
        def h(mod, inp, out):
            store[name] = [inp[0].detach(), None]
            out.register_hook(lambda g: store[name].__setitem__(1, g.detach()))
        return h

    handles = [masking.module(n).register_forward_hook(hook(n)) for n in masking.names]
    k_sims = list(spec.get("k_similar", [0.05, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0]))
    recall = {(n, k): [] for n in masking.names for k in k_sims}
    metric = AbsInnerProduct()
    for _ in range(int(spec.get("batches", 5))):
        idx = torch.randint(0, len(y_all), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        for name in masking.names:
            x, g = store[name]
            U, G = layer_vectors(masking.module(name), x, g)
            m = masking.mask(name).reshape(-1)
            n = max(1, round(0.05 * int(m.count_nonzero())))
            exact = BruteForceSearch(metric).find(name, G, U, m, n)
            ref = metric.exact(G, U).reshape(-1).masked_fill_(m != 0, -float("inf"))
            kth = ref[exact].min()
            for k in k_sims:
                got = FaissSearch(metric, k_similar=k).find(name, G, U, m, n)
                recall[(name, k)].append(float((ref[got] >= kth).float().sum()) / n)
    for h in handles:
        h.remove()

    # (a) the toy example of Figure 3.1 (numbers chosen like the thesis': one row holds several large values)
    S = np.array([[34.5, 35.0, 33.1, 5.0, 2.1, 1.0],
                  [4.0, 31.5, 34.0, 3.2, 1.1, 0.5],
                  [2.0, 3.0, 1.5, 20.4, 22.8, 0.7],
                  [1.2, 2.2, 6.3, 7.7, 2.9, 9.8],
                  [0.4, 1.9, 2.7, 3.3, 8.1, 6.6]])
    per_row = np.argsort(-S, axis=1)[:, :2]
    cand = [(i, int(j), S[i, j]) for i in range(S.shape[0]) for j in per_row[i]]
    merged = sorted(cand, key=lambda c: -c[2])[:4]
    flat = np.argsort(-S.reshape(-1))[:4]
    glob = [(int(f) // S.shape[1], int(f) % S.shape[1]) for f in flat]
    toy_recall = len({(i, j) for i, j, _ in merged} & set(glob)) / 4

    _plot(S, per_row, merged, glob, recall, masking.names, k_sims, spec, used)
    spec = {**spec, "dataset_used": used}
    out = [rows(spec, "toy 5x6 matrix, per-row top-2 merged, top-4", "recall_vs_global_topk", [toy_recall],
                "figure only (faiss misses the pair with similarity 33.1)", layer="toy", k_similar=2 / 6,
                note=f"merged {[(i, j) for i, j, _ in merged]} vs global {glob}")]
    for name in masking.names:
        for k in k_sims:
            out.append(rows(spec, f"{name}, k_similar={k}", "recall_vs_global_topk", recall[(name, k)],
                            "figure only", layer=name, k_similar=k, note="n = 5% of active, 80% sparse LeNet-300-100"))
    return pd.DataFrame(out)


def _plot(S, per_row, merged, glob, recall, names, k_sims, spec: dict, used: str) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.imshow(S, cmap="Blues")
    for i in range(S.shape[0]):
        for j in range(S.shape[1]):
            a.text(j, i, f"{S[i, j]:.1f}", ha="center", va="center", fontsize=8, color="white" if S[i, j] > 20 else "black")
    for i in range(S.shape[0]):
        for j in per_row[i]:
            a.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, ec="orange", lw=1.5))
    for i, j, _ in merged:
        a.plot(j, i + 0.3, marker="^", color="red", ms=6)
    for i, j in glob:
        a.plot(j + 0.3, i - 0.3, marker="s", color="green", ms=5)
    a.set_title("(a) per-row top-2 (boxes) merged, top-4 (red ^)\nvs global top-4 (green squares)", fontsize=9)
    a.set_xlabel("indexed vectors (dL/dz_j)")
    a.set_ylabel("queries (x_i)")
    for name in names:
        b.plot(k_sims, [np.mean(recall[(name, k)]) for k in k_sims], marker="o", label=name)
    b.set_xscale("log")
    b.set_xlabel("k_similar (fraction of indexed vectors returned per query)")
    b.set_ylabel("recall of the exact top-n (n = 5% of active)")
    b.set_title(f"(b) LeNet-300-100, 80% sparse, {used}, abs inner product", fontsize=9)
    b.set_ylim(0, 1.05)
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, spec, dpi=120)
