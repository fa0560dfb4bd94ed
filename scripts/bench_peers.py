"""RigL side by side with a peer implementation: rigl-torch's ``RigLScheduler`` vs our ``method=rigl``.

Issue 15. Trains LeNet-300-100 on real MNIST (``SPARSEBENCH_DATA``) with both under the same settings
and prints test accuracy (mean ± std over seeds), each layer's mask density over time and the time
per training step, then a verdict: ours matches the peer's accuracy within the seed spread and is no
slower per step. Writes ``results/bench/peers.txt`` (``--out``).

rigl-torch (McCrearyD's PyTorch port of google-research/rigl) is not a dependency of sparsebench and
this script installs nothing: ``pip install rigl-torch==0.5.2`` into the venv first. It imports
torchvision, so :func:`sparsebench.data._torchvision.import_torchvision` (the CPU-build shim) runs
before it.

How both sides are made to do the same thing (the known quirks of rigl-torch 0.5.2):

* Same images in the same order, same init, same optimiser and LR schedule: both run in our
  :class:`~sparsebench.training.trainer.Trainer` from one composed config (``RunContext.new_model``
  seeds the init with the run seed; the trainer's seeded generator draws the batches). Ours runs
  through ``api.execute`` (``method=rigl``); the peer as a callback around the same trainer. Only the
  random initial masks differ (the peer draws them from torch's global RNG, ours from its own stream).
* ``ignore_linear_layers`` defaults to True (an MLP would stay dense): passed False.
* With ``uniform`` it keeps the first weighted layer dense: ours is given the same by
  ``model.dense_layers=[layers.0.weight]`` (excluded from the mask, not counted in the density), so
  both prune ``layers.2`` and ``layers.4`` at the same density.
* It skips ``optimizer.step()`` on update steps (its documented loop is ``if scheduler():
  optimizer.step()``, as google-research/rigl, which applies either the mask update or the gradient):
  the peer is run exactly that way (the callback calls the scheduler after backward and suppresses
  that step); ours steps and then updates (``on_step_end``). One step in ΔT differs.
* It may regrow what it just dropped (grow scores rank every position active after the drop; a
  regrown weight keeps its old value): ours runs with ``method.allow_regrow=true`` (the same candidate
  set; ours zeroes a regrown weight).
* An LR scheduler created after ``RigLScheduler`` fails (it replaces ``optimizer.step`` by a plain
  function): the trainer builds its (constant) scheduler first; the peer's scheduler is made in
  ``on_train_start``.
* ``T_end`` in steps = int(0.75 * total steps) for the peer, ``method.t_end=0.75`` for ours; ΔT=100,
  drop fraction 0.3 with cosine decay on both.

Usage: ``python scripts/bench_peers.py [--seeds 0 1 2] [--epochs 2] [--subset 10000] [--density 0.1]``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _settings(args, seed: int, out_dir: str):
    return [f"out_dir={out_dir}", "method=rigl", "method.distribution=uniform", f"method.density={args.density}",
            "method.delta_t=100", "method.drop_fraction=0.3", "method.drop_fraction_anneal=cosine",
            "method.t_end=0.75", "method.allow_regrow=true", "model=lenet300_100",
            "model.dense_layers=[layers.0.weight]", "dataset=mnist", f"dataset.train_subset={args.subset}",
            f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch_size}", f"trainer.lr={args.lr}",
            "trainer.optimizer=sgd", "trainer.device=cpu", "trainer.progress=false", f"seed={seed}"]


_OURS_LOG: list = []  # (step, {layer: density}) of the current run of ours
_OURS_TIMES: list = []  # perf_counter at every step end of the current run of ours


def _patch_ours():
    """Record our masks' per-layer density every ΔT steps into ``_OURS_LOG`` (wraps
    DynamicSparse.updater in this process only, once)."""
    from sparsebench.methods.sparse_training import DynamicSparse

    if getattr(DynamicSparse.updater, "_bench_peers", False):
        return
    log = _OURS_LOG

    orig = DynamicSparse.updater

    def updater(self, masking, steps_per_epoch):
        upd = orig(self, masking, steps_per_epoch)
        inner = upd.on_step_end

        def on_step_end(trainer):
            inner(trainer)
            _OURS_TIMES.append(time.perf_counter())
            if trainer.step % upd.delta_t == 0 or trainer.step == trainer.total_steps:
                dens = {"layers.0.weight": 1.0, **masking.layer_densities()}
                log.append((trainer.step, dens))

        upd.on_step_end = on_step_end
        return upd

    updater._bench_peers = True
    DynamicSparse.updater = updater


def run_ours(args, seed: int) -> dict:
    from sparsebench.api import compose, execute

    _patch_ours()
    _OURS_LOG.clear()
    _OURS_TIMES.clear()
    with tempfile.TemporaryDirectory() as d:
        df = execute(compose(_settings(args, seed, d)), quiet=True)
    r = df.iloc[0]
    return {"test_acc": float(r["test_acc"]), "sec_per_step": float(r["train_seconds"]) / int(r["steps"]),
            "steps": int(r["steps"]), "density": list(_OURS_LOG), "step_median": _median_step(_OURS_TIMES)}


def run_peer(args, seed: int) -> dict:
    from sparsebench.api import compose, validate
    from sparsebench.core.io import MetricsLog
    from sparsebench.data._torchvision import import_torchvision
    from sparsebench.methods.base import RunContext
    from sparsebench.training.callbacks import Callback

    import_torchvision()
    from rigl_torch.RigL import RigLScheduler

    class PeerRigL(Callback):
        """rigl-torch's RigLScheduler driven as its README does: ``if scheduler(): optimizer.step()``."""

        def __init__(self):
            self.sched, self.skip, self.log, self.times = None, False, [], []

        def on_train_start(self, trainer):
            self.sched = RigLScheduler(trainer.model, trainer.optimizer, dense_allocation=args.density,
                                       T_end=int(0.75 * trainer.total_steps), sparsity_distribution="uniform",
                                       ignore_linear_layers=False, delta=100, alpha=0.3)
            rigl_step = trainer.optimizer.step  # rigl-torch's wrapper (step, reset momentum, apply masks)

            def step(*a, **k):
                if not self.skip:
                    rigl_step()

            trainer.optimizer.step = step

        def on_after_backward(self, trainer):
            self.skip = not self.sched()  # False on a mask-update step: no optimizer step then

        def on_step_end(self, trainer):
            self.times.append(time.perf_counter())
            if trainer.step % 100 == 0 or trainer.step == trainer.total_steps:
                names = ["layers.0.weight", "layers.2.weight", "layers.4.weight"]
                dens = {n: 1.0 if m is None else float(m.float().mean())
                        for n, m in zip(names, self.sched.backward_masks)}
                self.log.append((trainer.step, dens))

    with tempfile.TemporaryDirectory() as d:
        cfg = validate(compose(_settings(args, seed, d)))
        run_dir = Path(d) / "peer"
        (run_dir / "checkpoints").mkdir(parents=True)
        ctx = RunContext(cfg, run_dir, torch.device("cpu"), MetricsLog(run_dir / "metrics.csv"))
        model = ctx.new_model()
        cb = PeerRigL()
        trainer = ctx.trainer(model, None, callbacks=[cb])
        final = trainer.fit()
    return {"test_acc": float(final["test_acc"]), "sec_per_step": final["train_seconds"] / final["steps"],
            "steps": int(final["steps"]), "density": cb.log, "rigl_steps": cb.sched.rigl_steps,
            "step_median": _median_step(cb.times)}


def _median_step(times: list) -> float:
    """Median seconds between consecutive step ends: the cost of a regular step (forward, backward,
    optimizer step, mask upkeep), robust to bursts of load from other processes on a shared machine;
    mask-update steps and epoch-end evaluations are the outliers it ignores (they are in the mean)."""
    deltas = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(deltas) if deltas else float("nan")


def _ms(v):
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=10000, help="training images (first N of the seeded shuffle)")
    p.add_argument("--density", type=float, default=0.1, help="density of layers.2 and layers.4")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=str(ROOT / "results" / "bench" / "peers.txt"))
    args = p.parse_args(argv)
    if not os.environ.get("SPARSEBENCH_DATA"):
        print("error: set SPARSEBENCH_DATA to the folder holding MNIST/raw (real MNIST is required)", file=sys.stderr)
        return 2
    from sparsebench.data._torchvision import import_torchvision

    import_torchvision()  # before rigl_torch, which imports torchvision
    # expected: rigl-torch replaces optimizer.step after the trainer built its LR scheduler (quirk above)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    try:
        import rigl_torch  # noqa: F401
    except ImportError:
        print("error: rigl-torch is not installed (pip install rigl-torch==0.5.2)", file=sys.stderr)
        return 2

    res = {"ours": [], "peer": []}
    t0 = time.time()
    for seed in args.seeds:  # interleaved, so machine load affects both sides alike
        res["ours"].append(run_ours(args, seed))
        res["peer"].append(run_peer(args, seed))
        print(f"seed {seed}: ours {res['ours'][-1]['test_acc']:.4f} peer {res['peer'][-1]['test_acc']:.4f}",
              flush=True)

    lines = [f"# RigL side by side: sparsebench method=rigl vs rigl-torch 0.5.2 RigLScheduler (issue 15)",
             f"# LeNet-300-100, real MNIST, {args.subset} training images, {args.epochs} epochs, batch "
             f"{args.batch_size}, SGD lr {args.lr} momentum 0.9 constant, layers.2/layers.4 at density "
             f"{args.density} (uniform; layers.0 dense on both), dT=100, drop 0.3 cosine, T_end 0.75, "
             f"seeds {args.seeds}; load average {os.getloadavg()[0]:.2f}; {time.time() - t0:.0f} s in all",
             ""]
    acc = {k: [r["test_acc"] for r in v] for k, v in res.items()}
    sps = {k: [r["sec_per_step"] for r in v] for k, v in res.items()}
    med = {k: [r["step_median"] for r in v] for k, v in res.items()}
    for k in ("ours", "peer"):
        lines.append(f"{k:5s} test_acc {_ms(acc[k])}  per seed {[round(a, 4) for a in acc[k]]}  steps {res[k][0]['steps']}")
        lines.append(f"      ms per regular step (median within a run) per seed {[round(1000 * s, 3) for s in med[k]]}; "
                     f"ms per step incl. updates and evaluation (train_seconds / steps) per seed "
                     f"{[round(1000 * s, 3) for s in sps[k]]}")
    lines.append(f"peer mask updates per run: {[r['rigl_steps'] for r in res['peer']]}")
    lines.append("")
    lines.append("per-layer mask density over time (seed %d): step: layers.0 / layers.2 / layers.4" % args.seeds[0])
    for k in ("ours", "peer"):
        lines.append(f"  {k}: " + "; ".join(f"{s}: " + "/".join(f"{d[n]:.4f}" for n in sorted(d))
                                            for s, d in res[k][0]["density"]))
    spread = max(statistics.stdev(acc["ours"]) if len(acc["ours"]) > 1 else 0.0,
                 statistics.stdev(acc["peer"]) if len(acc["peer"]) > 1 else 0.0)
    diff = statistics.mean(acc["ours"]) - statistics.mean(acc["peer"])
    matches = abs(diff) <= 2 * spread + 1e-4 if spread > 0 else abs(diff) <= 1e-3
    # paired by seed (the two sides of a seed ran back to back), then the median over seeds
    ratio = statistics.median(o / p for o, p in zip(med["ours"], med["peer"]))
    ratio_all = statistics.median(o / p for o, p in zip(sps["ours"], sps["peer"]))
    lines.append("")
    lines.append(f"verdict: accuracy {'MATCHES' if matches else 'DIFFERS'} (ours - peer = {100 * diff:+.2f} points; "
                 f"seed spread (larger std) {100 * spread:.2f} points, criterion |diff| <= 2 std); regular step ours/peer "
                 f"= {ratio:.3f} ({'no slower' if ratio <= 1.05 else 'SLOWER'}; 5% tolerance for timer noise; median of "
                 f"per-seed ratios); with updates and evaluation {ratio_all:.3f}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
