"""Position selection shared by the drop and grow steps of a topology update.

* :func:`topk_indices`: exact top-n of a score vector (like ``torch.topk``, the same set up to ties),
  fast for large vectors and small ``n`` through a threshold estimated from a fixed sample or carried
  from the previous call (``hint``); on CPU the selection runs in numpy.
* :func:`select_above`: the scores above a threshold (or ``|s|`` above), minus listed positions, in one
  native pass; :func:`block_top`: the exact top-n of one score block through it; :func:`rows_above`: the
  same pass over a matrix given a row block at a time, each block selected while it is in cache, with a
  threshold from :func:`sampled_threshold` (a grid of the matrix's scores, :func:`sample_grid`);
  :func:`drop_sorted`: sorted positions minus sorted listed ones; :func:`rows_above_bounded`: the candidates
  of a bfloat16 copy of such a matrix, every entry whose exact score can exceed the threshold
  (:func:`bf16_matmul_fast` says where the bf16 product pays).
* :func:`random_growable`: ``n`` uniformly random positions among the inactive ones (SET's growth,
  and the fill when a score-based criterion has no score for a layer).
* :func:`host_view`: a numpy view of a CPU tensor (same memory), else the tensor (CUDA).
* :func:`reset_state_at`: zero the optimizer buffers of a weight at given flat positions.

All positions are flat indices into ``weight.view(-1)`` (long tensors or int64 arrays).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

_NEG_INF = -float("inf")


def top_np(a: np.ndarray, k: int, largest: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(values, positions)`` of the ``k`` largest (smallest) entries of a 1-D numpy array ``a`` (``0 < k <=
    a.size``; a set, no order; positions int64): ``torch.topk`` on a shared view. The one selection primitive
    of the update's numpy paths: numpy's ``partition`` / ``argpartition`` (2.x, introselect) slow down by
    10-25x on arrays with many equal entries, which score blocks hold (the zero rows and columns of dead
    units and always-zero inputs, the ``-inf`` marks of excluded positions): session 12, one thread,
    8192 scores 90% zero: 0.53-0.74 ms against 0.02-0.03 ms; 4M scores 60% zero, top 50k: 1.56 s against
    65 ms; without ties they are within 0.7-1.4x of each other."""
    v, i = torch.topk(torch.from_numpy(a), k, largest=largest, sorted=False)
    return v.numpy(), i.numpy()


def kth_np(a: np.ndarray, k: int, largest: bool = True) -> float:
    """The ``k``-th largest (smallest) entry of a 1-D numpy array (1-based, ``0 < k <= a.size``), through
    :func:`top_np` (from the nearer end)."""
    if 2 * k > a.size + 1:
        return kth_np(a, a.size - k + 1, not largest)
    v = top_np(a, k, largest)[0]
    return float(v.min() if largest else v.max())


def top_and_kth_np(a: np.ndarray, n: int, r: int, largest: bool = True) -> Tuple[np.ndarray, float]:
    """Positions of the ``n`` largest (smallest) entries of a 1-D numpy array and its ``r``-th largest
    (smallest) entry (``n <= r <= a.size``): one :func:`top_np` of ``r``, then the top ``n`` of those."""
    v, i = top_np(a, r, largest)
    t = float(v.min() if largest else v.max())
    return (i if n == r else i[top_np(v, n, largest)[1]]), t


def _not_in_sorted(draw: torch.Tensor, sorted_positions: torch.Tensor) -> torch.Tensor:
    """The draws that are not among the ascending ``sorted_positions``, ascending (the caller keeps only
    the set: it takes their unique values next). On the CPU the draws are sorted first, so the binary
    searches walk ``sorted_positions`` in order (100k draws into 168k positions: 1 ms against 5 ms for
    ``torch.searchsorted`` on the unsorted draws)."""
    if not sorted_positions.numel():
        return draw
    if draw.device.type == "cpu":
        d, a = np.sort(draw.numpy()), sorted_positions.numpy()
        at = np.minimum(np.searchsorted(a, d), a.size - 1)
        return torch.from_numpy(d[a[at] != d])
    at = torch.searchsorted(sorted_positions, draw).clamp_(max=sorted_positions.numel() - 1)
    return draw[sorted_positions[at] != draw]


def random_growable(mask_flat: Optional[torch.Tensor], n: int, generator: torch.Generator,
                    exclude: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
                    numel: Optional[int] = None) -> torch.Tensor:
    """``n`` distinct flat positions drawn uniformly among those with ``mask_flat == 0`` and not in
    ``exclude`` (long tensor). Returns a long tensor of length ``n`` (fewer only if fewer exist).

    A truly sparse layer may pass ``mask_flat=None`` with ``active`` (the ascending non-growable
    positions) and ``numel``: the same draws are then tested by binary search instead of a lookup in a
    ``numel``-byte mask (16 MB for a 4096 x 4096 layer, built per update), so both give the same
    positions at the same generator state.

    Rejection sampling (O(n)) while at least a quarter of the positions is growable, else a
    permutation of all growable positions.
    """
    if mask_flat is None:
        dev, numel = active.device, int(numel)
        free = numel - active.numel()
        if not (free >= numel // 4 and free >= 4 * n):  # dense layers: the mask's permutation path
            mask_flat = torch.zeros(numel, dtype=torch.uint8, device=dev)
            mask_flat[active] = 1
    else:
        dev, numel = mask_flat.device, mask_flat.numel()
        free = numel - int(mask_flat.count_nonzero())
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    if free >= numel // 4 and free >= 4 * n:
        got = torch.empty(0, dtype=torch.long, device=dev)
        for _ in range(16):
            draw = torch.randint(0, numel, (2 * (n - got.numel()) + 32,), generator=generator).to(dev)
            draw = draw[mask_flat[draw] == 0] if mask_flat is not None else _not_in_sorted(draw, active)
            if exclude is not None and exclude.numel():
                draw = draw[~torch.isin(draw, exclude)]
            uniq = torch.unique(torch.cat([got, draw]))
            if uniq.numel() >= n:
                perm = torch.randperm(uniq.numel(), generator=generator).to(dev)
                return uniq[perm[:n]]
            got = uniq
    cand = flat_nonzero(mask_flat == 0)
    if exclude is not None and exclude.numel():
        cand = cand[~torch.isin(cand, exclude)]
    perm = torch.randperm(cand.numel(), generator=generator).to(dev)
    return cand[perm[:n]]


SAMPLES_HELD = 4  # sample position sets a memo holds (a layer's blocks: full and last; a nonzero part's size changes)
SAMPLE_MIN_SCORES = 16384  # a selection's threshold comes from a fixed sample from this many scores on ...
SAMPLE_MAX_SHARE = 16  # ... when at most 1 / this of them is asked for


def _sample_pays(N: int, n: int) -> bool:
    """Whether the top ``n`` of ``N`` scores are selected above a sample's quantile (one pass, then a top-n of
    the few above it) rather than ranked directly: at least :data:`SAMPLE_MIN_SCORES` scores and ``n`` at most
    ``N /`` :data:`SAMPLE_MAX_SHARE`. The one policy of :func:`topk_indices`, :func:`block_top` and
    :func:`block_threshold`."""
    return N >= SAMPLE_MIN_SCORES and n <= N // SAMPLE_MAX_SHARE


def _sample_positions(N: int, size: int, device: torch.device, memo: Optional[dict] = None) -> torch.Tensor:
    """A fixed random sample (with replacement) of ``size`` positions in ``[0, N)``, drawn once per
    ``(N, size, device)`` from a generator seeded by ``(N, size)`` alone (the same sample in every
    process, whatever was drawn before: a resumed run selects exactly like an uninterrupted one):
    the scores change between calls, so a fixed sample stays a random one. ``memo`` (the caller's
    per-layer hint dict, when it keeps one) holds the last :data:`SAMPLES_HELD` samples between calls
    (older ones are dropped: a layer's nonzero part has a new size at every update); nothing is cached
    globally."""
    key = ("sample", N, size, str(device))
    idx = memo.get(key) if memo is not None else None
    if idx is None:
        gen = torch.Generator().manual_seed(20200701 + 1_000_003 * N + size)
        idx = torch.randint(0, N, (size,), generator=gen).to(device)
        if memo is not None:
            held = [k for k in memo if isinstance(k, tuple) and k and k[0] == "sample"]
            for k in held[:max(0, len(held) + 1 - SAMPLES_HELD)]:  # the oldest first (dicts keep insertion order)
                del memo[k]
            memo[key] = idx
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


def flat_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Flat (long) indices of the non-zero entries of ``t`` (any shape; bool, integer or float), in
    increasing order: ``t.reshape(-1).nonzero().squeeze(1)``. On the CPU through numpy's
    ``flatnonzero`` on a shared view, 5-6x faster than ``torch.nonzero`` (4M floats, one thread: 5 ms vs
    33 ms), which the topology update calls on score blocks and masks of up to ``numel`` entries."""
    a = host_view(t) if t.is_contiguous() else t
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.flatnonzero(a))
    return t.reshape(-1).nonzero().squeeze(1)


def _native_above(arr: np.ndarray, t: float, inclusive: bool) -> Optional[np.ndarray]:
    """Ascending int64 positions of a C-contiguous float32 ``arr`` above ``t`` (``>= t`` if ``inclusive``)
    by the native one-pass select (:mod:`sparsebench.sparsity.native`), or None where it cannot run
    (another dtype or layout, the library not built here)."""
    if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.size < 4096:
        return None
    from sparsebench.sparsity import native

    lib = native.load()
    if lib is None:
        return None
    tau = np.float32(t)
    if inclusive:  # s >= t  <=>  s > the next float32 below t (t finite)
        if not np.isfinite(tau):
            return None
        tau = np.nextafter(tau, np.float32(-np.inf), dtype=np.float32)
    cap = max(1024, arr.size // 64)
    for _ in range(2):
        out = np.empty(cap, dtype=np.int64)
        c = lib.sb_select_gt(arr.ctypes.data, arr.size, float(tau), out.ctypes.data, cap)
        if c <= cap:
            return out[:c]
        cap = c
    return None


def select_above(t: torch.Tensor, threshold: float, absolute: bool = False,
                 exclude: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``t`` (any shape) greater than ``threshold`` (``absolute``: ``|t| > threshold``),
    except the flat positions ``exclude`` (ascending long, or None): ``(flat, values)``, ``flat`` the
    ascending long flat indices and ``values`` their scores (``|t|`` if ``absolute``; float). NaN entries
    are never above. A contiguous CPU float32 ``t`` of 4096 to 2^31 entries takes the native one-pass
    select, which reads each score once, branches once per 64 scores (none per hit) and runs on
    ``torch.get_num_threads()`` threads (4M scores with 0.8% above: 0.9 ms on one thread against 7.5 ms
    for ``abs`` + compare + ``flatnonzero`` + gather); the excluded positions are then dropped from the
    hits by one merge pass over the two sorted lists (cheaper than marking them in ``t``: a hit list is
    a fraction of the excluded one's scattered writes). Else torch ops."""
    a = host_view(t) if t.is_contiguous() else None
    if isinstance(a, np.ndarray) and a.dtype == np.float32 and 4096 <= a.size < 2 ** 31:
        from sparsebench.sparsity import native

        if native.load() is not None:  # one block of rows_above's native pass, then one merge
            flat = t.reshape(1, -1)
            i, val = rows_above(lambda r0, r1: flat, 1, a.size, 1, threshold, absolute, expect=a.size // 128)
            if exclude is not None and exclude.numel():
                i, val = drop_sorted(i, val, np.ascontiguousarray(exclude.cpu().numpy(), dtype=np.int64), inplace=True)
            return torch.from_numpy(i.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(val))
    v = t.reshape(-1)
    v = v.abs() if absolute else v
    above = v > threshold
    if exclude is not None and exclude.numel():
        above[exclude.to(above.device)] = False
    i = flat_nonzero(above)
    return i, v[i].float()


def drop_sorted(f: np.ndarray, v: np.ndarray, ex: np.ndarray, inplace: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``f`` (ascending int32 / int64 positions) and their scores ``v`` without the positions in ``ex``
    (ascending int64): the native merge pass (``sb_drop_listed``) where built and the positions fit int32,
    else a binary search. ``inplace``: ``f`` (int32) and ``v`` (float32) may be overwritten (no copies).
    Returns ``(f, v)`` kept (``f`` int32 from the native pass, else int64; ``v`` float32)."""
    if not ex.size or not f.size:
        return f, v
    from sparsebench.sparsity import native

    lib = native.load()
    if lib is not None and int(f[-1]) < 2 ** 31:
        ok = inplace and f.dtype == np.int32 and v.dtype == np.float32 and f.flags.c_contiguous and v.flags.c_contiguous
        fi, vv = (f, v) if ok else (f.astype(np.int32), np.array(v, dtype=np.float32))
        ex = np.ascontiguousarray(ex, dtype=np.int64)
        c = lib.sb_drop_listed(fi.ctypes.data, vv.ctypes.data, fi.size, ex.ctypes.data, ex.size)
        return fi[:c], vv[:c]
    at = np.minimum(np.searchsorted(ex, f), ex.size - 1)
    keep = ex[at] != f
    return f[keep], v[keep]


SCAN_ELEMENTS = 1 << 19  # scores per block of a scan (2 MB, one core's L2: the select reads it from cache)
# a layer's top-n takes the scan (a grid, a threshold, the bf16 prefilter where it runs) only above this many scores:
# below it the fixed cost of the grid, the threshold and the rounding bound (about 2 ms) exceeds what the bf16
# product saves. Measured in session 11 (AMD EPYC, 1 thread, batch 100, 1% density, exact sets equal): scan /
# float32 row blocks 3.5 / 2.7 ms at 1000 x 784, 4.0 / 3.3 at 1000 x 1000, 4.4 / 4.4 at 1500 x 1000, 5.5 / 6.1
# at 2000 x 1000, 9.0 / 10.6 at 4096 x 784, 34.5 / 57.6 at 4096 x 4096 (2 threads: the same order)
SCAN_MIN_ELEMENTS = 3 * SCAN_ELEMENTS


def rows_above(score_rows, n_out: int, n_in: int, rows: int, threshold: float, absolute: bool = False,
               expect: int = 0) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Every entry of an ``(n_out, n_in)`` score matrix above ``threshold``, the matrix given a block of
    ``rows`` rows at a time: ``score_rows(r0, r1)`` returns rows ``[r0, r1)`` (a CPU tensor that may reuse
    one buffer), and each block is passed to the native select while it is still in cache (one call per
    block, the hits appended at their flat positions ``row * n_in + col``). ``absolute``: ``|s| > threshold``,
    values ``|s|``; else ``s > threshold``, values ``s``. ``expect``: the expected hit count (the first
    buffer's size).
    Without the native library (or for ``2^31`` entries or more, or blocks that are not contiguous float32)
    the same selection runs in numpy.

    Returns ``(flat, values)``: ascending positions (int32 from the native pass, the caller's to overwrite;
    else int64) and their float32 values, or None when a block is not a CPU tensor."""
    from sparsebench.sparsity import native

    lib = native.load() if n_out * n_in < 2 ** 31 else None
    cap, used = max(1 << 16, 2 * int(expect)), 0
    idx, val = np.empty(cap, dtype=np.int32), np.empty(cap, dtype=np.float32)
    tau, nt = float(np.float32(threshold)), torch.get_num_threads()
    slow_f, slow_v = [], []
    for r0 in range(0, n_out, max(1, rows)):
        r1 = min(n_out, r0 + max(1, rows))
        blk = score_rows(r0, r1)
        a = host_view(blk)
        if not isinstance(a, np.ndarray):
            return None
        a = a.reshape(-1)
        if lib is None or a.dtype != np.float32 or not a.flags.c_contiguous:
            r = np.abs(a) if absolute else a
            hit = np.flatnonzero(r > threshold)
            slow_f.append(hit + r0 * n_in)
            slow_v.append(r[hit].astype(np.float32))
            continue
        while True:
            c = lib.sb_select_vals(a.ctypes.data, a.size, tau, int(bool(absolute)), r0 * n_in, idx[used:].ctypes.data,
                                   val[used:].ctypes.data, cap - used, nt)
            if c >= 0:
                used += c
                break
            cap = max(2 * cap, used - c)  # -c: the room this block needs; its scores are still in the buffer
            idx, val = np.concatenate([idx[:used], np.empty(cap - used, np.int32)]), \
                np.concatenate([val[:used], np.empty(cap - used, np.float32)])
    if slow_f:  # some blocks took the numpy path: one int64 list in row order
        f = np.concatenate([idx[:used].astype(np.int64)] + slow_f) if used else np.concatenate(slow_f)
        v = np.concatenate([val[:used]] + slow_v) if used else np.concatenate(slow_v)
        order = np.argsort(f, kind="stable")
        return f[order], v[order]
    return idx[:used], val[:used]


class ProductRows:
    """``(r0, r1) -> G[:, r0:r1]^T U``: rows ``[r0, r1)`` of the ``(n_out, n_in)`` product of two vector groups,
    ``G`` ``(B, n_out)`` and ``U`` ``(B, n_in)`` (float32; e.g. a layer's ``dL/dz`` and ``x``, whose product is
    ``dL/dW``), one row block at a time. Every block is written into one reused buffer (valid until the
    next call): a fresh 16 MB block per call costs its page faults again (the wide MLP's 4096 x 4096 layer:
    38 ms of products + abs in four fresh blocks, 26 ms in one reused one); ``pool``: a dict the caller keeps,
    so the buffers outlive this object. :meth:`approx_rows`, :meth:`rounding_bound` and :meth:`at` serve
    :func:`prefiltered_above` (a bf16 product, then exact scores at its candidates only)."""

    def __init__(self, G: torch.Tensor, U: torch.Tensor, pool: Optional[Dict[str, torch.Tensor]] = None):
        self.U, self.G = U.float(), G.float()  # (B, n_in), (B, n_out)
        self._pool = pool if pool is not None else {}
        self._bf16: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._t: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._norms: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def pool(self) -> Dict[str, torch.Tensor]:
        """The dict of reused buffers (shared with a scorer of a part of this matrix)."""
        return self._pool

    @property
    def shape(self) -> Tuple[int, int]:
        """``(n_out, n_in)``."""
        return self.G.shape[1], self.U.shape[1]

    def norms(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(||G[:, i]||, ||U[:, j]||)``: the norms of the output-gradient and input vectors (float64 arrays of
        ``n_out`` and ``n_in``), bounds of the score rows' and columns' scale (the grid's strata)."""
        if self._norms is None:  # computed once (the grid, the bound and a search read them), along unit stride
            gt, ut = self.transposed()
            self._norms = tuple(torch.linalg.vector_norm(v, dim=1, dtype=torch.float64).cpu().numpy() for v in (gt, ut))
        return self._norms

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(G^T, U^T)`` contiguous, ``(n_out, B)`` and ``(n_in, B)`` (made once): the norms' and the SDDMM's
        layout (the batch along unit stride; a norm over ``G``'s strided axis cost 1.3 ms, 0.1 ms this way)."""
        if self._t is None:
            self._t = (self.G.t().contiguous(), self.U.t().contiguous())
        return self._t

    def sample(self, ri: np.ndarray, ci: np.ndarray) -> torch.Tensor:
        """``dL/dW`` at the grid of rows ``ri`` x columns ``ci`` (int64 arrays): ``(len(ri), len(ci))``."""
        dev = self.U.device
        gt, ut = self.transposed()  # whole rows gathered, not strided columns
        return torch.matmul(gt[torch.from_numpy(ri).to(dev)], ut[torch.from_numpy(ci).to(dev)].t())

    @property
    def approximate(self) -> bool:
        """Whether :func:`prefiltered_above` may run (the bf16 prefilter: :meth:`approx_rows`, :meth:`at`): a CPU
        scorer where :func:`bf16_matmul_fast` holds."""
        return self.U.device.type == "cpu" and bf16_matmul_fast()

    def approx_rows(self, r0: int, r1: int) -> torch.Tensor:
        """``(r1 - r0, n_in)`` bfloat16 ``G[:, r0:r1]^T U`` from bf16 copies of the vectors (made once), into
        one reused buffer; off from the float32 rows by at most :meth:`rounding_bound`."""
        if self._bf16 is None:
            self._bf16 = (self.transposed()[0].bfloat16(), self.U.bfloat16())
        gt, u = self._bf16
        size = (r1 - r0) * u.shape[1]
        buf = self._pool.get("approx")
        if buf is None or buf.numel() < size:
            buf = self._pool["approx"] = torch.empty(size, dtype=torch.bfloat16)
        return torch.mm(gt[r0:r1], u, out=buf[:size].view(r1 - r0, u.shape[1]))

    def rounding_bound(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(rb, cb)`` float32 arrays of ``n_out`` and ``n_in`` with ``|approx_rows - rows| <= rb[i] cb[j]``:
        ``rb = c ||G[:, i]||``, ``cb = ||U[:, j]||`` and ``c`` = :data:`BF16_ROUNDING`
        + ``B`` :data:`BF16_ACCUMULATION` (a sum of ``B`` bf16 products, each within
        ``2^-7`` of the exact one, ``sum |g_b x_b| <= ||g|| ||x||``, plus the result's own rounding)."""
        gn, un = self.norms()
        c = BF16_ROUNDING + self.U.shape[0] * BF16_ACCUMULATION
        return (np.nextafter((c * gn).astype(np.float32), np.float32(np.inf)),
                np.nextafter(un.astype(np.float32), np.float32(np.inf)))

    def at(self, flat: np.ndarray) -> np.ndarray:
        """The exact float32 ``dL/dW`` at ascending flat positions ``row * n_in + col`` (int32 / int64): one
        SDDMM of the vectors over those positions (the kernels backend's,
        :func:`~sparsebench.sparsity.kernels.get_kernels`)."""
        from sparsebench.sparsity.kernels import CSRStructure, get_kernels

        n_out, n_in = self.shape
        f = np.asarray(flat)
        r = f // n_in
        crow = np.zeros(n_out + 1, dtype=np.int32)
        np.cumsum(np.bincount(r, minlength=n_out), out=crow[1:])
        col = (f - r * n_in).astype(np.int32)
        s = CSRStructure((n_out, n_in), torch.from_numpy(crow), torch.from_numpy(col))
        gt, ut = self.transposed()
        return get_kernels().sddmm(s, gt.t(), ut.t()).numpy()

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        size = (r1 - r0) * self.U.shape[1]
        buf = self._pool.get("scores")
        if buf is None or buf.numel() < size or buf.device != self.U.device:
            buf = self._pool["scores"] = torch.empty(size, dtype=torch.float32, device=self.U.device)
        out = buf[:size].view(r1 - r0, self.U.shape[1])
        return torch.matmul(self.G[:, r0:r1].t(), self.U, out=out)


NONZERO_MIN_ELEMENTS = 1 << 18  # below, the renumbering costs more than the product it saves (session 12: a
# 10 x 4096 layer's part took 1.25 ms against 0.1 ms for its whole product)


def nonzero_part(G: torch.Tensor, U: torch.Tensor, excluded: torch.Tensor, at_most: float = 0.9) -> Optional[tuple]:
    """The part of a product's score matrix ``G^T U`` (``(n_out, n_in)``, ``G`` ``(B, n_out)``, ``U`` ``(B, n_in)``)
    that can be nonzero: a zero column of ``G`` (an output unit no gradient reaches: no active outgoing weight,
    or a ReLU inactive on the whole batch) or of ``U`` (an input zero on the whole batch) makes a row or column
    of scores exactly zero. Returns ``(G_part, U_part, excluded_part, rows, cols)``: the kept columns of ``G``
    and ``U``, the ascending flat ``excluded`` positions (long) that fall inside the part renumbered to its
    ``(len(rows), len(cols))`` shape (still ascending: row-major order is kept), and the kept row and column
    indices (long, ascending). An axis is cut only where it loses more than ``1 - at_most`` of its length
    (else all of it is kept: no copy of ``U`` for a few zero inputs); None when neither axis is cut, for a
    matrix of fewer than :data:`NONZERO_MIN_ELEMENTS` scores, or off the CPU (session 12, the wide MLP at 1%
    uniform: its 10 x 4096 output layer has ~410 active weights, so ~93% of the 4096 x 4096 layer's rows
    are zero)."""
    n_out, n_in = G.shape[1], U.shape[1]
    ex = host_view(excluded)
    if (not isinstance(ex, np.ndarray) or n_out * n_in < NONZERO_MIN_ELEMENTS or G.device.type != "cpu"
            or U.device.type != "cpu"):
        return None
    # max |entry| per vector (0: all zero; NaN stays in): a reduction along the batch axis of the (B, n) layout,
    # 0.1 ms for (100, 4096) against 0.6 ms for a transposed copy + norms
    r, c = (np.flatnonzero(v.abs().amax(0).numpy() != 0) for v in (G, U))
    cut_r, cut_c = r.size <= at_most * n_out, c.size <= at_most * n_in
    if not (cut_r or cut_c):
        return None
    if not cut_r:
        r = np.arange(n_out)
    if not cut_c:
        c = np.arange(n_in)
    if cut_r:  # the excluded positions of the kept rows, renumbered to the kept row order
        pos, row = excluded_of_rows(ex, r, n_in)
        ex = pos - (r[row] - row) * n_in
        G = G.index_select(1, torch.from_numpy(r))
    if cut_c:
        cmap = np.full(n_in, -1, dtype=np.int64)
        cmap[c] = np.arange(c.size)
        er, ec = ex // n_in, cmap[ex % n_in]
        inside = ec >= 0
        ex = er[inside] * c.size + ec[inside]
        U = U.index_select(1, torch.from_numpy(c))
    return G, U, torch.from_numpy(np.ascontiguousarray(ex, dtype=np.int64)), torch.from_numpy(r), torch.from_numpy(c)


# |bf16(a) bf16(b) - a b| summed over the batch, relative to ||a|| ||b||: two input roundings of at most 2^-8 each
# and one output rounding of 2^-8 (bf16 keeps 8 significant bits), with 10% to spare; the float32 accumulation
# adds BF16_ACCUMULATION per term of the sum (see ProductRows.rounding_bound)
BF16_ROUNDING = 1.1 * (2.0 ** -7 + 2.0 ** -8)
BF16_ACCUMULATION = 2.0 ** -22


@functools.lru_cache(maxsize=1)
def bf16_matmul_fast() -> bool:
    """Whether a bfloat16 matrix product runs natively here (an AVX512-BF16 or AMX-BF16 CPU, which
    oneDNN's bf16 GEMM uses): then the scan's score blocks are first computed in bf16, about 4x faster than
    float32 (4096 x 100 x 4096, one thread: 9.4 ms against 40.7; measured in session 9), and only their
    candidates rescored exactly. ``SPARSEBENCH_BF16=0`` / ``1`` overrides the check (1: force it, e.g. in
    tests; exactness does not depend on it, only speed)."""
    from sparsebench.sparsity import native

    env = os.environ.get("SPARSEBENCH_BF16")
    if env is not None:
        return env != "0"
    have = native.cpu_flags()
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        ok = False
    return ok and bool(have & {"avx512_bf16", "amx_bf16"})


def rows_above_bounded(approx_rows, n_out: int, n_in: int, rows: int, threshold: float, rb: np.ndarray,
                       cb: np.ndarray, expect: int = 0) -> Optional[np.ndarray]:
    """The candidates of an ``(n_out, n_in)`` score matrix given as an approximation: every position where
    ``|approx| + rb[i] * cb[j] > threshold``, so every entry whose exact ``|s|`` exceeds ``threshold`` when
    ``|approx - s| <= rb[i] * cb[j]`` (a rounding bound). ``approx_rows(r0, r1)`` returns rows ``[r0, r1)``
    as a contiguous bfloat16 CPU tensor (it may reuse one buffer), selected by one native pass while in
    cache (``sb_select_bound_bf16``). ``rb``: ``(n_out,)``, ``cb``: ``(n_in,)`` float32. ``expect``: the
    expected count (the first buffer's size).

    Returns the ascending flat positions ``row * n_in + col`` (int32), or None without the native library
    (or for ``2^31`` entries or more); the caller then scores the blocks exactly."""
    from sparsebench.sparsity import native

    lib = native.load() if n_out * n_in < 2 ** 31 else None
    if lib is None:
        return None
    rb = np.ascontiguousarray(rb, dtype=np.float32)
    cb = np.ascontiguousarray(cb, dtype=np.float32)
    cap, used = max(1 << 16, 2 * int(expect)), 0
    idx = np.empty(cap, dtype=np.int32)
    tau, nt, rows = float(np.float32(threshold)), torch.get_num_threads(), max(1, rows)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        blk = approx_rows(r0, r1)
        if blk.dtype != torch.bfloat16 or blk.device.type != "cpu" or not blk.is_contiguous():
            return None
        while True:
            c = lib.sb_select_bound_bf16(blk.data_ptr(), r1 - r0, n_in, tau, rb[r0:].ctypes.data, cb.ctypes.data,
                                         r0 * n_in, idx[used:].ctypes.data, cap - used, nt)
            if c >= 0:
                used += c
                break
            cap = max(2 * cap, used - c)  # -c: the room this block needs
            idx = np.concatenate([idx[:used], np.empty(cap - used, np.int32)])
    return idx[:used]


def sample_grid(n_out: int, n_in: int, size: int = 256,
                norms: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Sample rows and columns of an ``(n_out, n_in)`` matrix, ``min(size, n_out)`` and ``min(size, n_in)`` of
    them (ascending int64): the grid whose scores :func:`sampled_threshold` reads. Evenly spaced, or with
    ``norms`` (``(row_norms, col_norms)``, e.g. ``||dL/dz_i||`` and ``||x_j||``) evenly spaced in the order of
    those norms (systematic sampling of each axis sorted by its scale: the strong rows and columns that hold
    much of a gradient's top are represented in proportion, not by chance). Deterministic, so an update
    draws nothing from a generator for it."""
    def axis(m: int, w: Optional[np.ndarray]) -> np.ndarray:
        at = np.unique(np.linspace(0, m - 1, min(size, m)).astype(np.int64))
        return at if w is None else np.sort(np.argsort(w, kind="stable")[at])

    return (axis(n_out, None if norms is None else np.asarray(norms[0])),
            axis(n_in, None if norms is None else np.asarray(norms[1])))


def excluded_of_rows(excluded: np.ndarray, rows: np.ndarray, n_in: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ascending flat ``excluded`` positions (int64) that lie in the ascending ``rows`` of an ``(n_out, n_in)``
    matrix, and for each the index of its row in ``rows``: one slice of the sorted list per row, gathered by one
    repeat (no loop over rows)."""
    starts = np.searchsorted(excluded, rows * n_in)
    lens = np.searchsorted(excluded, (rows + 1) * n_in) - starts
    first = np.cumsum(lens) - lens
    pos = excluded[np.repeat(starts - first, lens) + np.arange(int(lens.sum()))]
    return pos, np.repeat(np.arange(rows.size), lens)


def sampled_threshold(sample: np.ndarray, ri: np.ndarray, ci: np.ndarray, n_in: int, n: int, N: int,
                      excluded: Optional[np.ndarray] = None, margin: float = 1.5) -> Optional[float]:
    """A threshold that about ``margin * n`` of the growable entries of an ``(n_out, n_in)`` score matrix
    exceed, estimated from its scores at a grid of rows ``ri`` x columns ``ci`` (``sample``, shape
    ``(len(ri), len(ci))``, the ranked scores, e.g. ``|s|``): the grid's growable scores at rank
    ``e + 4 sqrt(e) + 1``, where ``e = margin * n / N_g * size`` is the expected count above the matrix's
    n-th largest (``N_g = N - len(excluded)`` growable entries, ``size`` of them sampled). ``excluded``
    (ascending int64 flat positions) are left out of the grid's ranking. The estimate only decides how many
    entries a scan keeps: a caller must check that at least ``n`` passed (else its exact path).

    Returns the threshold, or None when the grid is too small for the rank (a share of ``1 / margin`` or
    more) or every growable grid score is below it (``-inf``)."""
    a = np.array(sample, dtype=np.float32).reshape(-1)
    C = len(ci)
    Ng = N
    if excluded is not None and excluded.size:
        Ng = N - excluded.size
        pos, row = excluded_of_rows(excluded, ri, n_in)  # the excluded positions of the sampled rows
        if pos.size:
            inv = np.full(n_in, -1, dtype=np.int64)
            inv[ci] = np.arange(C)
            col = inv[pos - ri[row] * n_in]
            hit = col >= 0
            a[row[hit] * C + col[hit]] = _NEG_INF
    size = int(np.count_nonzero(a > _NEG_INF))
    if Ng <= 0 or not size:
        return None
    e = margin * n / Ng * size
    k = int(math.ceil(e + 4.0 * math.sqrt(e))) + 1
    if k >= size:
        return None
    t = kth_np(a, k)
    return t if t > _NEG_INF else None


def _sample_rank(n: int, N: int, size: int) -> int:
    """How many of ``size`` sampled scores lie above the threshold that should let about ``1.2 n`` of ``N``
    scores pass: the ``n / N`` quantile with 20% margin plus four standard errors, in ``[1, size]``."""
    p = n / N
    frac = min(1.0, 1.2 * p + 4.0 * math.sqrt(p * (1 - p) / size) + 2.0 / size)
    return max(1, min(size, int(frac * size)))


def _select_np(arr: np.ndarray, cand: Optional[np.ndarray], n: int, largest: bool, margin: float,
               vals: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float]:
    """Exact top-n of ``arr`` among positions ``cand`` (all if None; at least ``n``; ``vals``: their
    scores if already extracted) and the score at rank ``margin * n`` among them (the next call's
    threshold)."""
    if vals is None:
        vals = arr if cand is None else arr[cand]
    r = min(vals.size, int(math.ceil(margin * n)) + 8)
    sel, t = top_and_kth_np(vals, n, r, largest)
    return (sel if cand is None else cand[sel]), t


def _beyond(arr: np.ndarray, t: float, largest: bool,
            exclude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Positions beyond ``t`` and not excluded, and their scores."""
    cand = _native_above(arr, t, inclusive=True) if largest else None
    if cand is None:
        cand = np.flatnonzero(arr >= t if largest else arr <= t)
    if exclude is not None:
        cand = cand[exclude[cand] == 0]
    return cand, arr[cand]


def _topk_np(arr: np.ndarray, n: int, largest: bool, sample: int, hint: Optional[Dict[str, float]],
             exclude: Optional[np.ndarray], memo: Optional[dict] = None) -> np.ndarray:
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
    if _sample_pays(N, n):
        pos = host_view(_sample_positions(N, min(sample, N // 8), torch.device("cpu"), memo))
        sub = arr[pos] if exclude is None else arr[pos[exclude[pos] == 0]]
        size = sub.size
        if size:
            k = _sample_rank(n, N, size)
            t = kth_np(sub, k, largest)
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
                 hint: Optional[Dict[str, float]] = None, exclude=None, memo: Optional[dict] = None):
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
    On CPU the threshold pass runs in numpy on a view of the tensor (:func:`host_view`), the ranking in
    :func:`top_np`: about 10x faster than ``torch.topk`` over all 235k scores for n = 1%.

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
            return torch.from_numpy(_topk_np(arr, n, largest, sample, hint, ex, memo))
    if exclude is not None:
        bad = exclude.to(torch.bool)
        if int((~bad).sum()) < n:
            raise ValueError(f"topk_indices: {n} positions requested, fewer are not excluded")
        scores = scores.masked_fill(bad, _NEG_INF if largest else float("inf"))
    N = scores.numel()
    if not _sample_pays(N, n):
        return torch.topk(scores, n, largest=largest, sorted=False).indices
    size = min(sample, N // 8)
    sub = scores.index_select(0, _sample_positions(N, size, scores.device, memo))
    k = _sample_rank(n, N, size)
    t = torch.topk(sub, k, largest=largest, sorted=False).values
    t = float(t.min() if largest else t.max())
    cand = flat_nonzero(scores >= t if largest else scores <= t)
    if cand.numel() < n or cand.numel() > N // 2:
        return torch.topk(scores, n, largest=largest, sorted=False).indices
    return cand[torch.topk(scores.index_select(0, cand), n, largest=largest, sorted=False).indices]


def _mark(s: torch.Tensor, positions: torch.Tensor) -> None:
    """``s[positions] = NaN`` (1-D ``s``; numpy's fancy assignment on a CPU view: 42k positions of a 4M
    block in 0.1 ms against 0.4 ms through torch's ``index_put_``)."""
    a = host_view(s)
    if isinstance(a, np.ndarray) and positions.device.type == "cpu":
        a[positions.numpy()] = np.nan
    else:
        s[positions.to(s.device)] = float("nan")


def largest_indices(v: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest entries of a 1-D ``v`` (a set; ``torch.topk``, see :func:`top_np`)."""
    return torch.topk(v, n, sorted=False).indices


def _sample_quantile(s: torch.Tensor, n: int, absolute: bool, memo: Optional[dict]) -> Optional[float]:
    """:func:`block_top`'s threshold: the score (``absolute``: ``|score|``) at :func:`_sample_rank`'s rank from the
    top of a fixed sample of the 1-D block ``s`` (NaN entries left out), or None if every sampled score is NaN.
    The gather runs on a shared numpy view on the CPU (elsewhere the sample is copied to the host), the NaN
    filter and abs in numpy, the rank in :func:`kth_np` (``np.partition`` of the sample took 1.4 of fc5's
    3.2 ms of per-block selection per update in session 12: dead units' zero scores are ties)."""
    N = s.numel()
    pos = _sample_positions(N, min(8192, N // 8), s.device, memo)
    a = host_view(s)
    sub = a.reshape(-1)[pos.numpy()] if isinstance(a, np.ndarray) else s[pos].float().cpu().numpy()
    sub = sub[~np.isnan(sub)]
    if absolute:
        sub = np.abs(sub)
    return kth_np(sub, _sample_rank(n, N, sub.size)) if sub.size else None


def block_threshold(s: torch.Tensor, n: int, absolute: bool, memo: Optional[dict]) -> float:
    """A threshold that at least about ``n`` scores of the 1-D block ``s`` (``absolute``: ``|s|``) exceed, for
    one :func:`select_above` pass that keeps every score above it: :func:`_sample_quantile` (the ``1.2 n / N``
    quantile plus four standard errors of a fixed sample) where :func:`_sample_pays`, else the exact ``n``-th
    largest. No NaN in ``s``. Cheaper than :func:`block_top`'s exact top-n when the caller needs only
    the threshold (session 13, 784 x 1000 scores, one thread: 0.08 ms against 0.3 ms, and no second pass)."""
    N = s.numel()
    t = _sample_quantile(s, n, absolute, memo) if _sample_pays(N, n) else None
    if t is not None:
        return float(t)
    a = s.abs() if absolute else s
    return float(torch.topk(a.reshape(-1), max(1, min(n, N)), sorted=False).values.min()) if N else 0.0


def block_top(s: torch.Tensor, n: int, absolute: bool, memo: Optional[dict],
               exclude: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``n`` of one score block ``s`` (1-D; ``absolute``: of ``|s|``) outside the ascending flat
    positions ``exclude``, as ``(flat, values)``: the ``1.2 n / N`` quantile (plus four standard errors) of
    a fixed sample is the threshold of one :func:`select_above` pass, and the top-n is taken among the
    entries above it; when fewer than ``n`` pass (or for a small block), the excluded entries are marked
    NaN and every entry is ranked (:func:`topk_indices`)."""
    N = s.numel()
    t0 = _sample_quantile(s, n, absolute, memo) if _sample_pays(N, n) else None
    if t0 is not None:
        i, v = select_above(s, t0, absolute, exclude=exclude)
        if i.numel() >= n:
            top = largest_indices(v, n)
            return i[top.to(i.device)], v[top.to(v.device)]
    _mark(s, exclude)
    if absolute:
        s = s.abs()
    s = s.nan_to_num(nan=_NEG_INF)
    i = topk_indices(s, min(n, N))
    return i, s[i]


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


PREFILTER_MAX = 4.0  # the bf16 prefilter runs when the grid predicts at most 4x the expected hits as candidates


def prefiltered_above(rows: ProductRows, t: float, block_elements: int, expect: int,
                      grid: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
                      ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Every entry of ``rows``' product with ``|s| > t``, through a bf16 product: the candidates of
    :meth:`ProductRows.approx_rows` (blocks of ``block_elements`` bf16 scores, :func:`rows_above_bounded` with
    :meth:`ProductRows.rounding_bound`: no entry above ``t`` is missed), rescored exactly
    (:meth:`ProductRows.at`), those with ``|s| > t`` kept: :func:`rows_above`'s positions and float32 values
    up to the summation order. 4096 x 100 x 4096 scores, one thread: 16.6 ms against 45.6 for
    :func:`rows_above` in float32 (session 9, this machine).

    Args:
        rows: the scores' vectors.
        t: the threshold (``> 0``).
        block_elements: bf16 scores per block (2^20: 2 MB, the float32 scan's block in bytes).
        expect: the expected count (the first buffer's size, and the candidates' budget).
        grid: ``(|s| at the grid, ri, ci)``, the exact scores at rows ``ri`` x columns ``ci`` (e.g. the
            threshold's sample); drawn here (:func:`sample_grid` by the norms) when None.

    Returns:
        ``(flat, s)``: ascending int32 positions ``row * n_in + col`` and their signed float32 scores; None when
        the bound is not finite, when the grid predicts more than :data:`PREFILTER_MAX` x ``expect`` candidates
        (``|s| + 2 bound > t``: a bound too coarse to prune, from tiny or huge vectors or a low ``t``), or
        without the native select; the caller then scores in float32.
    """
    n_out, n_in = rows.shape
    rb, cb = rows.rounding_bound()
    if not (t > 0.0) or not (np.isfinite(rb).all() and np.isfinite(cb).all()):
        return None
    if grid is None:
        ri, ci = sample_grid(n_out, n_in, norms=rows.norms())
        grid = (np.abs(rows.sample(ri, ci).cpu().numpy()), ri, ci)
    smp, ri, ci = grid
    loose = np.count_nonzero(smp + 2.0 * np.outer(rb[ri], cb[ci]) > t) * (n_out * n_in) / max(1, smp.size)
    if loose > PREFILTER_MAX * max(expect, 1):
        return None
    cand = rows_above_bounded(rows.approx_rows, n_out, n_in, max(1, block_elements // n_in), t, rb, cb,
                              expect=expect)
    if cand is None:
        return None
    v = rows.at(cand)
    keep = np.abs(v) > np.float32(t)
    return cand[keep], v[keep]
