"""Builders of document 000's tables: kNN / label propagation (T000-lpa-*, T000-k-sweep, T000-knn) and
randomized pruning (T000-random-prune).

Spec keys used beyond the common ones (see :mod:`sparsebench.tables.spec`):

``metrics``  summary columns reported per cell (default: :data:`LPA_METRICS`)
``extrapolate_to`` (row key) label of a reference cell: the row's graph was timed on a subset
             (``method.n_samples``); :func:`lpa_table` adds ``graph_seconds_extrapolated`` =
             graph_seconds * (n_ref / n)^2 (quadratic: every point against every point) and
             ``graph_speedup`` = that / the reference cell's graph_seconds, per seed (same table run)
``speedup_claim`` (row key, with ``extrapolate_to``) the document's speed-up factor: the speed-up row
             gets ``claim_holds`` (one-sample t of the per-seed speed-ups against it) and ``test``
``knn``      T000-knn only: ``dataset``, ``sizes``, ``k``, ``backends``, ``pca_components``, ``seeds``,
             ``reported`` (``{backend: {metric: value}}``)

:func:`lpa_table` serves every label-spreading table (one setting per cell, named by its label, with
the cell's ``reported`` values); :func:`k_sweep` adds the figure of accuracy and time against k;
:func:`knn_classifier` measures the kNN classifier itself (its spec has no rows).
Figures are written next to the CSV as ``results/<ID>.png`` (matplotlib, Agg backend).
"""
from __future__ import annotations

from typing import List

import numpy as np
import pandas as pd

from sparsebench.tables.figures import pyplot, save_figure
from sparsebench.tables.schema import combine, compare, describe, rows

LPA_METRICS = ["acc_masked", "acc_all", "total_seconds", "pca_seconds", "graph_seconds", "propagation_seconds",
               "iterations", "recall"]
EXTRA = ["backend", "solver", "k", "weighting", "tol"]


def lpa_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, metric): mean/std over the mask seeds beside the cell's ``reported`` value.

    Extra columns: ``backend``, ``solver``, ``k``, ``weighting``, ``tol``, ``dataset``.
    """
    out: List[dict] = []
    metrics = spec.get("metrics") or LPA_METRICS
    if runs.empty:
        return pd.DataFrame([rows(spec, "no runs finished", m, [], "") for m in metrics])
    reported = {c.label: c.reported for c in spec["cells"]}
    for _, df in runs.groupby("cell", sort=True):
        label = str(df["label"].iloc[0])
        first = df.iloc[0]
        extra = {c: first[c] for c in EXTRA if c in df.columns}
        extra["dataset"] = first["dataset"]
        for m in metrics:
            vals = df[m].astype(float).tolist() if m in df.columns else []
            rep = reported.get(label, {}).get(m, "")
            if m == "recall" and not any(v == v for v in vals) and rep == "":
                continue  # exact backend: recall is 1 by definition and not measured
            out.append(rows(spec, label, m, vals, rep, **extra))
    out += _extrapolated(spec, runs, reported)
    return pd.DataFrame(out)


def _extrapolated(spec: dict, runs: pd.DataFrame, reported: dict) -> List[dict]:
    """Rows of the cells with an ``extrapolate_to`` reference (see the module docstring)."""
    out: List[dict] = []
    by_label = {str(lab): g for lab, g in runs.groupby("label")}
    for c in spec["cells"]:
        ref = c.row.get("extrapolate_to")
        if not ref or c.label not in by_label:
            continue
        if ref not in {x.label for x in spec["cells"]}:
            raise ValueError(f"table {spec['id']}, cell {c.label}: extrapolate_to '{ref}' is not a cell label")
        if ref not in by_label:
            continue
        pair = by_label[c.label][["seed", "n", "graph_seconds"]].merge(
            by_label[ref][["seed", "n", "graph_seconds"]], on="seed", suffixes=("", "_ref"))
        scale = (pair["n_ref"] / pair["n"]) ** 2
        ext = pair["graph_seconds"] * scale
        note = (f"graph timed on n={int(pair['n'].iloc[0])} points, extrapolated quadratically to the "
                f"{ref} cell's n={int(pair['n_ref'].iloc[0])}: x (n_ref/n)^2 = x{float(scale.iloc[0]):.1f}; "
                f"speed-up = extrapolated / {ref} graph_seconds, per seed, same table run")
        extra = {"backend": by_label[c.label]["backend"].iloc[0], "dataset": by_label[c.label]["dataset"].iloc[0],
                 "note": note}
        rep = reported.get(c.label, {})
        out.append(rows(spec, c.label, "graph_seconds_extrapolated", ext.tolist(),
                        rep.get("graph_seconds_extrapolated", ""), **extra))
        speedup = (ext / pair["graph_seconds_ref"]).tolist()
        claim = c.row.get("speedup_claim")  # the document's factor: the approximate graph >= claim x faster
        if claim is not None:
            at_least, faster = compare(speedup, float(claim)), compare(speedup, 1.0)
            extra = {**extra, "claim_holds": at_least["verdict"],
                     "test": (f"{at_least['test']} of the per-seed speed-up against the document's {claim}x: diff "
                              f"{at_least['diff']:+.1f} [{at_least['ci_low']:+.1f}, {at_least['ci_high']:+.1f}], "
                              f"{at_least['verdict']}; against 1x (the approximate graph faster at all): "
                              f"{faster['verdict']} (n={faster['n_a']})")}
        out.append(rows(spec, f"{c.label} vs {ref}", "graph_speedup", speedup, rep.get("graph_speedup", ""), **extra))
    return out


def k_sweep(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T000-k-sweep: accuracy against k from the runs (:func:`lpa_table`, mean ± std over mask seeds) and
    the time against k measured here by :func:`k_sweep_timing`; writes ``results/T000-k-sweep.png``.

    Timing rows (settings ``k=<k>``): ``graph_seconds_min`` / ``_median``, ``propagation_seconds_min`` /
    ``_median`` and ``graph_plus_propagation_seconds_min`` / ``_median`` (PCA is fixed and excluded: it
    does not depend on k); ``measured_std`` is the spread over the repetitions, ``n_seeds`` their number.
    The runs' own ``*_seconds`` are not reported: each run times one graph, in table order, so machine
    load and its phase bias them (see the spec).
    """
    if runs.empty:
        return lpa_table(spec, runs)
    timing, loads = k_sweep_timing(spec, sorted(int(k) for k in runs["k"].unique()))
    spec = {**spec, "scale": f"{spec['scale']}; timing: {len(loads)} interleaved repetitions, load average "
                             f"{min(loads):.1f}-{max(loads):.1f}"}
    table = lpa_table(spec, runs)
    first = runs.groupby("k").first()
    out = []
    for k, g in timing.groupby("k", sort=True):
        extra = {c: first.loc[k, c] for c in EXTRA if c in first.columns and c != "k"}
        extra.update(k=int(k), dataset=first.loc[k, "dataset"])
        for m in ("graph_seconds", "propagation_seconds", "graph_plus_propagation_seconds"):
            v = g[m].astype(float)
            for stat, value in (("min", v.min()), ("median", v.median())):
                r = rows(spec, f"k={k}", f"{m}_{stat}", [value], "figure only", **extra)
                r.update(measured_std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n_seeds=int(len(v)))
                out.append(r)
    table = pd.concat([table, pd.DataFrame(out)], ignore_index=True)
    _k_sweep_figure(spec, runs, timing)
    return table


def k_sweep_timing(spec: dict, ks: List[int]):
    """Time the approximate graph and the propagation against ``k`` alone, interleaved.

    The features are computed once (the first cell's configuration, mask seed ``timing.seed``) and the
    timed fits use ``timing.num_threads`` torch / numba threads (None: the configuration's); every
    backend's one-time costs are paid first (pynndescent's numba compilation, then one untimed graph at
    full size); then ``timing.repeats`` repetitions each time every ``k`` once, in an order rotated by
    one per repetition (so drift in machine load does not line up with ``k``), through the same
    :class:`~sparsebench.graph.estimator.LabelSpreading` as the runs (PCA off: the features are given).

    Returns:
        ``(DataFrame with columns rep, k, graph_seconds, propagation_seconds,
        graph_plus_propagation_seconds, acc_masked; [load average before each repetition])``.
    """
    import os

    from omegaconf import OmegaConf

    from sparsebench.api import compose
    from sparsebench.graph.estimator import warmup_pipeline
    from sparsebench.graph.spreading import mask_labels
    from sparsebench.methods import METHODS
    from sparsebench.methods.lpa import load_pool
    from sparsebench.tables.spec import cell_overrides, is_quick

    p = spec.get("timing") or {}
    repeats, seed, threads = int(p.get("repeats", 5)), int(p.get("seed", 0)), p.get("num_threads")
    cfg = compose(cell_overrides(spec, spec["cells"][0], "quick" if is_quick(spec) else "setting", seed))
    c = METHODS.schema(cfg.method.name)(**OmegaConf.to_container(cfg.method, resolve=True))
    x, y, C = load_pool(cfg.dataset, seed, c.splits, c.n_samples)
    labelled = mask_labels(y, c.mask_fraction, seed, C, key="method.mask_fraction")
    y_in = np.where(labelled, y, -1)
    est = c.estimator(seed)
    est.fit(x, y_in)  # also warms the PCA solver and the first k
    z = est.X_
    est.set_params(pca_components=None, scale=False, num_threads=threads)
    warmup_pipeline(est)
    est.set_params(n_neighbors=ks[len(ks) // 2]).fit(z, y_in)  # one untimed full-size graph
    recs, loads = [], []
    for rep in range(repeats):
        loads.append(os.getloadavg()[0])
        for k in ks[rep % len(ks):] + ks[:rep % len(ks)]:
            est.set_params(n_neighbors=k).fit(z, y_in)
            t = est.timings_
            recs.append({"rep": rep, "k": k, "graph_seconds": t["graph"], "propagation_seconds": t["propagation"],
                         "graph_plus_propagation_seconds": t["graph"] + t["propagation"],
                         "acc_masked": float((est.transduction_[~labelled] == y[~labelled]).mean())})
    return pd.DataFrame(recs), loads


def _k_sweep_figure(spec: dict, runs: pd.DataFrame, timing: pd.DataFrame) -> None:
    """Accuracy (mean ± std over mask seeds) and seconds (min and median over interleaved repetitions)
    against k."""
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    g = runs.groupby("k")["acc_masked"]
    m, s = g.mean(), g.std().fillna(0)
    ax[0].errorbar(m.index, m.values, yerr=s.values, marker="o", capsize=3)
    ax[0].set_ylabel(f"accuracy on masked labels ({runs.seed.nunique()} mask seeds)")
    t = timing.groupby("k")
    for col, lab in (("graph_plus_propagation_seconds", "graph + propagation"), ("graph_seconds", "graph"),
                     ("propagation_seconds", "propagation")):
        lo, med = t[col].min(), t[col].median()
        line, = ax[1].plot(lo.index, lo.values, marker="o", label=f"{lab} (min)")
        ax[1].plot(med.index, med.values, marker="x", ls="--", color=line.get_color(), label=f"{lab} (median)")
    ax[1].set_ylabel(f"seconds ({timing.rep.nunique()} interleaved repetitions)")
    ax[1].set_ylim(bottom=0)
    ax[1].legend(fontsize=7)
    for a in ax:
        a.set_xlabel("k (neighbours)")
        a.grid(alpha=0.3)
    threads = (spec.get("timing") or {}).get("num_threads")
    fig.suptitle(f"{spec['id']}: label spreading vs k ({spec['dataset_used']}); time without PCA, warm-up "
                 f"excluded{f', {threads} thread(s)' if threads else ''}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, spec, dpi=120)


def knn_classifier(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T000-knn: kNN classification with exact vs approximate neighbours (measured here; the spec has no rows).

    For each training-set size (a seeded subset of the training split) and backend: PCA fitted on the
    training subset, index build and query of the full test split timed separately (warm-up of
    pynndescent's numba compilation excluded), majority vote of ``k`` neighbours. Writes
    ``results/T000-knn.png`` and the long-format table (metrics ``accuracy``, ``build_seconds``,
    ``query_seconds``, ``recall``; settings ``<backend> n_train=<N>``).
    """
    from sparsebench.config import DatasetConfig
    from sparsebench.data import default_data_root, load_dataset
    from sparsebench.graph.backends import warmup
    from sparsebench.graph.knn import knn_search, knn_vote, recall_at_k
    from sparsebench.graph.pca import pca_fit

    p = spec.get("knn") or {}
    name = p.get("dataset", "mnist")
    k = int(p.get("k", 5))
    backends = list(p.get("backends", ["brute", "faiss_hnsw", "pynndescent"]))
    ncomp = p.get("pca_components", 50)
    seeds = list(p.get("seeds", spec.get("seeds", [0])))
    b = load_dataset(DatasetConfig(name=name, root=default_data_root(), standardize=False, val_fraction=0.0), seed=0)
    xtr = b.train.x.reshape(len(b.train), -1).numpy()
    ytr = b.train.y.numpy()
    xte = b.test.x.reshape(len(b.test), -1).numpy()
    yte = b.test.y.numpy()
    lo, hi = float(xtr.min()), float(xtr.max())
    xtr, xte = (xtr - lo) / (hi - lo), (xte - lo) / (hi - lo)
    sizes = [s for s in p.get("sizes", [1000, 5000, 20000, 60000]) if s <= len(ytr)] or [len(ytr)]
    if "pynndescent" in backends:
        warmup("pynndescent", query=True)
    for bk in backends:  # thread pools, faiss start-up
        knn_search(xtr[:300, :16], xte[:10, :16], 3, backend=bk)
    recs = []
    for seed in seeds:
        for n in sizes:
            idx = np.sort(np.random.default_rng(seed).permutation(len(ytr))[:n])
            mean, V = pca_fit(xtr[idx], ncomp) if ncomp else (None, None)
            proj = (lambda a: (a - mean) @ V) if ncomp else (lambda a: a)
            ztr, zte = np.ascontiguousarray(proj(xtr[idx]), np.float32), np.ascontiguousarray(proj(xte), np.float32)
            _, exact_i, _, _ = knn_search(ztr, zte, k, backend="brute")
            for bk in backends:
                _, ii, t_build, t_query = knn_search(ztr, zte, k, backend=bk, seed=seed)
                pred = knn_vote(ii, ytr[idx], b.num_classes)
                recs.append({"seed": seed, "n_train": n, "backend": bk, "accuracy": float((pred == yte).mean()),
                             "build_seconds": t_build, "query_seconds": t_query,
                             "recall": recall_at_k(ii, exact_i)})
    df = pd.DataFrame(recs)
    out = []
    reported = p.get("reported") or {}
    for (bk, n), g in df.groupby(["backend", "n_train"], sort=True):
        setting = f"{bk} n_train={n}"
        for m in ("accuracy", "build_seconds", "query_seconds", "recall"):
            out.append(rows(spec, setting, m, g[m].tolist(), reported.get(bk, {}).get(m, "figure only"),
                            backend=bk, n_train=int(n), k=k, n_test=len(yte), dataset=name))
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for bk, g in df.groupby("backend"):
        s = g.groupby("n_train")
        for a, m in ((ax[0], "accuracy"), (ax[1], "query_seconds")):
            mu, sd = s[m].mean(), s[m].std().fillna(0)
            a.errorbar(mu.index, mu.values, yerr=sd.values, marker="o", capsize=3, label=bk)
    ax[0].set_ylabel(f"test accuracy ({k}-NN vote)")
    ax[1].set_ylabel(f"seconds to query {len(yte)} test points")
    for a in ax:
        a.set_xscale("log")
        a.set_xlabel("training points")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"{spec['id']}: kNN classifier, exact vs approximate neighbours ({name}, PCA {ncomp}; "
                 f"{len(seeds)} seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, spec, dpi=120)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- T000 randomized pruning
T000_REPORTED = {"none": 0.8768, "threshold": 0.8663, "random": 0.6456, "importance_random": 0.7806,
                 "fractional_threshold": 0.8747}


def t000_random_prune(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T000-random-prune: test accuracy per (layer choice, fraction, strategy) beside the document's
    FashionMNIST values, and ``results/T000-random-prune.png`` (accuracy vs fraction per strategy, one
    panel per layer choice).

    A seed's value is its mean over the random draws; rows give mean and std over seeds. The document
    states neither layer nor fraction, so its five numbers go (``reported``) beside the point
    (layer choice, fraction) that matches best: the smallest root-mean-square difference between our
    accuracy *drops* (unpruned - pruned, per strategy, mean over seeds) and the document's drops
    (87.68 - each of its four pruned numbers); the unpruned row carries 87.68 as is. At every point the
    document's ordering (none > fractional threshold > threshold > importance-weighted random > random)
    is tested pair by adjacent pair with :func:`compare` (paired t by seed: one trained net per seed
    serves every strategy), the pairs combined into ``ordering_holds``; ``fractional_over_threshold``
    is the pair the document's table singles out (its 87.47 vs 86.63)."""
    runs = runs.copy()
    if "layer_choice" not in runs.columns:
        runs["layer_choice"] = runs["layer"]
    rep_order = sorted(T000_REPORTED, key=lambda k: -T000_REPORTED[k])
    pruned_names = [k for k in rep_order if k != "none"]
    ref_drop = {k: T000_REPORTED["none"] - T000_REPORTED[k] for k in pruned_names}
    seed_acc = runs.groupby(["layer_choice", "fraction", "strategy", "seed"])["test_acc"].mean()
    none_by_seed = runs[runs.strategy == "none"].groupby("seed")["test_acc"].mean()
    points = runs[runs.strategy != "none"][["layer_choice", "fraction"]].drop_duplicates()
    choices = list(dict.fromkeys(runs["layer_choice"]))
    points = sorted(map(tuple, points.values), key=lambda p: (choices.index(p[0]), p[1]))

    def by_seed(choice, fraction, strat):
        if strat == "none":
            return none_by_seed
        return seed_acc.loc[(choice, fraction, strat)]

    def rms(p):
        d = [(none_by_seed.mean() - by_seed(*p, k).mean()) - ref_drop[k] for k in pruned_names
             if (p[0], p[1], k) in seed_acc.index]
        return float(np.sqrt(np.mean(np.square(d)))) if d else float("inf")

    best = min(points, key=rms) if points else None
    how = ("best-matching point = (layer, fraction) minimising the RMS difference of the four accuracy drops "
           "(unpruned - pruned) from the document's drops")
    out = [rows(spec, "none", "test_acc", none_by_seed.tolist(), T000_REPORTED["none"], strategy="none",
                layer_choice="-", layer="-", fraction=0.0, pruned=0.0, layer_size=0, draws=1,
                within_draw_std=0.0, best_match=True, match_rms=float("nan"), ordering_holds="",
                fractional_over_threshold="", test="", note=how)]
    for choice, fraction in points:
        present = [k for k in rep_order if k == "none" or (choice, fraction, k) in seed_acc.index]
        vals = {k: by_seed(choice, fraction, k) for k in present}
        tests = [(a, b, compare(vals[a], vals[b].reindex(vals[a].index), paired=True))
                 for a, b in zip(present, present[1:])]
        holds = combine([c["verdict"] for _, _, c in tests]) if tests else "not resolved (n=0)"
        ft = (compare(vals["fractional_threshold"], vals["threshold"], paired=True)
              if {"fractional_threshold", "threshold"} <= set(vals) else None)
        note = "; ".join(describe(c, f"{a} - {b}") for a, b, c in tests)
        if ft is not None:
            note += "; " + describe(ft, "fractional_threshold - threshold")
        is_best = (choice, fraction) == best
        for strat in pruned_names:
            if strat not in vals:
                continue
            g = runs[(runs.layer_choice == choice) & (runs.fraction == fraction) & (runs.strategy == strat)]
            out.append(rows(spec, f"{choice} f={fraction:g} {strat}", "test_acc", vals[strat].tolist(),
                            T000_REPORTED[strat] if is_best else "", strategy=strat, layer_choice=choice,
                            layer=g["layer"].iloc[0], fraction=float(fraction), pruned=float(g["pruned"].mean()),
                            layer_size=int(g["layer_size"].iloc[0]), draws=int(g["draws"].iloc[0]),
                            within_draw_std=float(g["test_acc_std"].mean()), best_match=is_best,
                            match_rms=rms((choice, fraction)), ordering_holds=holds,
                            fractional_over_threshold=ft["verdict"] if ft else "",
                            test="paired t by seed (95% interval) per adjacent pair of the document's order",
                            note=note))
    _t000_random_prune_figure(spec, runs, none_by_seed, best)
    return pd.DataFrame(out)


def _t000_random_prune_figure(spec: dict, runs: pd.DataFrame, none_by_seed: pd.Series, best) -> None:
    """Accuracy vs pruned fraction (mean ± std over seeds) per strategy, a panel per layer choice; the
    unpruned accuracy dashed, the document's five numbers as crosses at the best-matching point."""
    pruned = runs[runs.strategy != "none"]
    if pruned.empty:
        return
    plt = pyplot()
    choices = list(dict.fromkeys(pruned["layer_choice"]))
    fig, axes = plt.subplots(1, len(choices), figsize=(4.2 * len(choices), 3.8), sharey=True, squeeze=False)
    seed_means = pruned.groupby(["layer_choice", "strategy", "fraction", "seed"])["test_acc"].mean()
    colors = {"threshold": "C0", "random": "C1", "importance_random": "C2", "fractional_threshold": "C3"}
    for ax, choice in zip(axes[0], choices):
        for strat in [k for k in colors if k in set(pruned.strategy)]:
            g = seed_means.loc[(choice, strat)].groupby(level="fraction")
            m, s = g.mean(), g.std().fillna(0)
            ax.errorbar(m.index, m.values, yerr=s.values, marker="o", ms=3, capsize=3, color=colors[strat],
                        label=strat)
        ax.axhline(none_by_seed.mean(), color="k", ls="--", lw=1, label="unpruned")
        if best is not None and best[0] == choice:
            for strat, v in T000_REPORTED.items():
                ax.plot([best[1]], [v], marker="x", ms=8, color=colors.get(strat, "k"), ls="none")
        lay = pruned[pruned.layer_choice == choice]
        ax.set_title(f"{choice} ({lay['layer'].iloc[0]}, n={int(lay['layer_size'].iloc[0])})", fontsize=9)
        ax.set_xlabel("pruned fraction (same count for every strategy)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    if best is not None:
        axes[0][-1].plot([], [], marker="x", color="gray", ls="none",
                         label=f"document 000 (at the best match: {best[0]}, f={best[1]:g})")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{spec['id']}: {spec['dataset_used']}; mean ± std over {runs.seed.nunique()} seeds", fontsize=9)
    fig.tight_layout()
    save_figure(fig, spec, dpi=120)
