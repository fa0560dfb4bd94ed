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
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import torch
from torch import nn

from sparsebench.core.registry import Registry
from sparsebench.dst.capture import layer_vectors
from sparsebench.dst.search import SEARCHES, check_search
from sparsebench.dst.selection import (_NEG_INF, SCAN_ELEMENTS, SCAN_MIN_ELEMENTS, ProductRows, block_top, drop_sorted,
                                       flat_nonzero, host_view, largest_indices, prefiltered_above, random_growable,
                                       nonzero_part, rows_above, sample_grid, sampled_threshold, select_above, top_np,
                                       topk_indices)
from sparsebench.dst.similarity import METRICS
from sparsebench.sparsity.masking import Masking

GROW_CRITERIA: Registry = Registry("method.grow")


class LayerUpdate:
    """What a grow criterion sees for one layer (built by the layer's
    :class:`~sparsebench.dst.updater.TopologyLayer` adapter).

    Attributes:
        name, module: the prunable weight's name and its module (an ``nn.Linear`` / ``nn.Conv*`` behind a
            mask, or a :class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear`).
        weight: the dense weight (shape ``(n_out, ...)``), or None for a truly sparse layer.
        n: how many positions to grow.
        x, grad_out: the layer's captured input and output gradient of the update step (for a criterion
            with ``needs_activations``, and for ``needs_gradients`` on a sparse layer; None when nothing
            was captured).
        shape: ``(n_out, n_in)``, the weight's ``view(n_out, -1)`` shape.
        excluded: sparse layers only: ``(m,)`` sorted flat positions that may not be grown (the active
            ones; with ``allow_regrow`` minus those dropped in this update); None for a masked layer.

    :attr:`mask_flat` is the ``(numel,)`` mask, ``== 0`` marks the growable positions (with
    ``allow_regrow`` the ones dropped in this update are already 0). A masked layer passes its mask
    buffer; for a sparse layer it is built from ``excluded`` on first access (``numel`` bytes, uint8, for
    this update only): criteria that only need row blocks use :meth:`excluded_in_rows` instead.
    """

    def __init__(self, name: str, module: nn.Module, weight: Optional[torch.Tensor], mask_flat: Optional[torch.Tensor],
                 n: int, x: Optional[torch.Tensor] = None, grad_out: Optional[torch.Tensor] = None,
                 shape: Optional[Tuple[int, int]] = None, excluded: Optional[torch.Tensor] = None):
        if mask_flat is None and (excluded is None or shape is None):
            raise ValueError("LayerUpdate: give mask_flat, or shape and excluded")
        self.name, self.module, self.weight, self.n, self.x, self.grad_out = name, module, weight, int(n), x, grad_out
        if shape is None:
            shape = (int(weight.shape[0]), int(weight[0].numel()))
        self.shape, self.excluded, self._mask = (int(shape[0]), int(shape[1])), excluded, mask_flat

    @property
    def is_sparse(self) -> bool:
        """The layer has no dense weight (a truly sparse layer)."""
        return self.weight is None

    @property
    def mask_flat(self) -> torch.Tensor:
        if self._mask is None:
            m = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.uint8, device=self.excluded.device)
            m[self.excluded] = 1
            self._mask = m
        return self._mask

    def random_growable(self, n: int, generator: torch.Generator,
                        exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`~sparsebench.dst.selection.random_growable` on this layer: a sparse layer tests its draws
        against ``excluded`` (no ``numel``-byte mask built), with the same result as on the mask."""
        if self._mask is None and self.excluded is not None:
            return random_growable(None, n, generator, exclude=exclude, active=self.excluded,
                                   numel=self.shape[0] * self.shape[1])
        return random_growable(self.mask_flat, n, generator, exclude=exclude)

    def restricted(self, excluded: torch.Tensor, shape: Tuple[int, int]) -> "LayerUpdate":
        """This layer's update on a part of its matrix (e.g. :func:`~sparsebench.dst.selection.nonzero_part`):
        the same name, module, ``n`` and captured tensors, of ``shape`` with the part's ``excluded`` (sorted flat
        positions of the part)."""
        return LayerUpdate(self.name, self.module, None, None, self.n, self.x, self.grad_out, shape=shape,
                           excluded=excluded)

    def excluded_in_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Non-growable positions of rows ``[r0, r1)``, as flat indices into that row block (long)."""
        n_in = self.shape[1]
        if self.excluded is not None:
            ex = self.excluded
            a = host_view(ex)
            if isinstance(a, np.ndarray):  # numpy: no tensor construction and dispatch per row block
                lo, hi = np.searchsorted(a, (r0 * n_in, r1 * n_in))
                return torch.from_numpy(a[lo:hi] - r0 * n_in)
            lo, hi = (int(v) for v in torch.searchsorted(ex, torch.tensor([r0 * n_in, r1 * n_in], device=ex.device)))
            return ex[lo:hi] - r0 * n_in
        return flat_nonzero(self._mask[r0 * n_in:r1 * n_in])


def blocked_topn(score_rows: Callable[[int, int], torch.Tensor], layer: LayerUpdate, n: int,
                 block_elements: int = 1 << 22, absolute: bool = False,
                 memo: Optional[dict] = None, positive: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``n`` growable entries of an ``(n_out, n_in)`` score matrix computed a block of rows at
    a time, so at most ``block_elements`` scores exist at once (bounded peak memory).

    A sparse layer of more than :data:`~sparsebench.dst.selection.SCAN_MIN_ELEMENTS` scores, given a scorer with a
    ``sample(rows, cols)`` method (:class:`GradientRows`), is first scanned once with a threshold from a grid of
    its scores (:func:`_scanned_topn`: every block selected while it is in cache); only when that lets fewer
    than ``n`` growable entries pass does the row-block path below run.

    The first block keeps its share of the top-n (``1.25 n b / N`` plus four standard deviations, ``b`` its
    size; its own exact top, :func:`~sparsebench.dst.selection.block_top`), whose smallest score is the first
    threshold ``t``, an estimate of the n-th largest of the matrix. Each later block passes only its entries
    above ``t`` (one :func:`select_above` pass: with ``absolute`` the abs is taken in that pass), and the kept
    entries are cut back to the top-n whenever more than ``2 n`` wait (``t`` rising to the n-th largest seen, if
    higher). Exact: ``t`` never exceeds the final n-th largest kept score when at least ``n`` pass, so every
    entry above that is kept; when fewer pass (the first block's rows ran high), the blocks are scored again
    with the first block's full top-n as the threshold, an n-th largest seen.

    Args:
        score_rows: ``(r0, r1) -> (r1 - r0, n_in)`` float scores of rows ``[r0, r1)`` (may be written to;
            may reuse its buffer: a block is consumed before the next call).
        layer: gives the shape and the non-growable positions (:meth:`LayerUpdate.excluded_in_rows`).
        n: how many entries.
        block_elements: scores per block (rows per block: ``max(1, block_elements // n_in)``).
        absolute: rank ``|score|`` (``score_rows`` gives the signed product, e.g. :func:`gradient_rows`).
        memo: the caller's dict for the fixed sample positions of the first block's threshold.
        positive: with ``absolute`` only: return only scores above zero, and with a
            :class:`~sparsebench.dst.selection.ProductRows` scorer (``G^T U``) of a sparse layer score only the
            rows and columns that can hold them (:func:`~sparsebench.dst.selection.nonzero_part`: the product,
            the threshold and the selection run on that part). The caller fills what is short of ``n`` among
            the zero scores, all tied (e.g. at random).

    Returns:
        ``(values, flat)``: the ``min(n, growable)`` largest scores (``positive``: of those above zero) and
        their flat positions ``row * n_in + col`` (a set, no order): the same set as ``torch.topk`` over
        the full masked matrix up to ties.
    """
    part = None
    if positive and absolute and isinstance(score_rows, ProductRows) and layer.excluded is not None:
        part = nonzero_part(score_rows.G, score_rows.U, layer.excluded)
    if part is None:
        v, f = _blocked_topn_all(score_rows, layer, n, block_elements, absolute, memo)
    else:
        Gp, Up, ex, rows, cols = part
        sub_memo = memo.setdefault(("nonzero_part", layer.name), {}) if memo is not None else {}
        v, f = _blocked_topn_all(ProductRows(Gp, Up, score_rows.pool), layer.restricted(ex, (rows.numel(), cols.numel())),
                                 n, block_elements, True, sub_memo)
        if memo is not None and "scan_misses" in sub_memo:
            memo["scan_misses"] = memo.get("scan_misses", 0) + sub_memo.pop("scan_misses")
        f = rows[f // cols.numel()] * layer.shape[1] + cols[f % cols.numel()]
    if positive and absolute:
        ok = v > 0
        v, f = v[ok], f[ok]
    return v, f


def _blocked_topn_all(score_rows, layer: LayerUpdate, n: int, block_elements: int, absolute: bool,
                      memo: Optional[dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`blocked_topn` over the whole matrix: the scan, else the row blocks."""
    n_out, n_in = layer.shape
    if n_out * n_in > SCAN_MIN_ELEMENTS and layer.excluded is not None and hasattr(score_rows, "sample"):
        got = _scanned_topn(score_rows, layer, n, min(int(block_elements), SCAN_ELEMENTS), absolute, memo)
        if got is not None:
            return got
    rows = max(1, int(block_elements) // max(1, n_in))
    if rows < n_out:
        got = _blocked_topn(score_rows, layer, n, rows, absolute, memo, estimate=True)
        if got[0].numel() >= n:  # n entries above the estimate: the set is exact (see the docstring)
            return got
    return _blocked_topn(score_rows, layer, n, rows, absolute, memo, estimate=False)


SCAN_MARGIN = 1.5  # the scan's threshold lets about 1.5 n pass (plus four standard deviations) ...
SCAN_MARGIN_MAX = 16.0  # ... doubled for a layer after a miss (at most 16 n), shrunk by 10% after a hit


def _scanned_topn(score_rows, layer: LayerUpdate, n: int, block_elements: int, absolute: bool,
                  memo: Optional[dict]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`blocked_topn` of a sparse layer by one scan: a threshold from a grid of the matrix's scores
    (``score_rows.sample``, :func:`~sparsebench.dst.selection.sampled_threshold`; 256 x 256 at most, rows and
    columns stratified by ``score_rows.norms()`` where given), then
    every block of ``block_elements`` scores selected above it while it is in cache
    (:func:`~sparsebench.dst.selection.rows_above`), the excluded positions dropped from the sorted hits in
    one merge, and the top-n taken among them. Exact whenever at least ``n`` growable entries pass (every
    entry above the n-th largest is then a hit); None otherwise (counted in ``memo['scan_misses']``; the layer's
    margin, 1.5 n, doubles for its next scans, up to 16 n, and shrinks by 10% after each hit) or without the
    native select, and the caller takes the row-block path."""
    n_out, n_in = layer.shape
    N = n_out * n_in
    if memo is None:
        memo = {}
    ri, ci = sample_grid(n_out, n_in, norms=score_rows.norms() if hasattr(score_rows, "norms") else None)
    smp = host_view(score_rows.sample(ri, ci))
    if not isinstance(smp, np.ndarray):
        return None
    ex = host_view(layer.excluded)
    if not isinstance(ex, np.ndarray):
        return None
    key = ("scan_margin", layer.name)  # per layer, whatever the shape of its scored part (nonzero_part)
    margin = memo.get(key, SCAN_MARGIN)
    t = sampled_threshold(np.abs(smp) if absolute else smp, ri, ci, n_in, n, N, ex, margin)
    if t is None:
        return None
    got = None
    if absolute and getattr(score_rows, "approximate", False):
        got = prefiltered_above(score_rows, t, 2 * block_elements, int(2 * margin * n), (np.abs(smp), ri, ci))
        if got is not None:
            got = (got[0], np.abs(got[1]))
    if got is None:
        got = rows_above(score_rows, n_out, n_in, max(1, block_elements // n_in), t, absolute,
                         expect=int(2 * margin * n))
    if got is None:
        return None
    f, v = drop_sorted(got[0], got[1], ex, inplace=True)
    if f.size < n:  # the grid overweighted strong rows / columns: a wider margin for this layer's next scans
        memo["scan_misses"] = memo.get("scan_misses", 0) + 1
        memo[key] = min(SCAN_MARGIN_MAX, 2.0 * margin)
        return None
    memo[key] = max(SCAN_MARGIN, 0.9 * margin)
    if f.size > n:
        top = top_np(v, n)[1]
        f, v = f[top], v[top]
    return torch.from_numpy(np.array(v, dtype=np.float32)), torch.from_numpy(f.astype(np.int64))


def _blocked_topn(score_rows, layer: LayerUpdate, n: int, rows: int, absolute: bool, memo: Optional[dict],
                  estimate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`blocked_topn`'s pass over the blocks; ``estimate``: the first block keeps only its share of
    the top-n (1.25x plus four standard deviations) and its smallest kept score is the first threshold."""
    n_out, n_in = layer.shape
    N = n_out * n_in
    kept_v: List[torch.Tensor] = []
    kept_f: List[torch.Tensor] = []
    waiting, t, t_est = 0, None, _NEG_INF

    def cut():  # the top-n of the kept entries; t = max(estimate, their minimum) once there are n
        nonlocal kept_v, kept_f, waiting, t
        v, f = torch.cat(kept_v), torch.cat(kept_f)
        if v.numel() > n:
            top = largest_indices(v, n).to(v.device)
            v, f = v[top], f[top]
        kept_v, kept_f, waiting = [v], [f], v.numel()
        if v.numel() >= n:
            t = max(t_est, float(v.min()))

    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        s = score_rows(r0, r1).reshape(-1)
        ex = layer.excluded_in_rows(r0, r1)  # left out by the select (or marked NaN where every entry is ranked)
        if t is None:
            m = min(n, s.numel())
            if estimate:
                share = n * s.numel() / N
                m = min(m, int(math.ceil(1.25 * share + 4.0 * math.sqrt(share))))
            i, v = block_top(s, m, absolute, memo, ex)
            if estimate and m < n and v.numel() == m:
                t_est = t = float(v.min())
        else:
            i, v = select_above(s, t, absolute, exclude=ex)
        kept_v.append(v.to(torch.float32))
        kept_f.append(i.to(torch.long) + r0 * n_in)
        waiting += v.numel()
        if waiting >= n and (t is None or waiting > 2 * n):
            cut()
    if waiting and (len(kept_v) > 1 or waiting > n):
        cut()
    if not kept_v:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    v, f = kept_v[0], kept_f[0]
    ok = v > _NEG_INF
    return v[ok], f[ok]


def read_gradients(masking: Masking, names: Sequence[str], buffers: Dict[str, torch.Tensor],
                   write: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
    """For each named masked weight, ``write(grad, out)`` its dense ``weight.grad`` (read in
    ``on_after_backward``) into the layer's reused buffer ``buffers[name]`` (allocated on first use); a
    layer without a gradient loses its buffer (its growth is then a random fill, not a stale score)."""
    for name in names:
        g = masking.weight(name).grad
        if g is None:
            buffers.pop(name, None)
            continue
        buf = buffers.get(name)
        if buf is None or buf.shape != g.shape:
            buf = buffers[name] = torch.empty_like(g)
        write(g, buf)


class GradientRows(ProductRows):
    """``(r0, r1) -> dL/dW`` of rows ``[r0, r1)``: the signed ``G[:, r0:r1]^T U`` of the layer's captured
    vectors (:func:`~sparsebench.dst.capture.layer_vectors`), the dense gradient one row block at a time
    (:class:`~sparsebench.dst.selection.ProductRows`); rank its magnitude with
    ``blocked_topn(..., absolute=True)``. ``pool``: a dict the caller keeps, so the reused score buffers
    outlive this object, for the next update."""

    def __init__(self, layer: LayerUpdate, pool: Optional[Dict[str, torch.Tensor]] = None):
        U, G = layer_vectors(layer.module, layer.x, layer.grad_out)
        super().__init__(G, U, pool)


def gradient_rows(layer: LayerUpdate, pool: Optional[Dict[str, torch.Tensor]] = None) -> GradientRows:
    """The row-block scorer of ``|dL/dW|`` of a layer from its captured vectors (:class:`GradientRows`)."""
    return GradientRows(layer, pool)


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

    def random_fill(self, layer: LayerUpdate, n: int, exclude: Optional[torch.Tensor] = None,
                    stat: str = "random_fill") -> torch.Tensor:
        """``n`` random growable positions (not in ``exclude``), counted in ``stats[stat]``."""
        self.count(stat, n)
        return layer.random_growable(n, self.generator, exclude=exclude)

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
        return layer.random_growable(layer.n, self.generator)


@GROW_CRITERIA.register("gradient")
class GradientGrow(GrowCriterion):
    """RigL (Evci et al. 2020): grow score ``|dL/dW|``, the dense gradient of the update step's batch.

    PyTorch's ``weight.grad`` of a masked weight is already the dense gradient ``grad_out^T x`` (it
    is masked only in the optimizer pre-step hook), so :meth:`prepare` reads it there and writes
    ``|g|`` into one reused score buffer per layer; the base class's selection skips the positions the
    mask marks active at update time, so with ``allow_regrow`` the ones dropped in the same update
    compete again. A layer no gradient reached is filled at random.

    A truly sparse layer (``trainer.sparse_kernels=true``) has no dense gradient: the updater captures
    its input ``x`` and output gradient ``dL/dz`` at update steps only, and :meth:`grow` computes
    ``|dL/dW| = |dz^T x|`` a block of rows at a time (:func:`blocked_topn`: at most ``block_elements``
    float scores at once, exact top-n), never the whole ``(n_out, n_in)`` matrix. The block buffer is
    kept between updates (``4 x block_elements`` bytes, 16 MB by default), so an update does not pay a
    fresh buffer's page faults. Only the rows and columns that can score above zero are scored
    (``blocked_topn(positive=True)``); where fewer than ``n`` growable scores are above zero, the rest is
    drawn at random among the tied zeros (``stats['zero_ties']``; the masked mode's top-n takes whichever
    zeros ``torch.topk`` returns: the same set up to ties).

    Args:
        block_elements: scores per row block on sparse layers (default 4M: 16 MB of float32; 1M-element
            blocks measured slower in training, 40 against 27 ms of products for the wide MLP's
            4096 x 4096 layer, one thread).
    """

    needs_gradients = True

    def __init__(self, generator, block_elements: int = 1 << 22):
        super().__init__(generator)
        self.block_elements = int(block_elements)
        self._pool: Dict[str, torch.Tensor] = {}  # the row-block score buffer, reused across updates
        self._scores: Dict[str, torch.Tensor] = {}

    def prepare(self, masking, names):
        read_gradients(masking, names, self._scores, lambda g, out: torch.abs(g, out=out))

    def scores(self, layer):
        return self._scores.get(layer.name)

    def grow(self, layer):
        if not layer.is_sparse:
            return super().grow(layer)
        if layer.x is None or layer.grad_out is None:
            return self.random_fill(layer, layer.n)
        _, chosen = blocked_topn(gradient_rows(layer, self._pool), layer, layer.n, self.block_elements,
                                 absolute=True, memo=self._memo, positive=True)
        short = layer.n - chosen.numel()
        if short > 0:  # every other growable position has |dL/dW| = 0: tied, drawn at random among them
            chosen = torch.cat([chosen, self.random_fill(layer, short, exclude=chosen, stat="zero_ties")])
        return chosen


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
    (tested on a Linear and a Conv2d); its recall is 1 by construction. Likewise ``search=faiss`` with
    ``abs_ip`` (no ``rerank``, no ``max_rows``; :meth:`Search.answers_from_scores`) searches its score
    matrix ``S = G^T U``, which is the signed ``weight.grad``: on masked-dense layers :meth:`prepare`
    copies the gradient into a reused buffer and :meth:`grow` calls ``search.find_scores`` (no capture,
    no unfold, no product; the same set as searching the captured vectors up to float rounding).

    On a truly sparse layer (``trainer.sparse_kernels=true``) the vectors are captured by hooks on the
    :class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear` at update steps; no dense gradient
    exists, the recall's reference is computed in row blocks, and the exact configuration above
    becomes RigL's row-blocked gradient (:class:`GradientGrow`). The search runs through
    :meth:`Search.find_bounded` (at most ``block_elements`` scores at once): ``faiss`` with a flat-index
    metric (``abs_ip``, ``l2``) searches blocks of queries; ``faiss_index`` and ``lsh`` query the faiss
    index (no score matrix); only ``brute`` still forms the ``(n_out, n_in)`` matrix for the update.
    """

    needs_activations = True

    def __init__(self, generator, metric: str = "abs_ip", search: str = "faiss", k_similar: float = 0.15,
                 bits: float = 1.0, rerank: bool = False, max_rows: Optional[int] = None, log_recall: bool = True):
        super().__init__(generator)
        check_search(search, metric)
        self.metric = METRICS.get(metric).from_params(bits=bits)
        self.search = SEARCHES.get(search)(self.metric, k_similar, rerank)
        self.max_rows, self.log_recall = max_rows, bool(log_recall)
        self.block_elements = 1 << 22  # sparse layers: scores held at once by the search and the recall (16 MB)
        self.from_gradient = self.search.exact and self.metric.is_weight_gradient and max_rows is None
        # faiss search of abs_ip answered from its score matrix S = G^T U, which is the signed weight.grad
        self.from_scores = (not self.from_gradient and self.metric.is_weight_gradient and max_rows is None
                            and self.search.answers_from_scores())
        self._exact: Optional[GradientGrow] = None
        self._grads: Dict[str, torch.Tensor] = {}  # from_scores: per layer, the signed dense gradient (reused)
        if self.from_gradient:  # exact |G^T U| == |weight.grad| (see the class docstring)
            self.needs_activations, self.needs_gradients = False, True
            self._exact = GradientGrow(generator)
        elif self.from_scores:
            self.needs_activations, self.needs_gradients = False, True

    @classmethod
    def from_config(cls, cfg, generator):
        return cls(generator, metric=cfg.metric, search=cfg.search, k_similar=cfg.k_similar, bits=cfg.bits,
                   rerank=cfg.rerank, max_rows=cfg.max_rows, log_recall=cfg.log_recall)

    def prepare(self, masking, names):
        if self._exact is not None:
            self._exact.prepare(masking, names)
        elif self.from_scores:  # masked-dense layers only: a sparse layer has no dense gradient (it is captured)
            read_gradients(masking, names, self._grads, lambda g, out: out.copy_(g))

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
        with torch.no_grad():
            if self.from_scores and not layer.is_sparse:  # the search from S = weight.grad: no vectors, no product
                g = self._grads.get(layer.name)
                if g is None:
                    return self.random_fill(layer, layer.n)
                S = g.view(g.shape[0], -1)
                chosen = self.search.find_scores(layer.name, S, layer.mask_flat, layer.n)
                return self._complete(layer, chosen, lambda: S.abs())  # the reference |G^T U| = |dL/dW|
            if layer.x is None or layer.grad_out is None:
                return self.random_fill(layer, layer.n)
            U, G = layer_vectors(layer.module, layer.x, layer.grad_out)
            U, G = U.float(), G.float()
            Us, Gs = U, G
            if self.max_rows is not None and U.shape[0] > self.max_rows:
                rows = torch.randperm(U.shape[0], generator=self.generator)[:self.max_rows].to(U.device)
                Us, Gs = U[rows], G[rows]
            if layer.is_sparse:  # no (n_out, n_in) score matrix for a truly sparse layer, where the search can
                chosen = self.search.find_sparse(layer.name, Gs, Us, layer, layer.n, self.block_elements)
            else:
                chosen = self.search.find(layer.name, Gs, Us, layer.mask_flat, layer.n)
            return self._complete(layer, chosen, lambda: self.metric.reference(G, U), G, U)

    def _complete(self, layer: LayerUpdate, chosen: torch.Tensor, reference: Callable[[], torch.Tensor],
                  G: Optional[torch.Tensor] = None, U: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fill a shortfall of the search at random; with ``log_recall`` count how many of ``chosen`` are
        in the exact top-n of the ``reference()`` matrix (a new ``(n_out, n_in)`` tensor; on a sparse layer
        the reference is computed from ``G``, ``U`` in row blocks instead)."""
        short = layer.n - chosen.numel()
        if short > 0:
            chosen = torch.cat([chosen, self.random_fill(layer, short, exclude=chosen)])
        if self.log_recall:
            t = time.perf_counter()
            if layer.is_sparse:  # no (n_out, n_in) reference on a sparse layer: row blocks
                at, kth = self._reference_in_blocks(layer, G, U, chosen)
            else:
                ref = reference().reshape(-1).masked_fill_(layer.mask_flat != 0, _NEG_INF)
                kth = torch.topk(ref, layer.n, sorted=False).values.min()
                at = ref[chosen]
            self.count("recall_hits", int((at >= kth).sum()))
            self.count("recall_n", layer.n)
            self.count("excluded_seconds", time.perf_counter() - t)
        return chosen

    def _reference_in_blocks(self, layer: LayerUpdate, G: torch.Tensor, U: torch.Tensor,
                             chosen: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The exact reference scores at ``chosen`` and the n-th best growable reference score, computed a
        block of rows at a time (:func:`blocked_topn`; column ``j`` of ``G`` is row ``j`` of the weight)."""
        n_in = layer.shape[1]
        chosen = chosen.to(G.device)
        at = torch.empty(chosen.numel(), dtype=torch.float32, device=G.device)

        def rows(r0, r1):
            blk = self.metric.reference(G[:, r0:r1], U).float()
            sel = (chosen >= r0 * n_in) & (chosen < r1 * n_in)
            at[sel] = blk.reshape(-1)[chosen[sel] - r0 * n_in]
            return blk

        vals, _ = blocked_topn(rows, layer, layer.n, self.block_elements)
        return at, vals.min()
