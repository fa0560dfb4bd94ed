#!/usr/bin/env python
"""Benchmark: the label-spreading pipeline on full MNIST against scikit-learn, interleaved repetitions.

    python scripts/bench_lpa.py [--reps 5] [--k 10] [--mask 0.9] [--seed 0] [--threads N] [--n N]
                                [--out results/bench/lpa.txt]

Setting (issue 15 / document 000): 70 000 MNIST images (train + test pooled), pixels scaled to [0, 1],
PCA to 50 components, k = 10, alpha = 0.99, 90% of the labels hidden (seeded). Every pipeline is
``sparsebench.LabelSpreading`` (timed: PCA + k-NN graph + propagation; data loading is not timed);
the reference is scikit-learn's ``PCA(50)`` + ``LabelSpreading(kernel='knn', n_neighbors=k,
alpha=0.99, max_iter=1000)`` on the same scaled pixels and mask. One-time costs (pynndescent's numba
compilation, thread-pool start-up) are paid in a warm-up before any clock starts.

The project machines are shared: the pipelines run interleaved (one repetition = every pipeline
once, in turn), and the report gives each pipeline's minimum and median seconds, the speed-up over
scikit-learn per repetition (reference seconds / ours, the same repetition) as min / median, each
stage's share beside its floor estimate, and the load average (``os.getloadavg``). The verdict uses
the median per-repetition ratio, which a loaded machine inflates far less than absolute seconds.

Floor estimates (issue 15, on 2 cores): PCA to 50 components by a randomized method ~0.3 s, an
NN-descent / HNSW graph ~0.5 s, CG propagation < 0.1 s; the exact graph is bounded below by
``2 n^2 d`` FLOPs at this machine's SGEMM rate, measured here on the brute backend's block shape.
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
from sparsebench.graph.pca import scale_unit  # noqa: E402
from sparsebench.graph.spreading import mask_labels  # noqa: E402
from sparsebench.methods.lpa import load_pool  # noqa: E402

PIPELINES = {  # label -> LabelSpreading parameters (besides k, alpha, scale, PCA 50, seed)
    "approx  pynndescent + CG, randomized PCA": dict(graph="pynndescent", solver="cg", pca_solver="randomized"),
    "approx  pynndescent + CG (method defaults)": dict(graph="pynndescent", solver="cg"),
    "exact   brute torch + CG, randomized PCA": dict(graph="brute", solver="cg", pca_solver="randomized"),
    "exact   brute torch + CG (method defaults)": dict(graph="brute", solver="cg"),
}
APPROX, EXACT = "approx  pynndescent + CG, randomized PCA", "exact   brute torch + CG, randomized PCA"
SKLEARN = "sklearn PCA + LabelSpreading(knn)"
FLOOR = {"pca": 0.3, "graph": 0.5, "propagation": 0.1}  # seconds, issue 15's 2-core estimates
TARGETS = {"approx_s": 1.5, "exact_s": 5.0, "speedup": 12.0, "acc": 0.963}


def sgemm_rate(d: int = 51, n: int = 70000, rows: int = 479, reps: int = 5) -> float:
    """FLOP/s of the brute backend's block product ``(rows, d) @ (d, n)`` (best of ``reps``)."""
    a, b = torch.randn(rows, d), torch.randn(d, n)
    out = torch.empty(rows, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * d * n / best


def run_sklearn(x, y, labelled, k, alpha, seed, max_iter):
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
    buf = io.StringIO()

    def say(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        buf.write(line + "\n")

    try:
        x, y, C = load_pool({"name": "mnist", "root": default_data_root()}, a.seed, "all", a.n)
    except SparsebenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labelled = mask_labels(y, a.mask, a.seed, C)
    y_in = np.where(labelled, y, -1)
    n = len(y)
    ests = {lab: LabelSpreading(n_neighbors=a.k, alpha=a.alpha, scale=True, pca_components=50, random_state=a.seed,
                                num_threads=a.threads, **kw) for lab, kw in PIPELINES.items()}
    say(f"# bench_lpa: MNIST n={n}, PCA 50, k={a.k}, alpha={a.alpha}, {a.mask:.0%} of labels masked, seed {a.seed}, "
        f"{a.reps} interleaved repetitions")
    say(f"# machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average before "
        f"{os.getloadavg()[0]:.2f} (shared machine: other jobs inflate all timings; the verdict uses ratios)")
    t0 = time.perf_counter()
    warm = sum(warmup_pipeline(e) for e in ests.values())
    rate = sgemm_rate(n=n)
    say(f"# warm-up (not timed below): {time.perf_counter() - t0:.1f} s ({warm:.1f} s pipelines); "
        f"SGEMM rate {rate / 1e9:.1f} GFLOP/s -> exact-graph floor 2 n^2 d = {2.0 * n * n * 50 / rate:.2f} s")

    runs = {lab: [] for lab in [*PIPELINES, SKLEARN]}
    loads = []
    for rep in range(a.reps):
        loads.append(os.getloadavg()[0])
        for lab, est in ests.items():
            est.fit(x, y_in)
            pred = est.transduction_
            runs[lab].append({**est.timings_, "acc": float((pred[~labelled] == y[~labelled]).mean()),
                              "iters": est.n_iter_})
        runs[SKLEARN].append(run_sklearn(x, y, labelled, a.k, a.alpha, a.seed, a.sklearn_max_iter))
        say(f"#   repetition {rep + 1}: " + ", ".join(f"{r[-1]['total']:.2f}" for r in runs.values()) + " s")

    say("")
    say(f"{'pipeline':44s} {'min s':>6s} {'med s':>6s} {'PCA':>5s} {'graph':>6s} {'prop':>5s} {'iters':>5s} "
        f"{'acc masked':>10s} {'speed-up vs sklearn, min/median':>32s}")
    ref = [r["total"] for r in runs[SKLEARN]]
    summary = {}
    for lab, rs in runs.items():
        tot = [r["total"] for r in rs]
        ratios = [s / t for s, t in zip(ref, tot)]
        med = statistics.median(tot)
        best = min(range(len(rs)), key=lambda i: tot[i])
        share = {s: rs[best][s] / tot[best] for s in ("pca", "graph", "propagation")}
        summary[lab] = {"min": min(tot), "median": med, "ratio_med": statistics.median(ratios),
                        "ratio_min": min(ratios), "acc": rs[0]["acc"], "stages": rs[best]}
        sp = "-" if lab == SKLEARN else f"{min(ratios):5.1f}x / {statistics.median(ratios):5.1f}x"
        say(f"{lab:44s} {min(tot):6.2f} {med:6.2f} {share['pca']:5.0%} {share['graph']:6.0%} "
            f"{share['propagation']:5.0%} {rs[0]['iters']:5d} {rs[0]['acc']:10.4f} {sp:>32s}")

    say("")
    say("# stages of the fastest repetition, seconds (floor estimate beside):")
    floor = {**FLOOR}
    for lab in PIPELINES:
        st = summary[lab]["stages"]
        gfloor = 2.0 * n * n * 50 / rate if ests[lab].graph == "brute" else FLOOR["graph"]
        say(f"#   {lab:44s} PCA {st['pca']:.2f} (~{floor['pca']:.1f})  graph {st['graph']:.2f} (~{gfloor:.2f})  "
            f"propagation {st['propagation']:.2f} (<{floor['propagation']:.1f})")
    ap_, ex = summary[APPROX], summary[EXACT]
    say("")
    say(f"# issue 15 targets: approximate <= {TARGETS['approx_s']} s, exact <= {TARGETS['exact_s']} s, "
        f">= {TARGETS['speedup']:.0f}x scikit-learn (median ratio of the same repetition), accuracy >= {TARGETS['acc']}")
    say(f"#   approximate: min {ap_['min']:.2f} s, median ratio {ap_['ratio_med']:.1f}x, acc {ap_['acc']:.4f} -> "
        f"{'met' if ap_['ratio_med'] >= TARGETS['speedup'] and ap_['acc'] >= TARGETS['acc'] else 'NOT met'} (ratio); "
        f"{'met' if ap_['min'] <= TARGETS['approx_s'] else 'NOT met'} (seconds)")
    say(f"#   exact: min {ex['min']:.2f} s, median ratio {ex['ratio_med']:.1f}x, acc {ex['acc']:.4f} -> "
        f"{'met' if ex['min'] <= TARGETS['exact_s'] else 'NOT met'} (seconds)")
    say(f"# load average during repetitions: {', '.join(f'{v:.2f}' for v in loads)}; after {os.getloadavg()[0]:.2f}")
    if a.out:
        from sparsebench.core.io import atomic_write_text

        atomic_write_text(a.out, buf.getvalue())
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
