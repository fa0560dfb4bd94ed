"""Similarity searches: the ``n`` growable pairs ``(j, i)`` whose vectors are most similar (thesis 001, Figure 3.1).

Registry :data:`SEARCHES` (``method.search``):

* ``brute``: the exact ``(n_out, n_in)`` score matrix of the metric in torch, global top-n.
* ``faiss``: index the ``a = n_out`` gradient vectors, query every input vector for its
  ``k = ceil(k_similar * a)`` most similar, merge the per-query results (:func:`_merge_topn`) and
  take the top n growable pairs; can miss pairs of the global top-n (the thesis' approximation).
  For a metric with an exhaustive index (``abs_ip``, ``l2``: ``IndexFlatIP`` / ``IndexFlatL2``) the
  batched queries are answered by one matrix product and a per-query selection
  (:func:`per_query_topn`), the set faiss' flat index returns, ~10x faster on a CPU; ``lsh`` queries
  its faiss index.
* ``faiss_index``: the same search always through the faiss library's index (the reference
  ``faiss`` is tested against; what ``faiss`` ran before issue 15).

A search returns flat positions ``j * n_in + i`` of the weight's ``view(n_out, -1)``, a set in no
particular order, only where ``mask_flat == 0``. Source of the search: thesis 001, section 3
(Figure 3.1: per-query top-k of the index, flattened, sorted, the top K taken). :func:`check_search`
is the one check that a search can rank a metric (``brute`` needs a metric with an exact score;
``lsh`` has none).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.dst.selection import (_NEG_INF, SCAN_MIN_ELEMENTS, ProductRows, block_threshold, drop_sorted, host_view,
                                       nonzero_part,
                                       prefiltered_above, sample_grid, sampled_threshold, select_above, top_and_kth_np,
                                       top_np, topk_indices)
from sparsebench.dst.similarity import METRICS, SimilarityMetric

SEARCHES: Registry = Registry("method.search")


def check_search(search: str, metric: str) -> None:
    """Raise :class:`ConfigError` unless search ``search`` can rank metric ``metric`` (both registry names)."""
    if not SEARCHES.get(search).supports(METRICS.get(metric)):
        raise ConfigError(f"method.search={search}: metric={metric} is an approximate faiss index; use search=faiss "
                          f"(or metric=abs_ip for the exact search)")


def _best_distinct_np(f: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` best distinct positions of candidates ``f`` with scores ``s`` (a pair may repeat)."""
    order = np.argsort(-s, kind="stable")
    fs = f[order]
    _, first = np.unique(fs, return_index=True)
    return fs[np.sort(first)[:n]]


def _merge_topn(flat, sim, mask_flat: torch.Tensor, n: int) -> torch.Tensor:
    """Figure 3.1's merge: drop invalid and non-growable candidates, de-duplicate (keep the best score
    of a pair found by both ``q`` and ``-q``), return the ``n`` best flat positions (or fewer; a set,
    in no particular order).

    ``flat`` (long, -1 = no result) and ``sim`` are numpy arrays (faiss' output) or tensors.
    CPU: the top ``2n`` candidates by score are checked against the mask and de-duplicated, widened
    (x4, up to all candidates) until ``n`` distinct growable ones are found: only a few thousand of the
    ``2 * n_in * k`` candidates are ever looked up. Otherwise (CUDA): all candidates are filtered by
    the mask, the exact top-``n`` taken (:func:`topk_indices`) and, only if they hold duplicate pairs,
    de-duplicated from a top-``2n`` pre-selection, widened to all candidates if needed.
    """
    M = host_view(mask_flat)
    if isinstance(flat, np.ndarray) and isinstance(M, np.ndarray):  # CPU: numpy (no per-call dispatch)
        if flat.size and flat.min() < 0:
            ok = flat >= 0
            flat, sim = flat[ok], sim[ok]
        size = flat.size
        m = min(size, 2 * n + 16)
        while True:
            if m == 0:
                return torch.from_numpy(flat[:0])
            top = topk_indices(sim, m) if m < size else np.arange(size)
            f, s = flat[top], sim[top]
            ok = M[f] == 0
            f, s = f[ok], s[ok]
            if f.size > n:  # the rule: no pair twice among the n best, so no de-duplication needed
                sel = f[top_np(s, n)[1]]
                if np.unique(sel).size == n:
                    return torch.from_numpy(sel)
            best = _best_distinct_np(f, s, n)
            if best.size >= n or m == size:
                return torch.from_numpy(best)
            m = min(size, 4 * m)
    dev = mask_flat.device
    flat, sim = torch.as_tensor(flat, device=dev), torch.as_tensor(sim, device=dev)
    ok = flat >= 0
    flat, sim = flat[ok], sim[ok]
    ok = mask_flat.index_select(0, flat) == 0
    flat, sim = flat[ok], sim[ok]
    if flat.numel() == 0:
        return flat
    m = min(flat.numel(), n)
    f = flat.index_select(0, topk_indices(sim, m))
    if torch.unique(f).numel() == m:
        return f
    m = min(flat.numel(), 2 * n + 16)
    while True:
        top = torch.topk(sim, m, sorted=True).indices  # best first
        f = flat[top]
        uniq, inv = torch.unique(f, return_inverse=True)
        first = torch.full((uniq.numel(),), m, dtype=torch.long, device=f.device)
        first.scatter_reduce_(0, inv, torch.arange(m, device=f.device), reduce="amin")
        if uniq.numel() >= n or m == flat.numel():
            return f[torch.sort(first).values[:n]]
        m = flat.numel()


class Search:
    """Finds the ``n`` growable pairs ``(j, i)`` with the highest similarity."""

    exact = False  # returns the metric's exact top-n (recall 1)

    def __init__(self, metric: SimilarityMetric, k_similar: float = 0.15, rerank: bool = False):
        self.metric, self.k_similar, self.rerank = metric, float(k_similar), bool(rerank)

    @classmethod
    def supports(cls, metric_cls: type) -> bool:
        """Whether this search can rank ``metric_cls`` (a :data:`METRICS` class)."""
        return True

    def find(self, key: str, G: torch.Tensor, U: torch.Tensor, mask_flat: torch.Tensor, n: int) -> torch.Tensor:
        """Flat positions (``j * n_in + i``) of up to ``n`` growable (``mask_flat == 0``) pairs (a set, in
        no particular order)."""
        raise NotImplementedError

    def answers_from_scores(self) -> bool:
        """Whether :meth:`find_scores` gives :meth:`find`'s answer from the score matrix alone."""
        return False

    def find_bounded(self, key: str, G: torch.Tensor, U: torch.Tensor, mask_flat: torch.Tensor, n: int,
                     block_elements: int) -> torch.Tensor:
        """:meth:`find` with at most about ``block_elements`` scores held at once, where the search can
        (truly sparse layers, ``trainer.sparse_kernels=true``: no ``(n_out, n_in)`` matrix); by default
        :meth:`find` itself."""
        return self.find(key, G, U, mask_flat, n)

    def find_sparse(self, key: str, G: torch.Tensor, U: torch.Tensor, layer, n: int,
                    block_elements: int) -> torch.Tensor:
        """:meth:`find_bounded` for a truly sparse layer, given as its
        :class:`~sparsebench.dst.grow.LayerUpdate` (``layer.excluded``: the sorted non-growable positions);
        by default through the layer's full ``mask_flat``."""
        return self.find_bounded(key, G, U, layer.mask_flat, n, block_elements)

    def find_scores(self, key: str, S: torch.Tensor, mask_flat: torch.Tensor, n: int) -> torch.Tensor:
        """:meth:`find` from the ``(n_out, n_in)`` matrix ``S = metric.signed_scores(G, U)`` when the
        caller already holds it (only where :meth:`answers_from_scores`). For ``abs_ip`` (and no row
        subsampling) ``S = G^T U`` is autograd's dense ``weight.grad.view(n_out, -1)`` of the update step,
        so a caller reading it needs neither the captured vectors nor the product (nor, for a
        convolution, the unfold)."""
        raise NotImplementedError(f"{type(self).__name__} searches the vectors, not a score matrix")


@SEARCHES.register("brute")
class BruteForceSearch(Search):
    """Exact: the full ``(n_out, n_in)`` similarity matrix in torch, global top-n (Figure 3.1, right).

    Raises:
        ConfigError: the metric has no exact score (``lsh``).
    """

    exact = True

    def __init__(self, metric, k_similar=0.15, rerank=False):
        if not self.supports(type(metric)):
            raise ConfigError(f"method.search=brute: {type(metric).__name__} is an approximate faiss index; use "
                              f"search=faiss (or metric=abs_ip for the exact search)")
        super().__init__(metric, k_similar, rerank)

    @classmethod
    def supports(cls, metric_cls):
        return bool(metric_cls.brute_force)

    def find(self, key, G, U, mask_flat, n):
        s = self.metric.exact(G, U).reshape(-1).masked_fill_(mask_flat != 0, _NEG_INF)
        return topk_indices(s, n)


def keep_topn(best_v: Optional[torch.Tensor], best_f: Optional[torch.Tensor], v: torch.Tensor, f: torch.Tensor,
              n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Running top-``n`` over blocks: the ``n`` largest of the kept ``(best_v, best_f)`` (None at the first
    block) and a block's scores ``v`` at flat positions ``f``; returns the new kept pair (a set)."""
    if best_v is not None:
        v, f = torch.cat([best_v, v]), torch.cat([best_f, f])
    if v.numel() > n:
        v, top = torch.topk(v, n, sorted=False)
        f = f[top]
    return v, f


def _k_per_query(k_similar: float, n_out: int) -> int:
    """The thesis' ``k = ceil(k_similar * a)`` results per query (``a = n_out`` indexed vectors), in ``[1, a]``."""
    return min(n_out, max(1, int(math.ceil(k_similar * n_out))))


def _per_query_candidates(S: torch.Tensor, signs: Sequence[int], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every query's results, as faiss' flat index returns them: for each ``sign`` and input ``i`` the
    ``k`` largest ``sign * S[j, i]`` over ``j``. Returns flat positions ``j * n_in + i`` and their
    scores (``sign * S``), ``len(signs) * n_in * k`` of each (a pair can appear once per sign)."""
    n_in = S.shape[1]
    cols = torch.arange(n_in, device=S.device)
    flats, sims = [], []
    for sign in signs:
        v, j = torch.topk(S.t() if sign > 0 else -S.t(), k, dim=1, sorted=False)  # (n_in, k)
        flats.append((j * n_in + cols[:, None]).reshape(-1))
        sims.append(v.reshape(-1))
    return torch.cat(flats), torch.cat(sims)


def _within_rank(group: np.ndarray, value: np.ndarray, k: int) -> Optional[np.ndarray]:
    """Boolean mask: entry ``e`` is among the ``k`` largest ``value`` of its ``group`` (ties: any);
    None when every entry is (no group has more than ``k``)."""
    if group.size <= k:
        return None
    counts = np.bincount(group)
    if counts.max() <= k:
        return None
    keep = np.ones(group.size, dtype=bool)
    over = np.flatnonzero(counts[group] > k)  # only groups with more than k entries lose some
    order = over[np.lexsort((-value[over], group[over]))]  # by group, best first
    g = group[order]
    first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(g.size) - np.repeat(first, np.diff(np.r_[first, g.size]))
    keep[order[rank >= k]] = False
    return keep


def per_query_topn(S: torch.Tensor, signs: Sequence[int], k: int, mask_flat: torch.Tensor, n: int,
                   hint: Optional[Dict[str, float]] = None, memo: Optional[dict] = None,
                   abs_buf: Optional[np.ndarray] = None) -> torch.Tensor:
    """Figure 3.1 on a score matrix: the ``n`` best growable pairs among every query's top-``k``.

    Args:
        S: ``(n_out, n_in)`` float32 scores, ``S[j, i]`` the similarity of indexed vector ``g_j`` to
            query ``u_i`` (:meth:`SimilarityMetric.signed_scores`); query ``sign * u_i`` scores ``sign * S``.
        signs: the query signs, ``(1,)`` or ``(1, -1)`` (``-1``: the ``-q`` queries of an absolute metric).
        k: results per query (:func:`_k_per_query`).
        mask_flat: ``(n_out * n_in,)``, ``== 0`` marks the growable pairs (``S``'s row-major positions).
        n: how many pairs to return.
        hint, memo: per-layer dicts carried between calls (``hint['t']``: the preselection threshold,
            relative to the mean ``|S|`` for two signs; ``hint['mg']``: its margin, 1.3 to 4;
            ``hint['r']``: margin x the last ratio of preselected to usable pairs; ``memo``:
            :func:`topk_indices`' sample).
        abs_buf: optional reused ``(n_out * n_in,)`` float32 buffer for ``|S|``.

    Returns:
        Flat positions ``j * n_in + i`` (long tensor), a set of at most ``n`` growable pairs, equal to
        the merge (:func:`_merge_topn`) of all per-query results up to ties.

    On the CPU the per-query lists are never built: the pairs of the highest ``max_sign sign * S`` are
    preselected, all those at or above a threshold carried from the previous call (set to keep about
    ``margin * n`` usable pairs; the margin grows 1.5x after a miss, shrinks 5% after a hit; a missed
    positive threshold is halved, twice at most) or else the exact top ``m`` (:func:`topk_indices`).
    For a pair with score ``v >= tau`` (``tau`` the lowest preselected; with two signs ``tau > 0``, so
    only the pair's own sign reaches it) every pair of its query that the same sign scores higher is
    preselected too, so its rank in that query's result list, and hence whether the list holds it,
    is known exactly from the preselection (:func:`_within_rank`, a sort only of the queries with
    more than ``k`` preselected pairs). If the preselection holds ``n`` growable listed pairs they are
    the answer (every unlisted or lower pair scores at most ``tau``); else the preselection grows, and
    the full lists (:func:`_per_query_candidates`) are the last resort (also on CUDA, where
    ``torch.topk`` over the queries is cheap).
    """
    n_out, n_in = S.shape
    N = n_out * n_in
    signs = tuple(int(s) for s in signs)
    M = host_view(mask_flat)
    S_np = host_view(S)
    if n > 0 and isinstance(M, np.ndarray) and isinstance(S_np, np.ndarray) and signs in ((1,), (1, -1)):
        S_flat = S_np.reshape(-1)
        if signs == (1,):
            A = S_flat
        else:
            A = np.abs(S_flat, out=abs_buf if abs_buf is not None and abs_buf.size == N else None)
        hint = {} if hint is None else hint
        # |S| thresholds are kept relative to the mean |S| of every 61st pair (a fixed stride, so a fixed
        # sample: the gradient's scale moves between batches)
        scale = float(A[::61].mean()) if len(signs) == 2 else 1.0
        if not scale > 0:
            scale = 1.0
        margin = hint.get("mg", 1.3)
        t = hint.get("t")
        t = None if t is None else t * scale
        relax, m = 2 if len(signs) == 2 else 0, None
        while True:
            if t is not None:  # a carried threshold: one comparison pass
                P = np.flatnonzero(A >= t)
            else:
                m = m or min(N, int(hint.get("r", 2.5) * n) + 16)
                if m >= N:
                    break
                P = topk_indices(A, m, memo=memo)  # the exact top-m (sampled threshold)
            if len(signs) == 2:
                v = S_flat[P]  # one gather: the sign picks the query list, |v| the score
                neg = v < 0
                v = np.abs(v)
            else:
                v = A[P]
            if P.size and len(signs) == 2 and not float(v.min()) > 0:
                break  # zero scores preselected: their list membership depends on the other sign
            group = P % n_in
            if len(signs) == 2:
                group *= 2
                group += neg
            ok = M[P] == 0
            listed = _within_rank(group, v, k)
            if listed is not None:
                ok &= listed
            f, s = P[ok], v[ok]
            ratio = P.size / max(f.size, 1)  # preselected per usable pair
            if f.size >= n:
                # the next call's threshold: the score of the (margin * n)-th usable pair (one top-k
                # with the top-n cut), or below the lowest preselected if fewer were usable
                want = int(margin * n) + 8
                hint["r"], hint["mg"] = margin * ratio, max(1.3, 0.95 * margin)
                if f.size >= want:
                    top, nxt = top_and_kth_np(s, n, want)
                else:
                    top = top_np(s, n)[1] if f.size > n else None
                    lo = float(v.min())
                    nxt = 0.8 * lo if len(signs) == 2 else lo
                hint["t"] = nxt / scale
                if top is not None:
                    f = f[top]
                return torch.from_numpy(f)
            margin = hint["mg"] = min(4.0, 1.5 * margin)
            if t is not None and relax > 0:  # positive |S| threshold: relax it (twice at most)
                t, relax = 0.5 * t, relax - 1
                continue
            t = None
            m = min(N, max(2 * P.size, int(margin * n * ratio) + 16))
    flat, sim = _per_query_candidates(S, signs, k)
    if isinstance(M, np.ndarray):
        flat, sim = flat.numpy(), sim.numpy()
    return _merge_topn(flat, sim, mask_flat, n)


@SEARCHES.register("faiss")
class FaissSearch(Search):
    """Figure 3.1's search (thesis 001, section 3): index the ``a = n_out`` gradient vectors, query
    every input vector for its ``k = ceil(k_similar * a)`` most similar (``q`` and ``-q`` for absolute
    metrics), merge and take the top n growable pairs.

    A metric whose faiss index is exhaustive (:attr:`SimilarityMetric.flat_index`: ``abs_ip``'s
    ``IndexFlatIP``, ``l2``'s ``IndexFlatL2``) is searched as that index searches a batch of queries,
    one matrix product of the query and indexed vectors (:meth:`SimilarityMetric.signed_scores`)
    followed by each query's top-k, here selected without materialising the lists
    (:func:`per_query_topn`): the same set as faiss' index (tested against it), hence the same recall
    and the same grown positions up to float rounding at the k-th or n-th score, without faiss' per-query
    heaps (6x the fixed-mask step time at ΔT=1 before, results/bench/dst.txt). Other metrics (``lsh``)
    query their faiss index (:meth:`find_index`): indexes are cached per layer and dimension (an LSH
    rotation is drawn once). With ``rerank`` the merged candidates are re-scored by the exact
    ``|<g, u>|`` before the top n, read from the ``(n_out, n_in)`` product ``|G^T U|`` (through the
    index: with exact flat scores a re-score only changes pairs scored by the other sign's query).
    :meth:`find_scores` takes the product itself (``abs_ip``: ``weight.grad``)."""

    def __init__(self, metric, k_similar=0.15, rerank=False):
        super().__init__(metric, k_similar, rerank)
        self._indexes: Dict[Tuple[str, int], object] = {}
        self._hints: Dict[str, dict] = {}  # per layer: per_query_topn's thresholds (derived data)
        self._products: Dict[str, torch.Tensor] = {}  # per layer: the (n_out, n_in) product buffer (CPU)
        self._abs: Dict[str, np.ndarray] = {}  # per layer: |S| (CPU)
        self._pool: Dict[str, torch.Tensor] = {}  # find_sparse's bf16 prefilter buffers (ProductRows), all layers

    def _index(self, key: str, db: np.ndarray):
        dim = db.shape[1]
        idx = self._indexes.get((key, dim))
        if idx is None:
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())  # follow trainer.num_threads
            idx = self.metric.index(dim)
            if not idx.is_trained:
                idx.train(db)
            self._indexes[(key, dim)] = idx
        idx.reset()
        idx.add(db)
        return idx

    def answers_from_scores(self):
        return bool(self.metric.flat_index and not self.rerank)

    def find_scores(self, key, S, mask_flat, n):
        if not self.answers_from_scores():
            raise NotImplementedError(f"method.search=faiss: {type(self.metric).__name__} (rerank={self.rerank}) "
                                      f"needs the vectors (find)")
        S = S.detach().float().view(S.shape[0], -1)
        if S.device != mask_flat.device:
            S = S.to(mask_flat.device)
        return per_query_topn(S, self.metric.signs, _k_per_query(self.k_similar, S.shape[0]), mask_flat, n,
                              hint=self._hints.setdefault(key, {}), abs_buf=self._abs_buffer(key, S))

    def _abs_buffer(self, key: str, S: torch.Tensor) -> Optional[np.ndarray]:
        """This layer's reused host buffer for ``|S|`` (only a two-sign metric on the CPU needs one)."""
        if len(self.metric.signs) != 2 or S.device.type != "cpu":
            return None
        buf = self._abs.get(key)
        if buf is None or buf.size != S.numel():
            buf = self._abs[key] = np.empty(S.numel(), dtype=np.float32)
        return buf

    def find(self, key, G, U, mask_flat, n):
        if not self.answers_from_scores():
            return self.find_index(key, G, U, mask_flat, n)
        n_out, n_in = G.shape[1], U.shape[1]
        k = _k_per_query(self.k_similar, n_out)
        out = None
        if G.device.type == "cpu" and G.dtype == U.dtype == torch.float32:  # reuse this layer's product buffer
            out = self._products.get(key)
            if out is None or out.shape != (n_out, n_in):
                out = self._products[key] = torch.empty(n_out, n_in)
        S = self.metric.signed_scores(G.detach(), U.detach(), out=out).float()
        if S.device != mask_flat.device:
            S = S.to(mask_flat.device)
        return per_query_topn(S, self.metric.signs, k, mask_flat, n, hint=self._hints.setdefault(key, {}),
                              abs_buf=self._abs_buffer(key, S))

    def find_bounded(self, key, G, U, mask_flat, n, block_elements):
        """The flat-index search over blocks of queries (columns ``i`` of ``S = signed_scores(G, U)``): a
        query's top-k list lies inside its block, so each block's best ``n`` growable listed pairs
        (:func:`per_query_topn` on ``S[:, c0:c1]``) hold every pair of the global answer in that block,
        and the best ``n`` of their union (by the lists' score, ``|S|`` for two signs) is :meth:`find`'s
        set up to ties. At most ``n_out * max(1, block_elements // n_out)`` scores exist at once; no
        product buffer is kept. Other metrics: :meth:`find`."""
        n_out, n_in = G.shape[1], U.shape[1]
        cols = max(1, int(block_elements) // max(1, n_out))
        if not self.answers_from_scores() or cols >= n_in:
            return self.find(key, G, U, mask_flat, n)
        k = _k_per_query(self.k_similar, n_out)
        M = mask_flat.view(n_out, n_in)
        best_v = best_f = None
        for c0 in range(0, n_in, cols):
            c1 = min(n_in, c0 + cols)
            S = self.metric.signed_scores(G.detach(), U[:, c0:c1].detach()).float().to(mask_flat.device)
            got = per_query_topn(S, self.metric.signs, k, M[:, c0:c1].reshape(-1), n,
                                 hint=self._hints.setdefault(f"{key}/{c0}", {})).to(mask_flat.device)
            v = S.reshape(-1)[got]
            v = v.abs() if len(self.metric.signs) == 2 else v
            f = (got // (c1 - c0)) * n_in + c0 + got % (c1 - c0)
            best_v, best_f = keep_topn(best_v, best_f, v, f, n)
        return best_f

    def find_sparse(self, key, G, U, layer, n, block_elements, k: Optional[int] = None,
                    whole: Optional[Callable[[], Optional[torch.Tensor]]] = None):
        """The flat-index search on a truly sparse layer in row blocks of ``S = signed_scores(G, U)``, without
        the ``(n_out, n_in)`` mask: every pair whose score (``|S|`` for two signs) exceeds one threshold
        ``t > 0`` is preselected from each block by one native pass (:func:`select_above`; active pairs
        too, since they hold places in the query lists), with its sign. As in :func:`per_query_topn`, a
        preselected pair's rank in its query's list (column ``i``, its sign) is then exact, because every
        pair of that list scoring higher is preselected as well (:func:`_within_rank`); the growable
        listed pairs (the sorted ``layer.excluded`` dropped by a binary search) are the answer's
        candidates, and if ``n`` remain their top-n is :meth:`find`'s set up to ties. ``t`` lets the first
        block's share of ``margin * n`` (1.3 to 4, grown after a miss) plus four standard deviations pass
        (:func:`~sparsebench.dst.selection.block_threshold`: a sample quantile; that block's select is then the
        only pass over it); a miss halves ``t`` (twice) and scores the blocks again, then falls back to
        :meth:`find_bounded`. With ``abs_ip`` (the scores are ``dL/dW``) where the bf16 product pays, ``t``
        comes from a grid of the scores instead (:func:`~sparsebench.dst.selection.sampled_threshold` over
        every pair, active ones included) and the pairs above it from
        :func:`~sparsebench.dst.selection.prefiltered_above` (a bf16 product's candidates rescored exactly: the
        same pairs and scores up to the summation order). Only metrics
        answered from scores, float32 on the CPU; else that fallback.

        With ``abs_ip`` the search runs on the part of ``S`` that can be nonzero
        (:func:`~sparsebench.dst.selection.nonzero_part`; ``k`` stays the whole layer's per-query count): a
        zero score is never preselected (``t > 0``) and never outranks a preselected pair in its query's
        list, so the part's answer is the whole matrix's, mapped back. ``k`` and ``whole`` serve that call
        (the per-query count, and a fallback returning None)."""
        n_out, n_in = G.shape[1], U.shape[1]
        signs = tuple(int(v) for v in self.metric.signs)
        ex = layer.excluded
        if (n <= 0 or not self.answers_from_scores() or signs not in ((1,), (1, -1)) or ex is None
                or G.device.type != "cpu" or G.dtype != torch.float32 or U.dtype != torch.float32):
            return super().find_sparse(key, G, U, layer, n, block_elements)
        two = len(signs) == 2
        part = nonzero_part(G, U, ex) if two and self.metric.is_weight_gradient and k is None else None
        N, k = n_out * n_in, (_k_per_query(self.k_similar, n_out) if k is None else k)
        if whole is None:  # the fallback: Search's bounded search of this matrix (a part's: None, see below)
            def whole():
                return super(FaissSearch, self).find_sparse(key, G, U, layer, n, block_elements)
        if part is not None:  # a part's miss falls back to the whole layer's bounded search
            Gp, Up, exp, r, c = part
            f = self.find_sparse(key + "/part", Gp, Up, layer.restricted(exp, (r.numel(), c.numel())), n,
                                 block_elements, k, lambda: None)
            return whole() if f is None else r[f // c.numel()] * n_in + c[f % c.numel()]
        rows = max(1, int(block_elements) // max(1, n_in))
        buf = self._products.get(key + "/rows")
        if buf is None or buf.numel() < rows * n_in:
            buf = self._products[key + "/rows"] = torch.empty(rows * n_in)
        hint = self._hints.setdefault(key + "/sparse", {})
        margin = hint.get("mg", 1.3)
        exn = ex.cpu().numpy()
        # |G^T U| itself (abs_ip): in a layer of more than SCAN_MIN_ELEMENTS scores the pairs above t can come from
        # the bf16 prefilter (prefiltered_above); a smaller one is float32 blocks, cheaper than a grid and a prefilter
        product = None
        if two and self.metric.is_weight_gradient and N > SCAN_MIN_ELEMENTS:
            product = ProductRows(G, U, self._pool)
        t: Optional[float] = None
        grid = None
        if product is not None and product.approximate:  # t from a grid of the scores: no float32 block at all
            ri, ci = sample_grid(n_out, n_in, norms=product.norms())
            grid = (np.abs(product.sample(ri, ci).numpy()), ri, ci)
            t = sampled_threshold(grid[0], ri, ci, n_in, n, N, None, margin)
            t = t if t is not None and t > 0 else None
        for _ in range(3):
            P, V, NEG, first = [], [], [], None
            if t is None:  # the first block's share of margin * n, exact
                r1 = min(n_out, rows)
                sflat = self.metric.signed_scores(G[:, :r1], U, out=buf[:r1 * n_in].view(r1, n_in)).reshape(-1)
                share = margin * n * sflat.numel() / N
                m = min(sflat.numel(), int(math.ceil(share + 4.0 * math.sqrt(share))) + 1)
                t, first = block_threshold(sflat, m, two, hint), sflat  # about m pass; the select below is the pass
                if two and not t > 0:  # zero scores reach both lists: the exact ranks need t > 0
                    return whole()
            got = None
            if grid is not None:
                got = prefiltered_above(product, t, 2 * int(block_elements), int(2 * margin * n) + 1024, grid)
            if got is not None:
                P, sv = got[0].astype(np.int64), got[1]
                V, NEG = np.abs(sv), [sv < 0]
            else:
                for r0 in range(0, n_out, rows):
                    r1 = min(n_out, r0 + rows)
                    if r0 == 0 and first is not None:  # still in the buffer
                        sflat = first
                    else:
                        sflat = self.metric.signed_scores(G[:, r0:r1], U,
                                                          out=buf[:(r1 - r0) * n_in].view(r1 - r0, n_in)).reshape(-1)
                    i, v = select_above(sflat, t, two)
                    i_np = i.numpy()
                    P.append(i_np + r0 * n_in)
                    V.append(v.numpy())
                    if two:
                        NEG.append(host_view(sflat)[i_np] < 0)
                P, V = np.concatenate(P), np.concatenate(V)
            group = P % n_in
            if two:
                group = 2 * group + np.concatenate(NEG)
            listed = _within_rank(group, V, k)
            f, sv = (P, V) if listed is None else (P[listed], V[listed])
            f, sv = drop_sorted(f, sv, exn)  # growable pairs only
            if f.size >= n:
                hint["mg"] = max(1.3, 0.95 * margin)
                if f.size > n:
                    f = f[top_np(sv, n)[1]]
                return torch.from_numpy(f.astype(np.int64))
            margin = hint["mg"] = min(4.0, 1.5 * margin)
            t *= 0.5
        return whole()

    def find_index(self, key: str, G: torch.Tensor, U: torch.Tensor, mask_flat: torch.Tensor, n: int) -> torch.Tensor:
        """The search through the faiss library's index of the metric (:meth:`SimilarityMetric.index`):
        the ``n_in`` queries (twice, ``q`` and ``-q``, for two signs) in one ``search`` call, then
        :func:`_merge_topn`. Same arguments and result as :meth:`Search.find`."""
        n_out, n_in = G.shape[1], U.shape[1]
        db = np.ascontiguousarray(G.t().detach().cpu().float().numpy())
        ut = U.t().detach().cpu().float().numpy()  # (n_in, R) view
        index = self._index(key, db)
        k = _k_per_query(self.k_similar, n_out)
        signs = self.metric.signs
        queries = np.empty((len(signs) * n_in, ut.shape[1]), dtype=np.float32)  # q and -q: one search call
        for i, sign in enumerate(signs):
            part = queries[i * n_in:(i + 1) * n_in]
            if sign > 0:
                np.copyto(part, ut)
            else:
                np.negative(ut, out=part)
        D, I = index.search(queries, k)
        invalid = I < 0  # faiss pads with -1 only when it finds fewer than k results
        flat = I.reshape(len(signs), n_in, k)
        flat *= n_in
        flat += np.arange(n_in, dtype=np.int64)[None, :, None]
        flat = flat.reshape(-1)
        if invalid.any():
            flat[invalid.reshape(-1)] = -1
        sim = np.ascontiguousarray(self.metric.from_faiss(D), dtype=np.float32).reshape(-1)
        if self.rerank:  # exact |<g_j, u_i>| of the candidates, read from one (n_out, n_in) matmul
            flat = torch.from_numpy(flat[flat >= 0]).to(mask_flat.device)
            sim = (G.t() @ U).abs_().reshape(-1)[flat.to(G.device)].to(mask_flat.device)
        return _merge_topn(flat, sim, mask_flat, n)


@SEARCHES.register("faiss_index")
class FaissIndexSearch(FaissSearch):
    """:class:`FaissSearch` always through the faiss library's index (:meth:`FaissSearch.find_index`),
    also for the exhaustive ``IndexFlatIP`` / ``IndexFlatL2``: the reference the matrix-product path
    of ``faiss`` is tested and benchmarked against (what ``faiss`` ran before issue 15; on this
    project's 1-thread CPU its per-query heaps cost ~10x the product and selection). It indexes the
    vectors, so it never answers from a score matrix (:meth:`answers_from_scores` is False)."""

    def answers_from_scores(self):
        return False

    def find(self, key, G, U, mask_flat, n):
        return self.find_index(key, G, U, mask_flat, n)
