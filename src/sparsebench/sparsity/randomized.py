"""Document 000's pruning strategies (``method.strategies`` of ``randomized_prune``).

Each strategy is a small class whose :meth:`PruneStrategy.mask` returns the 0/1 mask of a flat vector
``w`` of trained weights (the chosen layers' weights concatenated) with **exactly** ``n_prune`` zeros,
so every strategy removes the same number of connections (``n_prune = round(fraction * w.numel())``,
:func:`n_prune`):

* ``none``: no pruning (the reference row; ignores ``n_prune``);
* ``threshold``: threshold fraction, prune the ``n_prune`` smallest ``|w|``;
* ``random``: prune ``n_prune`` connections drawn uniformly at random;
* ``importance_random``: sample ``n_prune`` connections without replacement with probability
  ``∝ exp(-|w| / (T mean|w|))`` (Gumbel top-k, the same law as successive draws);
* ``fractional_threshold``: candidates = the ``min(n, round(n_prune / random_part))`` smallest ``|w|``;
  ``n_prune`` of them, drawn uniformly, are pruned (so ``random_part`` is the share of the candidates
  pruned). Once ``n_prune / random_part >= n`` the candidates are every weight and the strategy is
  ``random``.

Before this definition ``fractional_threshold`` pruned ``fraction * random_part`` of the layer (half as
many connections as ``threshold``), which built part of its advantage in.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch

from sparsebench.core.registry import Registry
from sparsebench.sparsity.selection import topk_mask

PRUNE_STRATEGIES: Registry = Registry("method.strategies")


def n_prune(n: int, fraction: float) -> int:
    """The number of connections every strategy removes from ``n``: ``round(fraction * n)``."""
    return int(round(fraction * n))


def _drop(n: int, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n)
    mask[idx] = 0.0
    return mask


class PruneStrategy:
    """A document-000 strategy: :meth:`mask` of a trained weight ``w`` (CPU tensor; the method passes the
    chosen layers' weights concatenated into one flat vector) with exactly ``k`` zeros (default
    ``n_prune(w.numel(), cfg.fraction)``), for the config ``cfg`` (``random_part``, ``temperature``),
    drawing from ``gen``.

    Attributes:
        randomized: the mask is random, so it is drawn ``method.draws`` times (mean and std reported).
    """

    randomized: ClassVar[bool] = True

    def mask(self, w: torch.Tensor, cfg, gen: torch.Generator, k: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError


@PRUNE_STRATEGIES.register("none")
class NoPruning(PruneStrategy):
    """No pruning: all-ones mask (the trained network's reference row)."""

    randomized: ClassVar[bool] = False

    def mask(self, w, cfg, gen, k=None):
        return torch.ones_like(w)


@PRUNE_STRATEGIES.register("threshold")
class ThresholdFraction(PruneStrategy):
    """Threshold fraction: prune the ``k`` connections with the smallest |w|."""

    randomized: ClassVar[bool] = False

    def mask(self, w, cfg, gen, k=None):
        k = n_prune(w.numel(), cfg.fraction) if k is None else int(k)
        return topk_mask(w.detach().abs(), w.numel() - k)


@PRUNE_STRATEGIES.register("random")
class RandomFraction(PruneStrategy):
    """Random: prune ``k`` connections drawn uniformly, regardless of |w|."""

    def mask(self, w, cfg, gen, k=None):
        k = n_prune(w.numel(), cfg.fraction) if k is None else int(k)
        return _drop(w.numel(), torch.randperm(w.numel(), generator=gen)[:k]).view(w.shape)


@PRUNE_STRATEGIES.register("importance_random")
class ImportanceRandom(PruneStrategy):
    """Importance-weighted random: sample ``k`` connections to prune without replacement, with
    probability proportional to ``exp(-|w| / (temperature * mean|w|))`` (falls with |w|); drawn by the
    Gumbel top-k trick (the law of successive draws without replacement)."""

    def mask(self, w, cfg, gen, k=None):
        k = n_prune(w.numel(), cfg.fraction) if k is None else int(k)
        a = w.detach().abs().reshape(-1).double().cpu()
        logp = -a / (cfg.temperature * a.mean().clamp_min(1e-12))
        u = torch.rand(a.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        keys = logp - torch.log(-torch.log(u))
        idx = torch.topk(keys, k, sorted=False).indices if k else torch.empty(0, dtype=torch.long)
        return _drop(a.numel(), idx).view(w.shape)


@PRUNE_STRATEGIES.register("fractional_threshold")
class FractionalThreshold(PruneStrategy):
    """Fractional random threshold: the candidates are the ``min(n, round(k / random_part))``
    smallest-|w| connections; ``k`` of them, drawn uniformly, are pruned."""

    def mask(self, w, cfg, gen, k=None):
        k = n_prune(w.numel(), cfg.fraction) if k is None else int(k)
        a = w.detach().abs().reshape(-1).float().cpu()
        n_cand = min(a.numel(), max(k, int(round(k / cfg.random_part))))
        cand = torch.topk(-a, n_cand, sorted=False).indices
        chosen = cand[torch.randperm(n_cand, generator=gen)[:k]]
        return _drop(a.numel(), chosen).view(w.shape)
