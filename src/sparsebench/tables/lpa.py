"""Builders of document 000's kNN / label-propagation tables (T000-*).

Spec keys used beyond the common ones (see :mod:`sparsebench.tables`):

``labels``   one setting name per entry of ``runs`` (default: ``backend/solver``)
``metrics``  summary columns reported per setting (default: :data:`LPA_METRICS`)
``reported`` ``{label: {metric: value}}``, the document's numbers (strings allowed: ``"< 6.2"``)
``knn``      T000-knn only: ``dataset``, ``sizes``, ``k``, ``backends``, ``pca_components``, ``seeds``

:func:`lpa_table` serves every label-spreading table; :func:`k_sweep` adds the figure of accuracy and
time against k; :func:`knn_classifier` measures the kNN classifier itself (its spec has ``runs: []``).
Figures are written next to the CSV as ``results/<ID>.png`` (matplotlib, Agg backend).
"""
from __future__ import annotations

from typing import List

import numpy as np
import pandas as pd

from sparsebench.tables import pyplot, rows, save_figure

LPA_METRICS = ["acc_masked", "acc_all", "total_seconds", "pca_seconds", "graph_seconds", "propagation_seconds",
               "iterations", "recall"]
EXTRA = ["backend", "solver", "k", "weighting", "tol"]


def _label(spec: dict, i: int, df: pd.DataFrame) -> str:
    labels = spec.get("labels") or []
    if i < len(labels):
        return str(labels[i])
    r = df.iloc[0]
    return f"{r.backend}/{r.solver}"


def _reported(spec: dict, label: str, metric: str):
    rep = (spec.get("reported") or {}).get(label) or {}
    return rep.get(metric, "")


def lpa_table(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, metric): mean/std over the mask seeds beside the document's value.

    Extra columns: ``backend``, ``solver``, ``k``, ``weighting``, ``tol``, ``dataset``.
    """
    out: List[dict] = []
    metrics = spec.get("metrics") or LPA_METRICS
    if runs.empty:
        return pd.DataFrame([rows(spec, "no runs finished", m, [], _reported(spec, "", m)) for m in metrics])
    for i, df in runs.groupby("run_index", sort=True):
        label = _label(spec, int(i), df)
        first = df.iloc[0]
        extra = {c: first[c] for c in EXTRA if c in df.columns}
        extra["dataset"] = first["dataset"]
        for m in metrics:
            vals = df[m].astype(float).tolist() if m in df.columns else []
            rep = _reported(spec, label, m)
            if m == "recall" and not any(v == v for v in vals) and rep == "":
                continue  # exact backend: recall is 1 by definition and not measured
            out.append(rows(spec, label, m, vals, rep, **extra))
    return pd.DataFrame(out)


def k_sweep(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T000-k-sweep: :func:`lpa_table` plus ``results/T000-k-sweep.png`` (accuracy and time vs k)."""
    table = lpa_table(spec, runs)
    if runs.empty:
        return table
    plt = pyplot()
    g = runs.groupby("k")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for a, col, name in ((ax[0], "acc_masked", "accuracy on masked labels"), (ax[1], None, "seconds")):
        if col:
            m, s = g[col].mean(), g[col].std().fillna(0)
            a.errorbar(m.index, m.values, yerr=s.values, marker="o", capsize=3)
        else:
            for c, lab in (("total_seconds", "total (PCA + graph + propagation)"), ("graph_seconds", "graph"),
                           ("propagation_seconds", "propagation")):
                m, s = g[c].mean(), g[c].std().fillna(0)
                a.errorbar(m.index, m.values, yerr=s.values, marker="o", capsize=3, label=lab)
            a.legend(fontsize=8)
        a.set_xlabel("k (neighbours)")
        a.set_ylabel(name)
        a.grid(alpha=0.3)
    fig.suptitle(f"{spec['id']}: label spreading vs k ({spec['dataset_used']}; mean ± std over "
                 f"{runs.seed.nunique()} mask seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, spec, dpi=120)
    return table


def knn_classifier(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T000-knn: kNN classification with exact vs approximate neighbours (measured here, ``runs: []``).

    For each training-set size (a seeded subset of the training split) and backend: PCA fitted on the
    training subset, index build and query of the full test split timed separately (warm-up of
    pynndescent's numba compilation excluded), majority vote of ``k`` neighbours. Writes
    ``results/T000-knn.png`` and the long-format table (metrics ``accuracy``, ``build_seconds``,
    ``query_seconds``, ``recall``; settings ``<backend> n_train=<N>``).
    """
    from sparsebench.config import DatasetConfig
    from sparsebench.data import default_data_root, load_dataset
    from sparsebench.graph.knn import knn_search, recall_at_k, warmup
    from sparsebench.graph.spreading import knn_vote, pca_fit

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
    reported = spec.get("reported") or {}
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
