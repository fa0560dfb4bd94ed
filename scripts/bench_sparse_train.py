#!/usr/bin/env python
"""Time and memory of one training step: dense vs masked-dense vs truly sparse (issue 14), CPU.

    python scripts/bench_sparse_train.py [--reps 3] [--threads 1 2] [--out results/bench/sparse_train.txt]

Models: fc5 (784-1000-1000-500-200-10) and a wide MLP (784-4096-4096-10), every Linear at the same
random density 0.5 / 0.1 / 0.05 / 0.01 (uniform), batch 100 and 1024, 1 and 2 threads (one
subprocess per thread count, ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` set). A step is
``zero_grad + forward + cross-entropy + backward + SGD(momentum 0.9).step`` on Gaussian inputs.
Variants, interleaved over ``--reps`` repetitions after one warm-up step each (min and median). One
sample of a variant is one untimed step, then the mean time of a burst of consecutive steps lasting about
20 ms (1 to 10 steps, :data:`BURST_SECONDS`): a training run steps one model back to back, while a step
right after 13 other models ran measures their cache eviction too (fc5 at 1%: about 2.9 ms single-shot
against 2.0 ms in a burst, 2 threads; at batch 1024 a burst is one step, which was always such a cold one).

* ``dense``: plain ``nn.Linear``; ``masked``: ``nn.Linear`` + :class:`Masking` attached (the framework's
  masked mode); ``ours``: :func:`sparsify_for_training` with its defaults: backend ``auto``
  (:func:`sparsebench.sparsity.kernels.resolve_kernels`, printed in the header) and the per-layer
  fallback (``max_density = default_max_density(batch)``, 0.15 up to batch 128, 0.11 at 1024: denser
  layers stay masked-dense);
* the libraries, every layer sparse: ``torch_csr`` (:class:`SparseTrainLinear` forced onto the torch CSR
  backend: ``torch.sparse.mm`` + ``sampled_addmm``, cached transpose), ``sparseprop``
  (``sparseprop.modules.SparseLinear.from_dense``) and ``sparselab`` (``sparselab.SparseLinear`` at the
  same sparsity) where installed (benchmark-only extras). Their rows at density 0.5 on the wide model
  are skipped (seconds per step; 3-7x slower than dense there) unless ``--full``.

Memory = bytes of parameters + gradients + optimizer state + index / mask buffers after a step
(:func:`sparsebench.sparsity.sparse_linear.state_bytes`, which counts the cached transposed structures;
sparseprop's ``W_idx`` added here), as a multiple of ``density x dense``. sparselab keeps its indices in
C++ objects and a module-level transpose cache that no byte count here sees: its figure is a lower bound.
Targets (issue 14): ours >= 8x faster than dense at 1% on the wide MLP and >= 4x on fc5 (batch 100),
never > 1.2x slower than masked-dense at 50%, at least as fast as the best library, memory
<= 1.3 x density x dense where sparse kernels are chosen. The load average is printed: timings of a
shared machine are noisy. Also times one SET topology update (drop/grow 30%) of the wide model at 1%.

Similarity grow in sparse mode (``--grow``, default on; thesis 001's search of dL/dz against x, no dense
gradient): the wide and fc5 models at 1%, every layer truly sparse, batch 100, trained through the
framework's ``Trainer`` (``trainer.sparse_kernels=true``, SGD momentum 0.9) with a :class:`DSTUpdater`
(``grow=similarity``, ``metric=abs_ip``, ``search=faiss`` and ``brute``) at ΔT=100 (drop fraction 0.3,
:data:`GROW_STEPS` = 500 steps, updates every 100: a run's first update pays one-time costs, page faults of
its score buffer and selections without a carried threshold, which a 200-step run with two updates
counted as half of its update time) and ΔT=1 (drop fraction 0.05, 30 steps), against the same training
without updates (fixed sparse topology), interleaved over ``--reps``. Reported: ms per update, the first
update and the median of the later ones, the update's share of training time, and the measured ratio to
the fixed topology (the repetition with the smallest wall time).
Target (issue 14): at ΔT=100 the similarity grow adds <= 5%.

On CUDA (``--device cuda``, one in-process run, the GPU check's ``sparse_train`` step): the same model,
batch and density rows for ``dense``, ``masked``, ``ours`` and ``torch_csr``, whose products there are
cuSPARSE CSR (``torch.sparse.mm`` and ``sampled_addmm``; the compiled backends take CPU float32 only, so
``ours`` runs the same CSR products), each sample a burst timed between ``torch.cuda.synchronize`` calls.
No BSR row: the masks are unstructured, and a 1% uniform random mask leaves about 92% of its 16 x 16 blocks
non-empty (``1 - 0.99^256``), so BSR would store and multiply a nearly dense matrix;
``scripts/bench_sparse_forward.py`` times BSR on block-pruned masks. The similarity grow's CUDA rows are
``scripts/bench_dst.py --device cuda``'s (the GPU check's ``dst`` step).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

MODELS = {"fc5": [784, 1000, 1000, 500, 200, 10], "wide": [784, 4096, 4096, 10]}
DENSITIES = (0.5, 0.1, 0.05, 0.01)
BURST_SECONDS, BURST_MAX = 0.02, 10  # a sample = the mean of consecutive steps lasting about 20 ms (at most 10)
BATCHES = (100, 1024)
GROW_STEPS = 500  # steps of a similarity-grow run at dT=100: updates at steps 100, 200, ..., a first one included


def build(dims, density, variant, seed=0, batch=100, device="cpu"):
    """``(model, optimizer)`` of ``variant`` for an MLP of layer widths ``dims`` on ``device`` (the libraries:
    CPU only, ValueError elsewhere)."""
    import torch
    from torch import nn

    from sparsebench.sparsity.distributions import layer_counts, random_masks
    from sparsebench.sparsity.masking import Masking
    from sparsebench.sparsity.sparse_linear import default_max_density, sparsify_for_training

    torch.manual_seed(seed)
    if variant in ("sparselab", "sparseprop") and torch.device(device).type != "cpu":
        raise ValueError(f"{variant} runs on the CPU only")
    if variant == "sparselab":
        import sparselab

        layers = []
        for i in range(len(dims) - 1):
            layers += [sparselab.SparseLinear(dims[i], dims[i + 1], sparsity=1.0 - density), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    masking = None
    if variant != "dense":
        masking = Masking(model)
        masking.set_masks(random_masks(masking, layer_counts(masking, density, "uniform"),
                                       torch.Generator().manual_seed(seed)))
    if variant == "sparseprop":
        from sparseprop.modules import SparseLinear

        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                model[i] = SparseLinear.from_dense(m)
        masking = None
    elif variant == "ours":
        masking = sparsify_for_training(model, masking, max_density=default_max_density(batch)).masking
    elif variant == "torch_csr":
        masking = sparsify_for_training(model, masking, max_density=1.0, kernels="torch_csr").masking
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if masking is not None:
        masking.attach(opt)
    return model, opt


def bias_bytes(model, opt):
    """Bytes of the biases, their gradients and optimizer state: dense in every variant, so the weight
    memory ratio leaves them out (fc5 at 1%: biases alone are 0.12 x density x dense)."""
    import torch

    total = 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            total += p.numel() * p.element_size() * (1 + (p.grad is not None))
            total += sum(v.numel() * v.element_size() for v in opt.state.get(p, {}).values()
                         if torch.is_tensor(v) and v.dim() > 0)
    return total


def extra_index_bytes(model):
    """Index tensors the libraries keep outside parameters / buffers (sparseprop's ``W_idx``)."""
    total = 0
    for m in model.modules():
        idx = getattr(m, "W_idx", None)
        if isinstance(idx, tuple):
            total += sum(t.numel() * t.element_size() for t in idx)
    return total


def worker(threads, reps, full, libs, models, batches, device="cpu"):
    """Rows of one thread count (``device="cpu"``) or of one CUDA device (``threads`` 0: recorded as such)."""
    import torch
    import torch.nn.functional as F

    from sparsebench.sparsity.sparse_linear import SparseTrainLinear, set_update, state_bytes

    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    rows = []
    for mname in models:
        dims = MODELS[mname]
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, dims[0], generator=g).to(device)
            y = torch.randint(0, dims[-1], (batch,), generator=g).to(device)
            variants = {("dense", 1.0): build(dims, 1.0, "dense", device=device)}
            for d in DENSITIES:
                for v in ("masked", "ours") + tuple(libs):
                    if v in libs and d == 0.5 and mname == "wide" and not full:
                        continue
                    try:
                        variants[(v, d)] = build(dims, d, v, batch=batch, device=device)
                    except Exception as err:  # a library that does not build here: say why
                        rows.append({"model": mname, "batch": batch, "threads": threads, "variant": v,
                                     "density": d, "error": f"{type(err).__name__}: {err}"[:120]})

            if "sparselab" in libs:  # sparselab 0.2.2 caches W^T by id(W): a freed model's id reused by a new
                import sparselab.ops  # one hits a stale entry (IndexError in backward); no live W shares an id

                sparselab.ops._clear_transpose_cache()

            def step(model, opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            times = {k: [] for k in variants}
            burst = {}
            for k, (model, opt) in variants.items():
                step(model, opt)  # warm-up (and optimizer state allocated)
                sync()
                t = time.perf_counter()
                step(model, opt)
                sync()
                burst[k] = max(1, min(BURST_MAX, math.ceil(BURST_SECONDS / max(time.perf_counter() - t, 1e-6))))
            nreps = max(1, reps - 1) if (mname == "wide" and batch >= 1024) else reps
            for _ in range(nreps):
                for k, (model, opt) in variants.items():  # interleaved: one sample of every variant per repetition
                    step(model, opt)  # untimed: refills the caches the other variants' steps evicted
                    sync()
                    t = time.perf_counter()
                    for _ in range(burst[k]):
                        step(model, opt)
                    sync()
                    times[k].append((time.perf_counter() - t) / burst[k])
            for (v, d), ts in times.items():
                model, opt = variants[(v, d)]
                sparse = [n for n, m in model.named_modules() if isinstance(m, SparseTrainLinear)]
                rows.append({"model": mname, "batch": batch, "threads": threads, "variant": v, "density": d,
                             "min": min(ts), "median": statistics.median(ts), "reps": len(ts),
                             "bytes": state_bytes(model, opt) + extra_index_bytes(model),
                             "bias_bytes": bias_bytes(model, opt),
                             "sparse_layers": len(sparse)})
            del variants
    # one SET topology update of the wide model at 1% (drop / grow 30% of every layer)
    model, opt = build(MODELS["wide"], 0.01, "ours", device=device)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseTrainLinear)}
    sync()
    t = time.perf_counter()
    set_update(layers, 0.3, opt, generator=torch.Generator().manual_seed(0))
    sync()
    rows.append({"model": "wide", "batch": 0, "threads": threads, "variant": "set_update", "density": 0.01,
                 "min": time.perf_counter() - t, "median": 0.0, "reps": 1, "bytes": 0, "sparse_layers": len(layers)})
    return rows


def grow_rows(threads, reps, models=("wide", "fc5")):
    """Similarity-grow topology updates in sparse mode against a fixed sparse topology (module docstring)."""
    import torch

    from sparsebench.config import TrainerConfig
    from sparsebench.data import DataBundle, Split
    from sparsebench.dst.grow import GROW_CRITERIA
    from sparsebench.dst.updater import DSTUpdater
    from sparsebench.models import MLP
    from sparsebench.sparsity.distributions import layer_counts, random_masks
    from sparsebench.sparsity.masking import Masking
    from sparsebench.training.trainer import Trainer

    torch.set_num_threads(threads)
    rows = []
    for mname in models:
        dims = MODELS[mname]
        g = torch.Generator().manual_seed(0)
        n = 20000
        x, y = torch.randn(n, dims[0], generator=g), torch.randint(0, dims[-1], (n,), generator=g)
        data = DataBundle("gaussian", "tabular", Split(x, y), Split(x[:100], y[:100]), Split(x[:100], y[:100]), dims[-1])

        def run(search, delta_t, steps):
            torch.manual_seed(0)
            model = MLP(dims[0], dims[-1], hidden=dims[1:-1])
            masking = Masking(model)
            masking.set_masks(random_masks(masking, layer_counts(masking, 0.01, "uniform"), torch.Generator().manual_seed(0)))
            callbacks, upd = [], None
            if search is not None:
                crit = GROW_CRITERIA.get("similarity")(torch.Generator().manual_seed(1), metric="abs_ip",
                                                       search=search, log_recall=False)
                upd = DSTUpdater(masking, crit, d0=0.3 if delta_t >= 100 else 0.05, schedule="constant",
                                 delta_t=delta_t, t_end=1.0, metrics=_UpdateTimes())
                callbacks = [upd]
            cfg = TrainerConfig(iterations=steps, batch_size=100, lr=0.05, momentum=0.9, device="cpu",
                                eval_every=10 ** 6, nan_check=False, sparse_kernels=True, sparse_max_density=1.0,
                                num_threads=threads)
            tr = Trainer(cfg, model, data, torch.device("cpu"), masking=masking, callbacks=callbacks)
            for cb in tr.callbacks:
                cb.on_train_start(tr)
            t = time.perf_counter()
            for i in range(steps):
                idx = torch.arange(i * 100, (i + 1) * 100) % n
                tr.train_step(x[idx], y[idx])
            wall = time.perf_counter() - t
            per = upd.metrics.ms if upd else []
            return wall, (upd.update_seconds if upd else 0.0), (upd.updates if upd else 0), per

        L = GROW_STEPS
        configs = [("fixed", None, None, L), ("faiss dT=100", "faiss", 100, L), ("brute dT=100", "brute", 100, L),
                   ("fixed 30", None, None, 30), ("faiss dT=1", "faiss", 1, 30), ("brute dT=1", "brute", 1, 30)]
        run(None, None, 5)  # warm-up
        got = {c[0]: [] for c in configs}
        for r in range(reps):
            for label, search, dt, steps in configs[r % len(configs):] + configs[:r % len(configs)]:
                got[label].append(run(search, dt, steps))
        for label, search, dt, steps in configs:
            wall, upd_s, nupd, per = min(got[label], key=lambda r: r[0])
            base = min(got["fixed" if steps == L else "fixed 30"], key=lambda r: r[0])[0]
            firsts = [r[3][0] for r in got[label] if r[3]]
            laters = [ms for r in got[label] for ms in r[3][1:]]
            rows.append({"model": mname, "threads": threads, "variant": "grow", "label": label, "steps": steps,
                         "wall": wall, "update_s": upd_s, "updates": nupd, "ratio": wall / base,
                         "share": upd_s / wall if wall else 0.0,
                         "first_ms": min(firsts) if firsts else 0.0,
                         "later_ms": statistics.median(laters) if laters else 0.0})
    return rows


class _UpdateTimes:
    """A :class:`DSTUpdater` ``metrics`` sink keeping each update's ``dst/update_ms``."""

    def __init__(self):
        self.ms = []

    def log(self, step, metrics, store=True):
        if "dst/update_ms" in metrics:
            self.ms.append(float(metrics["dst/update_ms"]))


def grow_report(rows):
    out = ["\nSimilarity grow in sparse mode (every layer CSR, 1%, batch 100; abs_ip; the repetition with the "
           "smallest wall time; first / later: the first update of a run (min over repetitions) and the median "
           "of the later ones):",
           f"  {'model':>5} {'threads':>7} {'configuration':>14} {'steps':>5} {'updates':>7} {'ms/update':>9} "
           f"{'first':>7} {'later':>7} {'update share':>12} {'x fixed':>8}  target"]
    for r in rows:
        if r.get("variant") != "grow" or r["label"].startswith("fixed"):
            continue
        goal = ""
        if "dT=100" in r["label"]:
            ok = r["share"] <= 0.05  # the update's own time; the ratio also carries the machine's noise
            goal = (f"<= 5% added: {'met' if ok else 'MISSED'} (share {100 * r['share']:.1f}%, "
                    f"ratio {r['ratio']:.3f})")
        out.append(f"  {r['model']:>5} {r['threads']:>7} {r['label']:>14} {r['steps']:>5} {r['updates']:>7} "
                   f"{1e3 * r['update_s'] / max(r['updates'], 1):>9.1f} {r.get('first_ms', 0):>7.1f} "
                   f"{r.get('later_ms', 0):>7.1f} {100 * r['share']:>11.1f}% {r['ratio']:>8.3f}  {goal}")
    return out


def _where(threads):
    """How a row ran: ``"<n> thread(s)"`` on the CPU, ``"CUDA"`` for the device run (threads 0)."""
    return f"{threads} thread(s)" if threads else "CUDA"


def _weight_mem(r, dense, d):
    """Weights + their gradients + optimizer state + indices, over ``d`` x the dense model's (no biases)."""
    return (r["bytes"] - r["bias_bytes"]) / (d * (dense["bytes"] - dense["bias_bytes"]))


def _vs_best(key, where, d, libs, r):
    """``"  best library <name> x<ratio>"`` (its time / ours; >= 1: ours is at least as fast)."""
    lib = [(key[(*where, lv, d)]["min"], lv) for lv in libs if "min" in key.get((*where, lv, d), {})]
    if not lib:
        return ""
    t, name = min(lib)
    return f"  vs best {name} x{t / r['min']:.2f}"


def report(rows, libs):
    out = []
    key = {(r["model"], r["batch"], r["threads"], r["variant"], r["density"]): r for r in rows}
    for mname in MODELS:
        for threads in sorted({r["threads"] for r in rows}):
            for batch in sorted({r["batch"] for r in rows if r["batch"]}):
                dense = key.get((mname, batch, threads, "dense", 1.0))
                if dense is None:
                    continue
                out.append(f"\n{mname} {'-'.join(map(str, MODELS[mname]))}, batch {batch}, {_where(threads)}; "
                           f"dense step min {dense['min'] * 1e3:.1f} ms (median {dense['median'] * 1e3:.1f}), "
                           f"state {dense['bytes'] / 2**20:.1f} MiB")
                out.append(f"  {'density':>7} {'variant':>11} {'min ms':>9} {'med ms':>9} {'x dense':>8} "
                           f"{'x masked':>8} {'mem/(d*dense)':>13} {'weights':>7}  sparse layers")
                for d in DENSITIES:
                    masked = key.get((mname, batch, threads, "masked", d))
                    for v in ("masked", "ours") + tuple(libs):
                        r = key.get((mname, batch, threads, v, d))
                        if r is None:
                            continue
                        if "error" in r:
                            out.append(f"  {d:>7} {v:>11}  not run: {r['error']}")
                            continue
                        mem = r["bytes"] / (d * dense["bytes"])
                        wmem = _weight_mem(r, dense, d)
                        best = "" if v != "ours" else _vs_best(key, (mname, batch, threads), d, libs, r)
                        out.append(f"  {d:>7} {v:>11} {r['min'] * 1e3:>9.2f} {r['median'] * 1e3:>9.2f} "
                                   f"{dense['min'] / r['min']:>8.2f} {masked['min'] / r['min']:>8.2f} "
                                   f"{mem:>13.2f} {wmem:>7.2f}  {r['sparse_layers'] if v in ('ours', 'torch_csr') else '':>6}"
                                   f"{best}")
    return out


def targets(rows, libs):
    key = {(r["model"], r["batch"], r["threads"], r["variant"], r["density"]): r for r in rows if "error" not in r}
    lines = ["\nTargets (issue 14):"]
    for mname, want in (("wide", 8.0), ("fc5", 4.0)):
        if (mname, 100, 1, "dense", 1.0) not in key and (mname, 100, 2, "dense", 1.0) not in key:
            continue
        for th in sorted({r["threads"] for r in rows}):
            s = key[(mname, 100, th, "dense", 1.0)]["min"] / key[(mname, 100, th, "ours", 0.01)]["min"]
            lines.append(f"  {mname} 1% batch 100, {_where(th)}: {s:.2f}x over dense (target >= {want}x): "
                         f"{'met' if s >= want else 'MISSED'}")
    worst_masked, worst_lib, worst_mem, worst_all = 0.0, 10.0, 0.0, 0.0
    for (m, b, th, v, d), r in key.items():
        if v != "ours":
            continue
        worst_masked = max(worst_masked, r["min"] / key[(m, b, th, "masked", d)]["min"]) if d == 0.5 else worst_masked
        lib = [key[(m, b, th, lv, d)]["min"] for lv in libs if (m, b, th, lv, d) in key]
        if lib:
            worst_lib = min(worst_lib, min(lib) / r["min"])
        if r["sparse_layers"] == len(MODELS[m]) - 1:
            worst_mem = max(worst_mem, _weight_mem(r, key[(m, b, th, "dense", 1.0)], d))
            worst_all = max(worst_all, r["bytes"] / (d * key[(m, b, th, "dense", 1.0)]["bytes"]))
    lines.append(f"  at 50%: worst ours / masked-dense time {worst_masked:.2f} (target <= 1.2): "
                 f"{'met' if worst_masked <= 1.2 else 'MISSED'}")
    if libs:
        lines.append(f"  worst (best library time / ours time) over all rows {worst_lib:.2f} (target >= 1): "
                     f"{'met' if worst_lib >= 1.0 else 'MISSED'}")
    lines.append(f"  memory where every layer is sparse (weights + gradients + optimizer state + indices): worst "
                 f"{worst_mem:.2f} x density x dense (target <= 1.3): {'met' if worst_mem <= 1.3 else 'MISSED'}; "
                 f"with the dense biases {worst_all:.2f}")
    for r in rows:
        if r["variant"] == "set_update":
            lines.append(f"  SET update (30% of the wide model at 1%), {_where(r['threads'])}: {r['min'] * 1e3:.1f} ms")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--full", action="store_true", help="also run the libraries at 50%% on the wide MLP")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                   "bench", "sparse_train.txt"))
    ap.add_argument("--no-grow", action="store_true", help="skip the similarity-grow rows")
    ap.add_argument("--grow-only", action="store_true", help="only the similarity-grow rows")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: one in-process run on the GPU (dense / masked / ours / torch CSR = cuSPARSE)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    libs = ["torch_csr"]
    for lib in ("sparseprop", "sparselab"):
        try:
            __import__(lib)
            libs.append(lib)
        except Exception:
            pass
    if args.worker is not None:
        rows = [] if args.grow_only else worker(args.worker, args.reps, args.full, libs, args.models, args.batches)
        if not args.no_grow:
            rows += grow_rows(args.worker, args.reps, args.models)
        print(json.dumps(rows))
        return 0
    import torch

    from sparsebench.sparsity.kernels import resolve_kernels
    from sparsebench.sparsity.sparse_linear import default_max_density

    t0 = time.time()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device visible to this torch "
                  f"({torch.__version__}); run without --device for the CPU rows", file=sys.stderr)
            return 2
        head = [f"bench_sparse_train --device cuda: torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"{torch.cuda.get_device_name(0)}, optimizer SGD momentum 0.9, ours: the CSR products "
                "(compiled backends are CPU-only), torch_csr: cuSPARSE CSR; no BSR row (module docstring)"]
        rows = worker(0, args.reps, args.full, ["torch_csr"], args.models, args.batches, device="cuda")
        lines = head + report(rows, ["torch_csr"]) + targets(rows, ["torch_csr"])
        return _write(lines, t0, args.out)
    rows, head = [], [f"bench_sparse_train: torch {torch.__version__}, {os.cpu_count()} CPUs, optimizer SGD momentum 0.9, "
                      f"ours: backend {resolve_kernels('auto')} (kernels 'auto'), layers above density "
                      f"default_max_density(batch) ({default_max_density(100):.3f} at batch 100, "
                      f"{default_max_density(1024):.3f} at 1024) masked-dense; libraries: {', '.join(libs)}; "
                      f"load average before {os.getloadavg()}"]
    for th in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(th), MKL_NUM_THREADS=str(th))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(th), "--reps", str(args.reps),
               "--models", *args.models, "--batches", *map(str, args.batches)]
        cmd += ["--no-grow"] if args.no_grow else []
        cmd += ["--grow-only"] if args.grow_only else []
        res = subprocess.run(cmd + (["--full"] if args.full else []), env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return 1
        rows += json.loads(res.stdout.strip().splitlines()[-1])
    bench_rows = [r for r in rows if r.get("variant") != "grow"]
    lines = head + (report(bench_rows, libs) + targets(bench_rows, libs) if bench_rows else []) + grow_report(rows)
    return _write(lines, t0, args.out)


def _write(lines, t0, out):
    """Print the report and write it to ``out`` whole or not at all (:func:`sparsebench.core.io.atomic_write_text`)."""
    from sparsebench.core.io import atomic_write_text

    lines = lines + [f"\nload average after {os.getloadavg()}; wall {time.time() - t0:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
