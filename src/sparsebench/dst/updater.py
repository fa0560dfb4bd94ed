"""The topology update of dynamic sparse training: one generic drop/grow step, fed per layer a drop
score and a grow criterion's scores or positions (the pattern of jaxpruner's
``SET._update_masks(old_mask, drop_score, grow_score, drop_fraction)`` and google-research/rigl's
``_get_update_op``).

Every ``ΔT`` steps until ``T_end`` :class:`DSTUpdater`, per updated layer,

1. drops the ``n = round(d(t) * active)`` active weights with the smallest drop score ``|w|``
   (``d(t)``: a :data:`~sparsebench.dst.schedules.DROP_SCHEDULES` anneal),
2. grows ``n`` positions chosen by a :class:`~sparsebench.dst.grow.GrowCriterion` among positions
   that were *inactive before the update* (``allow_regrow=True``: inactive after the drop, as
   RigL's reference code),
3. writes the new mask into the :class:`~sparsebench.sparsity.masking.Masking` buffers, zeroes the
   grown (and dropped) weights and their optimizer state (momentum, Adam moments).

Each layer's active count is therefore exactly constant (``n`` capped at the number of growable
positions). The update runs in ``on_step_end`` (after the optimizer step of step ``t``), using what
``on_after_backward`` saw at that step: the dense weight gradient (``grow=gradient``) or the captured
layer inputs and output gradients (``grow=similarity``). Masking masks gradients in the optimizer's
*pre-step* hook, so ``weight.grad`` is still dense in ``on_after_backward`` (tested).

Update cost: on CPU the per-layer selection and mask edits run in numpy on views of the tensors
(:func:`~sparsebench.dst.selection.host_view`), selections are exact top-n by a threshold carried
from the previous update (:func:`~sparsebench.dst.selection.topk_indices`), and nothing scans the
dense weight more than once. On CUDA the same code runs on the tensors. The update time is kept
apart from the step time (diagnostics such as the recall are excluded from it).
"""
from __future__ import annotations

import copy
import fnmatch
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.io import MetricsLog
from sparsebench.dst.capture import ActivationCapture
from sparsebench.dst.grow import GrowCriterion, LayerUpdate
from sparsebench.dst.schedules import DROP_SCHEDULES, DropSchedule
from sparsebench.dst.selection import host_view, reset_state_at, topk_indices
from sparsebench.sparsity.masking import Masking
from sparsebench.training.callbacks import Callback


class DSTUpdater(Callback):
    """Drop/grow topology updates every ``delta_t`` steps until ``t_end`` (see the module docstring).

    Args:
        masking: the run's masking (initial sparse masks already set).
        grow: the grow criterion (a :data:`~sparsebench.dst.grow.GROW_CRITERIA` instance).
        d0: initial drop fraction (RigL's alpha, the thesis' K) in [0, 1).
        schedule: a :data:`DROP_SCHEDULES` name (``method.drop_fraction_anneal``).
        delta_t: update interval ΔT in steps (>= 1).
        t_end: fraction of the training steps after which the topology is frozen (RigL: 0.75).
        update_layers: fnmatch patterns of the prunable weights to update (others keep their mask).
        allow_regrow: let the weights dropped in this update be grown again (RigL's reference code);
            default False: grown positions were inactive before the update.
        metrics: optional long-format log (``dst/update_ms``, ``dst/recall``, ``dst/drop_fraction`` per update).

    Attributes:
        update_seconds: wall time of all updates (capture preparation + drop/grow), recall excluded.
        updates: number of topology updates done; ``changed``: positions grown in total.
    """

    def __init__(self, masking: Masking, grow: GrowCriterion, d0: float = 0.3, schedule: str = "cosine",
                 delta_t: int = 100, t_end: float = 0.75, update_layers: Sequence[str] = ("*",),
                 allow_regrow: bool = False, metrics: Optional[MetricsLog] = None, log_prefix: str = "dst/"):
        if not 0.0 <= d0 < 1.0:
            raise ConfigError(f"method.drop_fraction={d0!r}: must be in [0, 1)")
        if delta_t < 1:
            raise ConfigError(f"method.delta_t={delta_t!r}: must be >= 1")
        self.masking, self.criterion = masking, grow
        self.d0, self.schedule_name, self.delta_t, self.t_end_fraction = float(d0), schedule, int(delta_t), float(t_end)
        DROP_SCHEDULES.get(schedule)  # validate early
        self.names = [n for n in masking.names if any(fnmatch.fnmatch(n, p) for p in update_layers)]
        if not self.names:
            raise ConfigError(f"method.update_layers={list(update_layers)!r}: matches no prunable layer "
                              f"(prunable: {', '.join(masking.names)})")
        self.allow_regrow = bool(allow_regrow)
        self.metrics, self.prefix = metrics, log_prefix
        self.capture = ActivationCapture({n: masking.module(n) for n in self.names}) if grow.needs_activations else None
        self.schedule: Optional[DropSchedule] = None
        self.t_end = 0
        self.active_idx: Dict[str, torch.Tensor] = {}
        self._drop_hints: Dict[str, Dict[str, float]] = {}  # topk_indices thresholds, per layer
        self._memo: dict = {}  # topk_indices' fixed sample positions (derived data, not checkpointed)
        self.update_seconds = 0.0
        self.updates = 0
        self.changed = 0
        self.random_fill = 0
        self.last_recall: Optional[float] = None
        self._recall_hits = 0
        self._recall_n = 0
        self._pending = False

    # ------------------------------------------------------------------ schedule
    def is_update_step(self, step: int) -> bool:
        """Step ``step`` (0-based, the one in progress) ends with a topology update."""
        done = step + 1
        return done % self.delta_t == 0 and done <= self.t_end

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer) -> None:
        self.t_end = max(1, int(round(self.t_end_fraction * trainer.total_steps)))
        self.schedule = DROP_SCHEDULES.get(self.schedule_name)(self.d0, self.t_end)
        if self.delta_t > self.t_end:  # is_update_step is never true: the run stays static sparse
            import sys

            print(f"warning: method.delta_t={self.delta_t}: no topology update will happen (updates stop at step "
                  f"{self.t_end} = method.t_end x {trainer.total_steps} steps); lower method.delta_t or train longer",
                  file=sys.stderr, flush=True)
        for n in self.names:
            if not (self.masking.weight(n).is_contiguous() and self.masking.mask(n).is_contiguous()):
                raise ConfigError(f"trainer.channels_last: DST updates index weights flat and need contiguous "
                                  f"tensors ({n} is not); turn channels_last off for method=dynamic_sparse")
        self.active_idx = {n: self.masking.mask(n).reshape(-1).nonzero().squeeze(1) for n in self.names}
        self._arm(trainer.step)

    def on_resume(self, trainer) -> None:
        """After a checkpoint was loaded (:meth:`load_state_dict`): arm the capture for the next step."""
        self._arm(trainer.step)

    def state_dict(self) -> dict:
        """The topology bookkeeping a resumed run continues from (masks and weights are in the model's
        state): ``t_end``, each layer's active positions in their slot order, the drop thresholds,
        the grow criterion's state and the counters."""
        return {"t_end": self.t_end, "active_idx": {n: a.cpu().clone() for n, a in self.active_idx.items()},
                "drop_hints": copy.deepcopy(self._drop_hints), "grow": self.criterion.state_dict(),
                "counters": {"updates": self.updates, "changed": self.changed, "update_seconds": self.update_seconds,
                             "random_fill": self.random_fill, "recall_hits": self._recall_hits,
                             "recall_n": self._recall_n}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.t_end = int(state["t_end"])
        self.schedule = DROP_SCHEDULES.get(self.schedule_name)(self.d0, self.t_end)
        self.active_idx = {n: a.to(self.masking.mask(n).device) for n, a in state["active_idx"].items()}
        self._drop_hints = copy.deepcopy(state["drop_hints"])
        self.criterion.load_state_dict(state["grow"])
        c = state["counters"]
        self.updates, self.changed, self.update_seconds = int(c["updates"]), int(c["changed"]), float(c["update_seconds"])
        self.random_fill, self._recall_hits, self._recall_n = int(c["random_fill"]), c["recall_hits"], c["recall_n"]

    def _arm(self, step: int) -> None:
        if self.capture is not None and self.is_update_step(step):
            self.capture.arm()

    def on_after_backward(self, trainer) -> None:
        self._pending = self.is_update_step(trainer.step)
        if self._pending and self.criterion.needs_gradients:
            t = time.perf_counter()
            self.criterion.prepare(self.masking, self.names)
            self.update_seconds += time.perf_counter() - t

    def on_step_end(self, trainer) -> None:
        if self._pending:
            self._pending = False
            self.update(trainer.optimizer, trainer.step)
        if self.capture is not None:
            self.capture.disarm()
            self._arm(trainer.step)

    # ------------------------------------------------------------------ the update
    @staticmethod
    def drop_scores(W, A):
        """Drop score of the active weights ``W[A]`` (lowest dropped first): ``|w|`` (SET, RigL)."""
        return abs(W[A])

    @torch.no_grad()
    def update(self, optimizer: Optional[torch.optim.Optimizer], step: int) -> Dict[str, int]:
        """Drop and grow in every updated layer at ``step`` (steps done); returns ``{name: n}``."""
        t0 = time.perf_counter()
        d = self.schedule(step) if self.schedule is not None else self.d0
        self.criterion.stats = {}
        done = {}
        for name in self.names:
            w, mask = self.masking.weight(name), self.masking.mask(name)
            m_flat, active = mask.view(-1), self.active_idx[name]
            n_active, numel = active.numel(), m_flat.numel()
            n = min(int(round(d * n_active)), numel - n_active, n_active)
            if n <= 0:
                continue
            # numpy views on CPU (same memory, cheaper per call), the tensors themselves on GPU
            W, M, A = views = [host_view(t) for t in (w.detach().view(-1), m_flat, active)]
            if not all(isinstance(v, np.ndarray) for v in views):
                W, M, A = w.detach().view(-1), m_flat, active
            drop_slots = topk_indices(self.drop_scores(W, A), n, largest=False,
                                      hint=self._drop_hints.setdefault(name, {}), memo=self._memo)
            dropped = A[drop_slots]
            if self.allow_regrow:
                M[dropped] = 0
            x, gout = self.capture.get(name) if self.capture is not None else (None, None)
            layer = LayerUpdate(name, self.masking.module(name), w, m_flat, n, x, gout)
            grown = self.criterion.grow(layer)
            if isinstance(A, np.ndarray):
                grown = host_view(grown)
            M[dropped] = 0
            M[grown] = 1
            W[dropped] = 0
            W[grown] = 0
            if optimizer is not None:
                reset_state_at(optimizer, w, dropped, grown)
            A[drop_slots] = grown
            done[name] = n
        self.criterion.release()
        if done and self.criterion.needs_activations:
            # chosen from this process' own activations: data-parallel ranks differ, the trainer syncs rank 0's
            # masks when the version moves (gradient and random growth see all-reduced gradients / the same seed)
            self.masking.version += 1
        stats = self.criterion.stats
        elapsed = time.perf_counter() - t0 - stats.get("excluded_seconds", 0.0)
        self.update_seconds += elapsed
        self.updates += 1
        self.changed += sum(done.values())
        self.last_recall = (stats["recall_hits"] / stats["recall_n"]) if stats.get("recall_n") else None
        self._recall_hits += stats.get("recall_hits", 0)
        self._recall_n += stats.get("recall_n", 0)
        self.random_fill += int(stats.get("random_fill", 0))
        if self.metrics is not None:
            m = {f"{self.prefix}update_ms": 1000 * elapsed, f"{self.prefix}drop_fraction": d,
                 f"{self.prefix}grown": float(sum(done.values()))}
            if self.last_recall is not None:
                m[f"{self.prefix}recall"] = self.last_recall
            self.metrics.log(step, m)
        return done

    def summary(self) -> Dict[str, float]:
        """``updates``, ``grown_total``, ``update_seconds``, ``recall_mean`` (NaN without recall), ``random_fill``."""
        n = self._recall_n
        return {"updates": self.updates, "grown_total": self.changed, "update_seconds": self.update_seconds,
                "recall_mean": (self._recall_hits / n) if n else float("nan"), "random_fill": self.random_fill}
