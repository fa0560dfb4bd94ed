#!/usr/bin/env python
"""Training throughput: dense vs masked sparse training, in one run, with ratios.

    python scripts/bench_train.py                 # CPU: LeNet-300-100 mask overhead + a small WRN
    python scripts/bench_train.py --wrn 28 5 --batch 256 --amp --channels-last --compile   # GPU

For each model it times ``--steps`` optimizer steps (after ``--warmup``) of the sparsebench Trainer on
synthetic tensors of the right shape (timing only) for: dense, masked at 80% and 90% sparsity (our
mechanism: masks applied in place to gradients and weights around the optimizer step), and, as the
reference, the common ``F.linear(x, weight * mask)`` forward (masking inside the graph). It prints
images/s, the masked/dense ratio, and on CUDA the achieved fraction of the GPU's bf16 peak
(model FLOPs per image from torch.utils.flop_counter x images/s; ``--peak-tflops``, default 989 = H100
SXM dense bf16).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sparsebench.sparsity.distributions import layer_counts, random_masks  # noqa: E402
from sparsebench.config import TrainerConfig  # noqa: E402
from sparsebench.data import DataBundle, Split  # noqa: E402
from sparsebench.sparsity.masking import Masking  # noqa: E402
from sparsebench.models import MLP, WideResNet  # noqa: E402
from sparsebench.core.seeding import set_seed  # noqa: E402
from sparsebench.training.trainer import Trainer  # noqa: E402
from sparsebench.training.runtime import setup_run  # noqa: E402


class MaskInForward(nn.Module):
    """Reference: a Linear/Conv whose forward uses ``weight * mask`` (masking inside the graph)."""

    def __init__(self, mod: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.mod = mod
        self.register_buffer("mask", mask)

    def forward(self, x):
        w = self.mod.weight * self.mask
        if isinstance(self.mod, nn.Linear):
            return F.linear(x, w, self.mod.bias)
        return self.mod._conv_forward(x, w, self.mod.bias)


def wrap_mask_in_forward(model: nn.Module, masks: dict) -> nn.Module:
    for name, mask in masks.items():
        parent_name, _, child = name[: -len(".weight")].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MaskInForward(getattr(parent, child), mask))
    return model


def synthetic(shape, classes, n, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    s = Split(x, y)
    return DataBundle("synthetic", "image", s, Split(x[:1], y[:1]), Split(x[:1], y[:1]), classes)


def make_trainer(make_model, variant, sparsity, data, cfg, device):
    """A Trainer for one variant: ``dense``, ``masked`` (our mechanism) or ``reference`` (weight*mask)."""
    set_seed(0)
    model = make_model()
    masking = None
    if variant != "dense":
        probe = Masking(make_model())
        masks = random_masks(probe, layer_counts(probe, 1 - sparsity, "erk"), torch.Generator().manual_seed(0))
        if variant == "masked":
            masking = Masking(model)
            masking.set_masks(masks)
        else:  # reference: mask multiplied in forward
            model = wrap_mask_in_forward(model, masks)
    return Trainer(cfg, model, data, device, masking=masking, seed=0)


def time_round_robin(trainers: dict, steps: int, warmup: int, repeats: int, device) -> dict:
    """Best-of-``repeats`` images/s per variant; the variants alternate within every repeat, so slow
    drifts of the machine (frequency, other jobs) hit all of them alike."""
    best = {k: float("inf") for k in trainers}
    batches = {k: (t.data.train.x[:t.cfg.batch_size], t.data.train.y[:t.cfg.batch_size]) for k, t in trainers.items()}
    for k, t in trainers.items():
        for _ in range(warmup):
            t.train_step(*batches[k])
    for _ in range(repeats):
        for k, t in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                t.train_step(*batches[k])
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: steps * trainers[k].cfg.batch_size / v for k, v in best.items()}


def flops_per_image(make_model, shape, device):
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model().to(device)
    x = torch.randn(2, *shape, device=device)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    return fc.get_total_flops() / 2


def bench(name, make_model, shape, classes, args, device):
    cfg = TrainerConfig(batch_size=args.batch, lr=0.01, iterations=10**9, device=device.type, amp=args.amp,
                        channels_last=args.channels_last and len(shape) == 3, compile=args.compile,
                        cudnn_benchmark=device.type == "cuda", nan_check=False)
    setup_run(cfg)  # sets the cuDNN flag (process-wide, no longer done by Trainer)
    data = synthetic(shape, classes, args.batch, device)
    variants = {"dense": ("dense", 0.0)}
    for sp in (0.8, 0.9):
        variants[f"masked {int(sp * 100)}%"] = ("masked", sp)
        if not args.compile:
            variants[f"weight*mask {int(sp * 100)}% (reference)"] = ("reference", sp)
    trainers = {k: make_trainer(make_model, v, sp, data, cfg, device) for k, (v, sp) in variants.items()}
    rows = time_round_robin(trainers, args.steps, args.warmup, args.repeats, device)
    print(f"\n== {name}  batch {args.batch}  device {device}  amp={args.amp} channels_last={cfg.channels_last} "
          f"compile={args.compile}")
    dense = rows["dense"]
    fl = flops_per_image(make_model, shape, device) if device.type == "cuda" else None
    for k, ips in rows.items():
        extra = ""
        if fl:
            extra = f"  {100 * fl * ips / (args.peak_tflops * 1e12):5.1f}% of bf16 peak"
        print(f"  {k:30s} {ips:12.0f} images/s   ratio to dense {ips / dense:5.3f}  "
              f"(time overhead {dense / ips - 1:+.1%}){extra}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wrn", type=int, nargs=2, default=None, metavar=("DEPTH", "WIDTH"))
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-wrn", action="store_true", help="CPU: only the LeNet-300-100 mask-overhead part")
    args = ap.parse_args()
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_train: torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if device.type == "cpu":
        a = argparse.Namespace(**{**vars(args), "batch": args.batch or 64, "steps": args.steps or 200})
        bench("LeNet-300-100 (MNIST shape 1x28x28)", lambda: MLP(784, 10, [300, 100]), (1, 28, 28), 10, a, device)
        if args.skip_wrn:
            return
        depth, width = args.wrn or (10, 2)
        a = argparse.Namespace(**{**vars(args), "batch": args.batch or 64, "steps": 10})
        bench(f"WRN-{depth}-{width} (3x32x32)", lambda: WideResNet(3, 100, depth, width), (3, 32, 32), 100, a,
              device)
    else:
        depth, width = args.wrn or (28, 5)
        a = argparse.Namespace(**{**vars(args), "batch": args.batch or 256, "steps": args.steps or 30})
        bench(f"WRN-{depth}-{width} (3x32x32)", lambda: WideResNet(3, 100, depth, width), (3, 32, 32), 100, a,
              device)


if __name__ == "__main__":
    main()
