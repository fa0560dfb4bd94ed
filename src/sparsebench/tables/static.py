"""Builders for the static-sparsity tables: documents 002 (T002-*), 003 (T003-random, T003-neurons),
000 (T000-random-prune) and 004 (T004-*).

Each builder returns the long-format table of :mod:`sparsebench.tables` plus an ``ordering_holds``
column where the document states an ordering (True / False, with the measured ordering in
``note``), and draws ``results/<ID>.png`` where the document shows a figure (quick smoke tests draw
into the temporary directory instead, so they never overwrite the real figures).

Specs with ``runs_from: <ID>`` have no runs of their own: they are built from the runs of that
spec (run with the same seeds, reused through the run cache), e.g. T002-unit from T002-weight.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from sparsebench.tables import is_quick, load_spec, pyplot, rows, run_spec, save_figure


# --------------------------------------------------------------------------- helpers
def source_runs(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """The runs to build from, with a ``spec_id`` column naming the spec that ran them: ``runs`` itself
    plus, with ``runs_from``, those of the named spec, run with this spec's seeds (``quick_seeds`` in
    quick mode); finished runs come from the run cache.

    Raises:
        RuntimeError: no runs at all (every cell failed).
    """
    if len(runs):
        runs = runs.assign(spec_id=runs["spec_id"].fillna(spec["id"]) if "spec_id" in runs else spec["id"])
    parts = [runs] if len(runs) else []
    src = spec.get("runs_from")
    if src:
        quick = is_quick(spec)
        seeds = spec.get("quick_seeds") if quick and spec.get("quick_seeds") else spec.get("seeds")
        df, failed = run_spec(load_spec(src), quick=quick, seeds=seeds)
        for f in failed:
            print(f"  missing ({src}): {f}")
        if len(df):
            parts.append(df.assign(spec_id=src))
    if not parts:
        raise RuntimeError(f"{spec['id']}: no runs could be produced")
    return pd.concat(parts, ignore_index=True)


def _density_ticks(ax) -> None:
    """Plain-number ticks on a log density axis (no overlapping minor labels)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]
    lo, hi = sorted(ax.get_xlim())
    ax.xaxis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _critical_k(g: pd.DataFrame, drop: float = 0.05) -> float:
    """Smallest k whose mean test accuracy is more than ``drop`` below the k = 0 accuracy (inf if none)."""
    m = g.groupby("k")["test_acc"].mean().sort_index()
    base = m.iloc[0]
    bad = m[m < base - drop]
    return float(bad.index[0]) if len(bad) else float("inf")


# --------------------------------------------------------------------------- T002 weight / unit
T002_REPORTED = {"weight": "figure only: robust until a high k, then degrades",
                 "unit": "figure only: degrades much sooner than weight pruning"}


def _t002_curve(spec: dict, runs: pd.DataFrame, criterion: str) -> pd.DataFrame:
    runs = source_runs(spec, runs)
    crit = {c: _critical_k(g) for c, g in runs.groupby("criterion")}
    holds = crit.get("unit", np.inf) < crit.get("weight", np.inf) if {"unit", "weight"} <= set(crit) else None
    # also: at every k > 0, unit-pruned accuracy <= weight-pruned accuracy (mean over seeds)
    m = runs.groupby(["criterion", "k"])["test_acc"].mean().unstack(0)
    pointwise = bool((m.loc[m.index > 0, "unit"] <= m.loc[m.index > 0, "weight"] + 1e-9).all()) \
        if {"unit", "weight"} <= set(m.columns) else None
    note = (f"k where accuracy first falls >5 points below k=0: weight {crit.get('weight')}, unit {crit.get('unit')}; "
            f"unit <= weight at every k>0: {pointwise}")
    out = []
    g = runs[runs["criterion"] == criterion]
    for k, kg in g.groupby("k"):
        for metric in ("test_acc", "test_loss"):
            out.append(rows(spec, f"{criterion} pruning, k={k:g}", metric, kg[metric].tolist(), T002_REPORTED[criterion],
                            criterion=criterion, k=float(k), density=float(kg["density"].mean()),
                            ordering_holds=holds, note=note))
    _plot_t002(spec, runs, criterion)
    return pd.DataFrame(out)


def _plot_t002(spec: dict, runs: pd.DataFrame, criterion: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for c, g in runs.groupby("criterion"):
        m = g.groupby("k")[["test_loss", "test_acc"]].agg(["mean", "std"])
        style = dict(marker="o", lw=2) if c == criterion else dict(marker=".", lw=1, ls="--", alpha=0.6)
        for ax, metric in zip(axes, ("test_loss", "test_acc")):
            ax.errorbar(m.index * 100, m[(metric, "mean")], yerr=m[(metric, "std")].fillna(0), label=f"{c} pruning",
                        capsize=2, **style)
    for ax, metric in zip(axes, ("test loss (cross-entropy)", "test accuracy")):
        ax.set_xlabel("k (% pruned per layer)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle(f"{spec['id']}: {criterion} pruning after training (fc5, MNIST); mean ± std over seeds")
    save_figure(fig, spec, dpi=110, bbox_inches="tight")


def t002_weight(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T002-weight: loss/accuracy against k for weight pruning (ordering: unit degrades sooner)."""
    return _t002_curve(spec, runs, "weight")


def t002_unit(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T002-unit: loss/accuracy against k for unit pruning."""
    return _t002_curve(spec, runs, "unit")


# --------------------------------------------------------------------------- T002 magnitudes
def t002_magnitudes(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T002-magnitudes: KS distance and mean |w| of pruned vs surviving weights at ``hist_k``; the
    figure shows the per-layer histograms of the first seed's run. Claim: weight pruning separates the
    two groups completely (KS = 1), unit pruning barely (the two distributions look alike)."""
    runs = source_runs(spec, runs)
    h = runs.dropna(subset=["ks_mean"]) if "ks_mean" in runs else runs.iloc[:0]
    ks = h.groupby("criterion")["ks_mean"].mean().to_dict()
    holds = bool(ks.get("weight", 0) > 0.99 and ks.get("unit", 1) < ks.get("weight", 0)) if ks else None
    note = f"mean KS distance pruned vs surviving |w|: {', '.join(f'{c} {v:.3f}' for c, v in ks.items())}"
    reported = {"weight": "figure only: the smallest |w| are removed (pruned and surviving separate)",
                "unit": "figure only: weights removed nearly at random w.r.t. |w| (similar distributions)"}
    out = []
    for c, g in h.groupby("criterion"):
        for metric in ("ks_mean", "mean_abs_pruned", "mean_abs_surviving"):
            out.append(rows(spec, f"{c} pruning, k={g['k'].iloc[0]:g}", metric, g[metric].tolist(), reported.get(c, ""),
                            criterion=c, k=float(g["k"].iloc[0]), ordering_holds=holds, note=note))
    if len(h):
        first = h.sort_values("seed").iloc[0]
        mags = pd.read_csv(Path(first["run_dir"]) / "magnitudes.csv")
        _plot_magnitudes(spec, mags)
    return pd.DataFrame(out)


def _plot_magnitudes(spec: dict, mags: pd.DataFrame) -> None:
    plt = pyplot()
    crits = list(dict.fromkeys(mags["criterion"]))
    layers = list(dict.fromkeys(mags["layer"]))
    fig, axes = plt.subplots(len(crits), len(layers), figsize=(3.2 * len(layers), 2.6 * len(crits)), squeeze=False)
    for i, c in enumerate(crits):
        for j, layer in enumerate(layers):
            g = mags[(mags["criterion"] == c) & (mags["layer"] == layer)]
            ax = axes[i][j]
            width = (g["bin_right"] - g["bin_left"]).to_numpy()
            ax.bar(g["bin_left"], g["surviving"], width=width, align="edge", color="tab:green" if c == "weight"
                   else "tab:brown", alpha=0.6, label="surviving")
            ax.bar(g["bin_left"], g["pruned"], width=width, align="edge", color="tab:red", alpha=0.6, label="pruned")
            ax.set_title(f"{c} pruning, {layer}", fontsize=9)
            ax.set_xlabel("|w|", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{spec['id']}: |w| of pruned vs surviving weights at k={mags['k'].iloc[0]:g} (fc5, MNIST, seed 0)")
    fig.tight_layout()
    save_figure(fig, spec, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------- T002 time
def t002_time(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T002-time: forward seconds per batch and speedup over dense against k, per criterion and layout.
    Claim: the sparse forward time falls as k grows (Spearman correlation of k and time < 0, and the
    time at the largest k is below the time at the smallest)."""
    runs = source_runs(spec, runs)
    out = []
    for (dev, crit, lay), g in runs.groupby(["device", "criterion", "layout"]):
        m = g.groupby("k")["seconds"].mean().sort_index()
        rho = pd.Series(m.index).corr(pd.Series(m.values), method="spearman") if len(m) > 1 else np.nan
        holds = bool(rho < 0 and m.iloc[-1] < m.iloc[0]) if len(m) > 1 else None
        note = f"Spearman(k, time) = {rho:.3f}; time at k={m.index[-1]:g}: {m.iloc[-1] * 1e3:.3f} ms, at k={m.index[0]:g}: {m.iloc[0] * 1e3:.3f} ms"
        for k, kg in g.groupby("k"):
            extra = dict(device=dev, criterion=crit, layout=lay, k=float(k), ordering_holds=holds, note=note,
                         threads=kg["threads"].iloc[0] if "threads" in kg else None)
            out.append(rows(spec, f"{dev} {crit} pruning k={k:g} {lay}", "forward_ms", (kg["seconds"] * 1e3).tolist(),
                            "figure only: time falls as k grows (COO, CPU)", **extra))
            out.append(rows(spec, f"{dev} {crit} pruning k={k:g} {lay}", "speedup_vs_dense", kg["speedup"].tolist(),
                            "figure only", **extra))
    _plot_time(spec, runs)
    return pd.DataFrame(out)


def _plot_time(spec: dict, runs: pd.DataFrame) -> None:
    plt = pyplot()
    devs = list(dict.fromkeys(runs["device"]))
    fig, axes = plt.subplots(1, len(devs), figsize=(6 * len(devs), 4), squeeze=False)
    for ax, dev in zip(axes[0], devs):
        d = runs[runs["device"] == dev]
        for (crit, lay), g in d.groupby(["criterion", "layout"]):
            m = g.groupby("k")["seconds"].mean() * 1e3
            ax.plot(m.index * 100, m.values, marker="o", ls="-" if crit == "weight" else "--", label=f"{crit}, {lay}")
        dm = d.groupby("k")["dense_seconds"].mean() * 1e3
        ax.plot(dm.index * 100, dm.values, color="k", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("k (% pruned per layer)")
        ax.set_ylabel("forward time, batch 100 (ms)")
        ax.set_title(f"{dev}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec['id']}: fc5 forward time vs k, sparse export vs dense")
    save_figure(fig, spec, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------- T003 random
def _setting_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Unify random_prune and IMP rows: columns setting (budget or 'imp'), density, test_acc, seed."""
    parts = []
    rp = runs[runs["method"] == "random_prune"]
    if len(rp):
        parts.append(pd.DataFrame({"setting": rp["budget"], "density": rp["target_density"], "realised": rp["density"],
                                   "test_acc": rp["test_acc"], "seed": rp["seed"]}))
    imp = runs[runs["method"].isin(["lth_imp", "lth_imp_neurons"])]
    if len(imp):
        parts.append(pd.DataFrame({"setting": "imp", "density": imp["density"].round(5), "realised": imp["density"],
                                   "test_acc": imp["test_acc"], "seed": imp["seed"], "round": imp["round"]}))
    return pd.concat(parts, ignore_index=True)


def _nearest(levels: np.ndarray, d: float) -> float:
    return float(levels[np.argmin(np.abs(np.log(levels) - np.log(d)))])


def t003_random(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T003-random: test accuracy per budget and density, and IMP at its rounds' densities.

    Orderings checked per density: ERK >= SNIP ratio >= uniform (mean over seeds), and IMP above every
    random budget where sparsity > 40%."""
    runs = source_runs(spec, runs)
    s = _setting_rows(runs)
    imp_note = ("; IMP here prunes every layer by the same fraction (Algorithm 1), so at low density its "
                "10x100 output layer is as sparse as the rest, while ERK / SNIP ratio keep it denser")
    levels = np.array(sorted(s.loc[s["setting"] != "imp", "density"].unique()))
    if len(levels):
        s.loc[s["setting"] == "imp", "density"] = [_nearest(levels, d) if d < 1 else 1.0
                                                    for d in s.loc[s["setting"] == "imp", "density"]]
    mean = s.groupby(["setting", "density"])["test_acc"].mean().unstack(0)
    checks: Dict[float, dict] = {}
    for d in mean.index:
        r = mean.loc[d]
        budget_order = [b for b in ("erk", "snip_ratio", "uniform") if b in r and r[b] == r[b]]
        ordered = all(r[a] >= r[b] for a, b in zip(budget_order, budget_order[1:])) if len(budget_order) > 1 else None
        rand = [r[b] for b in ("erk", "snip_ratio", "uniform") if b in r and r[b] == r[b]]
        imp_best = bool(r["imp"] > max(rand)) if "imp" in r and r["imp"] == r["imp"] and rand else None
        measured = " > ".join(f"{b} {r[b]:.4f}" for b in sorted([b for b in r.index if r[b] == r[b]],
                                                                   key=lambda b: -r[b]))
        checks[d] = {"erk_snip_uniform_holds": ordered, "imp_beats_random": imp_best, "measured_order": measured}
    out = []
    rep = "figure only: ERK > SNIP ratio > uniform; none reaches IMP above 40% sparsity"
    for (setting, d), g in s.groupby(["setting", "density"]):
        c = checks.get(d, {})
        hold = c.get("erk_snip_uniform_holds")
        if d < 0.6 and c.get("imp_beats_random") is not None:
            hold = bool((hold is None or hold) and c["imp_beats_random"])
        out.append(rows(spec, f"{setting}, density {d:g}", "test_acc", g["test_acc"].tolist(), rep, budget=setting,
                        density=float(d), realised_density=float(g["realised"].mean()), ordering_holds=hold,
                        erk_snip_uniform_holds=c.get("erk_snip_uniform_holds"),
                        imp_beats_random=c.get("imp_beats_random"),
                        note=c.get("measured_order", "") + (imp_note if c.get("imp_beats_random") is False else "")))
    _plot_t003(spec, s)
    return pd.DataFrame(out)


def _plot_t003(spec: dict, s: pd.DataFrame) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for setting, g in s.groupby("setting"):
        m = g.groupby("density")["test_acc"].agg(["mean", "std"]).sort_index()
        ax.errorbar(m.index, m["mean"], yerr=m["std"].fillna(0), marker="o", capsize=2,
                    label={"imp": "IMP (rewind to θ0)", "snip_ratio": "SNIP ratio"}.get(setting, setting.upper()
                                                                                       if setting == "erk" else setting))
    ax.set_xscale("log")
    ax.invert_xaxis()
    _density_ticks(ax)
    ax.set_xlabel("density (fraction of weights kept)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(f"{spec['id']}: random pruning at init vs IMP (LeNet-300-100, MNIST)")
    save_figure(fig, spec, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------- T003 neurons
NEURON_SCHEDULES = {"T003-neurons": "Frankle & Carbin rates (hidden 20%, output 10% per round)",
                    "T003-random": "every layer 50% per round (the IMP runs of T003-random)"}


def t003_neurons(spec: dict, runs: pd.DataFrame, target: float = 0.13) -> pd.DataFrame:
    """T003-neurons: per hidden layer, the fraction of units with no incoming or no outgoing connection
    at the IMP round whose density is closest to ``target``, for each IMP schedule (own runs and the
    runs of ``runs_from``); every round is in the figure. Claim: few neurons are pruned (checked as:
    under 10% of the units of every hidden layer)."""
    runs = source_runs(spec, runs)
    imp = runs[runs["method"] == "lth_imp_neurons"].copy()
    imp["schedule"] = [NEURON_SCHEDULES.get(s, s) for s in imp["spec_id"]]
    cols = sorted(c for c in imp.columns if c.startswith(("hidden_dead/", "units_no_in/", "units_no_out/")))
    dead_cols = [c for c in cols if c.startswith("hidden_dead/")]
    out, picked = [], {}
    for schedule, g in imp.groupby("schedule", sort=False):
        by_round = g.groupby("round")["density"].mean()
        rnd = int((by_round - target).abs().idxmin())
        picked[schedule] = rnd
        at = g[g["round"] == rnd]
        dens = float(at["density"].mean())
        holds = bool(all(at[c].mean() < 0.10 for c in dead_cols)) if dead_cols else None
        note = (f"IMP round {rnd} at density {dens:.4f}: units cut off " +
                ", ".join(f"{c.split('/', 1)[1]} {at[c].mean():.4f}" for c in dead_cols) +
                f"; test_acc {at['test_acc'].mean():.4f}")
        for c in cols + ["hidden_dead_all"]:
            if c not in at:
                continue
            metric, _, layer = c.partition("/")
            out.append(rows(spec, f"{schedule}: round {rnd}, density {dens:.4f}, {layer or 'all hidden layers'}",
                            metric, at[c].tolist(), "figure only: few neurons pruned", schedule=schedule,
                            layer=layer or "all", round=rnd, density=dens, ordering_holds=holds, note=note))
    _plot_neurons(spec, imp, dead_cols, picked)
    return pd.DataFrame(out)


def _plot_neurons(spec: dict, imp: pd.DataFrame, dead_cols: List[str], picked: Dict[str, int]) -> None:
    plt = pyplot()
    schedules = list(dict.fromkeys(imp["schedule"]))
    fig, axes = plt.subplots(1, len(schedules), figsize=(6 * len(schedules), 4), squeeze=False, sharey=True)
    for ax, schedule in zip(axes[0], schedules):
        m = imp[imp["schedule"] == schedule].groupby("round")[["density"] + dead_cols].mean()
        for c in dead_cols:
            ax.plot(m["density"], m[c] * 100, marker="o", label=f"hidden units of {c.split('/', 1)[1]}")
        rnd = picked[schedule]
        ax.axvline(m.loc[rnd, "density"], color="grey", ls=":", label=f"round {rnd} (~13% density)")
        ax.set_xscale("log")
        ax.invert_xaxis()
        _density_ticks(ax)
        ax.set_xlabel("IMP density")
        ax.set_title(schedule, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("% units with no in- or no outgoing connection")
    fig.suptitle(f"{spec['id']}: neurons cut off during IMP (LeNet-300-100, MNIST)")
    save_figure(fig, spec, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------- T000 randomized pruning
T000_REPORTED = {"none": 0.8768, "threshold": 0.8663, "random": 0.6456, "importance_random": 0.7806,
                 "fractional_threshold": 0.8747}


def t000_random_prune(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T000-random-prune: test accuracy per strategy (mean over seeds of each seed's mean over random
    draws) beside the document's FashionMNIST values; the ordering of the document
    (none > fractional threshold > threshold > importance-weighted random > random) is checked."""
    runs = source_runs(spec, runs)
    mean = runs.groupby("strategy")["test_acc"].mean()
    rep_order = sorted(T000_REPORTED, key=lambda k: -T000_REPORTED[k])
    meas_order = [k for k in sorted(mean.index, key=lambda k: -mean[k]) if k in T000_REPORTED]
    holds = meas_order == [k for k in rep_order if k in meas_order]
    note = "measured: " + " > ".join(meas_order) + "; reported: " + " > ".join(rep_order)
    out = []
    for strat, g in runs.groupby("strategy", sort=False):
        out.append(rows(spec, strat, "test_acc", g["test_acc"].tolist(), T000_REPORTED.get(strat, ""),
                        strategy=strat, layer=g["layer"].iloc[0], fraction=float(g["fraction"].iloc[0]),
                        pruned=float(g["pruned"].mean()), layer_size=int(g["layer_size"].iloc[0]),
                        draws=int(g["draws"].iloc[0]), within_draw_std=float(g["test_acc_std"].mean()),
                        ordering_holds=holds, note=note))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- T004
def t004_train(spec: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """T004-train: final train/test accuracy per dataset (figures only in the document) and the
    training curves (train loss, test accuracy per epoch) from each run's ``metrics.csv``."""
    runs = source_runs(spec, runs)
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
    least-squares update keeps at least the accuracy of plain removal on average over the removal
    curve (area under the curve)."""
    runs = source_runs(spec, runs)
    out = []
    checks = {}
    for ds, g in runs.groupby("dataset", sort=False):
        m = g.groupby(["update", "removed"])["test_acc"].mean().unstack(0)
        if {"ls", "none"} <= set(m.columns):
            auc_ls, auc_none = float(m["ls"].mean()), float(m["none"].mean())
            checks[ds] = (auc_ls >= auc_none, f"mean accuracy over the removal curve: ls {auc_ls:.4f}, none {auc_none:.4f}")
    for (ds, upd, removed), g in runs.groupby(["dataset", "update", "removed"], sort=False):
        hold, note = checks.get(ds, (None, ""))
        out.append(rows(spec, f"{ds}, {upd}, {int(removed)} removed", "test_acc", g["test_acc"].tolist(),
                        "figure only", dataset=ds, update=upd, removed=int(removed),
                        units_left=int(g["units_left"].iloc[0]), ordering_holds=hold, note=note))
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
