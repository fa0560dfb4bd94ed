"""Feature preprocessing of the label-spreading pipeline: [0, 1] scaling and PCA.

Document 000 scales the pixels to [0, 1] (:func:`scale_unit`, one global min and max) and projects
them onto the top principal components (:func:`pca`). PCA solvers are strategies in
:data:`PCA_SOLVERS` (``method.pca_solver``): each maps float32 ``x`` ``(n, d)`` to the principal axes
``(d, c)``; the scores are ``(x - mean) @ axes``. :func:`single_thread` runs a block on one torch thread
(:func:`sparsebench.core.threads.torch_threads`, restored afterwards).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.core.threads import torch_threads

PCA_SOLVERS: Registry = Registry("method.pca_solver")


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
    with torch.random.fork_rng(devices=[]):  # seed the sketch without touching the caller's torch RNG
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
