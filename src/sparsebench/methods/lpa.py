"""``method=knn_lpa`` / ``method=kann_lpa``: label spreading on an exact / approximate k-NN graph.

Document 000's semi-supervised pipeline (see :mod:`sparsebench.graph.spreading`): [0, 1] scaling, PCA, a seeded
mask hiding ``mask_fraction`` of the labels, a k-NN graph, label spreading, accuracy on the hidden
labels (``acc_masked``) and on all points (``acc_all``).

Data: label propagation is transductive, so by default (``splits: all``) the train, validation and
test splits of the dataset are pooled (MNIST: 60 000 + 10 000 = 70 000 images, as in the
document). The dataset is loaded with ``standardize=false`` whatever ``dataset.standardize`` says,
so the pipeline sees raw features (MNIST pixels / 255, Digits' 0..16 counts) and scales them to
[0, 1] itself. ``n_samples`` keeps a seeded random subset of the pool (smoke tests). The trainer
group is composed but unused, except ``trainer.device`` (the ``brute`` backend runs on that device).

The run's ``seed`` seeds the label mask and, for ``kann_lpa``, randomised index construction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from sparsebench.config import DatasetConfig, MethodConfig, _check
from sparsebench.data import load_dataset
from sparsebench.core.errors import ConfigError
from sparsebench.graph.knn import GRAPH_BACKENDS
from sparsebench.graph.spreading import EDGE_WEIGHTS, PCA_SOLVERS, PROPAGATORS, LPASettings, run_lpa
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method


@dataclass
class LPAConfig(MethodConfig):
    """Keys shared by ``knn_lpa`` and ``kann_lpa``."""

    name: str = "knn_lpa"
    k: int = 10  # neighbours per point
    alpha: float = 0.99  # clamping factor
    mask_fraction: float = 0.9  # share of labels hidden (seeded by the run's seed)
    scale: bool = True  # min-max scale the features to [0, 1]
    pca_components: Optional[int] = 50  # null: no PCA
    pca_solver: str = "covariance"  # covariance (exact, d x d eigh) | randomized (torch.pca_lowrank) | sklearn
    splits: str = "all"  # all: pool train/val/test (MNIST: 70 000) | train: the training split only
    n_samples: Optional[int] = None  # seeded random subset of the pooled data
    backend: str = "brute"
    solver: str = "cg"  # cg: conjugate gradients on (I - alpha S) F = (1 - alpha) Y | iterate: the document's loop
    max_iter: int = 1000  # iteration cap (both solvers)
    tol: float = 1e-3  # iterate: early stopping when max|F_t+1 - F_t| < tol (0: run max_iter iterations)
    cg_rtol: float = 1e-4  # cg: relative residual target
    weighting: str = "binary"  # binary (the document) | heat (exp(-d^2 / sigma_i sigma_j), local bandwidth)
    heat_neighbor: int = 7  # heat: sigma_i = distance to this neighbour (Zelnik-Manor & Perona 2004)
    block_size: Optional[int] = None  # brute: query rows per matmul block (null: keep a block within 128 MiB)
    num_threads: Optional[int] = None  # faiss / numba / torch threads (null: library defaults)
    log_iterations: bool = True  # write the per-iteration residual to metrics.csv

    def __post_init__(self):
        _check(self.k >= 1, "method.k", self.k, "must be >= 1")
        _check(0.0 < self.alpha < 1.0, "method.alpha", self.alpha, "the clamping factor must be in (0, 1)")
        _check(0.0 < self.mask_fraction < 1.0, "method.mask_fraction", self.mask_fraction,
               "the masked fraction must be in (0, 1)")
        _check(self.pca_components is None or self.pca_components >= 1, "method.pca_components",
               self.pca_components, "must be >= 1 or null")
        _check(self.pca_solver in PCA_SOLVERS, "method.pca_solver", self.pca_solver,
               f"unknown (allowed: {', '.join(PCA_SOLVERS.names())})")
        _check(self.splits in ("all", "train"), "method.splits", self.splits, "unknown (allowed: all, train)")
        _check(self.n_samples is None or self.n_samples >= 2, "method.n_samples", self.n_samples, "must be >= 2 or null")
        _check(self.solver in PROPAGATORS, "method.solver", self.solver,
               f"unknown (allowed: {', '.join(PROPAGATORS.names())})")
        _check(self.max_iter >= 1, "method.max_iter", self.max_iter, "must be >= 1")
        _check(self.tol >= 0, "method.tol", self.tol, "must be >= 0 (0 disables early stopping)")
        _check(self.cg_rtol > 0, "method.cg_rtol", self.cg_rtol, "must be > 0")
        _check(self.weighting in EDGE_WEIGHTS, "method.weighting", self.weighting,
               f"unknown (allowed: {', '.join(EDGE_WEIGHTS.names())})")
        _check(self.heat_neighbor >= 1, "method.heat_neighbor", self.heat_neighbor, "must be >= 1")
        _check(self.block_size is None or self.block_size >= 1, "method.block_size", self.block_size, "must be >= 1 or null")
        _check(self.backend in GRAPH_BACKENDS, "method.backend", self.backend,
               f"unknown (allowed: {', '.join(GRAPH_BACKENDS.names())})")
        exact = [b for b in GRAPH_BACKENDS.names() if GRAPH_BACKENDS.get(b).exact]
        approx = [b for b in GRAPH_BACKENDS.names() if not GRAPH_BACKENDS.get(b).exact]
        if self.name == "knn_lpa":
            _check(self.backend in exact, "method.backend", self.backend,
                   f"knn_lpa needs an exact backend ({', '.join(exact)}); use method=kann_lpa for {', '.join(approx)}")
        elif self.name == "kann_lpa":
            _check(self.backend in approx, "method.backend", self.backend,
                   f"kann_lpa needs an approximate backend ({', '.join(approx)}); use method=knn_lpa for "
                   f"{', '.join(exact)}")

    def backend_params(self) -> dict:
        return {"block_size": self.block_size, "num_threads": self.num_threads}


@dataclass
class KnnLPAConfig(LPAConfig):
    """``knn_lpa``: exact k-NN graph (``brute`` torch matmul top-k, or ``faiss`` flat)."""

    name: str = "knn_lpa"
    backend: str = "brute"


@dataclass
class KannLPAConfig(LPAConfig):
    """``kann_lpa``: approximate k-NN graph (``pynndescent``, ``faiss_hnsw``, ``faiss_ivf``) and its recall@k."""

    name: str = "kann_lpa"
    backend: str = "pynndescent"
    recall_sample: int = 2000  # recall@k vs exact search estimated on this many seeded points (0: skip)
    n_trees: Optional[int] = None  # pynndescent: random-projection trees for the initial graph (null: default)
    n_iters: Optional[int] = None  # pynndescent: NN-descent iterations (null: default)
    deterministic: bool = False  # pynndescent: random_state=seed (reproducible, single-threaded, slower)
    nlist: Optional[int] = None  # faiss_ivf: k-means cells (null: 4 sqrt(n))
    nprobe: int = 8  # faiss_ivf: cells searched per query
    hnsw_m: int = 32  # faiss_hnsw: links per node
    ef_construction: int = 64  # faiss_hnsw
    ef_search: int = 64  # faiss_hnsw

    def __post_init__(self):
        super().__post_init__()
        _check(self.recall_sample >= 0, "method.recall_sample", self.recall_sample, "must be >= 0")
        for key in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            _check(getattr(self, key) >= 1, f"method.{key}", getattr(self, key), "must be >= 1")

    def backend_params(self) -> dict:
        return {**super().backend_params(), "n_trees": self.n_trees, "n_iters": self.n_iters,
                "deterministic": self.deterministic, "nlist": self.nlist, "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}


def load_pool(dataset_cfg, seed: int, splits: str = "all", n_samples: Optional[int] = None):
    """Features ``(n, d)`` float32 (images flattened, unstandardised) and labels ``(n,)`` int64 of the
    pooled splits, plus the number of classes. ``n_samples`` keeps a seeded random subset."""
    fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    raw = OmegaConf.to_container(dataset_cfg, resolve=True) if not isinstance(dataset_cfg, dict) else dict(dataset_cfg)
    ds = DatasetConfig(**{k: v for k, v in raw.items() if k in fields})
    ds = dataclasses.replace(ds, standardize=False, pad_to=None, train_subset=None, test_subset=None,
                             val_fraction=0.0 if splits == "all" else ds.val_fraction)
    bundle = load_dataset(ds, seed=seed)
    parts = [bundle.train, bundle.val, bundle.test] if splits == "all" else [bundle.train]
    x = torch.cat([p.x.reshape(len(p), -1) for p in parts if len(p)]).numpy()
    y = torch.cat([p.y for p in parts if len(p)]).numpy().astype(np.int64)
    if n_samples and n_samples < len(y):
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:n_samples])
        x, y = x[keep], y[keep]
    return np.ascontiguousarray(x, dtype=np.float32), y, int(bundle.num_classes)


class _LPAMethod(Method):
    """Shared run(): one summary row with timings, iterations, accuracies and recall@k."""

    def settings(self) -> LPASettings:
        c = self.cfg
        params = {k: v for k, v in c.backend_params().items() if v is not None}
        if c.backend == "brute":
            params["device"] = self.ctx.device
        return LPASettings(k=c.k, alpha=c.alpha, mask_fraction=c.mask_fraction, scale=c.scale,
                           pca_components=c.pca_components, pca_solver=c.pca_solver, backend=c.backend,
                           solver=c.solver, max_iter=c.max_iter, tol=c.tol, cg_rtol=c.cg_rtol,
                           weighting=c.weighting, heat_neighbor=c.heat_neighbor,
                           recall_sample=int(getattr(c, "recall_sample", 0)), backend_params=params)

    def run(self) -> pd.DataFrame:
        c = self.cfg
        # the validated method node is a DictConfig; rebuild the dataclass for its helper methods
        schema = METHODS.schema(c.name)
        self.cfg = schema(**OmegaConf.to_container(c, resolve=True))
        c = self.cfg
        if c.num_threads:
            torch.set_num_threads(int(c.num_threads))
        seed = int(self.ctx.cfg.seed)
        x, y, C = load_pool(self.ctx.cfg.dataset, seed, c.splits, c.n_samples)
        if c.pca_components and c.pca_components > min(x.shape):
            raise ConfigError(f"method.pca_components={c.pca_components}: must be <= {min(x.shape)} "
                              f"(min of samples and features of {self.ctx.cfg.dataset.name})")
        log = (lambda it, r: self.ctx.metrics.log(it, {"residual": r})) if c.log_iterations else None
        out = run_lpa(x, y, self.settings(), seed=seed, num_classes=C, callback=log)
        return pd.DataFrame([self.row(backend=c.backend, k=c.k, alpha=c.alpha, mask_fraction=c.mask_fraction,
                                      pca_components=c.pca_components or 0, solver=c.solver, tol=c.tol,
                                      weighting=c.weighting, **out)])


@METHODS.register("knn_lpa", schema=KnnLPAConfig)
class KnnLPA(_LPAMethod):
    """Label spreading on an exact k-NN graph (document 000's brute-force baseline)."""


@METHODS.register("kann_lpa", schema=KannLPAConfig)
class KannLPA(_LPAMethod):
    """Label spreading on an approximate k-NN graph (document 000: NN-descent via pynndescent)."""
