"""Drop-fraction anneals ``d(t)``: the fraction of each layer's active weights a topology update replaces.

Registry :data:`DROP_SCHEDULES` (``method.drop_fraction_anneal``):

* ``constant``: ``d(t) = d0`` (SET, Mocanu et al. 2018; the thesis' K).
* ``cosine``: ``d(t) = d0/2 * (1 + cos(pi t / T_end))`` (RigL, Evci et al. 2020, eq. 1).

Both are 0 after ``T_end``. A new anneal is one class here with ``@DROP_SCHEDULES.register(name)``.
"""
from __future__ import annotations

import math

from sparsebench.core.registry import Registry

DROP_SCHEDULES: Registry = Registry("method.drop_fraction_anneal")


class DropSchedule:
    """Fraction ``d(t)`` of each layer's active weights replaced at step ``t`` (steps done).

    Args:
        d0: initial drop fraction in [0, 1).
        t_end: last step (in steps) at which the topology is updated; ``d(t) = 0`` after it.
    """

    def __init__(self, d0: float, t_end: int):
        self.d0, self.t_end = float(d0), max(1, int(t_end))

    def __call__(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@DROP_SCHEDULES.register("constant")
class ConstantDrop(DropSchedule):
    """``d(t) = d0`` for ``t <= T_end`` (SET; the thesis' K)."""

    def __call__(self, t: int) -> float:
        return self.d0 if t <= self.t_end else 0.0


@DROP_SCHEDULES.register("cosine")
class CosineDrop(DropSchedule):
    """``d(t) = d0/2 * (1 + cos(pi t / T_end))`` for ``t <= T_end`` (RigL, Evci et al. 2020, eq. 1)."""

    def __call__(self, t: int) -> float:
        if t > self.t_end:
            return 0.0
        return 0.5 * self.d0 * (1.0 + math.cos(math.pi * t / self.t_end))
