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

Layer storage. The update reaches a layer only through a :class:`TopologyLayer` adapter: drop scores
at the active positions, the criterion's view of the layer (:class:`~sparsebench.dst.grow.LayerUpdate`),
and :meth:`TopologyLayer.replace` (drop slots, grow flat positions). :class:`MaskedLayer` edits a dense
weight behind its :class:`~sparsebench.sparsity.masking.Masking` mask; :class:`SparseLayer` a
:class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear` (``trainer.sparse_kernels=true``; the
trainer hands the converted layers over with :meth:`DSTUpdater.adopt_sparse_layers`): drop by the
smallest ``|values|``, grow by flat index, the CSR structure rebuilt in place, grown values and their
optimizer state zero, ``nnz`` exactly constant. Per layer the same :func:`drop_grow_layer` runs in both
storages, so SET and the similarity grow choose the same positions in both at the same seed (up to
ties in ``|w|``, whose order of slots differs). On a sparse layer a criterion that needs dense
gradients (RigL) gets the captured input and output gradient of the update step instead and computes
``|dL/dW|`` in row blocks (:class:`~sparsebench.dst.grow.GradientGrow`).
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
from sparsebench.dst.selection import flat_nonzero, host_view, reset_state_at, topk_indices
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.sparse_linear import SparseConversion, SparseTrainLinear
from sparsebench.training.callbacks import Callback


class TopologyLayer:
    """The storage side of one layer's topology update (see the module docstring).

    Attributes:
        name, module: the prunable weight's name and the module that holds it.
        numel: positions of the weight; :attr:`n_active`: active ones.
        is_sparse: the layer has no dense weight.
    """

    is_sparse = False

    def __init__(self, name: str, module):
        self.name, self.module = name, module

    @property
    def numel(self) -> int:
        raise NotImplementedError

    @property
    def n_active(self) -> int:
        raise NotImplementedError

    def drop_scores(self):
        """Drop score of the active weights in slot order, lowest dropped first: ``|w|`` (SET, RigL);
        a numpy array on CPU, else a tensor."""
        raise NotImplementedError

    def dropped_positions(self, slots):
        """Flat positions of the active slots ``slots``."""
        raise NotImplementedError

    def layer_update(self, n: int, x, grad_out, dropped=None) -> LayerUpdate:
        """The criterion's view for growing ``n``; ``dropped`` (flat positions, with ``allow_regrow``)
        count as growable."""
        raise NotImplementedError

    def replace(self, slots, grown, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Deactivate the active ``slots``, activate the flat positions ``grown`` (zero weights, zero
        optimizer state)."""
        raise NotImplementedError

    def start(self) -> None:
        """At the start of training (not on resume)."""

    def bump_version(self) -> None:
        """Mark the topology changed from rank-local data (data-parallel ranks sync on it)."""
        raise NotImplementedError


class MaskedLayer(TopologyLayer):
    """A dense weight behind a :class:`Masking` mask. Keeps the active positions in slot order
    (``active``, part of the updater's checkpoint) so that an update touches only ``O(n)`` entries."""

    def __init__(self, masking: Masking, name: str):
        super().__init__(name, masking.module(name))
        self.masking = masking
        self.active: Optional[torch.Tensor] = None

    @property
    def weight(self):
        return self.masking.weight(self.name)

    @property
    def mask(self):
        return self.masking.mask(self.name)

    @property
    def numel(self):
        return self.mask.numel()

    @property
    def n_active(self):
        return self.active.numel()

    def start(self):
        if not (self.weight.is_contiguous() and self.mask.is_contiguous()):
            raise ConfigError(f"trainer.channels_last: DST updates index weights flat and need contiguous "
                              f"tensors ({self.name} is not); turn channels_last off for method=dynamic_sparse")
        self.active = flat_nonzero(self.mask)

    def _views(self):
        # numpy views on CPU (same memory, cheaper per call), the tensors themselves on GPU
        ts = (self.weight.detach().view(-1), self.mask.view(-1), self.active)
        views = [host_view(t) for t in ts]
        return views if all(isinstance(v, np.ndarray) for v in views) else list(ts)

    def drop_scores(self):
        W, _, A = self._views()
        return abs(W[A])

    def dropped_positions(self, slots):
        return self._views()[2][slots]

    def layer_update(self, n, x, grad_out, dropped=None):
        if dropped is not None:
            self._views()[1][dropped] = 0
        return LayerUpdate(self.name, self.module, self.weight, self.mask.view(-1), n, x, grad_out)

    def replace(self, slots, grown, optimizer):
        W, M, A = self._views()
        if isinstance(A, np.ndarray):
            grown = host_view(grown)
        dropped = A[slots]
        M[dropped] = 0
        M[grown] = 1
        W[dropped] = 0
        W[grown] = 0
        if optimizer is not None:
            reset_state_at(optimizer, self.weight, dropped, grown)
        A[slots] = grown

    def bump_version(self):
        self.masking.version += 1


class SparseLayer(TopologyLayer):
    """A :class:`SparseTrainLinear`: slots are its ``values`` (row-major order of the active positions),
    the active positions its CSR structure; no dense weight, mask or gradient is read.

    Args:
        conversion: the :class:`SparseConversion` the layer belongs to (its ``version`` is bumped), or None.
    """

    is_sparse = True

    def __init__(self, name: str, module: SparseTrainLinear, conversion: Optional[SparseConversion] = None):
        super().__init__(name, module)
        self.conversion = conversion

    @property
    def numel(self):
        return self.module.out_features * self.module.in_features

    @property
    def n_active(self):
        return self.module.nnz

    def drop_scores(self):
        v = host_view(self.module.values.detach())
        return np.abs(v) if isinstance(v, np.ndarray) else v.abs()

    def dropped_positions(self, slots):
        return self.module.structure.flat()[torch.as_tensor(slots, dtype=torch.long)]

    def layer_update(self, n, x, grad_out, dropped=None):
        excluded = self.module.structure.flat()  # sorted
        if dropped is not None:
            excluded = excluded[~torch.isin(excluded, torch.as_tensor(dropped).to(excluded))]
        m = self.module
        return LayerUpdate(self.name, m, None, None, n, x, grad_out, shape=(m.out_features, m.in_features),
                           excluded=excluded)

    def replace(self, slots, grown, optimizer):
        self.module.update_topology(torch.as_tensor(slots), torch.as_tensor(grown), optimizer)

    def bump_version(self):
        if self.conversion is not None:
            self.conversion.version += 1


def drop_grow_layer(layer: TopologyLayer, n: int, criterion: GrowCriterion,
                    optimizer: Optional[torch.optim.Optimizer] = None, allow_regrow: bool = False,
                    x: Optional[torch.Tensor] = None, grad_out: Optional[torch.Tensor] = None,
                    hint: Optional[dict] = None, memo: Optional[dict] = None) -> int:
    """The one drop/grow step of a layer: drop the ``n`` active weights with the smallest drop score
    ``|w|`` (exact, :func:`~sparsebench.dst.selection.topk_indices`), grow ``n`` positions chosen by
    ``criterion`` (inactive before the update; with ``allow_regrow`` the dropped ones compete again),
    zero the grown weights and their optimizer state. ``x`` / ``grad_out``: the captured vectors of the
    update step; ``hint`` / ``memo``: the caller's per-layer selection thresholds. Returns ``n``
    (``n`` must not exceed the active or the inactive count)."""
    if n <= 0:
        return 0
    slots = topk_indices(layer.drop_scores(), n, largest=False, hint=hint, memo=memo)
    dropped = layer.dropped_positions(slots) if allow_regrow else None
    grown = criterion.grow(layer.layer_update(n, x, grad_out, dropped))
    layer.replace(slots, grown, optimizer)
    return n


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
        layers: ``{name: TopologyLayer}`` of the updated layers (:class:`MaskedLayer`, or
            :class:`SparseLayer` after :meth:`adopt_sparse_layers`).
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
        self.layers: Dict[str, TopologyLayer] = {n: MaskedLayer(masking, n) for n in self.names}
        self.capture: Optional[ActivationCapture] = None
        self._set_capture()
        self.schedule: Optional[DropSchedule] = None
        self.t_end = 0
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
    def _set_capture(self) -> None:
        """Capture the layers whose criterion reads per-batch vectors: all of them for
        ``needs_activations``; the sparse ones for ``needs_gradients`` (no dense gradient there)."""
        c = self.criterion
        watch = {n: t.module for n, t in self.layers.items()
                 if c.needs_activations or (c.needs_gradients and t.is_sparse)}
        self.capture = ActivationCapture(watch) if watch else None

    def adopt_sparse_layers(self, conversion: SparseConversion) -> None:
        """The trainer replaced masked Linear layers by :class:`SparseTrainLinear` (``trainer.sparse_kernels``):
        update those through :class:`SparseLayer`, the ones that stayed masked-dense through
        ``conversion.masking``. Called before training starts (and before a checkpoint is loaded)."""
        layers: Dict[str, TopologyLayer] = {}
        for n in self.names:
            if n in conversion.sparse:
                layers[n] = SparseLayer(n, conversion.sparse[n], conversion)
            else:
                layers[n] = MaskedLayer(conversion.masking, n)
        self.layers = layers
        self.masking = conversion.masking
        self._set_capture()

    def _dense_names(self):
        return [n for n, t in self.layers.items() if not t.is_sparse]

    def on_train_start(self, trainer) -> None:
        self.t_end = max(1, int(round(self.t_end_fraction * trainer.total_steps)))
        self.schedule = DROP_SCHEDULES.get(self.schedule_name)(self.d0, self.t_end)
        if self.delta_t > self.t_end:  # is_update_step is never true: the run stays static sparse
            import sys

            print(f"warning: method.delta_t={self.delta_t}: no topology update will happen (updates stop at step "
                  f"{self.t_end} = method.t_end x {trainer.total_steps} steps); lower method.delta_t or train longer",
                  file=sys.stderr, flush=True)
        for t in self.layers.values():
            t.start()
        self._arm(trainer.step)

    def on_resume(self, trainer) -> None:
        """After a checkpoint was loaded (:meth:`load_state_dict`): arm the capture for the next step."""
        self._arm(trainer.step)

    def state_dict(self) -> dict:
        """The topology bookkeeping a resumed run continues from (masks, weights and the sparse layers'
        structures are in the model's state): ``t_end``, each masked layer's active positions in their
        slot order, the drop thresholds, the grow criterion's state and the counters."""
        return {"t_end": self.t_end, "active_idx": {n: t.active.cpu().clone() for n, t in self.layers.items()
                                                    if isinstance(t, MaskedLayer) and t.active is not None},
                "drop_hints": copy.deepcopy(self._drop_hints), "grow": self.criterion.state_dict(),
                "counters": {"updates": self.updates, "changed": self.changed, "update_seconds": self.update_seconds,
                             "random_fill": self.random_fill, "recall_hits": self._recall_hits,
                             "recall_n": self._recall_n}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.t_end = int(state["t_end"])
        self.schedule = DROP_SCHEDULES.get(self.schedule_name)(self.d0, self.t_end)
        for n, a in state["active_idx"].items():
            t = self.layers[n]
            t.active = a.to(t.mask.device)
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
        dense = self._dense_names()
        if self._pending and self.criterion.needs_gradients and dense:
            t = time.perf_counter()
            self.criterion.prepare(self.masking, dense)
            self.update_seconds += time.perf_counter() - t

    def on_step_end(self, trainer) -> None:
        if self._pending:
            self._pending = False
            self.update(trainer.optimizer, trainer.step)
        if self.capture is not None:
            self.capture.disarm()
            self._arm(trainer.step)

    # ------------------------------------------------------------------ the update
    @property
    def active_idx(self) -> Dict[str, torch.Tensor]:
        """``{name: active flat positions in slot order}`` of the masked-dense layers (sparse layers keep
        theirs in their CSR structure)."""
        return {n: t.active for n, t in self.layers.items() if isinstance(t, MaskedLayer)}

    @torch.no_grad()
    def update(self, optimizer: Optional[torch.optim.Optimizer], step: int) -> Dict[str, int]:
        """Drop and grow in every updated layer at ``step`` (steps done); returns ``{name: n}``."""
        t0 = time.perf_counter()
        d = self.schedule(step) if self.schedule is not None else self.d0
        self.criterion.stats = {}
        done = {}
        watched = self.capture.modules if self.capture is not None else {}
        for name in self.names:
            layer = self.layers[name]
            n_active, numel = layer.n_active, layer.numel
            n = min(int(round(d * n_active)), numel - n_active, n_active)
            if n <= 0:
                continue
            x, gout = self.capture.get(name) if name in watched else (None, None)
            done[name] = drop_grow_layer(layer, n, self.criterion, optimizer, self.allow_regrow, x, gout,
                                         hint=self._drop_hints.setdefault(name, {}), memo=self._memo)
            if name in watched:
                # chosen from this process' own activations: data-parallel ranks differ, the trainer syncs rank 0's
                # topology when the version moves (dense gradients are all-reduced, random growth uses the same seed)
                layer.bump_version()
        self.criterion.release()
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
