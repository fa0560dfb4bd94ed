"""``method=forward_time`` (document 002, T002-time): forward time of a batch through the network
pruned per layer to each k (criteria of :data:`~sparsebench.sparsity.units.UNIT_CRITERIA`), dense vs the
sparse export of :mod:`sparsebench.sparsity.export` (CSR / COO), on CPU and, when available, CUDA.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pandas as pd
import torch

from sparsebench.config import MethodConfig, check
from sparsebench.core.errors import ConfigError
from sparsebench.core.threads import torch_threads
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.sparsity.export import export_sparse
from sparsebench.sparsity.units import DEFAULT_KS, UNIT_CRITERIA, check_ks, prunable_layers, zero_dead_unit_biases

LAYOUTS = ("csr", "coo", "auto")  # export_sparse layouts timed here (semi_structured/bsr need other masks)


@dataclass
class ForwardTimeConfig(MethodConfig):
    """``method=forward_time``: dense vs sparse forward time against k (T002-time)."""

    name: str = "forward_time"
    ks: List[float] = field(default_factory=lambda: list(DEFAULT_KS))
    criteria: List[str] = field(default_factory=lambda: ["weight", "unit"])
    layouts: List[str] = field(default_factory=lambda: ["csr", "coo"])
    batch_size: int = 100
    repeats: int = 30  # timed forward passes per variant (interleaved; min and median reported)
    threads: Optional[int] = 1  # torch threads while timing (1: less noise on a shared machine); null = as is
    cuda: bool = True  # also time on CUDA when it is available
    prune_output: bool = False
    train: bool = False  # time the trained net (weights' values do not change the time; off saves time)

    def __post_init__(self):
        check_ks("method.ks", self.ks)
        for c in self.criteria:
            UNIT_CRITERIA.get(c)
        for lay in self.layouts:
            check(lay in LAYOUTS, "method.layouts", lay, f"unknown (allowed: {', '.join(LAYOUTS)})")
        check(self.batch_size >= 1, "method.batch_size", self.batch_size, "must be >= 1")
        check(self.repeats >= 1, "method.repeats", self.repeats, "must be >= 1")
        check(self.threads is None or self.threads >= 1, "method.threads", self.threads, "must be >= 1 or null")


def time_forward(fns: Dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device
                 ) -> Dict[str, Dict[str, float]]:
    """Time each zero-argument forward in ``fns``, interleaved round-robin (so load changes on a shared
    machine hit every variant alike), after one warm-up call each.

    Returns:
        ``{name: {"min": s, "median": s}}`` in seconds per forward pass.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        sync()
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - t)
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


@METHODS.register("forward_time", schema=ForwardTimeConfig)
class ForwardTime(Method):
    """One row per (device, criterion, k, layout): ``seconds`` (min over repeats), ``seconds_median``,
    ``dense_seconds`` and ``speedup = dense_seconds / seconds`` of a forward pass of ``batch_size``
    real test images.

    Raises:
        ConfigError: the test split has fewer than ``batch_size`` samples.
    """

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        if cfg.train:
            ctx.trainer(model, masking).fit()
        model = model.cpu().eval()
        x_all = ctx.data.test.x[:cfg.batch_size]
        if x_all.shape[0] < cfg.batch_size:
            raise ConfigError(f"method.batch_size={cfg.batch_size}: the test split has only {x_all.shape[0]} samples")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        names = prunable_layers(masking, cfg.prune_output)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if cfg.cuda and torch.cuda.is_available() else [])
        rows = []
        with torch_threads(cfg.threads):
            for dev in devices:
                x = x_all.to(dev)
                for crit_name in cfg.criteria:
                    crit = UNIT_CRITERIA.get(crit_name)()
                    for k in cfg.ks:
                        model.load_state_dict(state)
                        masking.set_masks(crit.masks(masking, names, float(k)))
                        if crit.removes_units:
                            zero_dead_unit_biases(masking, names)
                        dense_model = model.to(dev)
                        fns = {"dense": lambda m=dense_model: m(x)}
                        for lay in cfg.layouts:
                            exported = export_sparse(dense_model, lay).to(dev)
                            fns[lay] = lambda m=exported: m(x)
                        t = time_forward(fns, cfg.repeats, dev)
                        for lay in cfg.layouts:
                            rows.append(self.row(device=dev.type, criterion=crit_name, k=float(k), layout=lay,
                                                 density=masking.density(), batch_size=cfg.batch_size,
                                                 threads=torch.get_num_threads() if dev.type == "cpu" else None,
                                                 seconds=t[lay]["min"], seconds_median=t[lay]["median"],
                                                 dense_seconds=t["dense"]["min"],
                                                 speedup=t["dense"]["min"] / t[lay]["min"]))
                        model.cpu()
        return pd.DataFrame(rows)
