"""Turning scores into masks: exact top-k per layer or over the whole network, and N:M groups.

Every pruning method computes scores (:mod:`sparsebench.sparsity.scores`; higher = keep) and hands them
to one selection here; the count is always exact (ties broken by ``torch.topk``'s order).

* :func:`topk_mask`: the primitive, keep the ``k`` largest entries of one tensor.
* :func:`layer_topk_masks`: per layer, keep ``counts[name]`` entries.
* :func:`global_topk_masks`: one top-k over the concatenated scores of several layers, split back
  per layer (the *one* global-top-k-then-split; SNIP, global magnitude pruning, the ``snip_ratio``
  distribution).
* :data:`SCOPES` (``method.scope``): ``layer`` (every layer at the density) or ``global`` (one
  ranking over all prunable weights at the density); :func:`select_masks` dispatches on it, and
  :func:`magnitude_masks` is the one magnitude pruning (``|w|`` among active weights) on top of it.
* :func:`nm_masks`: N:M structured magnitude masks (2:4 for sparse tensor cores).
"""
from __future__ import annotations

from typing import ClassVar, Dict, Iterable, Mapping, Union

import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.scores import MagnitudeScore

SCOPES: Registry = Registry("method.scope")


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (same shape as ``scores``, float32 0/1) keeping exactly the ``k`` largest scores.

    ``k`` is clipped to ``[0, scores.numel()]``. Ties are broken by ``torch.topk``'s order, so the count
    is exact: ``mask.sum() == k``. Use ``-inf`` scores for positions that must not be kept.
    """
    flat = scores.reshape(-1)
    k = int(max(0, min(k, flat.numel())))
    mask = torch.zeros_like(flat, dtype=torch.float32)
    if k > 0:
        idx = torch.topk(flat.float(), k, sorted=False).indices
        mask[idx] = 1.0
    return mask.view_as(scores)


def num_to_keep(numel: int, density: float) -> int:
    """Number of active weights for a layer of ``numel`` weights at ``density``: ``round(density *
    numel)`` clipped to ``[1, numel]``."""
    return max(1, min(numel, int(round(density * numel))))


def layer_topk_masks(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """Per layer, keep the ``counts[name]`` highest ``scores[name]``.

    Args:
        scores: ``{name: tensor of the weight's shape}``.
        counts: ``{name: k}`` for every name of ``scores``.

    Returns:
        ``{name: float 0/1 mask}`` on the device of each score, with ``mask.sum() == counts[name]``.
    """
    return {n: topk_mask(s, counts[n]) for n, s in scores.items()}


def global_topk_masks(scores: Mapping[str, torch.Tensor], k: int) -> Dict[str, torch.Tensor]:
    """Keep the ``k`` highest scores over all layers of ``scores`` together, split back per layer.

    The ranking is done on the CPU over the scores concatenated in the mapping's order.

    Args:
        scores: ``{name: tensor}``; one ranking over all of them.
        k: total number of kept entries.

    Returns:
        ``{name: float 0/1 CPU mask of the score's shape}``, ``sum == k`` (clipped to the total).
    """
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
    keep = topk_mask(flat, k)
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = keep[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out


# --------------------------------------------------------------------------- scopes (method.scope)
class Scope:
    """Where scores are ranked against each other (``method.scope``).

    Attributes:
        per_layer: the scope takes per-layer densities (``{name: d_l}``) as well as one float.
    """

    per_layer: ClassVar[bool] = False

    def masks(self, masking: Masking, scores: Mapping[str, torch.Tensor], density: Union[float, Mapping[str, float]],
              dense: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
        """Masks for every prunable layer of ``masking``.

        Args:
            masking: names and shapes of the prunable weights.
            scores: ``{name: tensor of the weight's shape}`` (higher = keep).
            density: the target in (0, 1] (a float, or per layer where the scope allows it).
            dense: layer names kept fully dense (they count towards the budget).
        """
        raise NotImplementedError


@SCOPES.register("layer")
class LayerScope(Scope):
    """Every layer keeps ``round(d_l * n_l)`` (at least 1) of its highest scores; ``density`` is one float
    for all layers or ``{name: d_l}`` (e.g. IMP's per-layer rates, Frankle & Carbin 2019)."""

    per_layer: ClassVar[bool] = True

    def masks(self, masking, scores, density, dense=()):
        dense = set(dense)
        dens = density if isinstance(density, Mapping) else {n: float(density) for n in masking.names}
        counts = {n: masking.weight(n).numel() if n in dense else num_to_keep(masking.weight(n).numel(), dens[n])
                  for n in masking.names}
        return layer_topk_masks({n: scores[n] for n in masking.names}, counts)


@SCOPES.register("global")
class GlobalScope(Scope):
    """One ranking over all prunable weights: keep ``round(density * N)`` (N = all prunable weights)
    highest scores; layers in ``dense`` stay dense and their weights count towards the budget (SNIP,
    Lee et al. 2019; global magnitude pruning).

    Raises:
        ConfigError: ``density`` given per layer, or the dense layers alone exceed the budget.
    """

    def masks(self, masking, scores, density, dense=()):
        if isinstance(density, Mapping):
            raise ConfigError("method.scope=global: needs one global density, not per-layer densities")
        dense = [n for n in masking.names if n in set(dense)]
        total = sum(masking.weight(n).numel() for n in masking.names)
        target = num_to_keep(total, float(density))
        fixed = sum(masking.weight(n).numel() for n in dense)
        if fixed > target:
            raise ConfigError(f"method.density={density}: the dense layers {dense} alone hold {fixed} weights, "
                              f"more than the budget of {target}")
        out = global_topk_masks({n: scores[n] for n in masking.names if n not in dense}, target - fixed)
        out.update({n: torch.ones_like(masking.weight(n)) for n in dense})
        return {n: out[n].to(masking.weight(n).device) for n in masking.names}


def select_masks(masking: Masking, scores: Mapping[str, torch.Tensor], density: Union[float, Mapping[str, float]],
                 scope: str = "layer", dense: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """Masks keeping the highest ``scores`` at ``density`` within ``scope`` (a name of :data:`SCOPES`).

    Raises:
        ConfigError: unknown scope (names ``method.scope``), or see the scope's own errors.
    """
    return SCOPES.get(scope)().masks(masking, scores, density, dense)


def magnitude_masks(masking: Masking, density: Union[float, Mapping[str, float]], scope: str = "layer"
                    ) -> Dict[str, torch.Tensor]:
    """Magnitude pruning among the active weights (pruned ones never come back): keep the highest
    ``|w|`` at ``density`` (one float, or ``{name: d_l}`` for ``scope="layer"``) within ``scope``
    (Han et al. 2015; the IMP criterion of Frankle & Carbin 2019)."""
    return select_masks(masking, MagnitudeScore()(masking), density, scope=scope)


# --------------------------------------------------------------------------- N:M structure
def nm_masks(masking: Masking, n: int = 2, m: int = 4) -> Dict[str, torch.Tensor]:
    """N:M structured magnitude pruning: in every group of ``m`` consecutive weights along the input
    dimension keep the ``n`` largest ``|w|`` (2:4 by default, the pattern of the sparse tensor cores).

    A Linear weight ``(out, in)`` is grouped as ``(out, in / m, m)``; a convolution weight
    ``(out, in, *kernel)`` is flattened per output row to ``(out, in * prod(kernel))`` and grouped the
    same way (groups run over the flattened ``(in, *kernel)`` in memory order). Scores are the current
    ``|w|``; pruned weights are zero and so rank last, but a group is always filled up to ``n`` (ties
    broken by ``torch.topk``'s order). Every layer ends at density exactly ``n / m``.

    Source: Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (arXiv:2104.08378), and
    NVIDIA's ASP ``m4n2_1d`` mask; written anew. Export with
    ``sparsebench.sparsity.export.export_sparse(model, "semi_structured")`` on a CUDA GPU.

    Returns:
        ``{name: float 0/1 mask of the weight's shape}`` for every prunable weight of ``masking``.

    Raises:
        ConfigError: ``n`` / ``m`` not ints with ``0 < n <= m``, or a layer whose (flattened) input
            dimension is not divisible by ``m`` (the message names it; exclude it from the
            :class:`Masking`, e.g. the first conv with 3 input channels).
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ConfigError(f"nm_masks n={n!r}, m={m!r}: need ints with 0 < n <= m")
    out = {}
    for name, w, _ in masking.items():
        rows = w.shape[0]
        cols = w.numel() // max(1, rows)
        if cols % m:
            raise ConfigError(f"nm_masks m={m}: {name} of shape {tuple(w.shape)} has an input dimension of {cols} "
                              f"(flattened per output row), not divisible by {m}; exclude it from the Masking")
        groups = w.detach().abs().float().reshape(rows, cols // m, m)
        keep = groups.topk(n, dim=-1, sorted=False).indices
        mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
        out[name] = mask.reshape(w.shape)
    return out
