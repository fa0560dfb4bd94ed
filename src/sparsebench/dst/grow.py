"""Grow criteria: which inactive positions a topology update activates (``method.grow``).

Registry :data:`GROW_CRITERIA`, keyed by the criterion (not by a method name):

* ``random``: uniformly at random among the growable positions (SET, Mocanu et al. 2018).
* ``gradient``: the largest ``|dL/dW|`` of the dense gradient of the update step's batch
  (RigL, Evci et al. 2020).
* ``similarity``: the pairs whose per-batch output-gradient and input vectors are most similar,
  found by a similarity search (thesis 001, chapter 3; :mod:`sparsebench.dst.similarity`,
  :mod:`sparsebench.dst.search`).

A criterion is a :class:`GrowCriterion` subclass that returns either *scores* (override
:meth:`GrowCriterion.scores`: a dense score per position, higher = grow first; the base class takes
the exact top-n among the growable positions) or *positions* (override :meth:`GrowCriterion.grow`).
So RigL differs from SET only in its grow scores, as in jaxpruner's ``RigL`` overriding
``SET._get_grow_scores``. To add one::

    @GROW_CRITERIA.register("my_grow")
    class MyGrow(GrowCriterion):
        def scores(self, layer):           # (numel,) tensor, or None for a random fill
            return layer.weight.detach().abs().view(-1)

and select it with ``method.grow=my_grow``. Parameters come from the ``method`` config through
:meth:`GrowCriterion.from_config`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from sparsebench.core.registry import Registry
from sparsebench.dst.capture import layer_vectors
from sparsebench.dst.search import SEARCHES, check_search
from sparsebench.dst.selection import _NEG_INF, random_growable, topk_indices
from sparsebench.dst.similarity import METRICS
from sparsebench.sparsity.masking import Masking

GROW_CRITERIA: Registry = Registry("method.grow")


@dataclass
class LayerUpdate:
    """What a grow criterion sees for one layer.

    Attributes:
        name, module, weight: the prunable weight (``weight`` shape ``(n_out, ...)``).
        mask_flat: the layer's mask, flat ``(numel,)``; ``== 0`` marks the growable positions (with
            ``allow_regrow`` the ones dropped in this update are already 0).
        n: how many positions to grow.
        x, grad_out: the layer's captured input and output gradient of the update step (only for a
            criterion with ``needs_activations``; None when nothing was captured).
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    mask_flat: torch.Tensor
    n: int
    x: Optional[torch.Tensor] = None
    grad_out: Optional[torch.Tensor] = None


class GrowCriterion:
    """Chooses which positions to grow.

    Attributes:
        needs_activations: the updater captures layer inputs and output gradients at update steps.
        needs_gradients: :meth:`prepare` reads the dense ``weight.grad`` in ``on_after_backward``.
        stats: per-update counters the updater reads (``random_fill``, ``recall_hits``, ``recall_n``,
            ``excluded_seconds``: diagnostics time not counted as update time); reset every update.
    """

    needs_activations = False
    needs_gradients = False

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.stats: Dict[str, float] = {}
        self._hints: Dict[str, Dict[str, float]] = {}  # topk_indices thresholds per layer
        self._memo: dict = {}  # topk_indices' fixed sample positions (derived data, not checkpointed)

    @classmethod
    def from_config(cls, cfg, generator: torch.Generator) -> "GrowCriterion":
        """Build from the validated ``method`` config (its flat keys); default: no parameters."""
        return cls(generator)

    def prepare(self, masking: Masking, names: Sequence[str]) -> None:
        """Called in ``on_after_backward`` of an update step (dense gradients are available)."""

    def scores(self, layer: LayerUpdate) -> Optional[torch.Tensor]:
        """Grow score of every position of the layer, shape ``(numel,)`` (higher = grow first), or None
        (no score for this layer: a random fill, counted in ``stats['random_fill']``)."""
        raise NotImplementedError(f"{type(self).__name__}: override scores() or grow()")

    def grow(self, layer: LayerUpdate) -> torch.Tensor:
        """Exactly ``layer.n`` distinct growable flat positions (long tensor): the top-n of
        :meth:`scores` among the positions ``layer.mask_flat`` marks inactive."""
        s = self.scores(layer)
        if s is None:
            return self.random_fill(layer, layer.n)
        return topk_indices(s.view(-1), layer.n, hint=self._hints.setdefault(layer.name, {}), exclude=layer.mask_flat,
                            memo=self._memo)

    def random_fill(self, layer: LayerUpdate, n: int, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``n`` random growable positions (not in ``exclude``), counted in ``stats['random_fill']``."""
        self.count("random_fill", n)
        return random_growable(layer.mask_flat, n, self.generator, exclude=exclude)

    def count(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0) + value

    def release(self) -> None:
        """Free per-update buffers."""

    def state_dict(self) -> dict:
        """What a resumed run needs to choose exactly as an uninterrupted one: the generator state
        (random growth and fills) and the selection thresholds (``hints``)."""
        return {"generator": self.generator.get_state(), "hints": copy.deepcopy(self._hints)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._hints = copy.deepcopy(state.get("hints", {}))


@GROW_CRITERIA.register("random")
class RandomGrow(GrowCriterion):
    """SET (Mocanu et al. 2018): grow uniformly at random among growable positions (positions, no scores)."""

    def grow(self, layer):
        return random_growable(layer.mask_flat, layer.n, self.generator)


@GROW_CRITERIA.register("gradient")
class GradientGrow(GrowCriterion):
    """RigL (Evci et al. 2020): grow score ``|dL/dW|``, the dense gradient of the update step's batch.

    PyTorch's ``weight.grad`` of a masked weight is already the dense gradient ``grad_out^T x`` (it
    is masked only in the optimizer pre-step hook), so :meth:`prepare` reads it there and writes
    ``|g|`` into one reused score buffer per layer; the base class's selection skips the positions the
    mask marks active at update time, so with ``allow_regrow`` the ones dropped in the same update
    compete again. A layer no gradient reached is filled at random.
    """

    needs_gradients = True

    def __init__(self, generator):
        super().__init__(generator)
        self._scores: Dict[str, torch.Tensor] = {}

    def prepare(self, masking, names):
        for name in names:
            g = masking.weight(name).grad
            if g is None:
                continue
            buf = self._scores.get(name)
            if buf is None or buf.shape != g.shape:
                buf = self._scores[name] = torch.empty_like(g)
            torch.abs(g, out=buf)

    def scores(self, layer):
        return self._scores.get(layer.name)


@GROW_CRITERIA.register("similarity")
class SimilarityGrow(GrowCriterion):
    """Thesis 001, chapter 3: grow the pairs with the largest similarity between the per-batch output
    gradient vectors ``g_j`` and input vectors ``u_i`` (``dL/dW_ji = <g_j, u_i>``), found by a search
    that indexes the ``n_out`` gradient vectors and queries every input vector for its
    ``ceil(k_similar * n_out)`` most similar; positions the search misses are filled at random.

    Args:
        metric: a :data:`~sparsebench.dst.similarity.METRICS` name; ``bits`` is passed to its ``from_params``.
        search: a :data:`~sparsebench.dst.search.SEARCHES` name.
        k_similar: fraction of the indexed vectors returned per query.
        rerank: re-score the merged faiss candidates by the exact ``|<g, u>|``.
        max_rows: subsample the vectors' coordinates (batch x positions) to at most this many.
        log_recall: compute the recall against the exact reference top-n at each update (its time is
            reported in ``stats['excluded_seconds']``, not counted as update time).

    Raises:
        ConfigError: unknown metric/search, or a search that cannot rank the metric (brute + lsh).

    An exact search of a metric whose exact score is ``|dL/dW|`` (``search=brute metric=abs_ip``,
    no ``max_rows``) ranks the full matrix ``|G^T U|``, and that matrix *is* ``|weight.grad|``
    (autograd's backward of a Linear layer computes ``G^T U``; of a Conv2d, the same sum over the
    unfolded patches). So this configuration reads the dense ``weight.grad`` like ``gradient`` (no
    capture, no unfold, no second matmul) and returns the same set as scoring captured vectors
    (tested on a Linear and a Conv2d); its recall is 1 by construction.
    """

    needs_activations = True

    def __init__(self, generator, metric: str = "abs_ip", search: str = "faiss", k_similar: float = 0.15,
                 bits: float = 1.0, rerank: bool = False, max_rows: Optional[int] = None, log_recall: bool = True):
        super().__init__(generator)
        check_search(search, metric)
        self.metric = METRICS.get(metric).from_params(bits=bits)
        self.search = SEARCHES.get(search)(self.metric, k_similar, rerank)
        self.max_rows, self.log_recall = max_rows, bool(log_recall)
        self.from_gradient = self.search.exact and self.metric.is_weight_gradient and max_rows is None
        self._exact: Optional[GradientGrow] = None
        if self.from_gradient:  # exact |G^T U| == |weight.grad| (see the class docstring)
            self.needs_activations, self.needs_gradients = False, True
            self._exact = GradientGrow(generator)

    @classmethod
    def from_config(cls, cfg, generator):
        return cls(generator, metric=cfg.metric, search=cfg.search, k_similar=cfg.k_similar, bits=cfg.bits,
                   rerank=cfg.rerank, max_rows=cfg.max_rows, log_recall=cfg.log_recall)

    def prepare(self, masking, names):
        if self._exact is not None:
            self._exact.prepare(masking, names)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._exact is not None:
            state["exact"] = self._exact.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self._exact is not None and "exact" in state:
            self._exact.load_state_dict(state["exact"])

    def grow(self, layer):
        if self._exact is not None:
            self._exact.stats = self.stats
            filled = self.stats.get("random_fill", 0)
            chosen = self._exact.grow(layer)
            if self.log_recall:  # exact by construction (except a random fill when no gradient reached the layer)
                self.count("recall_hits", layer.n - (self.stats.get("random_fill", 0) - filled))
                self.count("recall_n", layer.n)
            return chosen
        if layer.x is None or layer.grad_out is None:
            return self.random_fill(layer, layer.n)
        with torch.no_grad():
            U, G = layer_vectors(layer.module, layer.x, layer.grad_out)
            U, G = U.float(), G.float()
            Us, Gs = U, G
            if self.max_rows is not None and U.shape[0] > self.max_rows:
                rows = torch.randperm(U.shape[0], generator=self.generator)[:self.max_rows].to(U.device)
                Us, Gs = U[rows], G[rows]
            chosen = self.search.find(layer.name, Gs, Us, layer.mask_flat, layer.n)
            short = layer.n - chosen.numel()
            if short > 0:
                chosen = torch.cat([chosen, self.random_fill(layer, short, exclude=chosen)])
            if self.log_recall:
                t = time.perf_counter()
                ref = self.metric.reference(G, U).reshape(-1).masked_fill_(layer.mask_flat != 0, _NEG_INF)
                kth = torch.topk(ref, layer.n, sorted=False).values.min()
                self.count("recall_hits", int((ref[chosen] >= kth).sum()))
                self.count("recall_n", layer.n)
                self.count("excluded_seconds", time.perf_counter() - t)
        return chosen
