"""Builders for the dynamic-sparse-training tables of thesis 001 (T001-3.1 ... 3.5, fig3.1) and the
RigL / SET / static / dense comparison (T001-dst-compare).

Thesis tables: each cell of the spec has a ``role`` on its row (``dense`` | ``fixed`` | ``dst``
(default) | ``dt1``: a reference run that only feeds ``acc_vs_dt1``), an optional ``note``, and
``reported: {acc: %, hours: h for 70 epochs, acc_vs_dt1: points}``; its hyper-parameters are read
from its overrides. Per cell the CSV has the metrics

* ``acc``: measured test accuracy (%) beside the reported validation accuracy (%) on CIFAR-100;
* ``acc_vs_fixed``: accuracy minus the fixed-mask cell's (points), the comparison that transfers
  across datasets (reported: the same difference in the thesis);
* ``acc_vs_dt1`` (rows with ``dt1: <label>``, T001-3.3): accuracy minus the mean accuracy of this
  table's own reference cell ``<label>`` (placeholders ``{key}`` filled from the cell's overrides);
* ``time_vs_fixed``: wall time / the fixed-mask cell's wall time (per seed, then averaged; reported:
  hours / fixed-mask hours).

Extra columns: ``time_per_epoch_s``, ``update_share`` (topology-update time / training time),
``recall_mean`` (approximate vs exact top-n), ``inference_flops_rel`` and ``train_flops_rel`` (FLOPs
relative to the dense model, :mod:`sparsebench.sparsity.flops`), the hyper-parameters,
``reported_hours`` and ``note``.
"""
from __future__ import annotations

import re
from typing import Dict

import numpy as np
import pandas as pd

from sparsebench.tables.figures import pyplot, save_figure
from sparsebench.tables.schema import combine, compare, describe, rows
from sparsebench.tables.spec import fill_label

# CSV column -> override key (``metric`` is taken by the long format, so the similarity is ``similarity``);
# K is the thesis' symbol for the drop fraction
PARAMS = {"K": "method.drop_fraction", "k_similar": "method.k_similar", "bits": "method.bits",
          "search": "method.search", "similarity": "method.metric"}


def _by_seed(g: pd.DataFrame, col: str) -> Dict[int, float]:
    return {int(s): float(v) for s, v in zip(g["seed"], g[col])}


def _mean(g: pd.DataFrame, col: str) -> float:
    return float(g[col].mean()) if (not g.empty and col in g) else float("nan")


def _flops(g: pd.DataFrame) -> Dict[str, float]:
    """Mean ``inference_flops_rel`` / ``train_flops_rel`` of the cell's runs (NaN for runs without them)."""
    return {col: _mean(g, col) for col in ("inference_flops_rel", "train_flops_rel")}


def _delta_t(cell) -> object:
    """The update interval as the thesis writes it: 1 (every minibatch) or '1 epoch'; '' without updates."""
    if cell.row.get("role", "dst") in ("dense", "fixed"):
        return ""
    if cell.params.get("method.delta_t_epochs") is not None:
        return f"{float(cell.params['method.delta_t_epochs']):g} epoch"
    return cell.params.get("method.delta_t", 1)


def thesis_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """Long-format table for T001-3.1 ... T001-3.5 (see the module docstring)."""
    cells = spec["cells"]
    empty = pd.DataFrame(columns=["cell", "seed", "test_acc", "train_seconds"])
    runs = runs if not runs.empty else empty
    fixed_cell = next(c for c in cells if c.row.get("role") == "fixed")
    rep_fixed = fixed_cell.reported
    fixed = runs[runs["cell"] == fixed_cell.index]
    fixed_acc, fixed_time = _by_seed(fixed, "test_acc"), _by_seed(fixed, "train_seconds")
    by_label = {c.label: c for c in cells}
    out = []
    for c in cells:
        role = c.row.get("role", "dst")
        if role == "dt1":
            continue
        g = runs[runs["cell"] == c.index]
        acc = _by_seed(g, "test_acc")
        secs = _by_seed(g, "train_seconds")
        rep = c.reported
        extra = {"role": role, **{col: c.params.get(key, "") for col, key in PARAMS.items()},
                 "delta_t": _delta_t(c), "time_per_epoch_s": _mean(g, "time_per_epoch"),
                 "update_share": _mean(g, "update_share") if "update_share" in g else 0.0,
                 "recall_mean": _mean(g, "recall_mean"), **_flops(g), "reported_hours": rep.get("hours", ""),
                 "note": c.row.get("note", "") if not g.empty else "missing run"}
        out.append(rows(spec, c.label, "acc", [100 * v for v in acc.values()], rep.get("acc", ""), **extra))
        d = [100 * (acc[k] - fixed_acc[k]) for k in acc if k in fixed_acc]
        rep_d = round(rep["acc"] - rep_fixed["acc"], 2) if "acc" in rep and "acc" in rep_fixed else ""
        out.append(rows(spec, c.label, "acc_vs_fixed", d, rep_d, **extra))
        if c.row.get("dt1"):
            ref = fill_label(c.row["dt1"], c.params, f"table {spec['id']}, cell {c.label}: dt1")
            if ref not in by_label:
                raise ValueError(f"table {spec['id']}, cell {c.label}: dt1 reference '{ref}' is not a cell label")
            base = _mean(runs[runs["cell"] == by_label[ref].index], "test_acc") * 100
            out.append(rows(spec, c.label, "acc_vs_dt1", [100 * v - base for v in acc.values()] if base == base else [],
                            rep.get("acc_vs_dt1", ""),
                            **{**extra, "note": f"measured: minus this table's dT=1 run '{ref}' ({base:.2f}%)"}))
        r = [secs[k] / fixed_time[k] for k in secs if k in fixed_time and fixed_time[k] > 0]
        rep_r = round(rep["hours"] / rep_fixed["hours"], 3) if "hours" in rep and "hours" in rep_fixed else ""
        out.append(rows(spec, c.label, "time_vs_fixed", r, rep_r, **extra))
    return pd.DataFrame(out)


EVCI = "Evci et al. 2020 (RigL), Table 1 / Fig. 2: RigL >= SET >= static at equal sparsity (not in thesis 001)"


def compare_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """RigL vs SET vs static vs dense: test accuracy (%) per (method, density, distribution) read from
    each cell's overrides. Thesis 001 states no numbers or ordering for these methods, so ``reported``
    stays empty; the ordering expected from other papers is in ``reference`` (the row's
    ``reference`` key, with its citation). Per (density, distribution) the differences rigl - set and
    set - static (points, paired by seed: same init and data order) are rows of their own, with
    ``ordering_holds`` = the combined :func:`compare` verdict (paired t, 95% interval)."""
    out = []
    accs: Dict[tuple, pd.Series] = {}
    keys = []
    for c in spec["cells"]:
        g = runs[runs["cell"] == c.index] if not runs.empty else runs
        acc = [100 * v for v in (g["test_acc"] if not g.empty else [])]
        method, dens, dist = c.params["method"], c.params.get("method.density"), c.params.get("method.distribution")
        keys.append((dens, dist))
        accs[(method, dens, dist)] = pd.Series(acc, index=list(g["seed"]) if acc else [], dtype=float)
        out.append(rows(spec, c.label, "acc", acc, c.reported.get("acc", ""), reference=c.row.get("reference", ""),
                        method=method, density=dens if dens is not None else 1.0, distribution=dist or "",
                        time_per_epoch_s=_mean(g, "time_per_epoch"),
                        update_share=_mean(g, "update_share") if "update_share" in g else 0.0,
                        measured_density=_mean(g, "density"), **_flops(g), note="" if acc else "missing run"))
    for dens in sorted({d for d, _ in keys if d}):
        for dist in sorted({b for _, b in keys if b}):
            r, st, sf = (accs.get((m, dens, dist)) for m in ("rigl", "set", "static_sparse"))
            if any(x is None or x.empty for x in (r, st, sf)):
                continue
            tests = []
            for a, b, xa, xb in (("rigl", "set", r, st), ("set", "static", st, sf)):
                j = pd.concat([xa.rename("a"), xb.rename("b")], axis=1, join="inner")
                tests.append((a, b, j, compare(j["a"], j["b"], paired=True)))
            holds = combine([t["verdict"] for *_, t in tests])
            note = (f"rigl {r.mean():.2f}, set {st.mean():.2f}, static {sf.mean():.2f}; "
                    + "; ".join(describe(t, f"{a} - {b}") for a, b, _, t in tests))
            for a, b, j, t in tests:
                out.append(rows(spec, f"{a} - {b} at density {dens}, {dist}", "acc_diff_points",
                                (j["a"] - j["b"]).tolist(), "", reference=EVCI, method="", density=dens,
                                distribution=dist, ordering_holds=holds, pair_verdict=t["verdict"],
                                test="paired t by seed, 95% interval of the difference", note=note))
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
    from sparsebench.dst.capture import layer_vectors
    from sparsebench.dst.search import BruteForceSearch, FaissSearch
    from sparsebench.dst.similarity import AbsInnerProduct
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


# --------------------------------------------------------------------------- orderings (issue 16 stand-ins)
def _ordering(kind: str, a: pd.Series, b: pd.Series, margin: float) -> dict:
    """``compare`` of paired per-seed values: ``greater`` tests a > b; ``equivalent`` tests |a - b| < margin by
    two one-sided intervals (holds when both hold, reversed when either is reversed)."""
    j = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    if kind == "equivalent":
        up, down = compare(j["a"], j["b"], paired=True, margin=margin), compare(j["b"], j["a"], paired=True, margin=margin)
        verdict = combine([up["verdict"], down["verdict"]])
        return {**up, "verdict": verdict, "test": f"paired t, two one-sided 95% intervals, margin {margin:g}",
                "diffs": (j["a"] - j["b"]).tolist()}
    if kind != "greater":
        raise ValueError(f"ordering kind '{kind}' unknown (allowed: greater, equivalent)")
    c = compare(j["a"], j["b"], paired=True, margin=margin)
    return {**c, "test": "paired t by seed, 95% interval of a - b", "diffs": (j["a"] - j["b"]).tolist()}


def orderings_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """Thesis 001's orderings tested on a stand-in (issue 16): one ``acc`` row per cell (%, the spec's
    ``measure``: ``test_acc`` by default, ``val_acc`` for the WRN stand-in, as the thesis reports
    validation accuracy) with the thesis' value beside it, one ``train_seconds`` row per cell, and one row
    per entry of the spec's ``orderings`` (``claim``, cell labels ``a`` and ``b``, ``kind``: ``greater``
    (a > b) or ``equivalent`` (|a - b| < ``margin`` points), ``metric``: ``acc`` or ``train_seconds``,
    ``reported``: the thesis' numbers) with the paired difference over seeds, its test and the verdict
    (:func:`compare`; "not resolved" when the interval straddles the claim)."""
    measure = spec.get("measure", "test_acc")
    empty = pd.DataFrame(columns=["cell", "seed", measure, "train_seconds"])
    runs = runs if not runs.empty else empty
    series: Dict[tuple, pd.Series] = {}
    out = []
    for c in spec["cells"]:
        g = runs[runs["cell"] == c.index]
        acc = pd.Series([100 * v for v in g[measure]], index=list(g["seed"]), dtype=float)
        secs = pd.Series(list(g["train_seconds"]), index=list(g["seed"]), dtype=float)
        series[(c.label, "acc")], series[(c.label, "train_seconds")] = acc, secs
        extra = {"cell_label": c.label, "measure": measure, "time_per_epoch_s": _mean(g, "time_per_epoch"),
                 "update_share": _mean(g, "update_share") if "update_share" in g else 0.0, **_flops(g),
                 "note": "" if len(g) else "missing run"}
        out.append(rows(spec, c.label, "acc", acc.tolist(), c.reported.get("acc", ""), **extra))
        out.append(rows(spec, c.label, "train_seconds", secs.tolist(), "", **extra))
    labels = {c.label for c in spec["cells"]}
    for o in spec.get("orderings", []):
        metric, kind = o.get("metric", "acc"), o.get("kind", "greater")
        missing = [x for x in (o["a"], o["b"]) if x not in labels]
        if missing:
            raise ValueError(f"table {spec['id']}, ordering '{o['claim']}': {missing} are not cell labels")
        a, b = series[(o["a"], metric)], series[(o["b"], metric)]
        c = _ordering(kind, a, b, float(o.get("margin", 0.0)))
        unit = "points" if metric == "acc" else "s"
        note = (f"{o['a']} {a.mean():.2f} vs {o['b']} {b.mean():.2f} ({unit}); " + describe(c, "a - b"))
        out.append(rows(spec, o["claim"], f"{metric}_diff", c["diffs"], o.get("reported", ""), cell_label="",
                        measure=measure, ordering_holds=c["verdict"], test=c["test"], note=note))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- sparse mode (issue 14)
_MODE = re.compile(r"\s*\[sparse_kernels=(\w+)\]$")


def sparse_mode_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T001-sparse-mode (issue 14): cells whose labels end in ``[sparse_kernels=False|True]`` are paired by
    the rest of the label. Per pair: ``acc`` (%) of each mode, ``acc_diff`` sparse - masked (points, paired
    by seed) with ``ordering_holds`` = "holds (identical on every seed)" when every seed's accuracy is the
    same, else the verdict of two one-sided paired intervals with a 0.5-point margin, and ``time_ratio``
    = sparse / masked training seconds per seed (``sparse_layers``: layers the sparse run converted).

    Raises:
        ValueError: a cell label without the ``[sparse_kernels=...]`` suffix, or a pair missing a mode."""
    empty = pd.DataFrame(columns=["cell", "seed", "test_acc", "train_seconds"])
    runs = runs if not runs.empty else empty
    pairs: Dict[str, Dict[bool, object]] = {}
    for c in spec["cells"]:
        m = _MODE.search(c.label)
        if not m:
            raise ValueError(f"table {spec['id']}, cell '{c.label}': label must end in [sparse_kernels=...]")
        pairs.setdefault(c.label[:m.start()], {})[m.group(1).lower() == "true"] = c
    out = []
    for base, modes in pairs.items():
        if set(modes) != {False, True}:
            raise ValueError(f"table {spec['id']}, '{base}': needs both sparse_kernels=false and true cells")
        g = {mode: runs[runs["cell"] == cell.index] for mode, cell in modes.items()}
        acc = {mode: pd.Series([100 * v for v in d["test_acc"]], index=list(d["seed"]), dtype=float) for mode, d in g.items()}
        secs = {mode: pd.Series(list(d["train_seconds"]), index=list(d["seed"]), dtype=float) for mode, d in g.items()}
        layers = _mean(g[True], "sparse_layers")
        extra = {"pair": base, "sparse_layers": layers}
        for mode, name in ((False, "masked"), (True, "sparse")):
            out.append(rows(spec, f"{base}, {name}", "acc", acc[mode].tolist(), "", mode=name,
                            time_per_epoch_s=_mean(g[mode], "time_per_epoch"), **extra))
        j = pd.concat([acc[True].rename("s"), acc[False].rename("m")], axis=1, join="inner")
        diffs = (j["s"] - j["m"]).tolist()
        if diffs and all(abs(d) < 1e-9 for d in diffs):
            verdict, test, note = "holds (identical on every seed)", "per-seed equality", "same accuracy on every seed"
        else:
            c = _ordering("equivalent", acc[True], acc[False], 0.5)
            verdict, test, note = c["verdict"], c["test"], describe(c, "sparse - masked (points)")
        out.append(rows(spec, f"{base}: sparse - masked", "acc_diff", diffs, "", mode="", ordering_holds=verdict,
                        test=test, note=note, **extra))
        jt = pd.concat([secs[True].rename("s"), secs[False].rename("m")], axis=1, join="inner")
        out.append(rows(spec, f"{base}: sparse / masked time", "time_ratio", (jt["s"] / jt["m"]).tolist(), "", mode="",
                        note=f"sparse {jt['s'].mean():.2f} s vs masked {jt['m'].mean():.2f} s training time", **extra))
    return pd.DataFrame(out)
