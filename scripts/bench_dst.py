#!/usr/bin/env python
"""Cost of dynamic-sparse topology updates relative to fixed-mask sparse training, ratios in one run.

``python scripts/bench_dst.py [--steps-mlp 400] [--steps-wrn 100] [--reps 7] [--out results/bench/dst.txt]``

For each model (LeNet-300-100 on MNIST, batch 128; WideResNet-10-1 on 32x32-padded MNIST, batch 32;
80% sparse, uniform random masks, every conv/linear layer updated) it trains the same number of SGD
steps with

* a fixed mask (the reference) and the same again (its ratio is the measurement's noise floor),
* RigL (``grow=gradient``), faiss_grow (``grow=similarity``: abs inner product, ``search=faiss``:
  IndexFlatIP's per-query top-k, k_similar 0.15, answered by one GEMM and a per-query selection since
  issue 15) and faiss_grow with exact brute-force torch search, each at ΔT=100 (drop fraction 0.3)
  and ΔT=1 (drop fraction 0.05, the thesis' K), constant, and at ΔT=1 faiss_grow through the faiss
  library's own index (``search=faiss_index``, what ``faiss`` ran before issue 15: the same set),

interleaving the configurations over ``--reps`` repetitions (in a rotating order), and reports
``ratio``: every step's process CPU time (single-threaded, so it is the compute cost) is taken
as its minimum over the repetitions (the same batches each time; interference from a shared VM,
whose identical 1-second runs differ by up to 30%, only ever adds time, while an update step is
slow in every repetition, so its cost stays in), summed over the steps, divided by the same sum
for the fixed mask (``ms/step`` is that sum per step); ``paired``: the median over repetitions of
the whole run's CPU time divided by the fixed mask's in the same repetition; the ratio of median
wall times, the update's share of the wall time (``DSTUpdater.update_seconds``,
timed around the update itself, so precise) and the ratio that share implies, ``1 / (1 - share)``
(it leaves out the update's indirect cost, e.g. caches the next step finds cold). Targets of
issue 4: ΔT=100 at most 1.05x, ΔT=1 at most 1.5x, judged on both ``ratio`` and ``1/(1-share)``;
issue 15 for ``faiss_grow faiss dT=1``: at most 2x on LeNet-300-100 and 1.5x on the WRN.

``recall`` (grow configurations): after the timed repetitions each runs once more with recall logging
on (the same batches and choices: the logging draws nothing): the fraction of grown positions that
lie in the exact top-n of ``|dL/dW|`` among the growable ones at the same step, over all updates and
layers (``SimilarityGrow.log_recall``; 1 by construction for the brute force, which reads
``weight.grad``). ``same as index``: in that run every faiss search is also answered by the faiss
library's index (``faiss_index``) on the same vectors, or, where grow.py searches ``S = weight.grad``
(``find_scores``: no vectors), by every query's full top-k list of ``S`` merged, and the fraction of
positions both return is printed (below 1 only by ties and float rounding at the k-th / n-th score). ``vectors ms/step``: in
that run, the time per step ``grow.layer_vectors`` took to turn the captured tensors into the search's
vectors (``F.unfold`` for a convolution): the part of faiss_grow's update outside ``search.py``.
On the shared 2-core VM this was written on, configurations that run the very same steps (the
fixed mask and RigL at ΔT=100 before its first update) still differ by up to 10% in ``ratio``:
a whole-run ratio cannot resolve a 5% target there, while the update share is timed around
the update itself; at ΔT=100 (a handful of updates) it is the cost, at ΔT=1 the indirect cost
matters and ``ratio`` is the figure to trust.
CPU, ``torch.set_num_threads(1)`` and one faiss thread (the machine is shared). Recall logging is off
(it is a diagnostic, excluded from update time anyway). Uses real MNIST from $SPARSEBENCH_DATA; falls
back to random data of MNIST's shape when it is absent (then says so).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from sparsebench.sparsity.distributions import layer_counts, random_masks  # noqa: E402
from sparsebench.config import DatasetConfig, TrainerConfig  # noqa: E402
from sparsebench.data import DataBundle, Split, load_dataset  # noqa: E402
from sparsebench.dst.grow import GROW_CRITERIA  # noqa: E402
from sparsebench.dst.search import (FaissIndexSearch, _k_per_query, _merge_topn,  # noqa: E402
                                    _per_query_candidates)
from sparsebench.dst.updater import DSTUpdater  # noqa: E402
from sparsebench.core.errors import DataError  # noqa: E402
from sparsebench.sparsity.masking import Masking  # noqa: E402
from sparsebench.models import MLP, WideResNet  # noqa: E402
from sparsebench.training.trainer import Trainer  # noqa: E402

# (label, grow criterion (GROW_CRITERIA name), its kwargs, ΔT); drop fraction 0.3 at ΔT=100 (RigL), 0.05 at ΔT=1
# (the thesis' K); recall logging off (a diagnostic, excluded from the update time anyway)
NO_RECALL = {"log_recall": False}
CONFIGS = [
    ("fixed mask", None, {}, None),
    ("fixed mask again (noise)", None, {}, None),  # the same runs once more: the measurement's noise floor
    ("rigl dT=100", "gradient", {}, 100),
    ("faiss_grow faiss dT=100", "similarity", {"search": "faiss", **NO_RECALL}, 100),
    ("faiss_grow brute dT=100", "similarity", {"search": "brute", **NO_RECALL}, 100),
    ("rigl dT=1", "gradient", {}, 1),
    ("faiss_grow faiss dT=1", "similarity", {"search": "faiss", **NO_RECALL}, 1),
    ("faiss_grow faiss_index dT=1", "similarity", {"search": "faiss_index", **NO_RECALL}, 1),  # before issue 15
    ("faiss_grow brute dT=1", "similarity", {"search": "brute", **NO_RECALL}, 1),
]
D0 = {100: 0.3, 1: 0.05}
TARGET_BY_DT = {100: 1.05, 1: 1.5}  # issue 4
ISSUE15 = "faiss_grow faiss dT=1"  # issue 15's targets per model (bench(..., target15=...))


class IndexAgreement:
    """Wraps a faiss_grow search (a :data:`SEARCHES` instance) and counts the positions it shares with a
    reference on the same input; the wrapped search's answer is used. ``find(G, U)``: the faiss
    library's index (:class:`FaissIndexSearch`, same metric and k_similar) on the same vectors.
    ``find_scores(S)`` (grow.py's path from ``weight.grad``, no vectors to index): every query's full
    top-k list of ``S`` merged (:func:`_per_query_candidates`, :func:`_merge_topn`: what IndexFlatIP
    computes; tests/test_dst_search.py checks that it is the library's set)."""

    def __init__(self, search):
        self.inner, self.exact = search, search.exact
        self.ref = FaissIndexSearch(search.metric, search.k_similar, search.rerank)
        self.same = self.n = 0

    def answers_from_scores(self):
        return self.inner.answers_from_scores()

    def _count(self, got, want):
        self.same += len(set(got.tolist()) & set(want.tolist()))
        self.n += want.numel()
        return got

    def find(self, key, G, U, mask_flat, n):
        return self._count(self.inner.find(key, G, U, mask_flat, n), self.ref.find(key, G, U, mask_flat, n))

    def find_scores(self, key, S, mask_flat, n):
        flat, sim = _per_query_candidates(S.float(), self.inner.metric.signs,
                                          _k_per_query(self.inner.k_similar, S.shape[0]))
        M = mask_flat.cpu()
        want = _merge_topn(flat.cpu().numpy(), sim.cpu().numpy(), M, n)
        return self._count(self.inner.find_scores(key, S, mask_flat, n), want)


def mnist(pad_to=None, subset=20000) -> tuple[DataBundle, str]:
    root = os.environ.get("SPARSEBENCH_DATA", "data")
    try:
        data = load_dataset(DatasetConfig(name="mnist", root=root, train_subset=subset, test_subset=1000,
                                          pad_to=pad_to, val_fraction=0.0), seed=0)
        return data, "real MNIST"
    except DataError:
        side = pad_to or 28
        x = torch.randn(subset, 1, side, side)
        y = torch.randint(0, 10, (subset,))
        s = Split(x, y)
        return DataBundle("random", "image", s, Split(x[:500], y[:500]), Split(x[:500], y[:500]), 10), \
            "RANDOM data of MNIST shape (MNIST not found)"


class TimedVectors:
    """Times ``sparsebench.dst.grow.layer_vectors`` (the captured input / output gradient turned into the
    search's vectors: a reshape for Linear, ``F.unfold`` for Conv2d) for the duration of a ``with``
    block, in ``seconds``; a diagnostic of the untimed runs only."""

    def __init__(self):
        import sparsebench.dst.grow as grow_module

        self.module, self.orig, self.seconds = grow_module, grow_module.layer_vectors, 0.0

    def __enter__(self):
        def timed(*args):
            t = time.perf_counter()
            out = self.orig(*args)
            self.seconds += time.perf_counter() - t
            return out

        self.module.layer_vectors = timed
        return self

    def __exit__(self, *exc):
        self.module.layer_vectors = self.orig


def run_once(make_model, data, batch, steps, grow, kw, delta_t, device, diagnose=False):
    """One training run; returns wall s, CPU s, update s, updates, per-step times, and with ``diagnose``
    (recall logging on, faiss searches checked against the faiss index) ``(recall, same-as-index,
    vectors s per step)``."""
    torch.manual_seed(0)
    model = make_model().to(device)
    masking = Masking(model)
    masking.set_masks({n: m.to(device) for n, m in random_masks(masking, layer_counts(masking, 0.2, "uniform"),
                                                                 torch.Generator().manual_seed(0)).items()})
    callbacks, upd, probe = [], None, None
    if grow is not None:
        if diagnose and "log_recall" in kw:
            kw = {**kw, "log_recall": True}
        g = GROW_CRITERIA.get(grow)(torch.Generator().manual_seed(1), **kw)
        if diagnose and hasattr(g, "search") and not (g.search.exact or isinstance(g.search, FaissIndexSearch)):
            g.search = probe = IndexAgreement(g.search)
        d0 = D0.get(delta_t, 0.3)
        upd = DSTUpdater(masking, g, d0=d0, schedule="constant", delta_t=delta_t, t_end=1.0)
        callbacks = [upd]
    cfg = TrainerConfig(lr=0.05, batch_size=batch, iterations=steps, device=str(device), eval_every=10**6, nan_check=False)
    tr = Trainer(cfg, model, data, device, masking=masking, callbacks=callbacks)
    for cb in tr.callbacks:
        cb.on_train_start(tr)
    n = len(data.train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = [perm[(i * batch) % (n - batch):(i * batch) % (n - batch) + batch].to(device) for i in range(steps)]
    x_all, y_all = tr.data.train.x, tr.data.train.y
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # per-step cost
    per_step = []
    t, c = time.perf_counter(), time.process_time()
    with TimedVectors() if diagnose else contextlib.nullcontext() as vectors:
        for idx in batches:
            s0 = clock()
            tr.train_step(x_all[idx], y_all[idx])
            sync()
            per_step.append(clock() - s0)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    if diagnose:
        recall = upd.summary()["recall_mean"] if upd is not None else float("nan")
        return (recall, (probe.same / probe.n if probe is not None and probe.n else float("nan")),
                vectors.seconds / steps)
    return wall, cpu, (upd.update_seconds if upd else 0.0), (upd.updates if upd else 0), per_step


def bench(name, make_model, data, batch, steps, reps, lines, device, target15):
    cpus = {c[0]: [] for c in CONFIGS}
    walls = {c[0]: [] for c in CONFIGS}
    upd_s = {c[0]: [] for c in CONFIGS}
    paired = {c[0]: [] for c in CONFIGS}
    steps_t = {c[0]: [] for c in CONFIGS}
    nupd = {}
    run_once(make_model, data, batch, min(steps, 20), None, {}, None, device)  # warm-up (allocator, kernels)
    for r in range(reps):
        # rotate the order every repetition so no configuration always runs right after the same one
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        got = {}
        for label, grow, kw, dt in order:
            wall, cpu, us, nu, per_step = run_once(make_model, data, batch, steps, grow, kw, dt, device)
            got[label] = cpu
            steps_t[label].append(per_step)
            walls[label].append(wall)
            cpus[label].append(cpu)
            upd_s[label].append(us / wall)
            nupd[label] = nu
            print(f"  [{name}] rep {r} {label:26s} wall {wall:7.2f} s  cpu {cpu:7.2f} s", flush=True)
        for label in got:
            paired[label].append(got[label] / got["fixed mask"])
    diag = {label: run_once(make_model, data, batch, steps, grow, kw, dt, device, diagnose=True)
            for label, grow, kw, dt in CONFIGS if grow == "similarity"}
    med = statistics.median
    # per step, the minimum over repetitions (interference only ever adds time; the update steps are
    # slow in every repetition, so their cost stays in), summed over the steps
    min_sum = {label: sum(min(col) for col in zip(*steps_t[label])) for label in steps_t}
    spread = (max(cpus["fixed mask"]) / min(cpus["fixed mask"]) - 1) if reps > 1 else 0.0
    lines.append(f"\n{name}: {steps} steps, batch {batch}, {reps} repetitions, configurations interleaved in a rotating "
                 f"order (fixed-mask CPU time varies by {100 * spread:.0f}% across repetitions)")
    lines.append(f"{'configuration':28s} {'cpu s':>7s} {'ms/step':>8s} {'ratio':>7s} {'paired':>7s} {'wall ratio':>10s} "
                 f"{'updates':>8s} {'update share':>13s} {'1/(1-share)':>12s} {'recall':>7s} {'same as index':>13s} "
                 f"{'vectors ms/step':>15s}  target")
    for label, grow, kw, dt in CONFIGS:
        ratio = min_sum[label] / min_sum["fixed mask"]
        wall_ratio = med(walls[label]) / med(walls["fixed mask"])
        share = med(upd_s[label])
        goal = target15 if label == ISSUE15 else TARGET_BY_DT.get(dt)
        if label == "faiss_grow faiss_index dT=1":
            goal = None  # the reference of the previous implementation
        target = "" if goal is None else (f"<= {goal:g}x: ratio {'met' if ratio <= goal else 'MISSED'}, "
                                          f"1/(1-share) {'met' if 1 / (1 - share) <= goal else 'MISSED'}")
        if label == ISSUE15:
            target += " (issue 15)"
        recall, same, vec_s = diag.get(label, (float("nan"), float("nan"), float("nan")))
        lines.append(f"{label:28s} {med(cpus[label]):7.2f} {1000 * min_sum[label] / steps:8.2f} {ratio:7.3f} "
                     f"{med(paired[label]):7.3f} {wall_ratio:10.3f} {nupd[label]:8d} {100 * share:12.1f}% "
                     f"{1 / (1 - share):12.3f} {_fmt(recall):>7s} {_fmt(same):>13s} "
                     f"{_fmt(1000 * vec_s, '.2f'):>15s}  {target}")


def _fmt(x: float, spec: str = ".4f") -> str:
    return "-" if x != x else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-mlp", type=int, default=400)
    ap.add_argument("--steps-wrn", type=int, default=100)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (faiss stays on the CPU: vectors are copied)")
    ap.add_argument("--batch-mlp", type=int, default=128)
    ap.add_argument("--batch-wrn", type=int, default=32)
    ap.add_argument("--wrn", default="10x1", help="WRN depth x width, e.g. 28x5 on a GPU")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                   "bench", "dst.txt"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import faiss

    faiss.omp_set_num_threads(a.threads)
    lines = ["bench_dst: topology-update cost vs fixed-mask sparse training (issues 4, 15)",
             f"torch {torch.__version__}, faiss {faiss.__version__}, {a.threads} CPU thread(s), "
             f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
             "80% sparse (uniform random masks), all conv/linear layers updated; drop fraction 0.3 at dT=100, "
             "0.05 at dT=1 (constant); faiss_grow: abs_ip, k_similar=0.15; timed runs with recall logging off, "
             "recall and agreement with the faiss index from one more run each"]
    device = torch.device(a.device)
    lines.append(f"device: {device}")
    data, what = mnist()
    lines.append(f"MLP data: {what}")
    bench("LeNet-300-100 (MNIST 28x28)", lambda: MLP(784, 10, [300, 100]), data, a.batch_mlp, a.steps_mlp, a.reps,
          lines, device, target15=2.0)
    depth, width = (int(v) for v in a.wrn.split("x"))
    data32, what = mnist(pad_to=32, subset=5000)
    lines.append(f"\nWRN data: {what}")
    bench(f"WideResNet-{depth}-{width} (MNIST padded to 32x32)", lambda: WideResNet(1, 10, depth=depth, width=width),
          data32, a.batch_wrn, a.steps_wrn, a.reps, lines, device, target15=1.5)
    lines.append(f"\nload average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    text = "\n".join(lines) + "\n"
    print(text)
    from sparsebench.core.io import atomic_write_text

    atomic_write_text(a.out, text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
