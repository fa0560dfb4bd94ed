"""k-nearest-neighbour search backends: one :class:`NeighborBackend` strategy per library.

Every backend registers in :data:`GRAPH_BACKENDS` under its config name (``method.backend``) and
carries its own metadata: ``exact`` (True: the true k nearest neighbours up to ties) and ``jit``
(True: the first use in a process compiles kernels; :func:`warmup` pays that outside timed regions).

=============== ======= ==============================================================================
name            exact   what
=============== ======= ==============================================================================
``brute``       yes     blocked torch matmul ``|q|^2 - 2 q.x + |x|^2`` + :func:`smallest_k`, CPU or CUDA;
                        the selected neighbours' distances are recomputed exactly
``faiss``       yes     faiss ``IndexFlatL2`` (Johnson, Douze & Jegou 2019)
``faiss_ivf``   no      faiss ``IndexIVFFlat`` (inverted file over a k-means coarse quantiser)
``faiss_hnsw``  no      faiss ``IndexHNSWFlat`` (Malkov & Yashunin 2018)
``pynndescent`` no      NN-descent (Dong, Moses & Li 2011) as implemented by pynndescent (McInnes)
``numpy_rows``  yes     document 000's naive brute force: one NumPy distance row per query (O(n^2 d))
=============== ======= ==============================================================================

A backend's thread count (``num_threads``) is applied only inside :meth:`NeighborBackend.threads`,
a context manager that restores the library's previous setting. pynndescent compiles its numba
kernels on first use (about 30 s per new process on a 2-core CPU); ``NUMBA_CACHE_DIR`` (defaulted
to ``$SPARSEBENCH_CACHE/numba``) lets later processes reuse what numba can cache.

The public entry points (:func:`sparsebench.graph.knn.knn_graph`, ``knn_search``) live in
:mod:`sparsebench.graph.knn`; this module holds only the strategies.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import ClassVar, List, Optional, Tuple

import numpy as np
import torch

from sparsebench.core.registry import Registry
from sparsebench.core.threads import scoped_threads

GRAPH_BACKENDS: Registry = Registry("method.backend")


def backend_names(exact: bool) -> List[str]:
    """Registered backend names whose ``exact`` metadata equals ``exact`` (sorted)."""
    return [b for b in GRAPH_BACKENDS.names() if bool(GRAPH_BACKENDS.get(b).exact) == bool(exact)]


def drop_self(dist: np.ndarray, idx: np.ndarray, k: int, rows: Optional[np.ndarray] = None
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from a ``(m, k+1)`` self-query result, keeping ``k`` columns.

    ``rows`` gives the point index of each result row (default ``arange(m)``). Rows that do not
    contain their own index (exact duplicates can push it out) lose their last column.
    """
    m = idx.shape[0]
    rows = np.arange(m) if rows is None else np.asarray(rows)
    own = idx == rows[:, None]
    drop = np.where(own.any(1), own.argmax(1), idx.shape[1] - 1)
    keep = np.ones_like(own)
    keep[np.arange(m), drop] = False
    return dist[keep].reshape(m, -1)[:, :k], idx[keep].reshape(m, -1)[:, :k]


class NeighborBackend:
    """Strategy interface of a nearest-neighbour search backend.

    Subclasses implement :meth:`fit` (build an index over ``base``, float32 ``(n, d)``) and
    :meth:`query` (``k`` nearest base points of each query); :meth:`graph` builds the k-NN graph of
    a set with itself (self excluded) and may be overridden when the backend has a cheaper path.

    Args:
        num_threads: threads for faiss / numba (``None``: library default).
        seed: seeds randomised index construction (where the backend allows it).
    """

    name: ClassVar[str] = "?"
    exact: ClassVar[bool] = False
    jit: ClassVar[bool] = False  # first use in a process compiles kernels (see warmup)

    def __init__(self, num_threads: Optional[int] = None, seed: int = 0, **params):
        self.num_threads = num_threads
        self.seed = int(seed)
        self.params = params

    def threads(self):
        """Context in which the backend's library uses ``num_threads`` threads (restored on exit)."""
        return nullcontext()

    def fit(self, base: np.ndarray) -> "NeighborBackend":  # pragma: no cover - abstract
        raise NotImplementedError

    def query(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        """Return ``(distances, indices)``: float32 Euclidean and int64, both ``(m, k)``."""
        raise NotImplementedError

    def graph(self, x: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(distances, indices)`` of the k-NN graph of ``x`` with itself, self excluded, ``(n, k)``."""
        self.fit(x)
        d, i = self.query(x, k + 1)
        return drop_self(d, i, k)


# --------------------------------------------------------------------------- exact: torch brute force
def smallest_k(d: torch.Tensor, k: int, group: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices of the ``k`` smallest entries of each row of ``d`` ``(B, m)`` (unsorted).

    Exact (up to ties) and several times cheaper than ``torch.topk`` over long rows on CPU: the
    columns are cut into groups of ``group``; the ``k`` smallest entries of a row lie in the ``k``
    groups with the smallest group minima (``k`` distinct groups have minima <= the k-th smallest
    group minimum ``mu``, so the row's k-th smallest value is <= ``mu``, and every entry <= ``mu`` lies
    in a group whose minimum is <= ``mu``). One vectorised ``amin`` pass plus two small ``topk`` calls
    (over ``m / group`` minima, then over ``k * group`` candidates) replace a ``topk`` over ``m``.
    """
    B, m = d.shape
    k = min(int(k), m)
    if m < 8 * k * group or d.stride(1) != 1 or d.stride(0) != m:
        return torch.topk(d, k, dim=1, largest=False, sorted=False)
    m0 = m - m % group
    ng = m0 // group
    G = torch.as_strided(d, (B, ng, group), (m, group, 1))  # a view: no copy even when m % group != 0
    _, gi = torch.topk(G.amin(2), k, dim=1, largest=False, sorted=False)
    cand = G[torch.arange(B, device=d.device).unsqueeze(1), gi].reshape(B, k * group)
    if m0 < m:  # the last, partial group: always a candidate
        cand = torch.cat([cand, d[:, m0:]], 1)
    v, j = torch.topk(cand, k, dim=1, largest=False, sorted=False)
    in_groups = j < k * group
    jg = torch.where(in_groups, j, 0)
    idx = gi.gather(1, jg // group) * group + jg % group
    if m0 < m:
        idx = torch.where(in_groups, idx, m0 + (j - k * group))
    return v, idx


@GRAPH_BACKENDS.register("brute")
class BruteBackend(NeighborBackend):
    """Exact search by blocked matrix products in torch (CPU or CUDA).

    For a block of queries, ``-2 q.x_j + |x_j|^2`` (the squared distance minus the row constant
    ``|q|^2``) comes from one ``mm`` of ``[q, 1]`` with ``[-2 x, |x|^2]`` (no broadcast pass) and the
    point itself is set to ``inf`` for a self-graph. Two ways to pick each row's ``k`` smallest:

    - ``tiled`` (CPU, ``n >= 16 k g``): the product runs one cache-sized tile of ``block_size`` rows x
      ``tile_cols`` columns at a time (with ``d + 1 = 51`` it is bound by writing its output: ~300
      GFLOP/s into a 16 MiB tile on this 2-core machine, ~165 into a 128 MiB block), and each tile is
      reduced at once to the minima of column groups of ``g = 16`` (group ``j`` of a tile holds its
      columns ``j, j + C/g, j + 2C/g, ...``, so the reduction runs across contiguous vectors). The
      ``k`` nearest neighbours lie in the ``k`` groups with the smallest minima (the argument of
      :func:`smallest_k`); those ``k g`` candidates are recomputed from a copy of the base stored group
      by group, and the ``k`` smallest kept.
    - ``rows`` (CUDA, small sets): whole rows of ``block_size`` queries (default: a block within
      ``max_block_elems`` = 2^25 floats) and :func:`smallest_k`.

    The selected neighbours' distances are then recomputed as ``||q - x_j||`` so the expansion's
    cancellation error never reaches the caller.

    Params: ``device`` (``"cpu"``, ``"cuda"``, a torch.device; default CPU), ``block_size`` (query rows
    per block; default 512 tiled), ``tile_cols`` (columns per tile, a multiple of 16; default 4096).
    """

    name, exact = "brute", True
    group: ClassVar[int] = 16

    def fit(self, base):
        dev = self.params.get("device") or "cpu"
        self.device = torch.device(dev)
        self.base = torch.as_tensor(base, device=self.device)
        sq = (self.base * self.base).sum(1, keepdim=True)
        self.right = torch.cat([-2.0 * self.base, sq], 1).T.contiguous()  # (d+1, n)
        self._grouped = None
        return self

    def _tile_cols(self, n: int) -> int:
        g = self.group
        cols = int(self.params.get("tile_cols") or 4096)
        return max(g, min(cols, -(-n // g) * g) // g * g)

    def _search(self, queries, k, exclude_self):
        q_all = torch.as_tensor(queries, device=self.device)
        n = self.base.shape[0]
        tiled = self.device.type == "cpu" and n >= 16 * k * self.group
        idx = (self._select_tiled if tiled else self._select_rows)(q_all, k, exclude_self)
        dist = torch.empty(idx.shape, dtype=torch.float32, device=self.device)
        for s in range(0, len(idx), 4096):  # exact distances of the selected, in row chunks
            dist[s:s + 4096] = (q_all[s:s + 4096].unsqueeze(1) - self.base[idx[s:s + 4096]]).norm(dim=2)
        dist, order = dist.sort(dim=1)
        return dist.cpu().numpy(), idx.gather(1, order).cpu().numpy()

    def _select_rows(self, q_all, k, exclude_self) -> torch.Tensor:
        m, n = q_all.shape[0], self.base.shape[0]
        rows = int(self.params.get("block_size") or 0) or max(1, int(self.params.get("max_block_elems") or 2 ** 25) // n)
        out_i = torch.empty(m, k, dtype=torch.int64, device=self.device)
        buf = torch.empty(min(rows, m), n, dtype=torch.float32, device=self.device)
        ones = torch.ones(min(rows, m), 1, device=self.device)
        for s in range(0, m, rows):
            q = q_all[s:s + rows]
            b = q.shape[0]
            d = torch.mm(torch.cat([q, ones[:b]], 1), self.right, out=buf[:b]) if b == buf.shape[0] else \
                torch.cat([q, ones[:b]], 1) @ self.right
            if exclude_self:
                r = torch.arange(b, device=self.device)
                d[r, r + s] = float("inf")
            out_i[s:s + b] = smallest_k(d, k)[1]
        return out_i

    def _grouped_base(self, cols: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(base (n_groups, g, d+1), column (n_groups * g,))``: ``[-2 x, |x|^2]`` stored group by group
        (tile ``t``'s group ``j`` = its columns ``j + i C/g``), padding columns ``[0, inf]`` (index -1)."""
        if self._grouped is None or self._grouped[0] != cols:
            n, g = self.base.shape[0], self.group
            nt = -(-n // cols)
            col = (torch.arange(cols).view(g, cols // g).T.reshape(1, cols) + cols * torch.arange(nt).unsqueeze(1)).reshape(-1)
            col = torch.where(col < n, col, -1)
            pad = torch.zeros(1, self.right.shape[0])
            pad[0, -1] = float("inf")
            table = torch.cat([self.right.T, pad], 0)[col]  # col = -1 -> the padding row
            self._grouped = (cols, table.view(-1, g, table.shape[1]).contiguous(), col)
        return self._grouped[1], self._grouped[2]

    def _select_tiled(self, q_all, k, exclude_self) -> torch.Tensor:
        m, n = q_all.shape[0], self.base.shape[0]
        g, cols = self.group, self._tile_cols(n)
        ng, nt = cols // g, -(-n // cols)
        rows = int(self.params.get("block_size") or 512)
        grouped, col_of = self._grouped_base(cols)
        out_i = torch.empty(m, k, dtype=torch.int64)
        buf = torch.full((min(rows, m), cols), float("inf"))
        mins = torch.empty(min(rows, m), nt * ng)
        ones = torch.ones(min(rows, m), 1)
        for s in range(0, m, rows):
            b = min(rows, m - s)
            qa = torch.cat([q_all[s:s + b], ones[:b]], 1)
            for t in range(nt):
                c, w = t * cols, min(cols, n - t * cols)
                if w == cols:
                    d = torch.mm(qa, self.right[:, c:c + w], out=buf[:b])
                else:  # last, partial tile: the padding columns stay inf
                    d = buf[:b]
                    d[:, w:] = float("inf")
                    d[:, :w] = qa @ self.right[:, c:c + w]
                if exclude_self and c < s + b and s < c + w:
                    r = torch.arange(max(s, c), min(s + b, c + w))
                    d[r - s, r - c] = float("inf")
                torch.amin(d.view(b, g, ng), 1, out=mins[:b, t * ng:(t + 1) * ng])
            _, gi = torch.topk(mins[:b], k, dim=1, largest=False, sorted=False)  # (b, k) groups
            cand = grouped.index_select(0, gi.reshape(-1)).view(b, k * g, -1)  # (b, k g, d+1)
            v = torch.bmm(cand, qa.unsqueeze(2)).squeeze(2)
            j = (gi.unsqueeze(2) * g + torch.arange(g)).reshape(b, k * g)
            jc = col_of[j]
            if exclude_self:
                v = torch.where(jc == torch.arange(s, s + b).unsqueeze(1), float("inf"), v)
            _, sel = torch.topk(v, k, dim=1, largest=False, sorted=False)
            out_i[s:s + b] = jc.gather(1, sel)
        return out_i

    def query(self, queries, k):
        return self._search(queries, k, exclude_self=False)

    def graph(self, x, k):
        self.fit(x)
        return self._search(x, k, exclude_self=True)


# --------------------------------------------------------------------------- faiss
class _FaissBackend(NeighborBackend):
    def threads(self):
        import faiss

        return scoped_threads(self.num_threads, faiss.omp_get_max_threads, faiss.omp_set_num_threads)

    def _make_index(self, faiss, d: int, n: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, base):
        import faiss

        self.index = self._make_index(faiss, base.shape[1], base.shape[0])
        if not self.index.is_trained:
            self.index.train(base)
        self.index.add(base)
        return self

    def query(self, queries, k):
        d2, idx = self.index.search(queries, k)
        idx = idx.astype(np.int64)
        d = np.sqrt(np.maximum(d2, 0.0), dtype=np.float32)
        d[idx < 0] = np.inf
        return d, idx


@GRAPH_BACKENDS.register("faiss")
class FaissFlatBackend(_FaissBackend):
    """Exact search with faiss ``IndexFlatL2`` (BLAS distance blocks + heap selection)."""

    name, exact = "faiss", True

    def _make_index(self, faiss, d, n):
        return faiss.IndexFlatL2(d)


@GRAPH_BACKENDS.register("faiss_ivf")
class FaissIVFBackend(_FaissBackend):
    """Approximate search with faiss ``IndexIVFFlat``.

    Params: ``nlist`` (k-means cells; default ``4 sqrt(n)``, at most ``n``: k-means needs a training point
    per cell), ``nprobe`` (cells visited per query; 8).
    """

    name, exact = "faiss_ivf", False

    def _make_index(self, faiss, d, n):
        nlist = min(n, int(self.params.get("nlist") or max(1, min(n // 39, int(4 * np.sqrt(n))))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = self.seed
        index.nprobe = int(self.params.get("nprobe") or 8)
        self._quantizer = quantizer  # keep alive
        return index


@GRAPH_BACKENDS.register("faiss_hnsw")
class FaissHNSWBackend(_FaissBackend):
    """Approximate search with faiss ``IndexHNSWFlat`` (hierarchical navigable small-world graph).

    Params: ``hnsw_m`` (links per node; 32), ``ef_construction`` (64), ``ef_search`` (64).
    """

    name, exact = "faiss_hnsw", False

    def _make_index(self, faiss, d, n):
        index = faiss.IndexHNSWFlat(d, int(self.params.get("hnsw_m") or 32))
        index.hnsw.efConstruction = int(self.params.get("ef_construction") or 64)
        index.hnsw.efSearch = int(self.params.get("ef_search") or 64)
        return index

    def query(self, queries, k):
        self.index.hnsw.efSearch = max(int(self.params.get("ef_search") or 64), k)
        return super().query(queries, k)


# --------------------------------------------------------------------------- pynndescent
def _numba_env() -> None:
    """Point numba's on-disk cache at ``$SPARSEBENCH_CACHE/numba`` unless ``NUMBA_CACHE_DIR`` is set."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        from sparsebench.data import cache_dir

        path = cache_dir() / "numba"
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = str(path)
        except OSError:
            pass


def import_pynndescent():
    """Import pynndescent with numba's cache directory set (see :func:`_numba_env`)."""
    _numba_env()
    import pynndescent

    return pynndescent


@GRAPH_BACKENDS.register("pynndescent")
class NNDescentBackend(NeighborBackend):
    """Approximate k-NN graph by NN-descent (Dong, Moses & Li 2011, "Efficient k-nearest neighbor
    graph construction for generic similarity measures"), pynndescent's implementation.

    The graph of a set with itself is pynndescent's ``neighbor_graph`` (no search step). Queries of
    new points use its search graph (``prepare`` + ``query``; compiled separately on first use).

    Params: ``n_trees`` / ``n_iters`` (pynndescent defaults when ``None``: ``max(3, min(12, round(2
    log10 n)))`` random-projection trees, 10 for 70 000 points, and ``max(5, round(log2 n))`` iterations,
    16, stopped early once fewer than ``delta n k`` heap updates happen), ``max_candidates`` (new
    candidates per point and iteration; default ``min(60, k + 1)``), ``leaf_size`` (default
    ``max(60, min(256, 5 (k + 1)))``), ``low_memory`` (True, pynndescent's default), ``delta`` (0.001),
    ``deterministic`` (pass ``random_state=seed``: reproducible but single-threaded and slower; default
    ``False``), ``epsilon`` (query search breadth; 0.1). None of these defaults depends on ``k`` except
    ``max_candidates`` and ``leaf_size``, so the work per iteration grows with ``k``.
    """

    #: NNDescent keyword arguments taken from ``params`` when given (None: pynndescent's default)
    TUNING = ("n_trees", "n_iters", "max_candidates", "leaf_size", "low_memory", "delta")

    name, exact, jit = "pynndescent", False, True

    def threads(self):
        if not self.num_threads:
            return nullcontext()
        import numba

        n = min(int(self.num_threads), numba.config.NUMBA_NUM_THREADS)
        return scoped_threads(n, numba.get_num_threads, numba.set_num_threads)

    def _index(self, data, n_neighbors):
        pynndescent = import_pynndescent()
        rs = self.seed if self.params.get("deterministic") else None
        tuning = {key: self.params[key] for key in self.TUNING if self.params.get(key) is not None}
        return pynndescent.NNDescent(data, n_neighbors=n_neighbors, random_state=rs, n_jobs=self.num_threads,
                                     compressed=False, **tuning)

    def fit(self, base):
        self.index = self._index(base, int(self.params.get("index_neighbors") or 30))
        return self

    def query(self, queries, k):
        idx, d = self.index.query(queries, k=k, epsilon=float(self.params.get("epsilon") or 0.1))
        return d.astype(np.float32), idx.astype(np.int64)

    def graph(self, x, k):
        self.index = self._index(x, k + 1)
        idx, d = self.index.neighbor_graph
        return drop_self(d.astype(np.float32), idx.astype(np.int64), k)


@GRAPH_BACKENDS.register("numpy_rows")
class NumpyRowsBackend(NeighborBackend):
    """Document 000's contrast: a "naive brute force implementation hand written in python"
    (Algorithm BRUTE-KNN, "compare to every other point"), one query at a time.

    For each query row ``q``: ``||x_j - q||`` to every base point in one NumPy expression
    (``sqrt(((x - q) ** 2).sum(1))``, float32, no BLAS), the point itself set to ``inf`` for a
    self-graph, ``argpartition`` for the ``k`` smallest, sorted by distance. Exact; time grows as
    ``n^2 d`` with a Python loop over the ``n`` rows (single-threaded), so on large sets time it on a
    subset (``method.n_samples``) and extrapolate quadratically (the T000-lpa-mnist builder does).
    """

    name, exact = "numpy_rows", True

    def fit(self, base):
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        return self

    def _search(self, queries, k, exclude_self):
        n = self.base.shape[0]
        k = min(int(k), n - int(exclude_self))
        dist = np.empty((len(queries), k), np.float32)
        idx = np.empty((len(queries), k), np.int64)
        for i, q in enumerate(np.asarray(queries, dtype=np.float32)):
            d = np.sqrt(((self.base - q) ** 2).sum(1))
            if exclude_self:
                d[i] = np.inf
            j = np.argpartition(d, k - 1)[:k] if k < n else np.arange(n)
            j = j[np.argsort(d[j], kind="stable")]
            dist[i], idx[i] = d[j], j
        return dist, idx

    def query(self, queries, k):
        return self._search(queries, k, exclude_self=False)

    def graph(self, x, k):
        self.fit(x)
        return self._search(self.base, k, exclude_self=True)


def warmup(backend: str = "pynndescent", query: bool = False, **params) -> float:
    """Run ``backend`` once on tiny random data so JIT compilation (pynndescent's numba kernels) is
    paid outside timed regions. Returns the seconds it took (about 30 s the first time in a process
    for pynndescent on a 2-core CPU, ~0 afterwards and for the other backends)."""
    t0 = time.perf_counter()
    x = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32)
    b = GRAPH_BACKENDS.get(backend)(**params)
    with b.threads():
        b.graph(x, 5)
        if query:
            b.fit(x).query(x[:10], 5)
    return time.perf_counter() - t0


def make_backend(backend: str, **params) -> NeighborBackend:
    """Instantiate the registered backend ``backend`` (ConfigError listing the names if unknown)."""
    return GRAPH_BACKENDS.get(backend)(**params)
