"""Document 000's pruning strategies for one trained layer (``method.strategies`` of ``randomized_prune``).

Each strategy is a small class whose :meth:`PruneStrategy.mask` returns the 0/1 mask of one weight:

* ``none``: no pruning (the reference row);
* ``threshold``: threshold fraction, prune the ``fraction`` smallest ``|w|``;
* ``random``: prune a uniformly random ``fraction``;
* ``importance_random``: sample the pruned ``fraction`` with probability ``∝ exp(-|w| / (T mean|w|))``;
* ``fractional_threshold``: candidates = the ``fraction`` smallest ``|w|``, a random ``random_part`` of
  them is pruned.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from sparsebench.core.registry import Registry
from sparsebench.sparsity.selection import topk_mask

PRUNE_STRATEGIES: Registry = Registry("method.strategies")


def _n_prune(w: torch.Tensor, fraction: float) -> int:
    return int(round(fraction * w.numel()))


class PruneStrategy:
    """A document-000 strategy: :meth:`mask` of one trained weight ``w`` (CPU tensor) for the config
    ``cfg`` (``fraction``, ``random_part``, ``temperature``), drawing from ``gen``.

    Attributes:
        randomized: the mask is random, so it is drawn ``method.draws`` times (mean and std reported).
    """

    randomized: ClassVar[bool] = True

    def mask(self, w: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


@PRUNE_STRATEGIES.register("none")
class NoPruning(PruneStrategy):
    """No pruning: all-ones mask (the trained network's reference row)."""

    randomized: ClassVar[bool] = False

    def mask(self, w, cfg, gen):
        return torch.ones_like(w)


@PRUNE_STRATEGIES.register("threshold")
class ThresholdFraction(PruneStrategy):
    """Threshold fraction: prune the ``fraction`` of connections with the smallest |w|."""

    randomized: ClassVar[bool] = False

    def mask(self, w, cfg, gen):
        return topk_mask(w.abs(), w.numel() - _n_prune(w, cfg.fraction))


@PRUNE_STRATEGIES.register("random")
class RandomFraction(PruneStrategy):
    """Random: prune a uniformly random ``fraction`` of the connections, regardless of |w|."""

    def mask(self, w, cfg, gen):
        return topk_mask(torch.rand(w.shape, generator=gen), w.numel() - _n_prune(w, cfg.fraction))


@PRUNE_STRATEGIES.register("importance_random")
class ImportanceRandom(PruneStrategy):
    """Importance-weighted random: sample ``fraction`` of the connections to prune without replacement,
    with probability proportional to ``exp(-|w| / (temperature * mean|w|))`` (falls with |w|)."""

    def mask(self, w, cfg, gen):
        a = w.detach().abs().reshape(-1).float().cpu()
        p = torch.exp(-a / (cfg.temperature * a.mean().clamp_min(1e-12)))
        idx = torch.multinomial(p, _n_prune(w, cfg.fraction), replacement=False, generator=gen)
        mask = torch.ones_like(a)
        mask[idx] = 0.0
        return mask.view(w.shape)


@PRUNE_STRATEGIES.register("fractional_threshold")
class FractionalThreshold(PruneStrategy):
    """Fractional random threshold: the candidates are the ``fraction`` smallest-|w| connections;
    a random ``random_part`` of the candidates is pruned (so ``fraction * random_part`` in all)."""

    def mask(self, w, cfg, gen):
        a = w.detach().abs().reshape(-1).float().cpu()
        n_cand = _n_prune(w, cfg.fraction)
        cand = torch.topk(-a, n_cand, sorted=False).indices
        chosen = cand[torch.randperm(n_cand, generator=gen)[:int(round(cfg.random_part * n_cand))]]
        mask = torch.ones_like(a)
        mask[chosen] = 0.0
        return mask.view(w.shape)
