"""Edge weights and the normalised affinity of a k-NN graph (the graph side of label spreading).

Edge weights are strategies in :data:`EDGE_WEIGHTS` (``method.weighting``), each mapping a
:class:`~sparsebench.graph.knn.KnnGraph` to float32 ``(n, k)`` weights of its directed edges:
``binary`` (document 000) or ``heat`` (its proposed extension, ``w_ij = exp(-d_ij^2 / (sigma_i sigma_j))``
with per-point bandwidth ``sigma_i`` = distance to the point's ``heat_neighbor``-th neighbour;
Zelnik-Manor & Perona 2004, "Self-tuning spectral clustering"). :func:`affinity` symmetrises them
into ``W`` and :func:`normalized_affinity` forms ``S = D^-1/2 W D^-1/2`` (Zhou et al. 2004, eq. 1).
Everything is float32 ``scipy.sparse`` CSR; no dense ``n x n`` matrix is formed.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sparsebench.core.registry import Registry
from sparsebench.graph.knn import KnnGraph

EDGE_WEIGHTS: Registry = Registry("method.weighting")


@EDGE_WEIGHTS.register("binary")
def binary_weights(graph: KnnGraph, **_) -> np.ndarray:
    """Weight 1 on every k-NN edge (the document's graph)."""
    return np.ones(graph.indices.shape, dtype=np.float32)


@EDGE_WEIGHTS.register("heat")
def heat_weights(graph: KnnGraph, heat_neighbor: int = 7, **_) -> np.ndarray:
    """Heat kernel with local scaling: ``exp(-d_ij^2 / (sigma_i sigma_j))``, ``sigma_i`` = distance of
    ``i`` to its ``min(heat_neighbor, k)``-th neighbour (Zelnik-Manor & Perona 2004)."""
    d = graph.distances.astype(np.float64)
    col = min(int(heat_neighbor), graph.k) - 1
    sigma = d[:, col].copy()
    finite = np.isfinite(sigma) & (sigma > 0)
    sigma[~finite] = np.median(sigma[finite]) if finite.any() else 1.0
    j = np.where(graph.indices >= 0, graph.indices, 0)
    w = np.exp(-(d ** 2) / (sigma[:, None] * sigma[j]))
    return np.where(np.isfinite(d), w, 0.0).astype(np.float32)


def affinity(graph: KnnGraph, weighting: str = "binary", **params) -> sp.csr_matrix:
    """Symmetric sparse affinity ``W`` (float32 CSR ``(n, n)``, zero diagonal) of a k-NN graph.

    The directed k-NN relation is symmetrised by ``W = max(A, A^T)`` (an edge exists when either
    point lists the other); empty slots (index ``-1``) are dropped.
    """
    n, k = graph.indices.shape
    w = EDGE_WEIGHTS.get(weighting)(graph, **params)
    rows = np.repeat(np.arange(n), k)
    cols = graph.indices.ravel()
    vals = w.ravel()
    keep = (cols >= 0) & (cols != rows) & (vals > 0)
    A = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float32)
    W = A.maximum(A.T).tocsr()
    W.sort_indices()
    return W


def normalized_affinity(W: sp.spmatrix) -> sp.csr_matrix:
    """``S = D^-1/2 W D^-1/2`` (Zhou et al. 2004), float32 CSR; isolated points get zero rows."""
    deg = np.asarray(W.sum(axis=1), dtype=np.float64).ravel()
    inv = np.zeros_like(deg)
    inv[deg > 0] = 1.0 / np.sqrt(deg[deg > 0])
    D = sp.diags(inv.astype(np.float32))
    S = (D @ W @ D).tocsr().astype(np.float32)
    return S
