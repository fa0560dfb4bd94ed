"""Similarity searches: the ``n`` growable pairs ``(j, i)`` whose vectors are most similar (thesis 001, Figure 3.1).

Registry :data:`SEARCHES` (``method.search``):

* ``brute``: the exact ``(n_out, n_in)`` score matrix of the metric in torch, global top-n.
* ``faiss``: index the ``a = n_out`` gradient vectors, query every input vector for its
  ``k = ceil(k_similar * a)`` most similar, merge the per-query results (:func:`_merge_topn`) and
  take the top n growable pairs; can miss pairs of the global top-n (the thesis' approximation).

A search returns flat positions ``j * n_in + i`` of the weight's ``view(n_out, -1)``, a set in no
particular order, only where ``mask_flat == 0``. :func:`check_search` is the one check that a search
can rank a metric (``brute`` needs a metric with an exact score; ``lsh`` has none).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.dst.selection import _NEG_INF, host_view, topk_indices
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
                sel = f[np.argpartition(s, f.size - n)[f.size - n:]]
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


@SEARCHES.register("faiss")
class FaissSearch(Search):
    """faiss: index the ``a = n_out`` gradient vectors, query every input vector for its
    ``k = ceil(k_similar * a)`` most similar (``q`` and ``-q`` for absolute metrics), merge and take
    the top n growable pairs (Figure 3.1, left). Indexes are cached per layer and dimension (an LSH
    rotation is drawn once). With ``rerank`` the merged candidates are re-scored by the exact
    ``|<g, u>|`` before the top n, read from the ``(n_out, n_in)`` product ``|G^T U|`` (one matmul:
    as costly as brute force's scoring, but the candidate set still comes from the index)."""

    def __init__(self, metric, k_similar=0.15, rerank=False):
        super().__init__(metric, k_similar, rerank)
        self._indexes: Dict[Tuple[str, int], object] = {}

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

    def find(self, key, G, U, mask_flat, n):
        n_out, n_in = G.shape[1], U.shape[1]
        db = np.ascontiguousarray(G.t().detach().cpu().float().numpy())
        ut = U.t().detach().cpu().float().numpy()  # (n_in, R) view
        index = self._index(key, db)
        k = min(n_out, max(1, int(math.ceil(self.k_similar * n_out))))
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
