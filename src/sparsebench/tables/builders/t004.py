"""Builders of document 004's tables (T004-train, T004-prune): the online MSE MLP of Segala and
Castellano et al.'s (1997) iterative unit pruning with the least-squares update."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from sparsebench.tables.figures import pyplot, save_figure
from sparsebench.tables.schema import compare, describe, rows

# --------------------------------------------------------------------------- T004
def t004_train(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T004-train: final train/test accuracy per dataset (figures only in the document) and the
    training curves (train loss, test accuracy per epoch) from each run's ``metrics.csv``."""
    trained = runs[(runs["removed"] == 0) & (runs["update"] == runs["update"].iloc[0])]
    out = []
    for ds, g in trained.groupby("dataset", sort=False):
        for metric in ("test_acc", "train_acc", "train_seconds"):
            out.append(rows(spec, f"{ds}, {int(g['n_train'].iloc[0])} train / {int(g['n_test'].iloc[0])} test",
                            metric, g[metric].tolist(), "figure only", dataset=ds, steps=int(g["steps"].iloc[0])))
    _plot_t004_train(spec, trained)
    return pd.DataFrame(out)


def _plot_t004_train(spec: dict, trained: pd.DataFrame) -> None:
    plt = pyplot()
    dss = list(dict.fromkeys(trained["dataset"]))
    fig, axes = plt.subplots(2, len(dss), figsize=(4.2 * len(dss), 6), squeeze=False)
    for j, ds in enumerate(dss):
        for _, r in trained[trained["dataset"] == ds].iterrows():
            path = Path(r["run_dir"]) / "metrics.csv"
            if not path.is_file():
                continue
            m = pd.read_csv(path)
            fine = (m["name"] == "curve/test_acc").any()  # finer curve logged by method.curve_every
            for i, name in enumerate(("train_loss", "test_acc")):
                c = m[m["name"] == (f"curve/{name}" if fine else name)]
                axes[i][j].plot(c["step"], c["value"], marker=".", label=f"seed {r['seed']}")
        axes[0][j].set_title(ds)
        axes[0][j].set_ylabel("train MSE")
        axes[1][j].set_ylabel("test accuracy")
        for i in range(2):
            axes[i][j].set_xlabel("online updates (samples seen)")
            axes[i][j].grid(alpha=0.3)
        axes[1][j].legend(fontsize=7)
    fig.suptitle(f"{spec['id']}: online (batch 1) MSE training, bipolar sigmoid MLP")
    fig.tight_layout()
    save_figure(fig, spec, dpi=110, bbox_inches="tight")


def t004_prune(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T004-prune: test accuracy per (dataset, update, units removed). Ordering checked per dataset: the
    least-squares update beats plain removal on average over the removal curve (area under the curve):
    per seed the mean accuracy over the curve, ls vs none, paired t over seeds (:func:`compare`)."""
    out = []
    checks = {}
    test = "paired t by seed: mean accuracy over the removal curve, ls - none"
    for ds, g in runs.groupby("dataset", sort=False):
        m = g.groupby(["update", "removed"])["test_acc"].mean().unstack(0)
        if {"ls", "none"} <= set(m.columns):
            auc_ls, auc_none = float(m["ls"].mean()), float(m["none"].mean())
            per_seed = g.pivot_table(index="seed", columns="update", values="test_acc", aggfunc="mean")
            c = compare(per_seed["ls"], per_seed["none"], paired=True)
            checks[ds] = (c["verdict"], f"mean accuracy over the removal curve: ls {auc_ls:.4f}, none {auc_none:.4f}; "
                                        + describe(c, "ls - none"))
    for (ds, upd, removed), g in runs.groupby(["dataset", "update", "removed"], sort=False):
        hold, note = checks.get(ds, (None, ""))
        out.append(rows(spec, f"{ds}, {upd}, {int(removed)} removed", "test_acc", g["test_acc"].tolist(),
                        "figure only", dataset=ds, update=upd, removed=int(removed),
                        units_left=int(g["units_left"].iloc[0]), ordering_holds=hold, test=test if hold else "",
                        note=note))
    _plot_t004_prune(spec, runs)
    return pd.DataFrame(out)


def _plot_t004_prune(spec: dict, runs: pd.DataFrame) -> None:
    plt = pyplot()
    dss = list(dict.fromkeys(runs["dataset"]))
    fig, axes = plt.subplots(1, len(dss), figsize=(4.2 * len(dss), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        g = runs[runs["dataset"] == ds]
        for upd, u in g.groupby("update"):
            m = u.groupby("removed")["test_acc"].agg(["mean", "std"])
            ax.errorbar(m.index, m["mean"], yerr=m["std"].fillna(0), marker=".", capsize=2,
                        label="least-squares update" if upd == "ls" else "no update")
        ax.set_title(ds)
        ax.set_xlabel("hidden units removed")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec['id']}: iterative unit pruning (Castellano et al. 1997)")
    fig.tight_layout()
    save_figure(fig, spec, dpi=110, bbox_inches="tight")
