"""Graph-based semi-supervised learning: label spreading on a k-NN graph, and the kNN classifier.

Pipeline of document 000 (Shepard, Korandla & Aggarwal 2024, "Graph-Based Semi-Supervised
Learning"): scale the features to [0, 1], PCA to a few components, hide a seeded fraction of the
labels, build a k-NN graph (:mod:`sparsebench.graph.knn`), spread the remaining labels over it:

    F^(0) = Y,   F^(t+1) = alpha S F^(t) + (1 - alpha) Y,   y*_i = argmax_c F_ic          (doc. 000)

with ``Y`` the one-hot seed labels (zero rows for hidden labels) and clamping factor ``alpha``.
Following Zhou et al. (2004, "Learning with local and global consistency", eq. 1-2) the graph
enters through the symmetrically normalised affinity ``S = D^-1/2 W D^-1/2`` (``W`` symmetric, zero
diagonal, ``D = diag(W 1)``), as in scikit-learn's ``LabelSpreading``. The iteration converges to

    F* = (1 - alpha) (I - alpha S)^-1 Y                                                   (Zhou eq. 3)

which :class:`ConjugateGradient` solves directly: ``I - alpha S`` is symmetric positive definite
(eigenvalues in ``[1 - alpha, 1 + alpha]``), so CG needs about ``sqrt((1+alpha)/(1-alpha)) ~ 14``
iterations per decade of residual at ``alpha = 0.99`` instead of ``log(10)/-log(alpha) ~ 230``.
:class:`Iterate` is the document's loop with its proposed early stopping (``max|F^(t+1) - F^(t)| < tol``).

Edge weights (:data:`EDGE_WEIGHTS`): ``binary`` (the document) or ``heat`` (its proposed extension:
``w_ij = exp(-d_ij^2 / (sigma_i sigma_j))`` with per-point bandwidth ``sigma_i`` = distance to the
point's ``heat_neighbor``-th neighbour; Zelnik-Manor & Perona 2004, "Self-tuning spectral clustering").

Everything is float32 ``scipy.sparse`` CSR; no dense ``n x n`` matrix is formed.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.graph.knn import KnnGraph, check_k, knn_graph, knn_search, sampled_recall, warmup
from sparsebench.core.registry import Registry

PROPAGATORS: Registry = Registry("method.solver")
EDGE_WEIGHTS: Registry = Registry("method.weighting")
PCA_SOLVERS: Registry = Registry("method.pca_solver")


# --------------------------------------------------------------------------- preprocessing
def scale_unit(x: np.ndarray) -> np.ndarray:
    """Min-max scale all features jointly to ``[0, 1]`` (one global min and max, as for pixels).

    ``x``: ``(n, d)``; returns float32 ``(n, d)``. A constant array becomes all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


@contextmanager
def single_thread():
    """Run torch single-threaded inside the block (LAPACK calls on small matrices: with 2 OpenMP
    threads on a loaded 2-core machine, ``eigh`` of a 784 x 784 matrix took 22 s instead of 0.1 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@PCA_SOLVERS.register("covariance")
def pca_covariance(x: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    """Exact PCA: top eigenvectors of the ``d x d`` scatter matrix of the centred data (fast when
    ``d`` is small: one ``n d^2`` product, 0.7 s for 70 000 x 784 on two idle cores). Returns ``(d, c)``."""
    xc = x - x.mean(0)
    gram = (xc.T @ xc).double()
    with single_thread():  # a small d x d problem; multi-threaded LAPACK eigh stalls on a busy machine
        _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -c:].flip(1).float()


@PCA_SOLVERS.register("randomized")
def pca_randomized(x: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    """Randomised PCA (Halko, Martinsson & Tropp 2011) via ``torch.pca_lowrank`` (2 power iterations,
    10 oversampling columns). Returns ``(d, c)``."""
    torch.manual_seed(seed)
    _, _, v = torch.pca_lowrank(x, q=min(c + 10, min(x.shape)), center=True, niter=2)
    return v[:, :c]


@PCA_SOLVERS.register("sklearn")
def pca_sklearn(x: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    """scikit-learn ``PCA(svd_solver='auto')`` (the reference). Returns ``(d, c)``."""
    from sklearn.decomposition import PCA

    return torch.from_numpy(PCA(c, random_state=seed).fit(x.numpy()).components_.T.astype(np.float32))


def pca_fit(x, n_components: int, solver: str = "covariance", seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Principal axes of ``x`` ``(n, d)``: returns ``(mean (d,), components (d, n_components))``, float32;
    scores are ``(x - mean) @ components``. ``solver``: a :data:`PCA_SOLVERS` name.

    Raises:
        ConfigError: ``n_components`` outside ``[1, min(n, d)]`` or an unknown solver.
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if not 1 <= int(n_components) <= min(x.shape):
        raise ConfigError(f"method.pca_components={n_components}: must be in [1, {min(x.shape)}] "
                          f"(min of samples and features)")
    V = PCA_SOLVERS.get(solver)(x, int(n_components), int(seed))
    return x.mean(0).numpy(), np.ascontiguousarray(V.numpy(), dtype=np.float32)


def pca(x, n_components: int, solver: str = "covariance", seed: int = 0) -> np.ndarray:
    """Project ``x`` ``(n, d)`` onto its top ``n_components`` principal components: float32
    ``(n, n_components)`` centred scores (see :func:`pca_fit`)."""
    x = np.asarray(x, dtype=np.float32)
    mean, V = pca_fit(x, n_components, solver, seed)
    z = (torch.from_numpy(x) - torch.from_numpy(mean)) @ torch.from_numpy(V)
    return np.ascontiguousarray(z.numpy())


def mask_labels(y: np.ndarray, fraction: float, seed: int, num_classes: Optional[int] = None,
                key: str = "mask_fraction") -> np.ndarray:
    """Hide a seeded uniform-random ``round(fraction * n)`` of the labels.

    Returns:
        bool ``(n,)``: ``True`` where the label stays visible (a seed label).

    Raises:
        ConfigError (naming ``key``): ``fraction`` outside ``(0, 1)``, or a class left with no visible
            label (label spreading cannot predict a class it never sees).
    """
    y = np.asarray(y)
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"{key}={fraction}: the masked fraction must be in (0, 1)")
    n = len(y)
    n_mask = int(round(float(fraction) * n))
    labelled = np.ones(n, dtype=bool)
    labelled[np.random.default_rng(seed).permutation(n)[:n_mask]] = False
    classes = np.arange(int(num_classes) if num_classes else int(y.max()) + 1)
    present = np.unique(y)
    missing = [int(c) for c in classes if c in present and not labelled[y == c].any()]
    if missing:
        raise ConfigError(f"{key}={fraction}: class(es) {missing} have no labelled point after masking "
                          f"(seed {seed}, {n - n_mask} of {n} labels kept); lower the fraction")
    return labelled


def seed_matrix(y: np.ndarray, labelled: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot seed labels ``Y``: float32 ``(n, num_classes)``, zero rows where the label is hidden."""
    Y = np.zeros((len(y), num_classes), dtype=np.float32)
    rows = np.flatnonzero(labelled)
    Y[rows, np.asarray(y)[rows]] = 1.0
    return Y


# --------------------------------------------------------------------------- affinity
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


# --------------------------------------------------------------------------- propagation
@dataclass
class SpreadResult:
    """Output of a propagation solver.

    Attributes:
        F: float32 ``(n, C)`` class scores; the prediction is ``F.argmax(1)``.
        iterations: iterations (sparse products with ``S``) performed.
        converged: whether the stopping criterion was met before the cap.
        residual: last ``max|dF|`` (iterate) or largest relative residual over classes (cg).
        seconds: wall-clock seconds of the solve.
    """

    F: np.ndarray
    iterations: int
    converged: bool
    residual: float
    seconds: float = 0.0


class Propagator:
    """Strategy: solve label spreading for ``F`` given ``S`` (CSR ``(n, n)``) and ``Y`` (``(n, C)``)."""

    name: ClassVar[str] = "?"

    def __init__(self, alpha: float = 0.99, max_iter: int = 1000, tol: float = 1e-3, cg_rtol: float = 1e-4,
                 callback: Optional[Callable[[int, float], None]] = None):
        if not 0.0 < float(alpha) < 1.0:
            raise ConfigError(f"method.alpha={alpha}: the clamping factor must be in (0, 1)")
        self.alpha, self.max_iter, self.tol, self.cg_rtol = float(alpha), int(max_iter), float(tol), float(cg_rtol)
        self.callback = callback

    def solve(self, S: sp.csr_matrix, Y: np.ndarray) -> SpreadResult:  # pragma: no cover - abstract
        raise NotImplementedError


@PROPAGATORS.register("iterate")
class Iterate(Propagator):
    """The document's fixed-point iteration ``F <- alpha S F + (1 - alpha) Y`` from ``F = Y``, stopped
    after ``max_iter`` iterations or early once ``max|F^(t+1) - F^(t)| < tol`` (``tol = 0``: never)."""

    name = "iterate"

    def solve(self, S, Y):
        a = np.float32(self.alpha)
        base = (np.float32(1.0) - a) * Y
        F = Y.astype(np.float32, copy=True)
        delta, converged, it = float("inf"), False, 0
        for it in range(1, self.max_iter + 1):
            Fn = S @ F
            Fn *= a
            Fn += base
            delta = float(np.abs(Fn - F).max())
            F = Fn
            if self.callback is not None:
                self.callback(it, delta)
            if delta < self.tol:
                converged = True
                break
        return SpreadResult(F, it, converged, delta)


@PROPAGATORS.register("cg")
class ConjugateGradient(Propagator):
    """Conjugate gradients (Hestenes & Stiefel 1952) on ``(I - alpha S) F = (1 - alpha) Y``, float32,
    all classes at once (one CG recursion per column, one sparse product ``S P`` per iteration).

    Stops when every column's residual satisfies ``||r_c|| <= cg_rtol ||b_c||`` or after ``max_iter``.
    """

    name = "cg"

    def solve(self, S, Y):
        a = np.float32(self.alpha)
        B = ((np.float32(1.0) - a) * Y).astype(np.float32)
        X = np.zeros_like(B)
        R = B.copy()
        P = R.copy()
        rs = np.einsum("ij,ij->j", R, R)
        bnorm2 = rs.copy()
        target = np.float32(self.cg_rtol) ** 2 * bnorm2
        it, converged = 0, bool(np.all(rs <= target))
        while not converged and it < self.max_iter:
            it += 1
            AP = P - a * (S @ P)
            pAp = np.einsum("ij,ij->j", P, AP)
            step = np.divide(rs, pAp, out=np.zeros_like(rs), where=pAp > 0)
            X += step * P
            R -= step * AP
            rs_new = np.einsum("ij,ij->j", R, R)
            res = float(np.sqrt(np.max(np.divide(rs_new, bnorm2, out=np.zeros_like(rs_new), where=bnorm2 > 0))))
            if self.callback is not None:
                self.callback(it, res)
            converged = bool(np.all(rs_new <= target))
            beta = np.divide(rs_new, rs, out=np.zeros_like(rs), where=rs > 0)
            P = R + beta * P
            rs = rs_new
        res = float(np.sqrt(np.max(np.divide(rs, bnorm2, out=np.zeros_like(rs), where=bnorm2 > 0))))
        return SpreadResult(X, it, converged, res)


def label_spreading(S: sp.spmatrix, Y: np.ndarray, alpha: float = 0.99, solver: str = "iterate",
                    max_iter: int = 1000, tol: float = 1e-3, cg_rtol: float = 1e-4,
                    callback: Optional[Callable[[int, float], None]] = None) -> SpreadResult:
    """Label spreading (Zhou et al. 2004) with the chosen solver.

    Args:
        S: normalised affinity ``D^-1/2 W D^-1/2``, CSR ``(n, n)`` (:func:`normalized_affinity`).
        Y: float32 ``(n, C)`` one-hot seed labels (:func:`seed_matrix`).
        alpha: clamping factor in (0, 1). solver: a :data:`PROPAGATORS` name (``iterate`` | ``cg``).
        max_iter: iteration cap. tol: early-stopping threshold on ``max|dF|`` (iterate; 0 disables).
        cg_rtol: relative residual target (cg). callback: ``callback(iteration, residual)``.

    Returns:
        SpreadResult (``F``, iterations, converged, residual, seconds).
    """
    S = sp.csr_matrix(S, dtype=np.float32)
    Y = np.ascontiguousarray(Y, dtype=np.float32)
    prop = PROPAGATORS.get(solver)(alpha=alpha, max_iter=max_iter, tol=tol, cg_rtol=cg_rtol, callback=callback)
    t0 = time.perf_counter()
    res = prop.solve(S, Y)
    res.seconds = time.perf_counter() - t0
    return res


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
    ``backend`` (:func:`sparsebench.graph.knn.knn_search`).

    Returns:
        ``(predictions (m,) int64, build_seconds, query_seconds)``.
    """
    _, idx, t_build, t_query = knn_search(train_x, test_x, k, backend=backend, **params)
    return knn_vote(idx, train_y, num_classes), t_build, t_query


# --------------------------------------------------------------------------- the whole pipeline
@dataclass
class LPASettings:
    """Settings of :func:`run_lpa` (the ``knn_lpa`` / ``kann_lpa`` method config, minus bookkeeping)."""

    k: int = 10
    alpha: float = 0.99
    mask_fraction: float = 0.9
    scale: bool = True
    pca_components: Optional[int] = 50
    pca_solver: str = "covariance"
    backend: str = "brute"
    solver: str = "cg"
    max_iter: int = 1000
    tol: float = 1e-3
    cg_rtol: float = 1e-4
    weighting: str = "binary"
    heat_neighbor: int = 7
    recall_sample: int = 2000  # points on which recall@k is estimated (approximate backends; 0 = skip)
    backend_params: Dict = field(default_factory=dict)


def _warmup(s: LPASettings, params: dict) -> float:
    """Run the whole pipeline once on tiny data so one-time costs (pynndescent's numba compilation,
    torch/BLAS/faiss thread-pool start-up) stay out of the timed region. Returns its seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.random((200, 16), dtype=np.float32)
    if s.backend == "pynndescent":
        warmup("pynndescent", num_threads=params.get("num_threads"))
    z = pca(x, min(8, s.pca_components or 8), s.pca_solver, 0)
    g = knn_graph(z, 5, backend=s.backend, **{**params, "seed": 0})
    S = normalized_affinity(affinity(g, s.weighting, heat_neighbor=s.heat_neighbor))
    label_spreading(S, seed_matrix(np.arange(200) % 2, np.arange(200) < 20, 2), s.alpha, s.solver, max_iter=5)
    return time.perf_counter() - t0


def run_lpa(x: np.ndarray, y: np.ndarray, s: LPASettings, seed: int = 0, num_classes: Optional[int] = None,
            callback: Optional[Callable[[int, float], None]] = None, key_prefix: str = "method.") -> dict:
    """Scale, PCA, mask, build the graph, spread; returns timings, iterations and accuracies.

    Args:
        x: features ``(n, d)``; y: int labels ``(n,)``; seed: seeds the label mask (and randomised
            index construction). JIT warm-up of the graph backend runs before the clock starts.

    Returns:
        dict with ``n``, ``n_labelled``, ``pca_seconds``, ``graph_seconds``, ``propagation_seconds``
        (affinity + normalisation + solve), ``total_seconds`` (their sum; data loading and warm-up
        excluded), ``warmup_seconds``, ``iterations``, ``converged``, ``acc_masked`` (accuracy on the
        hidden labels), ``acc_all`` (on all points), ``recall`` (sampled recall@k; NaN for exact backends).

    Raises:
        ConfigError: ``k >= n``, masked fraction outside (0, 1), a fully masked class, unknown names.
    """
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    C = int(num_classes or y.max() + 1)
    check_k(s.k, n, key=f"{key_prefix}k")
    labelled = mask_labels(y, s.mask_fraction, seed, C, key=f"{key_prefix}mask_fraction")
    Y = seed_matrix(y, labelled, C)
    params = dict(s.backend_params)
    params.setdefault("seed", seed)
    t_warm = _warmup(s, params)

    t0 = time.perf_counter()
    z = scale_unit(x) if s.scale else np.asarray(x, dtype=np.float32)
    if s.pca_components:
        z = pca(z, s.pca_components, s.pca_solver, seed)
    t_pca = time.perf_counter() - t0

    g = knn_graph(z, s.k, backend=s.backend, **params)

    t1 = time.perf_counter()
    W = affinity(g, s.weighting, heat_neighbor=s.heat_neighbor)
    S = normalized_affinity(W)
    res = label_spreading(S, Y, alpha=s.alpha, solver=s.solver, max_iter=s.max_iter, tol=s.tol, cg_rtol=s.cg_rtol,
                          callback=callback)
    t_prop = time.perf_counter() - t1

    recall = float("nan")
    if not g.exact and s.recall_sample:
        recall = sampled_recall(g, z, sample=s.recall_sample, seed=seed,
                                device=params.get("device"))
    pred = res.F.argmax(1)
    hidden = ~labelled
    return {"n": n, "n_labelled": int(labelled.sum()), "features": int(z.shape[1]),
            "pca_seconds": t_pca, "graph_seconds": g.seconds, "propagation_seconds": t_prop,
            "solve_seconds": res.seconds, "total_seconds": t_pca + g.seconds + t_prop, "warmup_seconds": t_warm,
            "iterations": res.iterations, "converged": bool(res.converged), "residual": res.residual,
            "acc_masked": float((pred[hidden] == y[hidden]).mean()), "acc_all": float((pred == y).mean()),
            "recall": recall, "edges": int(W.nnz)}
