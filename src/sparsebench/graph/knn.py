"""k-nearest-neighbour graphs and searches: the public side of :mod:`sparsebench.graph.backends`.

:func:`knn_graph` returns a :class:`KnnGraph` (``(n, k)`` neighbour indices and Euclidean distances,
the point itself excluded), :func:`knn_search` answers queries against a separate base set, and
:func:`knn_classify` votes over those neighbours (the kNN classifier of document 000).
:func:`recall_at_k` / :func:`sampled_recall` measure an approximate graph against exact search.
Backends are chosen by name from :data:`~sparsebench.graph.backends.GRAPH_BACKENDS`; each call runs
inside the backend's thread context, so a ``num_threads`` setting never outlives the call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from sparsebench.core.errors import ConfigError, DataError
from sparsebench.graph.backends import BruteBackend, drop_self, make_backend


@dataclass
class KnnGraph:
    """A directed k-NN graph.

    Attributes:
        indices: int64 ``(n, k)``; row ``i`` lists the neighbours of point ``i`` by increasing distance,
            ``i`` itself excluded; ``-1`` marks a slot an approximate backend could not fill.
        distances: float32 ``(n, k)`` Euclidean (not squared) distances; ``inf`` where ``indices == -1``.
        backend: the backend's registry name.
        exact: whether the backend is exact.
        seconds: wall-clock seconds of index construction + search (the graph time of the tables).
    """

    indices: np.ndarray
    distances: np.ndarray
    backend: str
    exact: bool
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def _as_float32(x, key: str = "x") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"{key}: expected a 2-D (n, d) feature array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{key}: contains NaN or inf")
    return x


def check_k(k: int, n: int, key: str = "k") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``1 <= k < n`` (a point is not its own neighbour)."""
    if int(k) < 1:
        raise ConfigError(f"{key}={k}: must be >= 1")
    if int(k) >= int(n):
        raise ConfigError(f"{key}={k}: must be smaller than the number of samples ({n}); "
                          f"a point has at most n-1 neighbours")


def knn_graph(x, k: int, backend: str = "brute", **params) -> KnnGraph:
    """The k-NN graph of the rows of ``x`` (each point's ``k`` nearest other points).

    Args:
        x: features, ``(n, d)`` (numpy or torch; converted to float32).
        k: neighbours per point, ``1 <= k < n``.
        backend: a :data:`GRAPH_BACKENDS` name; ``params`` go to the backend (``device``, ``block_size``,
            ``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``n_trees``, ``deterministic``, ``seed``,
            ``num_threads``).

    Returns:
        KnnGraph with ``indices``/``distances`` ``(n, k)`` and the wall-clock ``seconds`` of the build.

    Raises:
        ConfigError: ``k`` outside ``[1, n)`` or an unknown backend. DataError: non-finite features.
    """
    x = _as_float32(x)
    check_k(k, x.shape[0])
    b = make_backend(backend, **params)
    with b.threads():
        t0 = time.perf_counter()
        d, i = b.graph(x, int(k))
        seconds = time.perf_counter() - t0
    return KnnGraph(np.ascontiguousarray(i, dtype=np.int64), np.ascontiguousarray(d, dtype=np.float32),
                    backend, b.exact, seconds)


def knn_search(base, queries, k: int, backend: str = "brute", **params):
    """``k`` nearest base points of every query (kNN classification).

    Returns:
        ``(distances (m, k) float32, indices (m, k) int64, build_seconds, query_seconds)``.

    Raises:
        ConfigError: ``k`` outside ``[1, n_base]`` or an unknown backend.
    """
    base, queries = _as_float32(base, "base"), _as_float32(queries, "queries")
    if not 1 <= int(k) <= base.shape[0]:
        raise ConfigError(f"k={k}: must be in [1, {base.shape[0]}] (the number of base points)")
    b = make_backend(backend, **params)
    with b.threads():
        t0 = time.perf_counter()
        b.fit(base)
        t1 = time.perf_counter()
        d, i = b.query(queries, int(k))
        t2 = time.perf_counter()
    return d, i, t1 - t0, t2 - t1


def recall_at_k(approx: np.ndarray, exact: np.ndarray, rows: Optional[np.ndarray] = None) -> float:
    """Mean fraction of the exact ``k`` neighbours that the approximate result also lists.

    Args:
        approx: int ``(m, k)`` neighbour indices of an approximate backend (``-1`` = empty slot).
        exact: int ``(m, k)`` exact neighbour indices of the same points (or of all ``n`` points when
            ``rows`` selects the ``m`` rows of ``approx`` that ``exact`` answers).
    """
    a = np.asarray(approx)
    e = np.asarray(exact)
    if rows is not None:
        a = a[rows]
    if a.shape != e.shape:
        raise ValueError(f"recall_at_k: shapes differ {a.shape} vs {e.shape}")
    hits = (a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)
    return float(hits.any(2).sum() / e.size)


def sampled_recall(graph: KnnGraph, x, sample: int = 2000, seed: int = 0, **params) -> float:
    """recall@k of ``graph`` estimated on ``sample`` seeded random points against exact brute search.

    Cheap (``sample x n`` distances) and, for ``sample = 2000`` and recall near 0.98, within about
    ±0.003 (one standard error) of the recall over all points. ``sample >= n`` gives the exact value.
    """
    x = _as_float32(x)
    n = x.shape[0]
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:min(sample, n)])
    b = BruteBackend(**{k: v for k, v in params.items() if k in ("device", "block_size")}).fit(x)
    d, i = b.query(x[rows], graph.k + 1)
    _, i = drop_self(d, i, graph.k, rows=rows)
    return recall_at_k(graph.indices, i, rows=rows)


# --------------------------------------------------------------------------- kNN classifier
def knn_vote(idx: np.ndarray, train_y: np.ndarray, num_classes: Optional[int] = None) -> np.ndarray:
    """Majority vote over neighbour indices ``idx`` ``(m, k)`` (nearest first; ``-1`` = empty slot)
    of training labels ``train_y``; ties go to the class of the nearer neighbours. Returns ``(m,)``."""
    train_y = np.asarray(train_y)
    C = int(num_classes or train_y.max() + 1)
    lab = np.where(idx >= 0, train_y[np.maximum(idx, 0)], -1)
    votes = np.zeros((len(lab), C), dtype=np.float64)
    k = idx.shape[1]
    rank_bonus = 1e-3 / (1.0 + np.arange(k))  # < 1 in total: only breaks ties, nearer first
    for j in range(k):
        ok = lab[:, j] >= 0
        votes[np.flatnonzero(ok), lab[ok, j]] += 1.0 + rank_bonus[j]
    return votes.argmax(1)


def knn_classify(train_x, train_y, test_x, k: int = 5, backend: str = "brute", num_classes: Optional[int] = None,
                 **params) -> Tuple[np.ndarray, float, float]:
    """k-nearest-neighbour classifier: :func:`knn_vote` over the ``k`` nearest training points found by
    ``backend`` (:func:`knn_search`).

    Returns:
        ``(predictions (m,) int64, build_seconds, query_seconds)``.
    """
    _, idx, t_build, t_query = knn_search(train_x, test_x, k, backend=backend, **params)
    return knn_vote(idx, train_y, num_classes), t_build, t_query
