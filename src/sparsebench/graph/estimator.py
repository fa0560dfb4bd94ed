"""``sparsebench.LabelSpreading``: the whole label-spreading pipeline as a scikit-learn estimator.

Document 000's pipeline (Shepard, Korandla & Aggarwal 2024) and Zhou et al. (2004, "Learning with
local and global consistency"), one owner for the Hydra methods ``knn_lpa`` / ``kann_lpa`` and for
library users::

    X (n, d) --scale_unit / pca--> Z (n, c) --knn_graph--> KnnGraph (n, k) --affinity--> W (n, n)
      --normalized_affinity--> S = D^-1/2 W D^-1/2 --label_spreading--> F (n, C) --argmax--> y*

``fit(X, y)`` is transductive: ``y`` holds ``-1`` for unlabelled points (scikit-learn's convention)
and :attr:`transduction_` the labels spread to every training point. ``predict`` / ``predict_proba``
of new points average the ``label_distributions_`` of their ``n_neighbors`` nearest training points
(exact search; the rule of scikit-learn's ``LabelSpreading(kernel='knn')``).

Fitted attributes: ``classes_`` ``(C,)``, ``transduction_`` ``(n,)``, ``label_distributions_``
``(n, C)`` (rows of ``F`` clipped at 0 and normalised to sum 1; uniform where ``F`` is 0),
``X_`` (the scaled / projected training features, float32 ``(n, c)``), ``graph_`` (the
:class:`~sparsebench.graph.knn.KnnGraph`), ``n_edges_`` (stored entries of ``W``), ``n_iter_``,
``converged_``, ``residual_`` and ``timings_`` (seconds of ``pca``, ``graph``, ``propagation`` =
affinity + normalisation + solve, ``solve``, and ``total`` = pca + graph + propagation).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from sparsebench.core.errors import ConfigError
from sparsebench.core.progress import Progress
from sparsebench.graph.affinity import EDGE_WEIGHTS, affinity, normalized_affinity
from sparsebench.graph.backends import GRAPH_BACKENDS, warmup
from sparsebench.graph.knn import check_k, knn_graph, knn_search
from sparsebench.core.threads import torch_threads
from sparsebench.graph.pca import PCA_SOLVERS, pca_fit_transform
from sparsebench.graph.spreading import PROPAGATORS, label_spreading, seed_matrix

UNLABELED = -1  # scikit-learn's marker of a hidden label


class LabelSpreading(ClassifierMixin, BaseEstimator):
    """Label spreading (Zhou et al. 2004) on a k-NN graph, optionally after [0, 1] scaling and PCA.

    Args:
        n_neighbors: neighbours per point in the k-NN graph (``1 <= k < n_samples``).
        alpha: clamping factor in (0, 1) (``F = (1 - alpha) (I - alpha S)^-1 Y``).
        graph: a :data:`~sparsebench.graph.backends.GRAPH_BACKENDS` name (``brute``, ``faiss`` exact;
            ``pynndescent``, ``faiss_hnsw``, ``faiss_ivf`` approximate).
        solver: a :data:`~sparsebench.graph.spreading.PROPAGATORS` name (``cg`` | ``iterate``).
        max_iter: iteration cap of the solver. tol: ``iterate``'s early stopping on ``max|dF|`` (0: off).
        cg_rtol: ``cg``'s relative residual target.
        weighting: an :data:`~sparsebench.graph.affinity.EDGE_WEIGHTS` name (``binary`` | ``heat``);
            heat_neighbor: the neighbour whose distance is ``heat``'s bandwidth.
        scale: min-max scale all features jointly to [0, 1] (the fitted min / max also scale new points).
        pca_components: project onto this many principal components (None: no PCA);
            pca_solver: a :data:`~sparsebench.graph.pca.PCA_SOLVERS` name.
        graph_params: extra backend parameters (``block_size``, ``device``, ``n_trees``, ``n_iters``,
            ``deterministic``, ``nlist``, ``nprobe``, ``hnsw_m``, ``ef_construction``, ``ef_search``).
        num_threads: torch / faiss / numba threads during ``fit`` (restored afterwards; None: defaults).
        random_state: int seed of randomised PCA and index construction (None: 0).
        callback: ``callback(iteration, residual)`` after each solver iteration.
        progress: report the three stages of ``fit`` (pca, graph, propagation): a tqdm bar on a terminal,
            else one line per stage on stdout (:class:`~sparsebench.core.progress.Progress`); ``None``: the
            bar when stderr is a terminal, else the lines; ``False`` (default): silent.

    Raises (from ``fit``):
        ConfigError (a ``ValueError``) naming the parameter: a value out of range or an unknown name,
            ``n_neighbors >= n_samples``, ``pca_components > min(n_samples, n_features)``, no labelled point.
    """

    def __init__(self, n_neighbors: int = 10, alpha: float = 0.99, graph: str = "pynndescent", solver: str = "cg",
                 max_iter: int = 1000, tol: float = 1e-3, cg_rtol: float = 1e-4, weighting: str = "binary",
                 heat_neighbor: int = 7, scale: bool = False, pca_components: Optional[int] = None,
                 pca_solver: str = "covariance", graph_params: Optional[dict] = None,
                 num_threads: Optional[int] = None, random_state: Optional[int] = None,
                 callback: Optional[Callable[[int, float], None]] = None, progress: Optional[bool] = False):
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.graph = graph
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.cg_rtol = cg_rtol
        self.weighting = weighting
        self.heat_neighbor = heat_neighbor
        self.scale = scale
        self.pca_components = pca_components
        self.pca_solver = pca_solver
        self.graph_params = graph_params
        self.num_threads = num_threads
        self.random_state = random_state
        self.callback = callback
        self.progress = progress

    # ------------------------------------------------------------------ validation
    def check_params(self, names: Optional[Mapping[str, str]] = None) -> None:
        """Raise :class:`ConfigError` for the first invalid parameter, named through ``names``
        (``{parameter: config key}``, e.g. the Hydra methods' ``{"n_neighbors": "method.k"}``)."""
        names = names or {}

        def check(cond: bool, param: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{names.get(param, param)}={getattr(self, param)!r}: {why}")

        def known(param: str, registry) -> None:
            check(getattr(self, param) in registry, param, f"unknown (allowed: {', '.join(registry.names())})")

        check(int(self.n_neighbors) >= 1, "n_neighbors", "must be >= 1")
        check(0.0 < float(self.alpha) < 1.0, "alpha", "the clamping factor must be in (0, 1)")
        known("graph", GRAPH_BACKENDS)
        known("solver", PROPAGATORS)
        check(int(self.max_iter) >= 1, "max_iter", "must be >= 1")
        check(float(self.tol) >= 0, "tol", "must be >= 0 (0 disables early stopping)")
        check(float(self.cg_rtol) > 0, "cg_rtol", "must be > 0")
        known("weighting", EDGE_WEIGHTS)
        check(int(self.heat_neighbor) >= 1, "heat_neighbor", "must be >= 1")
        check(self.pca_components is None or int(self.pca_components) >= 1, "pca_components", "must be >= 1 or None")
        known("pca_solver", PCA_SOLVERS)

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _backend_params(self) -> dict:
        params = {k: v for k, v in (self.graph_params or {}).items() if v is not None}
        if self.num_threads:
            params["num_threads"] = self.num_threads
        params.setdefault("seed", self._seed())
        return params

    # ------------------------------------------------------------------ features
    def _scale(self, x: np.ndarray) -> np.ndarray:
        """Min-max scaling with the fitted range (:func:`~sparsebench.graph.pca.scale_unit`'s formula)."""
        x = np.asarray(x, dtype=np.float32)
        if not self.scale:
            return x
        lo, hi = self.scale_range_
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    def _project(self, z: np.ndarray) -> np.ndarray:
        """PCA scores ``(z - mean) @ axes`` with the fitted axes: float32 ``(m, pca_components)``."""
        if not self.pca_components:
            return z
        zt = (torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)) - torch.from_numpy(self.pca_mean_)) \
            @ torch.from_numpy(self.pca_axes_)
        return np.ascontiguousarray(zt.numpy())

    def _fit_features(self, X: np.ndarray) -> np.ndarray:
        """Fit the scaling range and the PCA axes on ``X`` ``(n, d)``; return its features ``(n, c)``.

        With PCA the scaling is fused into the centring (:func:`~sparsebench.graph.pca.pca_fit_transform`:
        one pass over ``X``) and the scores come from the solver, so ``X`` is not projected a second time.
        """
        x = np.ascontiguousarray(X, dtype=np.float32)
        self.scale_range_ = (float(x.min()), float(x.max()))
        if not self.pca_components:
            return self._scale(x)
        if int(self.pca_components) > min(x.shape):
            raise ConfigError(f"pca_components={self.pca_components}: must be <= {min(x.shape)} "
                              f"(min of samples and features)")
        lo, hi = self.scale_range_
        offset, scale = (lo, 1.0 / (hi - lo)) if self.scale and hi > lo else (0.0, 0.0 if self.scale else 1.0)
        self.pca_mean_, self.pca_axes_, z = pca_fit_transform(x, int(self.pca_components), self.pca_solver,
                                                              self._seed(), offset=offset, scale=scale)
        return z

    # ------------------------------------------------------------------ fit / predict
    def fit(self, X, y) -> "LabelSpreading":
        """Spread the labels of ``y`` (``-1`` = unlabelled) over the k-NN graph of ``X`` ``(n, d)``.

        Returns:
            self, with the fitted attributes of the module docstring.
        """
        self.check_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], ensure_min_samples=2)
        check_classification_targets(y)
        y = np.asarray(y)
        labelled = y != UNLABELED if y.dtype.kind in "iuf" else np.ones(len(y), dtype=bool)
        if not labelled.any():
            raise ConfigError("y: no labelled point (every label is -1); label spreading needs seed labels")
        self.classes_ = np.unique(y[labelled])
        codes = np.zeros(len(y), dtype=np.int64)
        codes[labelled] = np.searchsorted(self.classes_, y[labelled])
        n = X.shape[0]
        check_k(self.n_neighbors, n, key="n_neighbors")
        Y = seed_matrix(codes, labelled, len(self.classes_))

        stages = Progress(3, "LPA", self.progress, unit="stage",
                          say=(lambda line: print(line, flush=True)) if self.progress is not False else None)
        with torch_threads(self.num_threads), stages:
            stages.start("pca")
            t0 = time.perf_counter()
            z = self._fit_features(X)
            t_pca = time.perf_counter() - t0
            stages.done(f"  LPA pca         {t_pca:8.2f} s  ({z.shape[1]} features)")

            stages.start(f"graph ({self.graph})")
            g = knn_graph(z, int(self.n_neighbors), backend=self.graph, **self._backend_params())
            stages.done(f"  LPA graph       {g.seconds:8.2f} s  ({self.graph}, k={self.n_neighbors})")

            stages.start(f"propagation ({self.solver})")
            t1 = time.perf_counter()
            W = affinity(g, self.weighting, heat_neighbor=self.heat_neighbor)
            S = normalized_affinity(W)
            res = label_spreading(S, Y, alpha=self.alpha, solver=self.solver, max_iter=self.max_iter, tol=self.tol,
                                  cg_rtol=self.cg_rtol, callback=self.callback)
            t_prop = time.perf_counter() - t1
            stages.done(f"  LPA propagation {t_prop:8.2f} s  ({self.solver}, {res.iterations} iterations)")

        self.X_, self.graph_, self.n_edges_ = z, g, int(W.nnz)
        self.n_iter_, self.converged_, self.residual_ = res.iterations, bool(res.converged), res.residual
        self.transduction_ = self.classes_[res.F.argmax(1)]
        self.label_distributions_ = _normalise_rows(res.F)
        self.timings_: Dict[str, float] = {"pca": t_pca, "graph": g.seconds, "propagation": t_prop,
                                           "solve": res.seconds, "total": t_pca + g.seconds + t_prop}
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(m, C)`` of new points: the mean ``label_distributions_`` of their
        ``n_neighbors`` nearest training points (exact search in the fitted feature space)."""
        check_is_fitted(self, "label_distributions_")
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        z = self._project(self._scale(X))
        k = min(int(self.n_neighbors), self.X_.shape[0])
        _, idx, _, _ = knn_search(self.X_, z, k, backend="brute")
        return _normalise_rows(self.label_distributions_[idx].sum(1))

    def predict(self, X) -> np.ndarray:
        """Predicted labels ``(m,)`` of new points: ``classes_[argmax predict_proba]``."""
        proba = self.predict_proba(X)  # checks is-fitted before classes_ is read
        return self.classes_[proba.argmax(1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def _normalise_rows(F: np.ndarray) -> np.ndarray:
    """Rows of ``F`` clipped at 0 and scaled to sum 1 (float64; a zero row becomes uniform)."""
    P = np.clip(np.asarray(F, dtype=np.float64), 0.0, None)
    s = P.sum(1, keepdims=True)
    return np.divide(P, s, out=np.full_like(P, 1.0 / P.shape[1]), where=s > 0)


def warmup_pipeline(est: LabelSpreading) -> float:
    """Run ``est``'s pipeline once on tiny data so one-time costs (pynndescent's numba compilation,
    torch / BLAS / faiss thread-pool start-up) stay out of a timed ``fit``. Returns its seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.random((200, 16), dtype=np.float32)
    params = est._backend_params()
    if GRAPH_BACKENDS.get(est.graph).jit:
        warmup(est.graph, num_threads=params.get("num_threads"))
    with torch_threads(est.num_threads):
        _, _, z = pca_fit_transform(x, min(8, est.pca_components or 8), est.pca_solver, 0)
        g = knn_graph(np.ascontiguousarray(z), 5, backend=est.graph, **{**params, "seed": 0})
        S = normalized_affinity(affinity(g, est.weighting, heat_neighbor=est.heat_neighbor))
        label_spreading(S, seed_matrix(np.arange(200) % 2, np.arange(200) < 20, 2), est.alpha, est.solver, max_iter=5)
    return time.perf_counter() - t0
