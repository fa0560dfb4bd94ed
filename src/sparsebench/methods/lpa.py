"""``method=knn_lpa`` / ``method=kann_lpa``: label spreading on an exact / approximate k-NN graph.

Document 000's semi-supervised pipeline: a seeded mask hiding ``mask_fraction`` of the labels, then
:class:`sparsebench.graph.estimator.LabelSpreading` ([0, 1] scaling, PCA, a k-NN graph, label
spreading; the one owner of the pipeline), accuracy on the hidden labels (``acc_masked``) and on all
points (``acc_all``). :class:`LPAConfig` is the one settings object: :meth:`LPAConfig.estimator`
builds the estimator from it by the estimator's own parameter names (two config keys keep the
document's names, :data:`CONFIG_KEYS`), and the estimator validates those parameters.

Data: label propagation is transductive, so by default (``splits: all``) the train, validation and
test splits of the dataset are pooled (MNIST: 60 000 + 10 000 = 70 000 images, as in the
document). The dataset is loaded with ``standardize=false`` whatever ``dataset.standardize`` says,
so the pipeline sees raw features (MNIST pixels / 255, Digits' 0..16 counts) and scales them to
[0, 1] itself. ``n_samples`` keeps a seeded random subset of the pool (smoke tests). The trainer
group is composed but unused, except ``trainer.device`` (the ``brute`` backend runs on that device)
and ``trainer.progress`` (the stage report of :class:`~sparsebench.graph.estimator.LabelSpreading`).

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

from sparsebench.config import DatasetConfig, MethodConfig, check
from sparsebench.core.errors import ConfigError
from sparsebench.data import load_dataset
from sparsebench.graph.backends import backend_names
from sparsebench.graph.estimator import LabelSpreading, warmup_pipeline
from sparsebench.graph.knn import check_k, sampled_recall
from sparsebench.graph.spreading import mask_labels
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method

#: estimator parameter -> config key, where the config keeps document 000's name
CONFIG_KEYS = {"n_neighbors": "k", "graph": "backend"}
#: estimator parameters supplied by the run, not by config keys
RUN_PARAMS = ("graph_params", "random_state", "callback", "progress")


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
    block_size: Optional[int] = None  # brute: query rows per block (null: 512-row x 4096-column tiles on CPU, 128 MiB on CUDA)
    num_threads: Optional[int] = None  # faiss / numba / torch threads (null: library defaults)
    log_iterations: bool = True  # write the per-iteration residual to metrics.csv

    def __post_init__(self):
        self.estimator().check_params({p: f"method.{CONFIG_KEYS.get(p, p)}" for p in LabelSpreading._get_param_names()})
        check(0.0 < self.mask_fraction < 1.0, "method.mask_fraction", self.mask_fraction,
               "the masked fraction must be in (0, 1)")
        check(self.splits in ("all", "train"), "method.splits", self.splits, "unknown (allowed: all, train)")
        check(self.n_samples is None or self.n_samples >= 2, "method.n_samples", self.n_samples, "must be >= 2 or null")
        check(self.block_size is None or self.block_size >= 1, "method.block_size", self.block_size, "must be >= 1 or null")
        exact, approx = backend_names(exact=True), backend_names(exact=False)
        if self.name == "knn_lpa":
            check(self.backend in exact, "method.backend", self.backend,
                   f"knn_lpa needs an exact backend ({', '.join(exact)}); use method=kann_lpa for {', '.join(approx)}")
        elif self.name == "kann_lpa":
            check(self.backend in approx, "method.backend", self.backend,
                   f"kann_lpa needs an approximate backend ({', '.join(approx)}); use method=knn_lpa for "
                   f"{', '.join(exact)}")

    def backend_params(self) -> dict:
        """Graph-backend parameters of this config (``LabelSpreading(graph_params=...)``)."""
        return {"block_size": self.block_size}

    def estimator(self, seed: int = 0, device=None, callback=None, progress=False) -> LabelSpreading:
        """The :class:`LabelSpreading` of this config: every estimator parameter read from the config key
        of the same name (or its :data:`CONFIG_KEYS` name); ``device`` goes to the ``brute`` backend,
        ``progress`` (the run's ``trainer.progress``) to the estimator's stage report."""
        params = {p: getattr(self, CONFIG_KEYS.get(p, p)) for p in LabelSpreading._get_param_names()
                  if p not in RUN_PARAMS}
        graph_params = {k: v for k, v in self.backend_params().items() if v is not None}
        if self.backend == "brute" and device is not None:
            graph_params["device"] = device
        return LabelSpreading(**params, graph_params=graph_params, random_state=seed, callback=callback,
                              progress=progress)


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
        check(self.recall_sample >= 0, "method.recall_sample", self.recall_sample, "must be >= 0")
        for key in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            check(getattr(self, key) >= 1, f"method.{key}", getattr(self, key), "must be >= 1")

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
    """Shared run(): mask, fit :meth:`LPAConfig.estimator`, one summary row with timings, iterations,
    accuracies and (approximate backends) recall@k."""

    def run(self) -> pd.DataFrame:
        # the validated method node is a DictConfig; rebuild the dataclass for its helper methods
        c = self.cfg = METHODS.schema(self.cfg.name)(**OmegaConf.to_container(self.cfg, resolve=True))
        seed = int(self.ctx.cfg.seed)
        x, y, C = load_pool(self.ctx.cfg.dataset, seed, c.splits, c.n_samples)
        if c.pca_components and c.pca_components > min(x.shape):
            raise ConfigError(f"method.pca_components={c.pca_components}: must be <= {min(x.shape)} "
                              f"(min of samples and features of {self.ctx.cfg.dataset.name})")
        check_k(c.k, len(y), key="method.k")
        labelled = mask_labels(y, c.mask_fraction, seed, C, key="method.mask_fraction")
        log = (lambda it, r: self.ctx.metrics.log(it, {"residual": r})) if c.log_iterations else None
        est = c.estimator(seed, device=self.ctx.device, callback=log, progress=self.ctx.cfg.trainer.progress)
        t_warm = warmup_pipeline(est)
        est.fit(x, np.where(labelled, y, -1))

        g, t = est.graph_, est.timings_
        recall = float("nan")
        if not g.exact and getattr(c, "recall_sample", 0):
            recall = sampled_recall(g, est.X_, sample=c.recall_sample, seed=seed)
        pred, hidden = est.transduction_, ~labelled
        out = {"n": len(y), "n_labelled": int(labelled.sum()), "features": int(est.X_.shape[1]),
               "pca_seconds": t["pca"], "graph_seconds": t["graph"], "propagation_seconds": t["propagation"],
               "solve_seconds": t["solve"], "total_seconds": t["total"], "warmup_seconds": t_warm,
               "iterations": est.n_iter_, "converged": est.converged_, "residual": est.residual_,
               "acc_masked": float((pred[hidden] == y[hidden]).mean()), "acc_all": float((pred == y).mean()),
               "recall": recall, "edges": est.n_edges_}
        return pd.DataFrame([self.row(backend=c.backend, k=c.k, alpha=c.alpha, mask_fraction=c.mask_fraction,
                                      pca_components=c.pca_components or 0, solver=c.solver, tol=c.tol,
                                      weighting=c.weighting, **out)])


@METHODS.register("knn_lpa", schema=KnnLPAConfig)
class KnnLPA(_LPAMethod):
    """Label spreading on an exact k-NN graph (document 000's brute-force baseline)."""


@METHODS.register("kann_lpa", schema=KannLPAConfig)
class KannLPA(_LPAMethod):
    """Label spreading on an approximate k-NN graph (document 000: NN-descent via pynndescent)."""
