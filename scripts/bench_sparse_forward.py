#!/usr/bin/env python
"""Dense vs sparse-export forward time of the fc5 net (784-1000-1000-500-200-10), batch 100.

    python scripts/bench_sparse_forward.py [--repeats 50] [--out results/bench/sparse_forward.txt]

Every layer is magnitude-pruned to 50 / 90 / 95 / 99 % sparsity (layer-wise, :mod:`sparsebench.masking`),
the masked model is exported with :func:`sparsebench.sparse_export.export_sparse` (torch sparse CSR),
and the dense and sparse forward passes of the same batch of 100 (real MNIST test images when
``$SPARSEBENCH_DATA`` has them, else Gaussian inputs) are timed interleaved in one run; the ratio
``dense time / sparse time`` (min over repeats) is printed per sparsity, for 1 torch thread and for
the default thread count, on CPU and, when available, CUDA. Targets (issue 3): >= 2x at 95%, >= 4x
at 99% on CPU. Outputs are checked to agree with the dense model.
"""
import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from sparsebench.masking import Masking, magnitude_masks  # noqa: E402
from sparsebench.methods.unit import time_forward  # noqa: E402
from sparsebench.models import MLP  # noqa: E402
from sparsebench.sparse_export import export_sparse, sparse_size_bytes  # noqa: E402

SPARSITIES = (0.5, 0.9, 0.95, 0.99)
TARGETS = {0.95: 2.0, 0.99: 4.0}


def batch(n: int = 100) -> tuple:
    """``(x (n, 1, 28, 28), source)``: real MNIST test images when available."""
    try:
        from sparsebench.config import DatasetConfig
        from sparsebench.data import load_dataset

        root = os.environ.get("SPARSEBENCH_DATA", "./data")
        data = load_dataset(DatasetConfig(name="mnist", root=root, val_fraction=0.0, train_subset=10), seed=0)
        return data.test.x[:n].contiguous(), "MNIST test images"
    except Exception as err:  # no data here: the timing does not depend on the input values
        return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)), f"Gaussian inputs ({err})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args()

    torch.manual_seed(0)
    x, source = batch(a.batch)
    lines = [f"fc5 784-1000-1000-500-200-10, batch {a.batch} ({source}); torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; min over {a.repeats} interleaved "
             f"repeats; ratio = dense time / sparse (CSR export) time",
             f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())} (a shared machine inflates the "
             f"multi-thread dense times most; the 1-thread rows are the fairer comparison)"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    default_threads = torch.get_num_threads()
    ok = True
    for dev in devices:
        for threads in ([1, default_threads] if dev.type == "cpu" and default_threads > 1 else [default_threads]):
            torch.set_num_threads(threads)
            lines.append(f"\n{dev.type}" + (f", {threads} thread(s)" if dev.type == "cpu" else ""))
            lines.append(f"{'sparsity':>9} {'dense ms':>9} {'csr ms':>9} {'ratio':>7} {'target':>7} {'MB dense->csr':>14} "
                         f"{'max |diff|':>10}")
            for s in SPARSITIES:
                model = MLP(784, 10, [1000, 1000, 500, 200])
                masking = Masking(model)
                masking.set_masks(magnitude_masks(masking, {n: 1.0 - s for n in masking.names}))
                model = model.to(dev).eval()
                sparse = export_sparse(model, "csr").to(dev)
                xd = x.to(dev)
                with torch.no_grad():
                    diff = float((model(xd) - sparse(xd)).abs().max())
                t = time_forward({"dense": lambda: model(xd), "csr": lambda: sparse(xd)}, a.repeats, dev)
                ratio = t["dense"]["min"] / t["csr"]["min"]
                target = TARGETS.get(s)
                flag = "" if target is None else ("ok" if ratio >= target else "MISS")
                if dev.type == "cpu" and target is not None and ratio < target:
                    ok = False
                mb = (sparse_size_bytes(export_sparse(model.cpu(), "dense")) / 1e6, sparse_size_bytes(sparse) / 1e6)
                lines.append(f"{s * 100:8.0f}% {t['dense']['min'] * 1e3:9.3f} {t['csr']['min'] * 1e3:9.3f} {ratio:6.2f}x "
                             f"{(f'>={target:g}x ' + flag) if target else '':>7} {mb[0]:6.2f}->{mb[1]:5.2f} {diff:10.2e}")
    torch.set_num_threads(default_threads)
    report = "\n".join(lines)
    print(report)
    if a.out:
        from sparsebench.io import atomic_write_text

        atomic_write_text(a.out, report + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
