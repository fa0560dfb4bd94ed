"""Pruning at initialisation: masks chosen once before training and then kept fixed.

Methods (``method.name``), both on the one :class:`PruneAtInit` flow:

* ``random_prune``: random masks at initialisation under any sparsity distribution of
  :mod:`sparsebench.sparsity.distributions` (``method.distribution``: ``uniform``, ``uniform+``, ``er``,
  ``erk``, ``erk+``, ``snip_ratio``, ...), then training with the mask fixed (document 003, section III;
  Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning"). ``snip_ratio`` keeps only the
  per-layer densities of SNIP's global top-k; positions are random.
* ``snip``: SNIP (Lee, Ajanthan & Torr 2019, "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", eq. 6): keep the global top-k of the connection sensitivity ``|w * dL/dw|`` at
  initialisation, computed on ``method.batches`` minibatches, then train with the mask fixed.

Both log the per-layer densities and the neuron-level accounting of their masks
(:func:`~sparsebench.sparsity.masking.mask_statistics`) at step 0 and in the summary row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pandas as pd
import torch

from sparsebench.config import MethodConfig, check, check_density
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.sparsity.distributions import check_distribution, get_distribution, layer_counts, random_masks
from sparsebench.sparsity.masking import Masking, mask_statistics
from sparsebench.sparsity.scores import SnipScore
from sparsebench.sparsity.selection import select_masks
from sparsebench.core.seeding import derive_seed


class PruneAtInit(Method):
    """Shared flow of pruning at initialisation: build the model, choose masks once (:meth:`init_masks`),
    log the per-layer densities and neuron accounting, train with the masks fixed; one summary row
    (:meth:`row_extra`, ``target_density``, realised ``density``, the trainer's final metrics, the mask
    statistics)."""

    def init_masks(self, model, masking: Masking, trainer, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        """``{name: 0/1 mask}`` for every prunable layer; ``gen`` is the run's mask generator."""
        raise NotImplementedError

    def row_extra(self) -> dict:
        """Leading summary-row columns of the method."""
        return {}

    def snip_scores(self, model, masking: Masking, trainer, batches: int, batch_size: Optional[int],
                    gen: torch.Generator) -> Dict[str, torch.Tensor]:
        """SNIP's ``|w * g|`` on ``batches`` training minibatches (default size: ``trainer.batch_size``)."""
        data = trainer.data.train
        return SnipScore(model, data.x, data.y, trainer.loss_fn, batches,
                         batch_size or self.ctx.cfg.trainer.batch_size, gen)(masking)

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        trainer = ctx.trainer(model, masking)
        gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "mask_init"))
        masking.set_masks(self.init_masks(model, masking, trainer, gen))
        init = mask_statistics(masking)
        ctx.metrics.log(0, init)
        final = trainer.fit()
        return pd.DataFrame([self.row(**self.row_extra(), target_density=cfg.density, density=masking.density(),
                                      **final, **init)])


# --------------------------------------------------------------------------- random pruning
@dataclass
class RandomPruneConfig(MethodConfig):
    """``method=random_prune``: random masks at init under ``distribution`` at global ``density``."""

    name: str = "random_prune"
    density: float = 0.1
    distribution: str = "erk"  # a name of sparsebench.sparsity.distributions.DISTRIBUTIONS
    dense: List[str] = field(default_factory=list)  # fnmatch patterns of layers kept dense (count to budget)
    erk_power_scale: float = 1.0  # er / erk / erk+: exponent of the raw ratio
    snip_batches: int = 1  # snip_ratio: minibatches for the SNIP scores
    snip_batch_size: Optional[int] = None  # default: trainer.batch_size

    def __post_init__(self):
        check_density("method.density", self.density)
        check_distribution(self.distribution)
        check(self.erk_power_scale > 0, "method.erk_power_scale", self.erk_power_scale, "must be > 0")
        check(self.snip_batches >= 1, "method.snip_batches", self.snip_batches, "must be >= 1")
        check(self.snip_batch_size is None or self.snip_batch_size >= 1, "method.snip_batch_size",
               self.snip_batch_size, "must be >= 1 or null")


@METHODS.register("random_prune", schema=RandomPruneConfig)
class RandomPrune(PruneAtInit):
    """Random pruning at initialisation under a sparsity distribution, then training (mask fixed).

    Summary row: ``distribution``, realised ``density``, ``target_density``, per-layer ``density/<layer>``,
    neuron accounting and the trainer's final metrics.
    """

    def init_masks(self, model, masking, trainer, gen):
        cfg = self.cfg
        scores = None
        if get_distribution(cfg.distribution).needs_scores:
            scores = self.snip_scores(model, masking, trainer, cfg.snip_batches, cfg.snip_batch_size, gen)
        counts = layer_counts(masking, cfg.density, cfg.distribution, dense=list(cfg.dense), scores=scores,
                              erk_power_scale=cfg.erk_power_scale)
        return random_masks(masking, counts, gen)

    def row_extra(self) -> dict:
        return {"distribution": self.cfg.distribution}


# --------------------------------------------------------------------------- SNIP
@dataclass
class SnipConfig(MethodConfig):
    """``method=snip``: SNIP's global top-k of |w * g| at init (Lee et al. 2019)."""

    name: str = "snip"
    density: float = 0.1
    batches: int = 1  # minibatches over which the gradient is averaged (Lee et al. use one)
    batch_size: Optional[int] = None  # default: trainer.batch_size
    dense: List[str] = field(default_factory=list)  # fnmatch patterns of layers kept dense

    def __post_init__(self):
        check_density("method.density", self.density)
        check(self.batches >= 1, "method.batches", self.batches, "must be >= 1")
        check(self.batch_size is None or self.batch_size >= 1, "method.batch_size", self.batch_size,
               "must be >= 1 or null")


@METHODS.register("snip", schema=SnipConfig)
class Snip(PruneAtInit):
    """SNIP: prune once at initialisation by connection sensitivity (one global ranking), then train
    with the mask fixed."""

    def init_masks(self, model, masking, trainer, gen):
        cfg = self.cfg
        scores = self.snip_scores(model, masking, trainer, cfg.batches, cfg.batch_size, gen)
        return select_masks(masking, scores, cfg.density, scope="global", dense=masking.matching(cfg.dense))
