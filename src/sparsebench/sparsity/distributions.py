"""Sparsity distributions: how many weights each prunable layer keeps for a global density.

A distribution (``method.distribution``, registry :data:`DISTRIBUTIONS`) is a small class with its own
parameters that gives real-valued per-layer densities; :func:`layer_counts` turns them into exact
per-layer *counts* ``{name: k_l}`` with ``sum(k_l) == round(density * N)`` (N = all prunable weights),
so the realised global density equals the target to one weight: ideal real-valued counts are rounded
by the largest-remainder method within each layer's cap. Positions are chosen elsewhere
(:func:`random_masks`, or a method's own scores).

Distributions: ``uniform``, ``uniform+`` (Gale et al. 2019), ``er`` (Mocanu et al. 2018), ``erk``
and ``erk+`` (Evci et al. 2020), ``snip_ratio`` (document 003). ``global`` is not a distribution but
a selection scope (``method.scope``, :mod:`sparsebench.sparsity.selection`): asking for it raises.

Layers whose names match ``dense`` fnmatch patterns are kept dense and count towards the budget.

Adding one: subclass :class:`Distribution` as a dataclass whose fields are its parameters, implement
:meth:`Distribution.densities`, and register it with ``@DISTRIBUTIONS.register("name")``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Iterable, Optional

import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.scores import RandomScore
from sparsebench.sparsity.selection import SCOPES, global_topk_masks, layer_topk_masks

DISTRIBUTIONS: Registry = Registry("method.distribution")


# --------------------------------------------------------------------------- the solver
def solve_densities(numel: Dict[str, int], raw: Dict[str, float], total_keep: float,
                    fixed: Dict[str, float]) -> Dict[str, float]:
    """Real-valued densities ``d_l = min(1, eps * raw_l)`` (layers in ``fixed`` take their given density)
    with ``sum d_l n_l = total_keep``; saturated layers become dense and eps is re-solved until none
    saturates (the loop of google-research/rigl ``sparse_utils.get_sparsities``).

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


def _numel(masking: Masking) -> Dict[str, int]:
    return {n: w.numel() for n, w, _ in masking.items()}


# --------------------------------------------------------------------------- the distributions
@dataclass
class Distribution:
    """Base class; dataclass fields are the distribution's parameters (passed as ``**params`` to
    :func:`layer_counts`).

    Attributes:
        needs_scores: the distribution reads per-weight scores (``scores=`` parameter), so a method
            without scores cannot offer it.
    """

    needs_scores: ClassVar[bool] = False

    def densities(self, masking: Masking, density: float, fixed: Dict[str, float], target: int) -> Dict[str, float]:
        """Real-valued per-layer densities in [0, 1] for every prunable layer of ``masking``.

        Args:
            masking: the prunable layers (names, shapes, order; the last is the output layer).
            density: the global target in (0, 1].
            fixed: ``{name: density}`` of layers held fixed (the ``dense`` patterns: 1.0).
            target: the number of active weights, ``max(#layers, round(density * N))``.

        Raises:
            ConfigError: the target cannot be met under the distribution's constraints.
        """
        raise NotImplementedError


@DISTRIBUTIONS.register("uniform")
@dataclass
class Uniform(Distribution):
    """Every layer at the same density (layers held fixed take their share first)."""

    def densities(self, masking, density, fixed, target):
        numel = _numel(masking)
        return solve_densities(numel, {n: 1.0 for n in numel}, target, fixed)


@DISTRIBUTIONS.register("uniform+")
@dataclass
class UniformPlus(Distribution):
    """Uniform with the first layer dense and the output layer at density at least ``output_floor``
    (Gale, Elsen & Hooker 2019, "The State of Sparsity in Deep Neural Networks": at most 80% sparse).

    Args:
        output_floor: minimum density of the output layer (default 0.2).
    """

    output_floor: float = 0.2

    def densities(self, masking, density, fixed, target):
        numel = _numel(masking)
        names = list(numel)
        fixed = dict(fixed)
        fixed.setdefault(names[0], 1.0)
        if len(names) > 1:
            fixed.setdefault(names[-1], max(density, self.output_floor))
        return solve_densities(numel, {n: 1.0 for n in numel}, target, fixed)


def _erk_raw(shape: torch.Size, kernel: bool, power: float) -> float:
    dims = list(shape) if kernel else list(shape[:2])
    return (sum(dims) / math.prod(dims)) ** power


@DISTRIBUTIONS.register("er")
@dataclass
class ER(Distribution):
    """Erdős–Rényi (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science"): ``d_l ∝ ((n_in + n_out) / (n_in n_out)) ** p``,
    kernel dims ignored; saturated layers become dense and the scale is solved again.

    Args:
        erk_power_scale: the exponent ``p`` (1.0 = standard ER).
    """

    erk_power_scale: float = 1.0
    kernel: ClassVar[bool] = False

    def densities(self, masking, density, fixed, target):
        raw = {n: _erk_raw(w.shape, self.kernel, self.erk_power_scale) for n, w, _ in masking.items()}
        return solve_densities(_numel(masking), raw, target, fixed)


@DISTRIBUTIONS.register("erk")
@dataclass
class ERK(ER):
    """Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the Lottery", RigL):
    ``d_l ∝ (sum(shape) / prod(shape)) ** p`` with the kernel dims included; layers whose density would
    exceed 1 are made dense and the scale is solved again until none saturates.

    Args:
        erk_power_scale: the exponent ``p`` (1.0 = standard ERK; RigL's ``erk_power_scale``).
    """

    kernel: ClassVar[bool] = True


@DISTRIBUTIONS.register("erk+")
@dataclass
class ERKPlus(ERK):
    """ERK (Evci et al. 2020) with a dense output layer."""

    def densities(self, masking, density, fixed, target):
        return super().densities(masking, density, {**fixed, masking.output_layer: 1.0}, target)


@DISTRIBUTIONS.register("snip_ratio")
@dataclass
class SnipRatio(Distribution):
    """The per-layer densities of SNIP's global top-k of connection sensitivity ``|w * g|`` (Lee et al.
    2019); positions are chosen elsewhere (random), only the ratios are kept (document 003, section III).
    Layers held fixed are set dense after the ranking (the rounding then trims the others).

    Args:
        scores: ``{name: tensor of the weight's shape}`` (e.g. :class:`~sparsebench.sparsity.scores.SnipScore`).

    Raises:
        ConfigError: no scores given.
    """

    scores: Optional[Dict[str, torch.Tensor]] = None
    needs_scores: ClassVar[bool] = True

    def densities(self, masking, density, fixed, target):
        if self.scores is None:
            raise ConfigError("method.distribution=snip_ratio: needs SNIP scores (use method=random_prune or snip)")
        keep = global_topk_masks({n: self.scores[n] for n in masking.names}, target)
        out = {n: float(keep[n].sum()) / keep[n].numel() for n in masking.names}
        for n in fixed:
            out[n] = 1.0
        return out


# --------------------------------------------------------------------------- public helpers
def get_distribution(name: str) -> type:
    """The :class:`Distribution` class registered as ``name``.

    Raises:
        ConfigError: unknown name (one line naming ``method.distribution`` and the allowed names; a
            selection scope such as ``global`` is pointed to ``method.scope``).
    """
    if name not in DISTRIBUTIONS and name in SCOPES:
        raise ConfigError(f"method.distribution={name!r}: {name!r} is a selection scope (method.scope of "
                          f"magnitude / lth_imp; snip ranks globally), not a sparsity distribution "
                          f"(allowed: {', '.join(DISTRIBUTIONS.names())})")
    return DISTRIBUTIONS.get(name)


def check_distribution(name: str) -> None:
    """For config schemas: raise :class:`ConfigError` unless ``name`` is a registered distribution."""
    get_distribution(name)


def build_distribution(name: str, **params) -> Distribution:
    """An instance of distribution ``name`` built from the ``params`` it declares (others are ignored,
    so a method can pass all of its distribution keys, e.g. ``erk_power_scale`` and ``scores``).

    Raises:
        ConfigError: unknown distribution.
        TypeError: a parameter that no registered distribution declares (a typo).
    """
    cls = get_distribution(name)
    known = {f.name for n in DISTRIBUTIONS.names() for f in dataclasses.fields(DISTRIBUTIONS.get(n))}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(f"distribution parameters {unknown}: declared by no distribution (known: {sorted(known)})")
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in own})


def layer_counts(masking: Masking, density: float, distribution: str = "erk", dense: Iterable[str] = (),
                 **params) -> Dict[str, int]:
    """Number of active weights per prunable layer for global ``density`` under ``distribution``.

    Args:
        masking: defines the prunable layers (names and shapes).
        density: global target in (0, 1] over all prunable weights.
        distribution: a name of :data:`DISTRIBUTIONS` (``uniform``, ``uniform+``, ``er``, ``erk``, ``erk+``,
            ``snip_ratio``, or one registered later).
        dense: fnmatch patterns of layer names kept fully dense.
        **params: the distribution's parameters (see :func:`build_distribution`), e.g.
            ``erk_power_scale=1.0`` (ER/ERK exponent), ``scores={name: tensor}`` (``snip_ratio``).

    Returns:
        ``{name: k}`` with ``sum(k) == max(#layers, round(density * N))``, each ``1 <= k <= numel``.

    Raises:
        ConfigError: density outside (0, 1], unknown distribution, or one that cannot be met.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"method.density={density!r}: density must be in (0, 1]")
    dist = build_distribution(distribution, **params)
    numel = _numel(masking)
    target = max(len(numel), int(round(density * sum(numel.values()))))
    fixed = {n: 1.0 for n in masking.matching(dense)}
    return _round_counts(numel, dist.densities(masking, density, fixed=fixed, target=target), target)


def layer_densities(masking: Masking, density: float, distribution: str = "erk", **kw) -> Dict[str, float]:
    """Per-layer densities (``count / numel``) of :func:`layer_counts` (same arguments)."""
    counts = layer_counts(masking, density, distribution, **kw)
    return {n: counts[n] / w.numel() for n, w, _ in masking.items()}


def random_masks(masking: Masking, counts: Dict[str, int], generator: Optional[torch.Generator] = None
                 ) -> Dict[str, torch.Tensor]:
    """Uniformly random masks with exactly ``counts[name]`` active positions per layer.

    Scores are drawn on the CPU from ``generator`` layer by layer in module order
    (:class:`~sparsebench.sparsity.scores.RandomScore`); masks are returned on each weight's device.
    """
    masks = layer_topk_masks(RandomScore(generator)(masking), counts)
    return {n: masks[n].to(w.device) for n, w, _ in masking.items()}
