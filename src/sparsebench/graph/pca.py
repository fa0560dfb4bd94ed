"""Feature preprocessing of the label-spreading pipeline: [0, 1] scaling and PCA.

Document 000 scales the pixels to [0, 1] (:func:`scale_unit`, one global min and max) and projects
them onto the top principal components (:func:`pca`). PCA solvers are strategies in
:data:`PCA_SOLVERS` (``method.pca_solver``): each gets the centred float32 data ``xc`` ``(n, d)`` (a
torch tensor, centred once by :func:`pca_fit_transform`) and returns the principal axes ``(d, c)`` and,
where the solver has them for free, the scores ``xc @ axes`` ``(n, c)`` (else ``None``: the caller
projects). :func:`single_thread` runs a block on one torch thread
(:func:`sparsebench.core.threads.torch_threads`, restored afterwards).

Costs on 70 000 x 784 MNIST (2 cores): ``covariance`` one ``n d^2`` product (8.6e10 FLOPs), a
784 x 784 ``eigh`` and the projection; ``randomized`` ``2 (2 niter + 1) n d q`` = 3.3e10 FLOPs for
``q = c + 10``, ``niter = 2`` (subspace iteration, Halko, Martinsson & Tropp 2011), whose scores come
with the axes (no second pass over ``xc``).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.core.threads import torch_threads

PCA_SOLVERS: Registry = Registry("method.pca_solver")

#: a solver: ``(xc (n, d) centred float32 tensor, n_components, seed) -> (axes (d, c), scores (n, c) | None)``
Solver = Callable[[torch.Tensor, int, int], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def scale_unit(x: np.ndarray) -> np.ndarray:
    """Min-max scale all features jointly to ``[0, 1]`` (one global min and max, as for pixels).

    ``x``: ``(n, d)``; returns float32 ``(n, d)``. A constant array becomes all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def single_thread():
    """:func:`torch_threads` with one thread (LAPACK calls on small matrices: with 2 OpenMP threads on
    a loaded 2-core machine, ``eigh`` of a 784 x 784 matrix took 22 s instead of 0.1 s)."""
    return torch_threads(1)


@PCA_SOLVERS.register("covariance")
def pca_covariance(xc: torch.Tensor, c: int, seed: int) -> Tuple[torch.Tensor, None]:
    """Exact PCA: top eigenvectors of the ``d x d`` scatter matrix ``xc^T xc`` (float32 product,
    float64 ``eigh``). Returns ``(axes (d, c), None)``."""
    gram = (xc.T @ xc).double()
    with single_thread():  # a small d x d problem; multi-threaded LAPACK eigh stalls on a busy machine
        _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -c:].flip(1).float().contiguous(), None


@PCA_SOLVERS.register("randomized")
def pca_randomized(xc: torch.Tensor, c: int, seed: int, niter: int = 2, oversample: int = 10
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Randomised PCA: subspace iteration on ``xc^T xc`` from a Gaussian start (Halko, Martinsson &
    Tropp 2011, Algorithms 4.4 and 5.1), float32, ``q = c + oversample`` columns, ``niter`` power steps.

    ``Q = orth(G)`` (``G`` ``(d, q)`` Gaussian), then ``niter`` times ``Q = orth(xc^T (xc Q))``; with
    ``B = xc Q`` ``(n, q)``, the eigenvectors ``W`` of ``B^T B`` give the axes ``Q W`` and the scores
    ``B W``. Every product with ``xc`` is a multi-threaded GEMM; the LAPACK steps (QR of ``(d, q)``,
    ``eigh`` of ``(q, q)`` in float64) are small and run on one thread: ``torch.svd_lowrank`` factorises
    ``(n, q)`` matrices with multi-threaded LAPACK, which stalled for seconds on a loaded 2-core machine.
    Returns ``(axes (d, c), scores (n, c))``; the scores equal ``xc @ axes`` up to rounding.
    """
    n, d = xc.shape
    q = min(c + oversample, d, n)
    gen = torch.Generator().manual_seed(int(seed))  # the caller's torch RNG is untouched
    Q = torch.randn(d, q, generator=gen, dtype=xc.dtype)
    for step in range(int(niter) + 1):
        with single_thread():
            Q = torch.linalg.qr(Q).Q
        B = xc @ Q
        if step < niter:
            Q = xc.T @ B
    with single_thread():
        evals, W = torch.linalg.eigh((B.T @ B).double())
    W = W[:, -c:].flip(1).to(xc.dtype)
    return (Q @ W).contiguous(), (B @ W).contiguous()


@PCA_SOLVERS.register("sklearn")
def pca_sklearn(xc: torch.Tensor, c: int, seed: int) -> Tuple[torch.Tensor, None]:
    """scikit-learn ``PCA(svd_solver='auto')`` (the reference). Returns ``(axes (d, c), None)``."""
    from sklearn.decomposition import PCA

    axes = PCA(c, random_state=seed).fit(xc.numpy()).components_.T.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(axes)), None


def _check_components(n_components: int, shape) -> None:
    if not 1 <= int(n_components) <= min(shape):
        raise ConfigError(f"method.pca_components={n_components}: must be in [1, {min(shape)}] "
                          f"(min of samples and features)")


def pca_fit_transform(x, n_components: int, solver: str = "covariance", seed: int = 0, offset: float = 0.0,
                      scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the features ``(x - offset) * scale`` (``x`` ``(n, d)``; the affine map is the [0, 1]
    scaling, fused with the centring into one pass over ``x``).

    Returns:
        ``(mean (d,), axes (d, c), scores (n, c))``, float32, with ``mean`` in the scaled units and
        ``scores = (features - mean) @ axes``.

    Raises:
        ConfigError: ``n_components`` outside ``[1, min(n, d)]`` or an unknown solver.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    _check_components(n_components, xt.shape)
    fn = PCA_SOLVERS.get(solver)
    raw_mean = xt.mean(0)
    xc = torch.sub(xt, raw_mean)  # the one centred copy
    if scale != 1.0:
        xc.mul_(float(scale))
    axes, scores = fn(xc, int(n_components), int(seed))
    if scores is None:
        scores = xc @ axes
    mean = (raw_mean - float(offset)) * float(scale)
    return mean.numpy(), np.ascontiguousarray(axes.numpy()), np.ascontiguousarray(scores.numpy())


def pca_fit(x, n_components: int, solver: str = "covariance", seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Principal axes of ``x`` ``(n, d)``: returns ``(mean (d,), components (d, n_components))``, float32;
    scores are ``(x - mean) @ components``. ``solver``: a :data:`PCA_SOLVERS` name.

    Raises:
        ConfigError: ``n_components`` outside ``[1, min(n, d)]`` or an unknown solver.
    """
    mean, axes, _ = pca_fit_transform(x, n_components, solver, seed)
    return mean, axes


def pca(x, n_components: int, solver: str = "covariance", seed: int = 0) -> np.ndarray:
    """Project ``x`` ``(n, d)`` onto its top ``n_components`` principal components: float32
    ``(n, n_components)`` centred scores (see :func:`pca_fit_transform`)."""
    return pca_fit_transform(x, n_components, solver, seed)[2]
