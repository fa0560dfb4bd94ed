"""Dynamic sparse training from scratch: the drop/grow topology update and its grow criteria.

A network starts from random ER/ERK masks (:mod:`sparsebench.sparsity.distributions`) and trains sparse. Every
``ΔT`` steps until ``T_end`` the :class:`DSTUpdater` callback, per updated layer,

1. drops the ``n = round(d(t) * active)`` active weights with the smallest ``|w|``,
2. grows ``n`` positions chosen by a :class:`GrowStrategy` among positions that were *inactive
   before the update* (``allow_regrow=True``: inactive after the drop, as RigL's reference code),
3. writes the new mask into the :class:`~sparsebench.sparsity.masking.Masking` buffers, zeroes the grown
   (and dropped) weights and their optimizer state (momentum, Adam moments).

Each layer's active count is therefore exactly constant (``n`` capped at the number of growable
positions). The update runs in ``on_step_end`` (after the optimizer step of step ``t``), using
what ``on_after_backward`` saw at that step: the dense weight gradient (RigL) or the captured layer
inputs and output gradients (faiss_grow). Masking masks gradients in the optimizer's *pre-step*
hook, so ``weight.grad`` is still dense in ``on_after_backward`` (``tests/test_dst.py`` checks it).

Drop-fraction schedules (:data:`DROP_SCHEDULES`): ``constant`` ``d(t) = d0`` and ``cosine``
``d(t) = d0/2 * (1 + cos(pi t / T_end))`` (Evci et al. 2020, RigL, eq. 1).

Grow criteria (:data:`GROWTH`):

* ``set``: uniformly random among growable positions (Mocanu et al. 2018, SET).
* ``rigl``: largest ``|dL/dW|`` of the dense gradient (Evci et al. 2020, RigL).
* ``faiss_grow``: the method of thesis 001 (chapter 3): ``dL/dW_ji = sum_b dL/dz_bj * x_bi`` is the
  inner product of the per-batch vector of output gradients ``g_j`` (length B) and of inputs
  ``u_i`` (length B), so the largest ``|dL/dW|`` are the most similar pairs of two vector groups.
  An index holds the ``a = n_out`` gradient vectors; every input vector queries its
  ``k = ceil(k_similar * a)`` most similar ones; the per-query results are merged and the top ``n``
  (the thesis' ``K * c``) growable pairs are grown (Figure 3.1). Metrics (:data:`METRICS`):
  ``abs_ip`` (|inner product|; searched with ``q`` and ``-q``, since faiss' inner product is
  signed), ``l2`` (smallest Euclidean distance), ``lsh`` (faiss ``IndexLSH``, ``nbits = bits * B``,
  hamming distance of random-rotation sign codes, approximating the angle; searched with ``q``
  and ``-q``). Searches (:data:`SEARCHES`): ``brute`` (exact score matrix in torch, global top-n)
  and ``faiss`` (``IndexFlatIP`` / ``IndexFlatL2`` / ``IndexLSH``). With ``abs_ip`` the brute-force
  score matrix ``|G^T U|`` is exactly ``|dL/dW|``, which autograd has already computed as
  ``weight.grad``, so that configuration reads it (as RigL does) instead of capturing vectors and
  multiplying them again; the sets are the same (tested).

  Convolutions: ``dL/dW[o, c, kh, kw] = sum_{b, p} dL/dz[b, o, p] * patch[b, p, (c, kh, kw)]``, so
  the input is unfolded (``F.unfold`` with the layer's kernel, stride, padding, dilation) and every
  (sample, output position) pair becomes one coordinate of the vectors: ``u_i`` and ``g_o`` have
  length ``B * H_out * W_out`` and the search is the same as for a linear layer
  (``method.max_rows`` optionally subsamples these coordinates, e.g. for LSH on large maps).

Update cost: on CPU the per-layer selection and mask edits run in numpy on views of the tensors
(:func:`host_view`; torch's per-call dispatch dominates these small steps), selections are exact
top-n by a threshold carried from the previous update (:func:`topk_indices`), and nothing scans
the dense weight more than once. On CUDA the same code runs on the tensors.

At every update the recall of the chosen set against the exact top-n of the reference score
(|dense gradient| for ``abs_ip``/``lsh``, L2 similarity for ``l2``) is logged (tie-aware: a chosen
position counts when its exact score reaches the n-th largest), and the update time is kept apart
from the step time (the recall computation is excluded from it).

``dst_masked`` (Liu et al. 2020, "Dynamic sparse training: find efficient sparse network from
scratch with trainable masked layers") lives here too: :class:`ThresholdMask` is a
``torch.nn.utils.parametrize`` parametrization ``W -> W * S(|W| - t)`` with a trainable threshold
per output neuron and the long-tailed straight-through estimator :class:`StepLTE`.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.core.errors import ConfigError
from sparsebench.core.io import MetricsLog
from sparsebench.sparsity.masking import Masking
from sparsebench.core.registry import Registry
from sparsebench.training.trainer import Callback

DROP_SCHEDULES: Registry = Registry("method.schedule")
GROWTH: Registry = Registry("method.grow")
METRICS: Registry = Registry("method.metric")
SEARCHES: Registry = Registry("method.search")

_NEG_INF = -float("inf")


# =========================================================================== drop-fraction schedules
class DropSchedule:
    """Fraction ``d(t)`` of each layer's active weights replaced at step ``t`` (steps done).

    Args:
        d0: initial drop fraction in [0, 1).
        t_end: last step (in steps) at which the topology is updated; ``d(t) = 0`` after it.
    """

    def __init__(self, d0: float, t_end: int):
        self.d0, self.t_end = float(d0), max(1, int(t_end))

    def __call__(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@DROP_SCHEDULES.register("constant")
class ConstantDrop(DropSchedule):
    """``d(t) = d0`` for ``t <= T_end`` (SET; the thesis' K)."""

    def __call__(self, t: int) -> float:
        return self.d0 if t <= self.t_end else 0.0


@DROP_SCHEDULES.register("cosine")
class CosineDrop(DropSchedule):
    """``d(t) = d0/2 * (1 + cos(pi t / T_end))`` for ``t <= T_end`` (RigL, Evci et al. 2020, eq. 1)."""

    def __call__(self, t: int) -> float:
        if t > self.t_end:
            return 0.0
        return 0.5 * self.d0 * (1.0 + math.cos(math.pi * t / self.t_end))


# =========================================================================== helpers
def random_growable(mask_flat: torch.Tensor, n: int, generator: torch.Generator,
                    exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n`` distinct flat positions drawn uniformly among those with ``mask_flat == 0`` and not in
    ``exclude`` (long tensor). Returns a long tensor of length ``n`` (fewer only if fewer exist).

    Rejection sampling (O(n)) while at least a quarter of the positions is growable, else a
    permutation of all growable positions.
    """
    dev = mask_flat.device
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    numel = mask_flat.numel()
    free = numel - int(mask_flat.count_nonzero())
    if free >= numel // 4 and free >= 4 * n:
        got = torch.empty(0, dtype=torch.long, device=dev)
        for _ in range(16):
            draw = torch.randint(0, numel, (2 * (n - got.numel()) + 32,), generator=generator).to(dev)
            draw = draw[mask_flat[draw] == 0]
            if exclude is not None and exclude.numel():
                draw = draw[~torch.isin(draw, exclude)]
            uniq = torch.unique(torch.cat([got, draw]))
            if uniq.numel() >= n:
                perm = torch.randperm(uniq.numel(), generator=generator).to(dev)
                return uniq[perm[:n]]
            got = uniq
    cand = (mask_flat == 0).nonzero().squeeze(1)
    if exclude is not None and exclude.numel():
        cand = cand[~torch.isin(cand, exclude)]
    perm = torch.randperm(cand.numel(), generator=generator).to(dev)
    return cand[perm[:n]]


_SAMPLES: Dict[Tuple[int, int, str], torch.Tensor] = {}


def _sample_positions(N: int, size: int, device: torch.device) -> torch.Tensor:
    """A fixed random sample (with replacement) of ``size`` positions in ``[0, N)``, drawn once per
    ``(N, size, device)`` from a generator seeded by ``(N, size)`` alone (the same sample in every
    process, whatever was drawn before: a resumed run selects exactly like an uninterrupted one):
    the scores change between calls, so a fixed sample stays a random one."""
    key = (N, size, str(device))
    idx = _SAMPLES.get(key)
    if idx is None:
        gen = torch.Generator().manual_seed(20200701 + 1_000_003 * N + size)
        idx = _SAMPLES[key] = torch.randint(0, N, (size,), generator=gen).to(device)
    return idx


def host_view(t: torch.Tensor):
    """A numpy view of a CPU tensor (shares its memory), else the tensor itself (CUDA, or a dtype
    numpy lacks such as bfloat16). On CPU numpy's indexing, comparisons and selection cost a fraction
    of torch's per call (dispatch), which dominates the small per-layer steps of a topology update;
    the update code indexes both kinds with the same syntax."""
    if t.device.type == "cpu":
        try:
            return t.detach().numpy()
        except TypeError:
            return t
    return t


def _select_np(arr: np.ndarray, cand: Optional[np.ndarray], n: int, largest: bool, margin: float,
               vals: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float]:
    """Exact top-n of ``arr`` among positions ``cand`` (all if None; at least ``n``; ``vals``: their
    scores if already extracted) and the score at rank ``margin * n`` among them (the next call's
    threshold)."""
    if vals is None:
        vals = arr if cand is None else arr[cand]
    c = vals.size
    r = min(c, int(math.ceil(margin * n)) + 8)
    if largest:
        part = np.argpartition(vals, (c - r, c - n))
        sel, t = part[c - n:], float(vals[part[c - r]])
    else:
        part = np.argpartition(vals, (n - 1, r - 1))
        sel, t = part[:n], float(vals[part[r - 1]])
    return (sel if cand is None else cand[sel]), t


def _beyond(arr: np.ndarray, t: float, largest: bool,
            exclude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Positions beyond ``t`` and not excluded, and their scores."""
    cand = np.flatnonzero(arr >= t if largest else arr <= t)
    if exclude is not None:
        cand = cand[exclude[cand] == 0]
    return cand, arr[cand]


def _topk_np(arr: np.ndarray, n: int, largest: bool, sample: int, hint: Optional[Dict[str, float]],
             exclude: Optional[np.ndarray]) -> np.ndarray:
    N = arr.size
    margin = hint.get("m", 1.25) if hint is not None else 1.25
    t = hint.get("t") if hint is not None else None
    if t is not None:
        for _ in range(3):
            cand, vals = _beyond(arr, t, largest, exclude)
            if cand.size >= n:
                sel, hint["t"] = _select_np(arr, cand, n, largest, margin, vals)
                hint["m"] = max(1.25, 0.95 * margin)
                return sel
            margin = hint["m"] = min(4.0, 1.5 * margin)
            if not t > 0:  # relax a positive threshold (|w|, |g|: the scale moves between batches) by 2x
                break
            t = 0.5 * t if largest else 2.0 * t
    got = None
    if N >= 16384 and n <= N // 16:
        pos = host_view(_sample_positions(N, min(sample, N // 8), torch.device("cpu")))
        sub = arr[pos] if exclude is None else arr[pos[exclude[pos] == 0]]
        size = sub.size
        if size:
            p = n / N
            frac = min(1.0, 1.2 * p + 4.0 * math.sqrt(p * (1 - p) / size) + 2.0 / size)  # quantile + 4 std margin
            k = max(1, min(size, int(frac * size)))
            t = float(np.partition(sub, size - k)[size - k] if largest else np.partition(sub, k - 1)[k - 1])
            cand, vals = _beyond(arr, t, largest, exclude)
            if cand.size >= n:
                got = _select_np(arr, cand, n, largest, margin, vals)
    if got is None:  # small array or the estimate failed: select among all (not excluded) positions
        cand = None
        if exclude is not None:
            cand = np.flatnonzero(exclude == 0)
            if cand.size < n:
                raise ValueError(f"topk_indices: {n} positions requested, {cand.size} not excluded")
        got = _select_np(arr, cand, n, largest, margin)
    if hint is not None:
        hint["t"] = got[1]
    return got[0]


def topk_indices(scores, n: int, largest: bool = True, sample: int = 8192,
                 hint: Optional[Dict[str, float]] = None, exclude=None):
    """Indices of the ``n`` largest (smallest) entries of a 1-D ``scores``, skipping positions where
    ``exclude`` (same shape, 0/1) is non-zero: exact, like ``torch.topk`` (the same set up to ties;
    the order is unspecified). ``scores`` is a tensor or a numpy array; the result is of the same
    kind (long / int64).

    For large arrays and small ``n`` a threshold is estimated, every entry beyond it is kept as a
    candidate (one vectorised comparison) and the exact top-n is taken among the candidates. Since
    all candidates lie beyond the threshold and there are at least ``n`` of them (else the threshold
    is estimated afresh, and a full selection is the last resort), the true top-n are among them.
    The threshold is the ``1.2 n / N`` quantile (plus four standard errors) of a fixed random sample
    of ``min(sample, N // 8)`` entries or, on CPU with a ``hint`` dict (one per call site, e.g. per
    layer: ΔT=1 updates barely move the score distribution), the score at rank ``m * n`` of the
    previous call, where the margin ``m`` (from 1.25 to 4) grows by half after a hint that let fewer
    than ``n`` entries pass (per-batch gradients change scale; a positive threshold is then relaxed
    by 2x, twice at most, before the sample is used) and shrinks by 5% after one that worked.
    On CPU the selection runs in numpy on a view of the tensor (:func:`host_view`): about 10x faster
    than ``torch.topk`` for 235k scores and n = 1%.

    Raises:
        ValueError: fewer than ``n`` positions are not excluded.
    """
    if isinstance(scores, np.ndarray):
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        return _topk_np(scores, n, largest, sample, hint, None if exclude is None else np.asarray(exclude))
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    arr = host_view(scores)
    if isinstance(arr, np.ndarray):
        ex = None if exclude is None else host_view(exclude)
        if ex is None or isinstance(ex, np.ndarray):
            return torch.from_numpy(_topk_np(arr, n, largest, sample, hint, ex))
    if exclude is not None:
        bad = exclude.to(torch.bool)
        if int((~bad).sum()) < n:
            raise ValueError(f"topk_indices: {n} positions requested, fewer are not excluded")
        scores = scores.masked_fill(bad, _NEG_INF if largest else float("inf"))
    N = scores.numel()
    if N < 16384 or n > N // 16:
        return torch.topk(scores, n, largest=largest, sorted=False).indices
    size = min(sample, N // 8)
    sub = scores.index_select(0, _sample_positions(N, size, scores.device))
    p = n / N
    frac = min(1.0, 1.2 * p + 4.0 * math.sqrt(p * (1 - p) / size) + 2.0 / size)  # quantile + 4 std margin
    k = max(1, int(frac * size))
    t = torch.topk(sub, k, largest=largest, sorted=False).values
    t = float(t.min() if largest else t.max())
    cand = (scores >= t if largest else scores <= t).nonzero().squeeze(1)
    if cand.numel() < n or cand.numel() > N // 2:
        return torch.topk(scores, n, largest=largest, sorted=False).indices
    return cand[torch.topk(scores.index_select(0, cand), n, largest=largest, sorted=False).indices]


def reset_state_at(optimizer: torch.optim.Optimizer, param: nn.Parameter, *flat_idx) -> None:
    """Zero every per-parameter optimizer buffer of ``param`` (SGD momentum, Adam moments) at the
    flat positions ``flat_idx`` (long tensors or int64 arrays; index form of
    :meth:`Masking.reset_optimizer_state`, O(n))."""
    state = optimizer.state.get(param, {})
    for v in state.values():
        if torch.is_tensor(v) and v.shape == param.shape:
            buf = host_view(v.view(-1))
            for idx in flat_idx:
                buf[idx] = 0


def layer_vectors(module: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-batch vectors of a layer: inputs ``U`` ``(R, n_in)`` and output gradients ``G`` ``(R, n_out)``
    with ``G.T @ U == dL/dW`` reshaped to ``(n_out, n_in)`` (the weight's ``view(n_out, -1)``).

    Linear: ``R = B`` (leading dims flattened). Conv2d: the input is unfolded with the layer's
    kernel size, dilation, padding and stride, ``R = B * H_out * W_out`` and
    ``n_in = C_in * kh * kw`` in the weight's ``(c, kh, kw)`` order.

    Raises:
        ConfigError: a grouped or non-2-D convolution (not supported by the unfold path).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]), gout.reshape(-1, gout.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise ConfigError(f"method.update_layers: faiss_grow cannot unfold grouped/'same'-padded conv {module}")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        u = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * P, C*kh*kw)
        g = gout.flatten(2).transpose(1, 2).reshape(-1, gout.shape[1])  # (B * P, O)
        return u, g
    raise ConfigError(f"method.update_layers: faiss_grow supports Linear and Conv2d layers, not {type(module).__name__}")


# =========================================================================== similarity metrics
class SimilarityMetric:
    """Similarity between gradient vectors ``g_j`` and input vectors ``u_i`` (higher = grow first).

    ``signs``: query signs used with faiss (``(1, -1)`` turns a signed inner product into |.|).
    """

    signs: Tuple[int, ...] = (1,)

    def exact(self, G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """``(n_out, n_in)`` exact similarity of every pair (brute force)."""
        raise NotImplementedError

    def reference(self, G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """The exact score approximate search is judged against (recall)."""
        return self.exact(G, U)

    def index(self, dim: int):
        """A fresh faiss index for ``dim``-dimensional vectors."""
        raise NotImplementedError

    def from_faiss(self, D: np.ndarray) -> np.ndarray:
        """Turn faiss' returned distances/scores into similarities (higher = better)."""
        return D


@METRICS.register("abs_ip")
class AbsInnerProduct(SimilarityMetric):
    """``|<g_j, u_i>| = |dL/dW_ji|``; faiss ``IndexFlatIP`` searched with ``q`` and ``-q``."""

    signs = (1, -1)

    def exact(self, G, U):
        return (G.t() @ U).abs_()

    def index(self, dim):
        import faiss

        return faiss.IndexFlatIP(dim)


@METRICS.register("l2")
class L2Similarity(SimilarityMetric):
    """``-||g_j - u_i||^2`` (thesis Table 3.2); faiss ``IndexFlatL2``."""

    def exact(self, G, U):
        g2 = (G * G).sum(0)[:, None]
        u2 = (U * U).sum(0)[None, :]
        return (G.t() @ U).mul_(2).sub_(g2).sub_(u2)

    def index(self, dim):
        import faiss

        return faiss.IndexFlatL2(dim)

    def from_faiss(self, D):
        return -D


@METRICS.register("lsh")
class LSHSimilarity(SimilarityMetric):
    """faiss ``IndexLSH(d, nbits = bits * d, rotate_data=True)``: hamming distance of sign codes after a
    random rotation (approximates the angle between vectors), searched with ``q`` and ``-q``;
    judged against the exact ``|inner product|``. No brute-force form (use ``metric=abs_ip``).

    Raises:
        ConfigError: the rotation matrix would exceed ``max_rotation_gib`` (set ``method.max_rows``).
    """

    signs = (1, -1)
    max_rotation_gib = 2.0

    def __init__(self, bits: float = 1.0):
        self.bits = float(bits)

    def exact(self, G, U):  # the hash-free reference
        return (G.t() @ U).abs_()

    def index(self, dim):
        import faiss

        nbits = max(1, int(round(self.bits * dim)))
        gib = dim * nbits * 4 / 2**30
        if gib > self.max_rotation_gib:
            raise ConfigError(f"method.bits={self.bits}: the LSH rotation for vectors of dimension {dim} would need "
                              f"{gib:.1f} GiB; set method.max_rows (subsample of batch x positions) or lower bits")
        return faiss.IndexLSH(dim, nbits, True, False)

    def from_faiss(self, D):
        return -D


# =========================================================================== searches
@dataclass
class SearchResult:
    """Chosen flat positions and bookkeeping of one layer's grow search."""

    chosen: torch.Tensor
    random_fill: int = 0


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

    def __init__(self, metric: SimilarityMetric, k_similar: float = 0.15, rerank: bool = False):
        self.metric, self.k_similar, self.rerank = metric, float(k_similar), bool(rerank)

    def find(self, key: str, G: torch.Tensor, U: torch.Tensor, mask_flat: torch.Tensor, n: int) -> torch.Tensor:
        """Flat positions (``j * n_in + i``) of up to ``n`` growable (``mask_flat == 0``) pairs (a set, in
        no particular order)."""
        raise NotImplementedError


@SEARCHES.register("brute")
class BruteForceSearch(Search):
    """Exact: the full ``(n_out, n_in)`` similarity matrix in torch, global top-n (Figure 3.1, right)."""

    def find(self, key, G, U, mask_flat, n):
        if isinstance(self.metric, LSHSimilarity):
            raise ConfigError("method.search=brute: metric=lsh is an approximate faiss index; use search=faiss "
                              "(or metric=abs_ip for the exact search)")
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


# =========================================================================== grow strategies
@dataclass
class LayerUpdate:
    """What a grow strategy sees for one layer: ``mask_flat == 0`` marks the growable positions (with
    ``allow_regrow`` the ones dropped in this update are already 0), ``n`` is how many to grow."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    mask_flat: torch.Tensor
    n: int


class GrowStrategy:
    """Chooses which positions to grow. ``needs_activations``: the updater captures layer inputs and
    output gradients at update steps (forward hooks); ``needs_gradients``: ``prepare`` reads the dense
    ``weight.grad`` in ``on_after_backward``."""

    needs_activations = False
    needs_gradients = False

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.stats: Dict[str, float] = {}
        self._hints: Dict[str, Dict[str, float]] = {}  # topk_indices thresholds per layer, if the strategy keeps any

    def prepare(self, updater: "DSTUpdater", names: Sequence[str]) -> None:
        """Called in ``on_after_backward`` of an update step (dense gradients are available)."""

    def grow(self, layer: LayerUpdate, updater: "DSTUpdater") -> torch.Tensor:
        """Exactly ``layer.n`` distinct growable flat positions (long tensor)."""
        raise NotImplementedError

    def release(self) -> None:
        """Free per-update buffers."""

    def state_dict(self) -> dict:
        """What a resumed run needs to choose exactly as an uninterrupted one: the generator state
        (random growth and fills) and, where kept, the selection thresholds (``hints``)."""
        return {"generator": self.generator.get_state(), "hints": copy.deepcopy(self._hints)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._hints = copy.deepcopy(state.get("hints", {}))


@GROWTH.register("set")
class RandomGrow(GrowStrategy):
    """SET (Mocanu et al. 2018): grow uniformly at random among growable positions."""

    def grow(self, layer, updater):
        return random_growable(layer.mask_flat, layer.n, self.generator)


@GROWTH.register("rigl")
class GradientGrow(GrowStrategy):
    """RigL (Evci et al. 2020): grow the largest ``|dL/dW|`` of the dense gradient of the update
    step's batch. PyTorch's ``weight.grad`` of a masked weight is already the dense gradient
    ``grad_out^T x`` (it is masked only in the optimizer pre-step hook), so it is read there and
    written into one reused score buffer per layer as ``|g|``; the selection skips the positions
    the mask marks active at update time (:func:`topk_indices` with ``exclude``), so with
    ``allow_regrow`` the positions dropped in the same update compete again. Nothing else is computed."""

    needs_gradients = True

    def __init__(self, generator):
        super().__init__(generator)
        self._scores: Dict[str, torch.Tensor] = {}

    def prepare(self, updater, names):
        for name in names:
            g = updater.masking.weight(name).grad
            if g is None:
                continue
            buf = self._scores.get(name)
            if buf is None or buf.shape != g.shape:
                buf = self._scores[name] = torch.empty_like(g)
            torch.abs(g, out=buf)

    def grow(self, layer, updater):
        s = self._scores.get(layer.name)
        if s is None:  # no gradient reached this layer: fall back to random
            self.stats["random_fill"] = self.stats.get("random_fill", 0) + layer.n
            return random_growable(layer.mask_flat, layer.n, self.generator)
        return topk_indices(s.view(-1), layer.n, hint=self._hints.setdefault(layer.name, {}), exclude=layer.mask_flat)


@GROWTH.register("faiss_grow")
class SimilarityGrow(GrowStrategy):
    """Thesis 001, chapter 3: grow the pairs with the largest similarity between per-batch output
    gradient vectors and input vectors (see the module docstring).

    Args:
        metric: a :data:`METRICS` name; ``bits`` is passed to ``lsh``.
        search: a :data:`SEARCHES` name.
        k_similar: fraction of the indexed vectors returned per query.
        max_rows: subsample the vectors' coordinates (batch x positions) to at most this many.
        log_recall: compute the recall against the exact reference top-n at each update.

    ``search=brute`` with ``metric=abs_ip`` (and no ``max_rows``) is the exact search over the
    full ``(n_out, n_in)`` matrix ``|G^T U|``, and that matrix *is* ``|dL/dW|``: autograd's backward
    of a Linear layer computes ``weight.grad = G^T U`` (of a Conv2d, the same sum over the unfolded
    patches). So this configuration reads the dense ``weight.grad`` like RigL (no activation capture,
    no unfold, no second matmul) and returns the same set as scoring captured vectors
    (``tests/test_dst.py`` checks it on a Linear and a Conv2d); its recall is 1 by construction.
    """

    needs_activations = True

    def __init__(self, generator, metric: str = "abs_ip", search: str = "faiss", k_similar: float = 0.15,
                 bits: float = 1.0, rerank: bool = False, max_rows: Optional[int] = None, log_recall: bool = True):
        super().__init__(generator)
        metric_cls = METRICS.get(metric)
        self.metric = metric_cls(bits) if metric_cls is LSHSimilarity else metric_cls()
        self.search = SEARCHES.get(search)(self.metric, k_similar, rerank)
        if isinstance(self.search, BruteForceSearch) and isinstance(self.metric, LSHSimilarity):
            raise ConfigError("method.search=brute: metric=lsh is an approximate faiss index; use search=faiss "
                              "(or metric=abs_ip for the exact search)")
        self.max_rows, self.log_recall = max_rows, bool(log_recall)
        self.from_gradient = (isinstance(self.search, BruteForceSearch) and type(self.metric) is AbsInnerProduct
                              and max_rows is None)
        self._exact: Optional[GradientGrow] = None
        if self.from_gradient:  # exact |G^T U| == |weight.grad| (see the class docstring)
            self.needs_activations, self.needs_gradients = False, True
            self._exact = GradientGrow(generator)

    def prepare(self, updater, names):
        if self._exact is not None:
            self._exact.prepare(updater, names)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._exact is not None:
            state["exact"] = self._exact.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self._exact is not None and "exact" in state:
            self._exact.load_state_dict(state["exact"])

    def grow(self, layer, updater):
        if self._exact is not None:
            self._exact.stats = self.stats
            filled = self.stats.get("random_fill", 0)
            chosen = self._exact.grow(layer, updater)
            if self.log_recall:  # exact by construction (except a random fill when no gradient reached the layer)
                hits = layer.n - (self.stats.get("random_fill", 0) - filled)
                self.stats["recall_hits"] = self.stats.get("recall_hits", 0) + hits
                self.stats["recall_n"] = self.stats.get("recall_n", 0) + layer.n
            return chosen
        x, gout = updater.capture.get(layer.name)
        if x is None or gout is None:
            self.stats["random_fill"] = self.stats.get("random_fill", 0) + layer.n
            return random_growable(layer.mask_flat, layer.n, self.generator)
        with torch.no_grad():
            U, G = layer_vectors(layer.module, x, gout)
            U, G = U.float(), G.float()
            Us, Gs = U, G
            if self.max_rows is not None and U.shape[0] > self.max_rows:
                rows = torch.randperm(U.shape[0], generator=self.generator)[:self.max_rows].to(U.device)
                Us, Gs = U[rows], G[rows]
            chosen = self.search.find(layer.name, Gs, Us, layer.mask_flat, layer.n)
            short = layer.n - chosen.numel()
            if short > 0:
                fill = random_growable(layer.mask_flat, short, self.generator, exclude=chosen)
                chosen = torch.cat([chosen, fill])
                self.stats["random_fill"] = self.stats.get("random_fill", 0) + short
            if self.log_recall:
                t = time.perf_counter()
                ref = self.metric.reference(G, U).reshape(-1).masked_fill_(layer.mask_flat != 0, _NEG_INF)
                kth = torch.topk(ref, layer.n, sorted=False).values.min()
                hit = int((ref[chosen] >= kth).sum())
                self.stats["recall_hits"] = self.stats.get("recall_hits", 0) + hit
                self.stats["recall_n"] = self.stats.get("recall_n", 0) + layer.n
                updater.exclude_time(time.perf_counter() - t)
        return chosen


# =========================================================================== activation capture
class ActivationCapture:
    """Forward hooks that keep, for one training step, each watched layer's input ``x`` and the
    gradient of its output ``dL/dz`` (a tensor hook). Armed only for update steps, removed after."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.inputs: Dict[str, torch.Tensor] = {}
        self.grads: Dict[str, torch.Tensor] = {}
        self._handles: List = []

    def arm(self) -> None:
        if self._handles:
            return
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(mod, inputs, out):
            if not (mod.training and torch.is_grad_enabled() and out.requires_grad):
                return
            self.inputs[name] = inputs[0].detach()

            def keep(g, name=name):
                self.grads[name] = g.detach()

            out.register_hook(keep)

        return hook

    def get(self, name: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.inputs.get(name), self.grads.get(name)

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.inputs.clear()
        self.grads.clear()


# =========================================================================== the updater
class DSTUpdater(Callback):
    """Drop/grow topology updates every ``delta_t`` steps until ``t_end`` (see module docstring).

    Args:
        masking: the run's masking (initial sparse masks already set).
        grow: the grow criterion.
        d0: initial drop fraction (RigL's alpha, the thesis' K) in [0, 1).
        schedule: a :data:`DROP_SCHEDULES` name.
        delta_t: update interval ΔT in steps (>= 1).
        t_end: fraction of the training steps after which the topology is frozen (RigL: 0.75).
        update_layers: fnmatch patterns of the prunable weights to update (others keep their mask).
        allow_regrow: let the weights dropped in this update be grown again (RigL's reference code);
            default False: grown positions were inactive before the update.
        metrics: optional long-format log (``dst/update_ms``, ``dst/recall``, ``dst/drop_fraction`` per update).

    Attributes:
        update_seconds: wall time of all updates (capture preparation + drop/grow), recall excluded.
        updates: number of topology updates done; ``changed``: positions grown in total.
    """

    def __init__(self, masking: Masking, grow: GrowStrategy, d0: float = 0.3, schedule: str = "cosine",
                 delta_t: int = 100, t_end: float = 0.75, update_layers: Sequence[str] = ("*",),
                 allow_regrow: bool = False, metrics: Optional[MetricsLog] = None, log_prefix: str = "dst/"):
        if not 0.0 <= d0 < 1.0:
            raise ConfigError(f"method.drop_fraction={d0!r}: must be in [0, 1)")
        if delta_t < 1:
            raise ConfigError(f"method.delta_t={delta_t!r}: must be >= 1")
        self.masking, self.grow_strategy = masking, grow
        self.d0, self.schedule_name, self.delta_t, self.t_end_fraction = float(d0), schedule, int(delta_t), float(t_end)
        DROP_SCHEDULES.get(schedule)  # validate early
        self.names = [n for n in masking.names if any(fnmatch.fnmatch(n, p) for p in update_layers)]
        if not self.names:
            raise ConfigError(f"method.update_layers={list(update_layers)!r}: matches no prunable layer "
                              f"(prunable: {', '.join(masking.names)})")
        self.allow_regrow = bool(allow_regrow)
        self.metrics, self.prefix = metrics, log_prefix
        self.capture = ActivationCapture({n: masking.module(n) for n in self.names}) if grow.needs_activations else None
        self.schedule: Optional[DropSchedule] = None
        self.t_end = 0
        self.active_idx: Dict[str, torch.Tensor] = {}
        self._drop_hints: Dict[str, Dict[str, float]] = {}  # topk_indices thresholds, per layer
        self.update_seconds = 0.0
        self._excluded = 0.0
        self.updates = 0
        self.changed = 0
        self.random_fill = 0
        self.last_recall: Optional[float] = None
        self._recall_hits = 0
        self._recall_n = 0
        self._pending = False

    # ------------------------------------------------------------------ schedule
    def is_update_step(self, step: int) -> bool:
        """Step ``step`` (0-based, the one in progress) ends with a topology update."""
        done = step + 1
        return done % self.delta_t == 0 and done <= self.t_end

    def exclude_time(self, seconds: float) -> None:
        """Diagnostics (recall) call this so their time is not counted as update time."""
        self._excluded += seconds

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer) -> None:
        self.t_end = max(1, int(round(self.t_end_fraction * trainer.total_steps)))
        self.schedule = DROP_SCHEDULES.get(self.schedule_name)(self.d0, self.t_end)
        for n in self.names:
            if not (self.masking.weight(n).is_contiguous() and self.masking.mask(n).is_contiguous()):
                raise ConfigError(f"trainer.channels_last: DST updates index weights flat and need contiguous "
                                  f"tensors ({n} is not); turn channels_last off for method=dst methods")
        self.active_idx = {n: self.masking.mask(n).reshape(-1).nonzero().squeeze(1) for n in self.names}
        self._arm(trainer.step)

    def on_resume(self, trainer) -> None:
        """After a checkpoint was loaded (:meth:`load_state_dict`): arm the capture for the next step."""
        self._arm(trainer.step)

    def state_dict(self) -> dict:
        """The topology bookkeeping a resumed run continues from (masks and weights are in the model's
        state): ``t_end``, each layer's active positions in their slot order, the drop thresholds,
        the grow strategy's state and the counters."""
        return {"t_end": self.t_end, "active_idx": {n: a.cpu().clone() for n, a in self.active_idx.items()},
                "drop_hints": copy.deepcopy(self._drop_hints), "grow": self.grow_strategy.state_dict(),
                "counters": {"updates": self.updates, "changed": self.changed, "update_seconds": self.update_seconds,
                             "random_fill": self.random_fill, "recall_hits": self._recall_hits,
                             "recall_n": self._recall_n}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.t_end = int(state["t_end"])
        self.schedule = DROP_SCHEDULES.get(self.schedule_name)(self.d0, self.t_end)
        self.active_idx = {n: a.to(self.masking.mask(n).device) for n, a in state["active_idx"].items()}
        self._drop_hints = copy.deepcopy(state["drop_hints"])
        self.grow_strategy.load_state_dict(state["grow"])
        c = state["counters"]
        self.updates, self.changed, self.update_seconds = int(c["updates"]), int(c["changed"]), float(c["update_seconds"])
        self.random_fill, self._recall_hits, self._recall_n = int(c["random_fill"]), c["recall_hits"], c["recall_n"]

    def _arm(self, step: int) -> None:
        if self.capture is not None and self.is_update_step(step):
            self.capture.arm()

    def on_after_backward(self, trainer) -> None:
        self._pending = self.is_update_step(trainer.step)
        if self._pending and self.grow_strategy.needs_gradients:
            t = time.perf_counter()
            self.grow_strategy.prepare(self, self.names)
            self.update_seconds += time.perf_counter() - t

    def on_step_end(self, trainer) -> None:
        if self._pending:
            self._pending = False
            self.update(trainer.optimizer, trainer.step)
        if self.capture is not None:
            self.capture.disarm()
            self._arm(trainer.step)

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, optimizer: Optional[torch.optim.Optimizer], step: int) -> Dict[str, int]:
        """Drop and grow in every updated layer at ``step`` (steps done); returns ``{name: n}``."""
        t0 = time.perf_counter()
        self._excluded = 0.0
        d = self.schedule(step) if self.schedule is not None else self.d0
        self.grow_strategy.stats = {}
        done = {}
        for name in self.names:
            w, mask = self.masking.weight(name), self.masking.mask(name)
            m_flat, active = mask.view(-1), self.active_idx[name]
            n_active, numel = active.numel(), m_flat.numel()
            n = min(int(round(d * n_active)), numel - n_active, n_active)
            if n <= 0:
                continue
            # numpy views on CPU (same memory, cheaper per call), the tensors themselves on GPU
            W, M, A = views = [host_view(t) for t in (w.detach().view(-1), m_flat, active)]
            if not all(isinstance(v, np.ndarray) for v in views):
                W, M, A = w.detach().view(-1), m_flat, active
            drop_slots = topk_indices(abs(W[A]), n, largest=False, hint=self._drop_hints.setdefault(name, {}))
            dropped = A[drop_slots]
            if self.allow_regrow:
                M[dropped] = 0
            layer = LayerUpdate(name, self.masking.module(name), w, m_flat, n)
            grown = self.grow_strategy.grow(layer, self)
            if isinstance(A, np.ndarray):
                grown = host_view(grown)
            M[dropped] = 0
            M[grown] = 1
            W[dropped] = 0
            W[grown] = 0
            if optimizer is not None:
                reset_state_at(optimizer, w, dropped, grown)
            A[drop_slots] = grown
            done[name] = n
        self.grow_strategy.release()
        if done and self.grow_strategy.needs_activations:
            # chosen from this process' own activations: data-parallel ranks differ, the trainer syncs rank 0's
            # masks when the version moves (gradient and random growth see all-reduced gradients / the same seed)
            self.masking.version += 1
        elapsed = time.perf_counter() - t0 - self._excluded
        self.update_seconds += elapsed
        self.updates += 1
        self.changed += sum(done.values())
        stats = self.grow_strategy.stats
        self.last_recall = (stats["recall_hits"] / stats["recall_n"]) if stats.get("recall_n") else None
        self._recall_hits += stats.get("recall_hits", 0)
        self._recall_n += stats.get("recall_n", 0)
        self.random_fill += int(stats.get("random_fill", 0))
        if self.metrics is not None:
            m = {f"{self.prefix}update_ms": 1000 * elapsed, f"{self.prefix}drop_fraction": d,
                 f"{self.prefix}grown": float(sum(done.values()))}
            if self.last_recall is not None:
                m[f"{self.prefix}recall"] = self.last_recall
            self.metrics.log(step, m)
        return done

    def summary(self) -> Dict[str, float]:
        """``updates``, ``grown_total``, ``update_seconds``, ``recall_mean`` (NaN without recall), ``random_fill``."""
        n = self._recall_n
        return {"updates": self.updates, "grown_total": self.changed, "update_seconds": self.update_seconds,
                "recall_mean": (self._recall_hits / n) if n else float("nan"), "random_fill": self.random_fill}


# =========================================================================== dst_masked (Liu et al. 2020)
class StepLTE(torch.autograd.Function):
    """Unit step ``S(x) = 1[x > 0]`` with the long-tailed straight-through estimator of Liu et al.
    2020 (eq. 6): ``dS/dx ~ H(x) = 2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``,
    ``0`` otherwise."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        a = x.abs()
        h = torch.where(a <= 0.4, 2.0 - 4.0 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return g * h


def long_tailed_estimator(x: torch.Tensor) -> torch.Tensor:
    """``H(x)`` of :class:`StepLTE` (for tests and plots)."""
    a = x.abs()
    return torch.where(a <= 0.4, 2.0 - 4.0 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


class ThresholdMask(nn.Module):
    """Parametrization ``W -> W * S(|W| - t)`` with one trainable threshold per output neuron
    (``t`` shape ``(out_features,)`` / ``(out_channels,)``), Liu et al. 2020, eqs. 2-4.

    Register with ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", ThresholdMask(n_out))``.
    """

    def __init__(self, n_out: int, init: float = 0.0):
        super().__init__()
        self.threshold = nn.Parameter(torch.full((n_out,), float(init)))

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        t = self.threshold.view(-1, *([1] * (w.dim() - 1)))
        return StepLTE.apply(w.abs() - t)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask(w)


def attach_threshold_masks(masking: Masking, init: float = 0.0) -> Dict[str, ThresholdMask]:
    """Parametrize every prunable weight of ``masking`` with a :class:`ThresholdMask` (before the
    optimizer is built, so the thresholds are trained). Returns ``{name: parametrization}``."""
    from torch.nn.utils import parametrize

    out = {}
    for name in masking.names:
        mod = masking.module(name)
        pm = ThresholdMask(mod.weight.shape[0], init).to(mod.weight.device)
        parametrize.register_parametrization(mod, "weight", pm)
        out[name] = pm
    return out


class ThresholdMaskCallback(Callback):
    """Training side of ``dst_masked``: adds the sparsity regulariser ``alpha * sum_l sum_i exp(-t_i)``
    (its gradient, in ``on_after_backward``), resets a layer's thresholds to 0 when more than
    ``reset_above`` of it is masked (Liu et al. 2020, Sec. 3.3), and mirrors the current masks into
    the Masking buffers (for densities and checkpoints) at every epoch end.
    """

    def __init__(self, masking: Masking, masks: Dict[str, ThresholdMask], alpha: float, reset_above: float = 0.99,
                 check_every: int = 50, metrics: Optional[MetricsLog] = None):
        self.masking, self.masks, self.alpha = masking, masks, float(alpha)
        self.reset_above, self.check_every, self.metrics = float(reset_above), int(check_every), metrics
        self.resets = 0

    def state_dict(self) -> dict:
        return {"resets": self.resets}  # the thresholds themselves are model parameters

    def load_state_dict(self, state: dict) -> None:
        self.resets = int(state.get("resets", 0))

    def on_after_backward(self, trainer) -> None:
        if self.alpha > 0:
            reg = self.alpha * sum(torch.exp(-pm.threshold).sum() for pm in self.masks.values())
            reg.backward()

    @torch.no_grad()
    def sync(self) -> None:
        """Write the current ``S(|W| - t)`` into each layer's ``weight_mask`` buffer."""
        for name, pm in self.masks.items():
            mod = self.masking.module(name)
            w = mod.parametrizations.weight.original
            mod.weight_mask.copy_(pm.mask(w))

    @torch.no_grad()
    def on_step_end(self, trainer) -> None:
        if trainer.step % self.check_every:
            return
        for name, pm in self.masks.items():
            w = self.masking.module(name).parametrizations.weight.original
            if float(pm.mask(w).mean()) < 1.0 - self.reset_above:
                pm.threshold.zero_()
                self.resets += 1

    def on_epoch_end(self, trainer) -> None:
        self.sync()
        if self.metrics is not None:
            self.metrics.log(trainer.step, {"dst_masked/density": self.masking.density(),
                                            **{f"dst_masked/threshold_mean/{n}": float(pm.threshold.detach().mean())
                                               for n, pm in self.masks.items()}})
