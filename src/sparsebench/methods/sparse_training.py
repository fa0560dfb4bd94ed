"""Sparse training from scratch: ``static_sparse``, ``dynamic_sparse`` and ``dst_masked``.

* ``static_sparse``: a fixed random mask at ``density`` under a layer ``distribution`` (ER / ERK /
  uniform, :mod:`sparsebench.sparsity.distributions`), trained as is (the fixed-mask reference row of
  thesis 001's tables; SET's fixed-topology baseline).
* ``dynamic_sparse``: the same start, plus a :class:`~sparsebench.dst.updater.DSTUpdater` that drops
  the smallest ``|w|`` and grows by the criterion ``method.grow`` (:mod:`sparsebench.dst.grow`):
  ``random`` (SET, Mocanu et al. 2018), ``gradient`` (RigL, Evci et al. 2020) or ``similarity``
  (thesis 001, chapter 3). ``conf/method/{set,rigl,faiss_grow}.yaml`` are presets of it; the schema
  defaults are RigL's schedule (ΔT=100, d0=0.3 cosine, T_end=0.75 of training, ERK), so
  ``method=set method.grow=gradient`` is exactly ``method=rigl``.
* ``dst_masked``: dense weights behind trainable per-neuron thresholds (Liu et al. 2020).

Every method returns one summary row with the final accuracies, the realised ``density``, the wall
time (``train_seconds``, ``time_per_epoch``) and the topology-update time (``update_seconds``,
``update_share`` of the training time); ``dynamic_sparse`` adds ``grow`` and ``recall_mean``
(``grow=similarity``; NaN otherwise). Under ``trainer.sparse_kernels=true`` the row also counts the layers
trained truly sparse (``sparse_layers``; the others stayed masked-dense by density), and ``density`` /
``layer_active`` are read from their sparse storage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import pandas as pd
import torch

from sparsebench.config import MethodConfig, check, check_density, check_fraction
from sparsebench.dst.grow import GROW_CRITERIA
from sparsebench.dst.schedules import DROP_SCHEDULES
from sparsebench.dst.search import SEARCHES, check_search
from sparsebench.dst.similarity import METRICS
from sparsebench.dst.threshold import ThresholdMaskCallback, attach_threshold_masks
from sparsebench.dst.updater import DSTUpdater
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.sparsity.distributions import check_distribution, layer_counts, random_masks
from sparsebench.sparsity.masking import Masking
from sparsebench.core.seeding import derive_seed


def _check_name(registry, key: str, value: str) -> None:
    check(value in registry, key, value, f"unknown (allowed: {', '.join(registry.names())})")


# --------------------------------------------------------------------------- schemas
@dataclass
class StaticSparseConfig(MethodConfig):
    """Random sparse masks at ``density`` (global, over all prunable weights) under ``distribution``
    (a :data:`~sparsebench.sparsity.distributions.DISTRIBUTIONS` name; ``erk_power_scale`` is the ER/ERK
    exponent)."""

    name: str = "static_sparse"
    density: float = 0.2
    distribution: str = "erk"
    erk_power_scale: float = 1.0

    def __post_init__(self):
        check_density("method.density", self.density)
        check_distribution(self.distribution)
        check(self.erk_power_scale > 0, "method.erk_power_scale", self.erk_power_scale, "must be > 0")


@dataclass
class DynamicSparseConfig(StaticSparseConfig):
    """Dynamic sparse training: ``static_sparse`` plus drop/grow updates.

    ``drop_fraction`` d0 (RigL's alpha, the thesis' K) decays by ``drop_fraction_anneal``; updates every
    ``delta_t`` steps (or every ``delta_t_epochs`` epochs, which overrides it) until ``t_end`` (fraction
    of training); ``grow`` is a :data:`~sparsebench.dst.grow.GROW_CRITERIA` name. The similarity keys
    (``metric``, ``search``, ``k_similar``, ``bits``, ``rerank``, ``max_rows``, ``log_recall``) are read
    by ``grow=similarity`` only. Defaults: RigL's schedule (ΔT=100, d0=0.3 cosine, T_end=0.75) with SET's
    random growth.
    """

    name: str = "dynamic_sparse"
    grow: str = "random"
    drop_fraction: float = 0.3
    drop_fraction_anneal: str = "cosine"  # constant | cosine
    delta_t: int = 100  # ΔT: steps between updates
    delta_t_epochs: Optional[float] = None  # set: ΔT = round(delta_t_epochs * steps per epoch) (overrides delta_t)
    t_end: float = 0.75  # fraction of training after which the topology is frozen
    update_layers: List[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns of updated weights
    allow_regrow: bool = False  # weights dropped in an update may be grown back in the same update
    # grow=similarity (thesis 001, chapter 3)
    metric: str = "abs_ip"  # abs_ip | l2 | lsh
    search: str = "faiss"  # faiss | brute
    k_similar: float = 0.15  # fraction of the indexed (output-gradient) vectors returned per query
    bits: float = 1.0  # lsh: nbits = bits x vector dimension
    rerank: bool = False  # re-score merged faiss candidates by the exact |<g, u>|
    max_rows: Optional[int] = None  # subsample batch x positions coordinates of the vectors
    log_recall: bool = True  # recall vs the exact top-n at every update (excluded from update time)

    def __post_init__(self):
        super().__post_init__()
        _check_name(GROW_CRITERIA, "method.grow", self.grow)
        check_fraction("method.drop_fraction", self.drop_fraction)
        _check_name(DROP_SCHEDULES, "method.drop_fraction_anneal", self.drop_fraction_anneal)
        check(self.delta_t >= 1, "method.delta_t", self.delta_t, "must be >= 1")
        check(self.delta_t_epochs is None or self.delta_t_epochs > 0, "method.delta_t_epochs", self.delta_t_epochs,
              "must be > 0 or null")
        check(0.0 < self.t_end <= 1.0, "method.t_end", self.t_end, "must be in (0, 1]")
        check(len(self.update_layers) > 0, "method.update_layers", list(self.update_layers), "must not be empty")
        _check_name(METRICS, "method.metric", self.metric)
        _check_name(SEARCHES, "method.search", self.search)
        check_search(self.search, self.metric)
        check(0.0 < self.k_similar <= 1.0, "method.k_similar", self.k_similar, "must be in (0, 1]")
        check(self.bits > 0, "method.bits", self.bits, "must be > 0")
        check(self.max_rows is None or self.max_rows >= 1, "method.max_rows", self.max_rows, "must be >= 1 or null")


@dataclass
class DSTMaskedConfig(MethodConfig):
    """Liu et al. 2020: ``alpha`` weighs the sparsity regulariser ``sum exp(-t)``; thresholds start at
    ``threshold_init``; a layer more than ``reset_above`` masked gets its thresholds reset to 0."""

    name: str = "dst_masked"
    alpha: float = 5e-4
    threshold_init: float = 0.0
    reset_above: float = 0.99

    def __post_init__(self):
        check(self.alpha >= 0, "method.alpha", self.alpha, "must be >= 0")
        check_fraction("method.reset_above", self.reset_above, closed_right=True)


# --------------------------------------------------------------------------- methods
def init_random_masks(masking: Masking, density: float, distribution: str, seed: int,
                      erk_power_scale: float = 1.0) -> None:
    """Set uniformly random masks with the exact per-layer counts of ``distribution`` (ER/ERK/uniform)."""
    counts = layer_counts(masking, density, distribution, erk_power_scale=erk_power_scale)
    gen = torch.Generator().manual_seed(derive_seed(seed, "mask_init"))
    masking.set_masks(random_masks(masking, counts, gen))


def _layer_active(masking) -> str:
    """``name:active/total;...`` of a :class:`Masking` or a :class:`~sparsebench.sparsity.sparse_linear.SparseConversion`."""
    return ";".join(f"{n}:{a}/{t}" for n, (a, t) in masking.counts().items())


class SparseFromScratch(Method):
    """Random sparse start, then training with the callback of :meth:`updater` (none: static)."""

    def updater(self, masking: Masking, steps_per_epoch: int) -> Optional[DSTUpdater]:
        return None

    def identity(self) -> dict:
        """The row's setting columns after ``density``."""
        return {"distribution": self.cfg.distribution}

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        init_random_masks(masking, cfg.density, cfg.distribution, int(ctx.cfg.seed), cfg.erk_power_scale)
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / int(ctx.cfg.trainer.batch_size)))
        upd = self.updater(masking, steps_per_epoch)
        trainer = ctx.trainer(model, masking, callbacks=[upd] if upd is not None else [])
        final = trainer.fit()
        # trainer.sparse_kernels=true: the converted layers' topology lives in their sparse storage, not in `masking`
        topology = trainer.sparse if trainer.sparse is not None else masking
        epochs = max(1, trainer.epoch)
        extra = {"updates": 0, "grown_total": 0, "update_seconds": 0.0, "recall_mean": float("nan"), "random_fill": 0}
        if upd is not None:
            extra = upd.summary()
            extra["delta_t"] = upd.delta_t
        row = self.row(density=topology.density(), **self.identity(), **final, epochs=epochs,
                       time_per_epoch=final["train_seconds"] / epochs, **extra,
                       update_share=extra["update_seconds"] / max(final["train_seconds"], 1e-12),
                       layer_active=_layer_active(topology),
                       **({"sparse_layers": len(trainer.sparse.sparse)} if trainer.sparse is not None else {}))
        return pd.DataFrame([row])


@METHODS.register("static_sparse", schema=StaticSparseConfig)
class StaticSparse(SparseFromScratch):
    """Fixed random ER/ERK/uniform mask (the fixed-mask reference row)."""


@METHODS.register("dynamic_sparse", schema=DynamicSparseConfig)
class DynamicSparse(SparseFromScratch):
    """``static_sparse`` plus drop/grow updates with the grow criterion ``GROW_CRITERIA[method.grow]``."""

    def identity(self) -> dict:
        return {**super().identity(), "grow": self.cfg.grow}

    def updater(self, masking, steps_per_epoch):
        cfg = self.cfg
        delta_t = cfg.delta_t if cfg.delta_t_epochs is None else max(1, int(round(cfg.delta_t_epochs * steps_per_epoch)))
        gen = torch.Generator().manual_seed(derive_seed(self.ctx.cfg.seed, "grow"))
        grow = GROW_CRITERIA.get(cfg.grow).from_config(cfg, gen)
        return DSTUpdater(masking, grow, d0=float(cfg.drop_fraction), schedule=cfg.drop_fraction_anneal,
                          delta_t=delta_t, t_end=cfg.t_end, update_layers=list(cfg.update_layers),
                          allow_regrow=cfg.allow_regrow, metrics=self.ctx.metrics)


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
        row = self.row(density=masking.density(), **final, epochs=epochs,
                       time_per_epoch=final["train_seconds"] / epochs, update_seconds=trainer.time_in_callbacks,
                       update_share=trainer.time_in_callbacks / max(final["train_seconds"], 1e-12),
                       threshold_resets=cb.resets, layer_active=_layer_active(masking))
        return pd.DataFrame([row])
