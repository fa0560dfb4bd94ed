"""Layer-wise density budgets: how many weights each prunable layer keeps for a global density.

Every budget returns exact per-layer *counts* ``{name: k_l}`` with ``sum(k_l) == round(density * N)``
(N = all prunable weights), so the realised global density equals the target to one weight:
ideal real-valued counts are rounded by the largest-remainder method within each layer's cap.

Budgets (``method.budget``):

* ``uniform``: every layer at ``density``.
* ``uniform+``: first layer dense, output layer at least 20% dense (at most 80% sparse), the other
  layers share the rest uniformly (Gale, Elsen & Hooker 2019).
* ``er``: Erdős–Rényi (Mocanu et al. 2018): density_l ∝ (n_in + n_out) / (n_in * n_out).
* ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020, RigL): density_l ∝ sum(shape) / prod(shape),
  kernel dims included; layers whose density would exceed 1 are made dense and the scale eps is
  solved again for the rest until no layer saturates (the loop of ``rigl/sparse_utils.py``).
* ``erk+``: ERK with a dense output layer.
* ``snip_ratio``: layer densities of SNIP's global top-k of connection sensitivity |w * g|
  (needs ``scores``); positions are chosen elsewhere (random), only the ratios are kept (003).
* ``global``: one density over all layers; counts here are uniform, positions from a global ranking.

Layers whose names match ``dense`` fnmatch patterns are kept dense and count towards the budget.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Dict, Iterable, Optional

import torch

from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking, topk_mask
from sparsebench.core.registry import Registry

BUDGETS: Registry = Registry("method.budget")


def _shapes(masking: Masking) -> Dict[str, torch.Size]:
    return {n: w.shape for n, w, _ in masking.items()}


def _solve(numel: Dict[str, int], raw: Dict[str, float], total_keep: float, fixed: Dict[str, float]) -> Dict[str, float]:
    """Real-valued densities ``d_l = min(1, eps * raw_l)`` (layers in ``fixed`` take their given density)
    with ``sum d_l n_l = total_keep``; saturated layers become dense and eps is re-solved.

    Raises:
        ConfigError: the fixed layers alone exceed the budget (density too low for the constraints).
    """
    dens = dict(fixed)
    while True:
        free = [n for n in numel if n not in dens]
        budget = total_keep - sum(dens[n] * numel[n] for n in dens)
        if not free:
            break
        denom = sum(raw[n] * numel[n] for n in free)
        if budget < 0 or denom <= 0:
            raise ConfigError(f"method.density: a budget of {int(total_keep)} active weights cannot be met with "
                              f"{', '.join(sorted(fixed))} held at fixed density (raise the density or drop "
                              f"the dense-layer constraint)")
        eps = budget / denom
        saturated = [n for n in free if eps * raw[n] >= 1.0]
        if not saturated:
            for n in free:
                dens[n] = eps * raw[n]
            break
        for n in saturated:
            dens[n] = 1.0
    return dens


def _round_counts(numel: Dict[str, int], dens: Dict[str, float], target: int) -> Dict[str, int]:
    """Largest-remainder rounding of ``dens_l * n_l`` to integers summing to ``target`` (each in [1, n_l])."""
    ideal = {n: min(1.0, max(0.0, dens[n])) * numel[n] for n in numel}
    counts = {n: min(numel[n], max(1, math.floor(v))) for n, v in ideal.items()}
    diff = target - sum(counts.values())
    order = sorted(numel, key=lambda n: ideal[n] - math.floor(ideal[n]), reverse=diff > 0)
    i = 0
    while diff != 0 and i < 10 * len(order) + abs(diff):
        n = order[i % len(order)]
        if diff > 0 and counts[n] < numel[n]:
            counts[n] += 1
            diff -= 1
        elif diff < 0 and counts[n] > 1:
            counts[n] -= 1
            diff += 1
        i += 1
    return counts


def layer_counts(masking: Masking, density: float, budget: str = "erk", dense: Iterable[str] = (),
                 scores: Optional[Dict[str, torch.Tensor]] = None, erk_power_scale: float = 1.0) -> Dict[str, int]:
    """Number of active weights per prunable layer for global ``density`` under ``budget``.

    Args:
        masking: defines the prunable layers (names and shapes).
        density: global target in (0, 1] over all prunable weights.
        budget: one of :data:`BUDGETS` (``uniform``, ``uniform+``, ``er``, ``erk``, ``erk+``, ``snip_ratio``, ``global``).
        dense: fnmatch patterns of layer names kept fully dense.
        scores: ``{name: tensor of the weight's shape}``, needed by ``snip_ratio``.
        erk_power_scale: ERK's exponent on the raw ratio (1.0 = standard ERK).

    Returns:
        ``{name: k}`` with ``sum(k) == round(density * N)``.

    Raises:
        ConfigError: density outside (0, 1], unknown budget, or a budget that cannot be met.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"method.density={density!r}: density must be in (0, 1]")
    numel = {n: s.numel() for n, s in _shapes(masking).items()}
    total = sum(numel.values())
    target = max(len(numel), int(round(density * total)))
    fixed = {n: 1.0 for n in numel if any(fnmatch.fnmatch(n, p) for p in dense)}
    dens = BUDGETS.get(budget)(masking, density, fixed=fixed, target=target, scores=scores,
                               erk_power_scale=erk_power_scale)
    return _round_counts(numel, dens, target)


def layer_densities(masking: Masking, density: float, budget: str = "erk", **kw) -> Dict[str, float]:
    """Per-layer densities (``count / numel``) of :func:`layer_counts`."""
    counts = layer_counts(masking, density, budget, **kw)
    return {n: counts[n] / w.numel() for n, w, _ in masking.items()}


def random_masks(masking: Masking, counts: Dict[str, int], generator: Optional[torch.Generator] = None
                 ) -> Dict[str, torch.Tensor]:
    """Uniformly random masks with exactly ``counts[name]`` active positions per layer."""
    out = {}
    for n, w, _ in masking.items():
        scores = torch.rand(w.shape, generator=generator)
        out[n] = topk_mask(scores, counts[n]).to(w.device)
    return out


# --------------------------------------------------------------------------- the budgets
def _numel(masking):
    return {n: s.numel() for n, s in _shapes(masking).items()}


@BUDGETS.register("uniform")
def _uniform(masking, density, fixed, target, **_):
    numel = _numel(masking)
    return _solve(numel, {n: 1.0 for n in numel}, target, fixed)


@BUDGETS.register("global")
def _global(masking, density, fixed, target, **_):
    return _uniform(masking, density, fixed, target)


@BUDGETS.register("uniform+")
def _uniform_plus(masking, density, fixed, target, **_):
    numel = _numel(masking)
    names = list(numel)
    fixed = dict(fixed)
    fixed.setdefault(names[0], 1.0)
    if len(names) > 1:
        fixed.setdefault(names[-1], max(density, 0.2))
    return _solve(numel, {n: 1.0 for n in numel}, target, fixed)


def _erk_raw(shape: torch.Size, kernel: bool, power: float) -> float:
    dims = list(shape) if kernel else list(shape[:2])
    return (sum(dims) / math.prod(dims)) ** power


@BUDGETS.register("er")
def _er(masking, density, fixed, target, erk_power_scale=1.0, **_):
    shapes = _shapes(masking)
    return _solve(_numel(masking), {n: _erk_raw(s, False, erk_power_scale) for n, s in shapes.items()}, target, fixed)


@BUDGETS.register("erk")
def _erk(masking, density, fixed, target, erk_power_scale=1.0, **_):
    shapes = _shapes(masking)
    return _solve(_numel(masking), {n: _erk_raw(s, True, erk_power_scale) for n, s in shapes.items()}, target, fixed)


@BUDGETS.register("erk+")
def _erk_plus(masking, density, fixed, target, erk_power_scale=1.0, **_):
    fixed = {**fixed, masking.output_layer: 1.0}
    return _erk(masking, density, fixed, target, erk_power_scale)


@BUDGETS.register("snip_ratio")
def _snip_ratio(masking, density, fixed, target, scores=None, **_):
    if scores is None:
        raise ConfigError("method.budget=snip_ratio: needs SNIP scores (use method=random_prune or snip)")
    names = list(_numel(masking))
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    keep = topk_mask(flat, target)
    out, i = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = float(keep[i:i + k].sum()) / k
        i += k
    for n in fixed:
        out[n] = 1.0
    return out
