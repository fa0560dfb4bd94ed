"""Sparse training from scratch: ``static_sparse``, ``set``, ``rigl``, ``faiss_grow``, ``dst_masked``.

* ``static_sparse``: a fixed random mask at ``density`` under a layer budget (ER / ERK / uniform),
  trained as is (the "pruned" reference row of thesis 001's tables; SET's fixed-topology baseline).
* ``set`` / ``rigl`` / ``faiss_grow``: the same start, plus a :class:`~sparsebench.dst.DSTUpdater`
  with the grow criterion of the method name (see :mod:`sparsebench.dst`; Mocanu et al. 2018,
  Evci et al. 2020, thesis 001 chapter 3).
* ``dst_masked``: dense weights behind trainable per-neuron thresholds (Liu et al. 2020).

Every method returns one summary row with the final accuracies, the realised ``density``, the wall
time (``train_seconds``, ``time_per_epoch``) and the topology-update time (``update_seconds``,
``update_share`` of the training time), plus ``recall_mean`` for faiss_grow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import pandas as pd
import torch

from sparsebench.sparsity.distributions import layer_counts, random_masks
from sparsebench.config import MethodConfig, _check, check_density, check_fraction
from sparsebench.dst import (DROP_SCHEDULES, GROWTH, METRICS, SEARCHES, DSTUpdater, ThresholdMaskCallback,
                   attach_threshold_masks)
from sparsebench.sparsity.masking import Masking
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method

MASK_BUDGETS = ("uniform", "uniform+", "er", "erk", "erk+", "global")


# --------------------------------------------------------------------------- schemas
@dataclass
class StaticSparseConfig(MethodConfig):
    """Random sparse masks at ``density`` (global, over all prunable weights) under ``budget``."""

    name: str = "static_sparse"
    density: float = 0.2
    budget: str = "erk"  # uniform | uniform+ | er | erk | erk+ | global

    def __post_init__(self):
        check_density("method.density", self.density)
        _check(self.budget in MASK_BUDGETS, "method.budget", self.budget, f"unknown (allowed: {', '.join(MASK_BUDGETS)})")


@dataclass
class _UpdateConfig(StaticSparseConfig):
    """Topology-update schedule shared by set, rigl and faiss_grow."""

    delta_t: int = 100  # ΔT: steps between updates
    delta_t_epochs: Optional[float] = None  # set: ΔT = round(delta_t_epochs * steps per epoch) (overrides delta_t)
    t_end: float = 0.75  # fraction of training after which the topology is frozen
    schedule: str = "cosine"  # drop-fraction decay: constant | cosine
    update_layers: List[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns of updated weights
    allow_regrow: bool = False  # weights dropped in an update may be grown back in the same update

    def __post_init__(self):
        super().__post_init__()
        _check(self.delta_t >= 1, "method.delta_t", self.delta_t, "must be >= 1")
        _check(self.delta_t_epochs is None or self.delta_t_epochs > 0, "method.delta_t_epochs", self.delta_t_epochs,
               "must be > 0 or null")
        _check(0.0 < self.t_end <= 1.0, "method.t_end", self.t_end, "must be in (0, 1]")
        _check(self.schedule in DROP_SCHEDULES, "method.schedule", self.schedule,
               f"unknown (allowed: {', '.join(DROP_SCHEDULES.names())})")
        _check(len(self.update_layers) > 0, "method.update_layers", list(self.update_layers), "must not be empty")


@dataclass
class SETConfig(_UpdateConfig):
    """SET. Defaults follow the RigL paper's SET baseline (ΔT=100, d0=0.3 cosine, T_end=0.75);
    Mocanu et al.'s original is ``delta_t_epochs=1 schedule=constant t_end=1.0``."""

    name: str = "set"
    drop_fraction: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        check_fraction("method.drop_fraction", self.drop_fraction)


@dataclass
class RigLConfig(SETConfig):
    """RigL (Evci et al. 2020): ΔT=100, d0=0.3 with cosine decay, T_end = 0.75 of training."""

    name: str = "rigl"


@dataclass
class FaissGrowConfig(_UpdateConfig):
    """Thesis 001: ``K`` = fraction of each layer's active connections replaced per update,
    ``k_similar`` = fraction of the indexed vectors returned per query, ``metric`` abs_ip | l2 | lsh,
    ``search`` brute | faiss, ``bits``: LSH code length per vector dimension."""

    name: str = "faiss_grow"
    K: float = 0.05
    k_similar: float = 0.15
    metric: str = "abs_ip"
    search: str = "faiss"
    bits: float = 1.0
    rerank: bool = False  # re-score merged faiss candidates by the exact |<g, u>|
    max_rows: Optional[int] = None  # subsample batch x positions coordinates of the vectors
    log_recall: bool = True  # recall vs the exact top-n at every update (excluded from update time)
    delta_t: int = 1
    t_end: float = 1.0
    schedule: str = "constant"

    def __post_init__(self):
        super().__post_init__()
        _check(0.0 < self.K < 1.0, "method.K", self.K, "must be in (0, 1)")
        _check(0.0 < self.k_similar <= 1.0, "method.k_similar", self.k_similar, "must be in (0, 1]")
        _check(self.metric in METRICS, "method.metric", self.metric, f"unknown (allowed: {', '.join(METRICS.names())})")
        _check(self.search in SEARCHES, "method.search", self.search, f"unknown (allowed: {', '.join(SEARCHES.names())})")
        _check(not (self.metric == "lsh" and self.search == "brute"), "method.search", self.search,
               "metric=lsh is an approximate faiss index; use search=faiss (or metric=abs_ip for the exact search)")
        _check(self.bits > 0, "method.bits", self.bits, "must be > 0")
        _check(self.max_rows is None or self.max_rows >= 1, "method.max_rows", self.max_rows, "must be >= 1 or null")


@dataclass
class DSTMaskedConfig(MethodConfig):
    """Liu et al. 2020: ``alpha`` weighs the sparsity regulariser ``sum exp(-t)``; thresholds start at
    ``threshold_init``; a layer more than ``reset_above`` masked gets its thresholds reset to 0."""

    name: str = "dst_masked"
    alpha: float = 5e-4
    threshold_init: float = 0.0
    reset_above: float = 0.99

    def __post_init__(self):
        _check(self.alpha >= 0, "method.alpha", self.alpha, "must be >= 0")
        check_fraction("method.reset_above", self.reset_above, closed_right=True)


# --------------------------------------------------------------------------- methods
def init_random_masks(masking: Masking, density: float, budget: str, seed: int) -> None:
    """Set uniformly random masks with the exact per-layer counts of ``budget`` (ER/ERK/uniform)."""
    counts = layer_counts(masking, density, budget)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    masking.set_masks(random_masks(masking, counts, gen))


class SparseFromScratch(Method):
    """Random sparse start, then training with the callback of :meth:`updater` (none: static)."""

    def updater(self, masking: Masking, steps_per_epoch: int) -> Optional[DSTUpdater]:
        return None

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        init_random_masks(masking, cfg.density, cfg.budget, int(ctx.cfg.seed))
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / int(ctx.cfg.trainer.batch_size)))
        upd = self.updater(masking, steps_per_epoch)
        trainer = ctx.trainer(model, masking, callbacks=[upd] if upd is not None else [])
        final = trainer.fit()
        epochs = max(1, trainer.epoch)
        extra = {"updates": 0, "grown_total": 0, "update_seconds": 0.0, "recall_mean": float("nan"), "random_fill": 0}
        if upd is not None:
            extra = upd.summary()
            extra["delta_t"] = upd.delta_t
        counts = masking.counts()
        row = self.row(density=masking.density(), budget=cfg.budget, **final, epochs=epochs,
                       time_per_epoch=final["train_seconds"] / epochs, **extra,
                       update_share=extra["update_seconds"] / max(final["train_seconds"], 1e-12),
                       layer_active=";".join(f"{n}:{a}/{t}" for n, (a, t) in counts.items()))
        return pd.DataFrame([row])


@METHODS.register("static_sparse", schema=StaticSparseConfig)
class StaticSparse(SparseFromScratch):
    """Fixed random ER/ERK/uniform mask (the fixed-mask reference row)."""


class DynamicSparse(SparseFromScratch):
    """``static_sparse`` plus drop/grow updates; the grow criterion is ``GROWTH[method.name]``."""

    drop_key = "drop_fraction"  # the config key holding the initial drop fraction d0

    def grow_kwargs(self) -> dict:
        return {}

    def updater(self, masking, steps_per_epoch):
        cfg = self.cfg
        delta_t = cfg.delta_t if cfg.delta_t_epochs is None else max(1, int(round(cfg.delta_t_epochs * steps_per_epoch)))
        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed) + 104729)
        grow = GROWTH.get(cfg.name)(gen, **self.grow_kwargs())
        return DSTUpdater(masking, grow, d0=float(cfg[self.drop_key]), schedule=cfg.schedule, delta_t=delta_t, t_end=cfg.t_end,
                          update_layers=list(cfg.update_layers), allow_regrow=cfg.allow_regrow, metrics=self.ctx.metrics)


@METHODS.register("set", schema=SETConfig)
class SET(DynamicSparse):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop smallest |w|, grow at random."""


@METHODS.register("rigl", schema=RigLConfig)
class RigL(DynamicSparse):
    """RigL (Evci et al. 2020): drop smallest |w|, grow largest |dense gradient|."""


@METHODS.register("faiss_grow", schema=FaissGrowConfig)
class FaissGrow(DynamicSparse):
    """Thesis 001: drop smallest |w|, grow by similarity search between output-gradient and input vectors."""

    drop_key = "K"

    def grow_kwargs(self):
        c = self.cfg
        return dict(metric=c.metric, search=c.search, k_similar=c.k_similar, bits=c.bits, rerank=c.rerank,
                    max_rows=c.max_rows, log_recall=c.log_recall)


@METHODS.register("dst_masked", schema=DSTMaskedConfig)
class DSTMasked(Method):
    """Dynamic sparse training with trainable masked layers (Liu et al. 2020): every prunable weight
    is parametrized as ``W * S(|W| - t)``; the network finds its own layer-wise sparsity."""

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        masks = attach_threshold_masks(masking, cfg.threshold_init)
        cb = ThresholdMaskCallback(masking, masks, cfg.alpha, cfg.reset_above, metrics=ctx.metrics)
        trainer = ctx.trainer(model, None, callbacks=[cb])
        final = trainer.fit()
        cb.sync()
        epochs = max(1, trainer.epoch)
        counts = masking.counts()
        row = self.row(density=masking.density(), **final, epochs=epochs,
                       time_per_epoch=final["train_seconds"] / epochs, update_seconds=trainer.time_in_callbacks,
                       update_share=trainer.time_in_callbacks / max(final["train_seconds"], 1e-12),
                       threshold_resets=cb.resets,
                       layer_active=";".join(f"{n}:{a}/{t}" for n, (a, t) in counts.items()))
        return pd.DataFrame([row])
