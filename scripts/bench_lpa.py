#!/usr/bin/env python
"""Benchmark: the label-spreading pipeline on full MNIST against scikit-learn, interleaved repetitions.

    flock /tmp/bench.lock nice -n -10 python scripts/bench_lpa.py [--reps 5] [--k 10] [--mask 0.9]
        [--seed 0] [--threads N] [--n N] [--sklearn-max-iter 1000] [--out results/bench/lpa.txt]

Setting (issue 15 / document 000): 70 000 MNIST images (train + test pooled), pixels scaled to [0, 1],
PCA to 50 components, k = 10, alpha = 0.99, 90% of the labels hidden (seeded). Every pipeline is
``sparsebench.LabelSpreading`` (timed: PCA incl. the scaling + k-NN graph + propagation incl. the
affinity; data loading is not timed); the reference is scikit-learn's ``PCA(50)`` +
``LabelSpreading(kernel='knn', n_neighbors=k, alpha=0.99, max_iter=1000)`` on the same pixels and
mask, timed the same way (scaling + PCA, then ``fit``). One-time costs (pynndescent's numba
compilation, thread-pool start-up) are paid in a warm-up before any clock starts, and printed.

The project machines are shared: the pipelines run interleaved (one repetition = every pipeline once,
in turn, then scikit-learn), and the report gives each stage's and each total's minimum and median
seconds, the speed-up over scikit-learn per repetition (its seconds / ours, the same repetition) as
min / median, each stage's share of the median total beside its floor estimate, and the load average
(``os.getloadavg``) before every repetition. The verdict on the speed-up uses the median
per-repetition ratio, which load inflates far less than absolute seconds; the absolute targets are
printed beside it with the load they were measured at.

Floor estimates (issue 15, 2 cores): PCA to 50 components by a randomized method ~0.3 s, an
NN-descent / HNSW graph ~0.5 s, CG propagation < 0.1 s; the exact graph is bounded below by its
``2 n^2 d`` FLOPs at this machine's SGEMM rate, measured here (best of 5 square 2048^3 products, and
the brute backend's own tile shape).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsebench.core.errors import SparsebenchError  # noqa: E402
from sparsebench.data import default_data_root  # noqa: E402
from sparsebench.graph.estimator import LabelSpreading, warmup_pipeline  # noqa: E402
from sparsebench.graph.knn import sampled_recall  # noqa: E402
from sparsebench.graph.pca import scale_unit  # noqa: E402
from sparsebench.graph.spreading import mask_labels  # noqa: E402
from sparsebench.methods.lpa import load_pool  # noqa: E402

#: label -> LabelSpreading parameters besides k, alpha, scale, PCA 50, seed (threads: --threads unless
#: given). "(... defaults)" rows are what the Hydra methods run. "1 thread" rows: on this shared 2-core
#: machine a 2-thread OpenMP loop waits at every barrier for a descheduled thread, so under load one
#: thread can be faster (pynndescent at load 5.5: 1.4-2.2 s on 1 thread, 3.4-5.5 s on 2). Dropped after
#: a full run at load 5 (11:45 UTC): faiss IVF(256, nprobe 8) (graph slower than pynndescent, recall
#: 0.980, acc 0.9606) and pynndescent(4 trees, 4 iters) (recall 0.971, acc 0.9627 < 0.963).
PIPELINES = {
    "approx  rand. PCA + pynndescent + CG 1e-3": dict(graph="pynndescent", pca_solver="randomized", cg_rtol=1e-3),
    "approx  rand. PCA + pynndescent + CG 1e-3, 1 thread": dict(
        graph="pynndescent", pca_solver="randomized", cg_rtol=1e-3, num_threads=1),
    "approx  (kann_lpa defaults: cov. PCA, CG 1e-4)": dict(graph="pynndescent"),
    "exact   rand. PCA + brute torch + CG 1e-3": dict(graph="brute", pca_solver="randomized", cg_rtol=1e-3),
    "exact   rand. PCA + brute torch + CG 1e-3, 1 thread": dict(
        graph="brute", pca_solver="randomized", cg_rtol=1e-3, num_threads=1),
    "exact   (knn_lpa defaults: cov. PCA, CG 1e-4)": dict(graph="brute"),
}
SKLEARN = "sklearn PCA(50) + LabelSpreading(knn)"
STAGES = ("pca", "graph", "propagation", "total")
FLOOR = {"pca": 0.3, "graph": 0.5, "propagation": 0.1}  # seconds, issue 15's 2-core estimates
TARGETS = {"approx_s": 1.5, "exact_s": 5.0, "speedup": 12.0, "acc": 0.963}


def sgemm_rate(shape, reps: int = 5) -> float:
    """FLOP/s of a float32 ``(m, kk) @ (kk, n)`` product ``shape = (m, kk, n)`` (best of ``reps``, after one
    untimed call)."""
    m, kk, n = shape
    a, b, out = torch.randn(m, kk), torch.randn(kk, n), torch.empty(m, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * kk * n / best


def run_sklearn(x, y, labelled, k, alpha, seed, max_iter) -> dict:
    """scikit-learn's pipeline on the raw pixels: scaling + ``PCA(50)`` (timed as "pca"), then
    ``LabelSpreading(kernel='knn').fit`` (graph and propagation, timed together as "propagation")."""
    from sklearn.decomposition import PCA
    from sklearn.semi_supervised import LabelSpreading as SkLabelSpreading

    t0 = time.perf_counter()
    z = PCA(50, random_state=seed).fit_transform(scale_unit(x))
    t_pca = time.perf_counter() - t0
    ls = SkLabelSpreading(kernel="knn", n_neighbors=k, alpha=alpha, max_iter=max_iter)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ls.fit(z, np.where(labelled, y, -1))
    t_fit = time.perf_counter() - t0
    pred = ls.transduction_
    return {"pca": t_pca, "graph": float("nan"), "propagation": t_fit, "total": t_pca + t_fit,
            "acc": float((pred[~labelled] == y[~labelled]).mean()), "iters": int(ls.n_iter_)}


def stats(values) -> tuple:
    """``(min, median)`` of the finite values (NaN, NaN when none)."""
    v = [x for x in values if x == x]
    return (min(v), statistics.median(v)) if v else (float("nan"), float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--mask", type=float, default=0.9)
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=None, help="seeded subset of the 70 000 images (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch/faiss/numba threads (default: library's)")
    ap.add_argument("--sklearn-max-iter", type=int, default=1000)
    ap.add_argument("--out", default=None, help="also write the report here (e.g. results/bench/lpa.txt)")
    a = ap.parse_args()
    if a.reps < 1:
        print(f"error: --reps={a.reps}: must be >= 1", file=sys.stderr)
        return 2
    buf = io.StringIO()

    def say(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        buf.write(line + "\n")

    try:
        x, y, C = load_pool({"name": "mnist", "root": default_data_root()}, a.seed, "all", a.n)
        labelled = mask_labels(y, a.mask, a.seed, C)
    except SparsebenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    y_in = np.where(labelled, y, -1)
    n, d_pca = len(y), 50
    ests = {lab: LabelSpreading(n_neighbors=a.k, alpha=a.alpha, scale=True, pca_components=d_pca,
                                random_state=a.seed, **{"num_threads": a.threads, **kw}) for lab, kw in PIPELINES.items()}
    say(f"# bench_lpa: MNIST n={n}, PCA {d_pca}, k={a.k}, alpha={a.alpha}, {a.mask:.0%} of labels masked, "
        f"seed {a.seed}, {a.reps} interleaved repetitions (each: every pipeline once, then scikit-learn)")
    say(f"# machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average before "
        f"{os.getloadavg()[0]:.2f} (shared machine: load inflates every absolute time; the verdict uses ratios)")
    t0 = time.perf_counter()
    warm = {lab: warmup_pipeline(e) for lab, e in ests.items()}
    t_warm = time.perf_counter() - t0
    say(f"# warm-up (NOT timed below): {t_warm:.1f} s, of which the first pynndescent pipeline (numba "
        f"compilation) {max(warm.values()):.1f} s")
    peak = sgemm_rate((2048, 2048, 2048))
    tile = (512, d_pca + 1, min(4096, n))  # BruteBackend's default tile (block_size x tile_cols)
    block = sgemm_rate(tile, reps=20)
    whole_rows = sgemm_rate((max(1, 2 ** 25 // n), d_pca + 1, n))
    flops = 2.0 * n * n * d_pca
    exact_floor = flops / peak
    say(f"# SGEMM: {peak / 1e9:.0f} GFLOP/s (2048^3), {block / 1e9:.0f} GFLOP/s at the brute backend's tile "
        f"({tile[0]} x {tile[1]} x {tile[2]}), {whole_rows / 1e9:.0f} GFLOP/s for whole rows "
        f"({max(1, 2 ** 25 // n)} x {d_pca + 1} x {n}, its path before the tiling); exact-graph floor 2 n^2 d = "
        f"{flops:.2e} FLOPs -> {exact_floor:.2f} s (peak rate), {flops / block:.2f} s (tile shape)")

    runs = {lab: [] for lab in [*PIPELINES, SKLEARN]}
    recall, loads = {}, []
    for rep in range(a.reps):
        loads.append(os.getloadavg()[0])
        for lab, est in ests.items():
            est.fit(x, y_in)
            pred = est.transduction_
            runs[lab].append({**est.timings_, "acc": float((pred[~labelled] == y[~labelled]).mean()),
                              "iters": est.n_iter_})
            if rep == 0 and not est.graph_.exact:  # outside every timed region
                recall[lab] = sampled_recall(est.graph_, est.X_, sample=2000, seed=a.seed)
        runs[SKLEARN].append(run_sklearn(x, y, labelled, a.k, a.alpha, a.seed, a.sklearn_max_iter))
        say(f"#   repetition {rep + 1} (load {loads[-1]:.2f}), totals s: "
            + ", ".join(f"{r[-1]['total']:.2f}" for r in runs.values()))

    ref = [r["total"] for r in runs[SKLEARN]]
    summary = {}
    for lab, rs in runs.items():
        st = {s: stats([r[s] for r in rs]) for s in STAGES}
        ratios = [s / r["total"] for s, r in zip(ref, rs)]
        summary[lab] = {"stages": st, "ratio": stats(ratios), "ratio_max": max(ratios),
                        "acc": rs[0]["acc"], "iters": rs[0]["iters"]}

    say("")
    say("# seconds, min / median over the repetitions; speed-up = scikit-learn's total / ours, same repetition")
    say(f"{'pipeline':62s} {'PCA':>11s} {'graph':>11s} {'prop':>11s} {'total':>11s} {'iters':>5s} "
        f"{'acc mask':>8s} {'recall':>6s} {'speed-up min/med':>17s}")
    for lab, sm in summary.items():
        st = sm["stages"]
        cells = " ".join(f"{st[s][0]:5.2f}/{st[s][1]:5.2f}" if st[s][0] == st[s][0] else f"{'(in fit)':>11s}"
                         for s in STAGES)
        rc = f"{recall[lab]:6.4f}" if lab in recall else f"{'-':>6s}"
        sp = "-" if lab == SKLEARN else f"{sm['ratio'][0]:5.1f}x / {sm['ratio'][1]:5.1f}x"
        say(f"{lab:62s} {cells} {sm['iters']:5d} {sm['acc']:8.4f} {rc} {sp:>17s}")

    say("")
    say("# share of the median total per stage, [floor estimate, 2 cores]; x floor = median stage / floor")
    for lab in PIPELINES:
        st = summary[lab]["stages"]
        tot = st["total"][1]
        floor = {**FLOOR, "graph": exact_floor if ests[lab].graph == "brute" else FLOOR["graph"]}
        parts = [f"{s} {st[s][1] / tot:4.0%} [{floor[s]:.2f} s, x{st[s][1] / floor[s]:4.1f}]"
                 for s in ("pca", "graph", "propagation")]
        say(f"#   {lab:62s} " + "   ".join(parts))

    approx = [lab for lab in PIPELINES if lab.startswith("approx")]
    exact = [lab for lab in PIPELINES if lab.startswith("exact")]
    ok = lambda lab: summary[lab]["acc"] >= TARGETS["acc"]  # noqa: E731
    best_a = min((lab for lab in approx if ok(lab)), key=lambda lab: summary[lab]["stages"]["total"][1], default=None)
    best_e = min((lab for lab in exact if ok(lab)), key=lambda lab: summary[lab]["stages"]["total"][1], default=None)
    say("")
    say(f"# issue 15 targets: approximate <= {TARGETS['approx_s']} s, exact <= {TARGETS['exact_s']} s, "
        f">= {TARGETS['speedup']:.0f}x scikit-learn (median ratio of the same repetition), accuracy on masked "
        f">= {TARGETS['acc']}")
    for kind, lab, target in (("approximate", best_a, TARGETS["approx_s"]), ("exact", best_e, TARGETS["exact_s"])):
        if lab is None:
            say(f"#   {kind}: no pipeline reached accuracy {TARGETS['acc']} -> NOT met")
            continue
        sm = summary[lab]
        ratio_ok = sm["ratio"][1] >= TARGETS["speedup"]
        say(f"#   {kind} ({lab.split(None, 1)[1].strip()}): acc {sm['acc']:.4f}; speed-up median {sm['ratio'][1]:.1f}x "
            f"(min {sm['ratio'][0]:.1f}x, max {sm['ratio_max']:.1f}x)"
            + (f" -> {'met' if ratio_ok else 'NOT met'} (ratio)" if kind == "approximate" else "")
            + f"; seconds min {sm['stages']['total'][0]:.2f} / median {sm['stages']['total'][1]:.2f} vs "
            f"{target} s -> {'met' if sm['stages']['total'][0] <= target else 'NOT met'} at load "
            f"{min(loads):.1f}-{max(loads):.1f}")
    say("# note: scikit-learn's reference is mostly single-threaded (its 1000 scipy sparse products), so load "
        "inflates it less than our 2-thread stages (barrier waits): a ratio measured under load understates "
        "the quiet-machine ratio; compare the 1-thread rows")
    say(f"# load average before each repetition: {', '.join(f'{v:.2f}' for v in loads)}; "
        f"after {os.getloadavg()[0]:.2f}")
    if a.out:
        from sparsebench.core.io import atomic_write_text

        atomic_write_text(a.out, buf.getvalue())
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
