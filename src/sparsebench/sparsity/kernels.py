"""Sparse-dense products for truly sparse training of ``nn.Linear`` layers (issue 14).

A weight ``W`` of shape ``(out, in)`` is held as a :class:`CSRStructure` (the positions of its active
weights in row-major order: int32 row pointers ``crow`` and column indices ``col``, int16 when
``in <= 32767``) plus a 1-D value vector ``values`` of length ``nnz`` in that order. Only ``crow`` and
``col`` persist (module buffers, ``state_dict``): 2 bytes per active weight instead of the 12 the
previous layout kept (``col``, ``t_col``, ``perm`` as int32), so parameters + gradient + momentum +
indices come to about 14 bytes per active weight against 12 per weight for a dense layer (1.2 x
density x dense, ``results/bench/sparse_train.txt``). A :class:`SparseKernels` backend computes the
three products of a training step:

* forward    ``y  = x W^T``   ``(B, in)  -> (B, out)``   sparse-dense (SpMM)
* input grad ``dx = dy W``    ``(B, out) -> (B, in)``
* weight grad ``dW[i, j] = sum_b dy[b, i] x[b, j]`` only at the active ``(i, j)``: a sampled
  dense-dense product (SDDMM), returned as a ``(nnz,)`` vector in the order of ``values``.

No dense ``(out, in)`` tensor is formed. Backends are registered in :data:`KERNELS` (config name ->
class, metadata ``description`` and ``available``, a function saying whether the backend can run
here); :func:`get_kernels` resolves ``"auto"`` (:data:`DEFAULT_KERNELS`) to the first available name of
:data:`AUTO_ORDER`. Backends:

``torch_csr`` (always available; the fallback): torch CSR tensors, ``torch.sparse.mm`` (MKL sparse
BLAS on CPU, cuSPARSE on CUDA) and ``torch.sparse.sampled_addmm``. ``dy W`` runs as ``(W^T) dy^T`` on a
CSR copy of the transposed structure (:meth:`CSRStructure.transposed`, built on first use and cached
on the structure object, not saved; rebuilt after a topology update) whose values are gathered from
``values`` each step: torch's products of a transposed (CSC) or right-hand sparse operand are 10-20x
slower on CPU (4096 x 4096 at 1%, batch 100, one thread: 1.9 ms with the cached transpose, 25 ms
through CSC, 14-35 ms as ``dense @ csr``), and rebuilding the transpose every step (a stable sort of
``col``, 2.7 ms there) costs as much as the three products. The cache holds 8-10 bytes per active
weight (``t_col`` + ``perm`` int32), which is why this backend misses the 1.3 x density x dense
memory target (about 1.9x). Outputs are returned as transposed views of the ``(out, B)`` product (no
copy): element-wise layers keep that layout, so the next layer's ``x.t()`` is contiguous again and
MKL copies nothing (fc5 at 1%, batch 100: 3.3 ms a step instead of 17 ms with contiguous outputs).

``sparseprop`` (optional: PyPI ``sparseprop`` 0.1.14, IST-DASLab, Nikdan et al. 2023,
``pip install --no-build-isolation sparseprop==0.1.14``; first in :data:`AUTO_ORDER` when importable):
forward and the weight-only gradient as ``torch_csr``; the input and weight gradients together by
sparseprop's fused CSR kernel ``sparse_linear_vectorized_backward`` (AVX2 + OpenMP; it scatters
``dy[:, i] W[i, j]`` into ``dx[:, j]`` row by row of ``W``), which needs no transposed structure: the
memory target holds. On ``(in, B)`` feature-major activations, i.e. the transposed views above, it
copies nothing. CPU float32 only; other devices / dtypes run the ``torch_csr`` products.

``native`` (ours; first in :data:`AUTO_ORDER` wherever it builds: AVX-512 and a C++ compiler,
:mod:`sparsebench.sparsity.native`): compiled AVX-512 kernels on the same lean layout, transpose-free
at batch <= 256 (a fused scatter backward) and with a per-call counting-sort transpose above (see
:class:`NativeKernels`). Measured in ``results/bench/sparse_train.txt`` (2026-12-03; one training step,
SGD momentum): on the wide MLP at 1%, batch 100, 1 thread 7.5 ms against sparseprop's 14.6 (1.93x, the
transpose-free library at the same memory) and torch CSR's 11.3 (1.51x, with 1.75x the memory); on fc5,
where per-layer overheads dominate, 1.49x torch CSR. At the benchmark's 24 settings of density <= 0.1
it is 1.15-2.14x the best library (the 1.15x: fc5 at 1%, batch 1024, 2 threads), at 1.2 instead of 1.75-1.8 x
density x dense memory: the only backend here that meets both the speed and the memory targets. Where
the library cannot be built, ``auto`` falls back to sparseprop, then torch CSR.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from sparsebench.core.registry import Registry
from sparsebench.core.threads import scoped_threads

KERNELS: Registry = Registry("trainer.sparse_backend")
DEFAULT_KERNELS = "auto"
AUTO_ORDER = ("native", "sparseprop", "torch_csr")  # "auto" takes the first available (transpose-free first)
INT16_MAX_IN = 32767  # col is int16 while every column index fits


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def col_dtype(in_features: int) -> torch.dtype:
    """Dtype of the column indices of a weight with ``in_features`` columns: int16 up to 32767, else int32."""
    return torch.int16 if in_features <= INT16_MAX_IN else torch.int32


class CSRStructure:
    """Positions of the active weights of an ``(out, in)`` weight (CSR, row-major value order).

    Args:
        shape: ``(out, in)``.
        crow: ``(out + 1,)`` int32 row pointers.
        col: ``(nnz,)`` column (input) index of every active weight in row-major order (the order of the
            layer's ``values``); int16 when ``in <= 32767`` (:func:`col_dtype`), else int32.
        t_crow, t_col, perm: optional precomputed transposed structure (see :meth:`transposed`);
            computed on first use when omitted.

    The transposed structure is a cache of this object (not persistent state): build a new
    ``CSRStructure`` when ``crow`` / ``col`` change; :meth:`backed_by` says whether this one still
    describes given tensors.
    """

    def __init__(self, shape: Tuple[int, int], crow: torch.Tensor, col: torch.Tensor,
                 t_crow: Optional[torch.Tensor] = None, t_col: Optional[torch.Tensor] = None,
                 perm: Optional[torch.Tensor] = None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.crow, self.col = crow, col
        self._versions = (crow._version, col._version)
        self._t = (t_crow, t_col, perm) if t_crow is not None and t_col is not None and perm is not None else None

    def __repr__(self) -> str:
        return f"CSRStructure(shape={self.shape}, nnz={self.nnz}, col={self.col.dtype})"

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def backed_by(self, crow: torch.Tensor, col: torch.Tensor) -> bool:
        """True when ``crow`` / ``col`` are this structure's tensors and unchanged since it was built."""
        return crow is self.crow and col is self.col and (crow._version, col._version) == self._versions

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: Tuple[int, int], is_sorted: bool = False) -> "CSRStructure":
        """Build from flat row-major positions ``row * in + col`` (``(nnz,)`` int64, any order, unique).

        The value order of the result is ``flat`` sorted ascending. ``is_sorted=True``: the caller
        passes ``flat`` already ascending (a topology update merges two sorted lists), so the
        ``O(nnz log nnz)`` sort, about half of an update's storage edit, is skipped; the order is still
        checked (one comparison pass).

        Raises:
            ValueError: duplicate or out-of-range positions, or ``is_sorted`` with an unsorted ``flat``.
        """
        out, inp = int(shape[0]), int(shape[1])
        flat = flat.to(torch.int64)
        if not is_sorted:
            flat = torch.sort(flat).values
        step = flat[1:] - flat[:-1]  # one pass gives both checks: < 0 unsorted, == 0 a duplicate
        if is_sorted and bool((step < 0).any()):
            raise ValueError("from_flat(is_sorted=True): positions are not in ascending order")
        if flat.numel() and (flat[0] < 0 or flat[-1] >= out * inp):
            raise ValueError(f"positions out of range for a weight of shape {(out, inp)}")
        if bool((step == 0).any()):
            raise ValueError("duplicate positions in a sparse structure")
        if flat.numel() >= 2 ** 31:
            raise ValueError(f"{flat.numel()} active weights: int32 row pointers hold at most 2**31 - 1")
        rows, cols = flat // inp, flat % inp
        crow = torch.zeros(out + 1, dtype=torch.int64, device=flat.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
        return cls((out, inp), crow.to(torch.int32), cols.to(col_dtype(inp)))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "CSRStructure":
        """From a 0/1 (or bool) mask of shape ``(out, in)``; active = non-zero."""
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D (out, in), got shape {tuple(mask.shape)}")
        return cls.from_flat(torch.nonzero(mask.reshape(-1)).reshape(-1), tuple(mask.shape))

    def rows(self) -> torch.Tensor:
        """``(nnz,)`` int64 row (output) index of every active weight, in value order."""
        if self.col.device.type == "cpu":  # numpy's repeat: 168k indices in 0.2 ms against 0.7 ms
            c = self.crow.numpy().astype(np.int64)
            return torch.from_numpy(np.repeat(np.arange(self.shape[0], dtype=np.int64), c[1:] - c[:-1]))
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.col.device),
                                       (self.crow[1:] - self.crow[:-1]).to(torch.int64))

    def flat(self) -> torch.Tensor:
        """``(nnz,)`` int64 row-major positions ``row * in + col`` in value order."""
        if self.col.device.type == "cpu":
            r = self.rows().numpy()
            r *= self.shape[1]
            r += self.col.numpy()
            return torch.from_numpy(r)
        return self.rows() * self.shape[1] + self.col.to(torch.int64)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` dense weight (zeros at inactive positions); for tests and export."""
        w = torch.zeros(self.shape[0] * self.shape[1], dtype=values.dtype, device=values.device)
        w[self.flat()] = values
        return w.view(self.shape)

    def col32(self) -> torch.Tensor:
        """``col`` as int32 (what torch CSR tensors and sparseprop take): a cast per call (0.02 ms for
        168k indices), so no second copy of the indices persists."""
        return self.col if self.col.dtype == torch.int32 else self.col.to(torch.int32)

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t_crow, t_col, perm)``, int32: the CSR structure of ``W^T`` (``(in + 1,)`` row pointers,
        ``(nnz,)`` output index of every active weight in column-major order) and ``values[perm]`` = the
        values of ``W^T`` in its CSR order. Built on first call (a stable sort of ``col``), then cached."""
        if self._t is None:
            cols = self.col.to(torch.int64)
            perm = torch.sort(cols, stable=True).indices  # column-major; rows ascending inside a column
            t_crow = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=cols.device)
            t_crow[1:] = torch.cumsum(torch.bincount(cols, minlength=self.shape[1]), 0)
            i32 = torch.int32
            self._t = (t_crow.to(i32), self.rows()[perm].to(i32), perm.to(i32))
        return self._t

    @property
    def t_crow(self) -> torch.Tensor:
        return self.transposed()[0]

    @property
    def t_col(self) -> torch.Tensor:
        return self.transposed()[1]

    @property
    def perm(self) -> torch.Tensor:
        return self.transposed()[2]

    def nbytes(self) -> int:
        """Bytes of the persistent index tensors (``crow``, ``col``)."""
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col))

    def cache_nbytes(self) -> int:
        """Bytes of the cached transposed structure (0 until a backend built it)."""
        return 0 if self._t is None else sum(t.numel() * t.element_size() for t in self._t)


class SparseKernels:
    """Interface of a product backend; all inputs are 2-D and ``values`` is ``(nnz,)``.

    Subclasses implement :meth:`spmm` (``x W^T``), :meth:`spmm_t` (``dy W``) and :meth:`sddmm`; a backend
    with a fused backward overrides :meth:`backward`.
    """

    name = "?"

    def spmm(self, s: CSRStructure, values: torch.Tensor, x: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, in) -> (B, out)``: ``x W^T`` (``+ bias``, ``(out,)``, when given)."""
        raise NotImplementedError

    def spmm_t(self, s: CSRStructure, values: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """``(B, out) -> (B, in)``: ``dy W``."""
        raise NotImplementedError

    def sddmm(self, s: CSRStructure, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(nnz,)``: ``(dy^T x)`` at the active positions, in value order."""
        raise NotImplementedError

    def backward(self, s: CSRStructure, values: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
                 need_dx: bool, need_dv: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(dx, dv)`` of ``y = x W^T`` given ``dy``; None for a gradient not asked for."""
        dx = self.spmm_t(s, values, dy) if need_dx else None
        dv = self.sddmm(s, dy, x) if need_dv else None
        return dx, dv


def _always() -> bool:
    return True


@KERNELS.register("torch_csr", available=_always,
                  description="torch CSR: sparse.mm (MKL / cuSPARSE) + sparse.sampled_addmm, cached transposed "
                              "structure (about 1.9 x density x dense memory)")
class TorchCSRKernels(SparseKernels):
    """torch CSR backend (see the module docstring).

    Args:
        chunk: batch rows per product call (``>= 1``) or None (one call per product; the default: with
            transposed activations a chunk is a strided slice and the copy it needs ate the cache gain).

    Raises:
        ValueError: ``chunk < 1``.
    """

    name = "torch_csr"

    def __init__(self, chunk: Optional[int] = None):
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk={chunk}: must be >= 1 or None")
        self.chunk = int(chunk) if chunk else 1 << 62

    def _apply(self, w: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
        b = x.shape[0]
        if b <= self.chunk:
            return torch.sparse.mm(w, x.t()).t()
        y = torch.empty(b, n_out, dtype=x.dtype, device=x.device)
        for k in range(0, b, self.chunk):
            y[k:k + self.chunk] = torch.sparse.mm(w, x[k:k + self.chunk].t()).t()
        return y

    def spmm(self, s, values, x, bias=None):
        y = self._apply(_csr(s.crow, s.col32(), values, s.shape), x, s.shape[0])
        return y if bias is None else y + bias

    def spmm_t(self, s, values, dy):
        t_crow, t_col, perm = s.transposed()
        wt = _csr(t_crow, t_col, values.index_select(0, perm), (s.shape[1], s.shape[0]))
        return self._apply(wt, dy, s.shape[1])

    def sddmm(self, s, dy, x):
        pattern = _csr(s.crow, s.col32(), torch.zeros(s.nnz, dtype=x.dtype, device=x.device), s.shape)
        acc = pattern
        for k in range(0, x.shape[0], self.chunk):
            acc = torch.sparse.sampled_addmm(acc, dy[k:k + self.chunk].t(), x[k:k + self.chunk],
                                             beta=1.0, alpha=1.0)
        return acc.values()


def _cpu32(*ts: torch.Tensor) -> bool:
    """Every tensor is a float32 CPU tensor (what the compiled backends, sparseprop and native, take)."""
    for t in ts:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
    return True


def _sparseprop_available() -> bool:
    return importlib.util.find_spec("sparseprop") is not None


@KERNELS.register("sparseprop", available=_sparseprop_available,
                  description="torch CSR forward + sparseprop's fused transpose-free CSR backward (optional "
                              "extra, CPU float32)")
class SparsePropKernels(TorchCSRKernels):
    """``torch_csr`` products, except ``(dx, dv)`` together by sparseprop's fused CSR backward (module
    docstring). Tensors off the CPU or not float32 take the ``torch_csr`` path.

    Its kernel synchronises its OpenMP threads once per row of ``W`` (sparseprop shares torch's libgomp,
    so ``torch.set_num_threads`` governs it); a layer with fewer than :attr:`MIN_WORK_PER_ROW` products
    per row (``nnz * B / out``) runs it on one thread. Measured on this machine, 2 threads, batch 100:
    fc5 at 1% (780 per row) 3.4 ms a step on one thread against 7.9 ms on two; the wide MLP at 1% (4100)
    19.4 against 17.6 and at 5% (20500) 79 against 57.

    Raises:
        ImportError: sparseprop is not installed (``pip install --no-build-isolation sparseprop==0.1.14``).
    """

    name = "sparseprop"
    MIN_WORK_PER_ROW = 2000  # multiply-adds per row of W per thread barrier below which one thread runs

    def __init__(self):
        super().__init__()
        from sparseprop import backend  # its compiled module (AVX2, OpenMP)

        self._fused: Callable = backend.sparse_linear_vectorized_backward

    def backward(self, s, values, x, dy, need_dx, need_dv):
        if not (need_dx and _cpu32(values, x, dy)):
            return super().backward(s, values, x, dy, need_dx, need_dv)
        x_t, dy_t = x.t().contiguous(), dy.t().contiguous()  # (in, B), (out, B): views when feature-major
        dx_t = torch.zeros(s.shape[1], x.shape[0], dtype=x.dtype)
        dv = torch.empty(s.nnz, dtype=x.dtype)
        threads = 1 if s.nnz * x.shape[0] < self.MIN_WORK_PER_ROW * s.shape[0] else None
        with scoped_threads(threads, torch.get_num_threads, torch.set_num_threads):
            self._fused(x_t.detach(), s.crow, s.col32(), values.detach(), dy_t.detach(), dx_t, dv)
        return dx_t.t(), (dv if need_dv else None)


_NATIVE_FNS: dict = {}  # (library, op, index dtype) -> the ctypes entry point


def _native_available() -> bool:
    from sparsebench.sparsity import native

    return native.available()


def _feature_major(t: torch.Tensor) -> torch.Tensor:
    """``(B, f) -> (f, B)`` with unit stride along the batch: a view when ``t`` is a transposed
    ``(f, B)`` tensor (the layout these backends return), else a copy."""
    tt = t.detach().t()
    return tt if tt.stride(1) == 1 and tt.stride(0) >= max(1, tt.shape[1]) else tt.contiguous()


@KERNELS.register("native", available=_native_available,
                  description="our AVX-512 CSR kernels (sparsity/csrc/csr_linear.cpp, built on first use): "
                              "gather forward, fused transpose-free scatter backward + SDDMM")
class NativeKernels(TorchCSRKernels):
    """Our own compiled CSR kernels (:mod:`sparsebench.sparsity.native`), transpose-free like
    ``sparseprop`` and as lean in memory (only ``crow`` + ``col``), on feature-major ``(f, B)``
    activations with the batch as the 16-float AVX-512 vector axis:

    * forward: one output row per task, ``y^T[i] = sum_k v_k x^T[col_k]`` (a gather, OpenMP over rows);
    * backward up to batch :attr:`SMALL_BATCH`: one pass over the rows of ``W`` that scatters
      ``v_k dy^T[i]`` into ``dx^T[col_k]`` and takes the dot product ``<dy^T[i], x^T[col_k]>`` for ``dv_k``
      (on one thread below 2M products; on more, ``dx`` by batch chunks of whole vectors on half of the
      threads and ``dv`` by whole rows of ``W`` on all of them, no partial sums; ``dx`` rows are padded to
      cache lines so threads never share one);
    * backward above it (unless the thread count is at most :attr:`FUSED_LARGE_THREADS`, measured per
      vendor: then the same fused pass): ``W^T`` is built for the call by a counting sort (O(nnz + in),
      :meth:`transposed_workspace`: 12 bytes per active weight, freed when the call returns, never kept
      between steps, so the state stays at ``crow`` + ``col``), ``dx`` is the forward's gather over it and
      ``dv`` a row-parallel SDDMM: at batch 1024 the scatter's working set no longer fits the cache;
    * the weight-only gradient (a first layer): the row-parallel SDDMM.

    Kept (issue 14: an own kernel only where >= 1.5x faster than the best library) because the library
    backends at its memory (sparseprop, sparselab) are 1.93x / 1.93x slower on the wide MLP at 1%
    (batch 100, 1 thread; ``results/bench/sparse_train.txt`` of 2026-12-03) and torch CSR, 1.51x slower
    there, needs a cached transposed structure (1.75x memory); over the benchmark's 24 settings of density
    <= 10% the best library is 1.15-2.14x slower, at least 1.5x at 15 of them (the smaller margins at
    batch 1024 and on fc5: 1.49x at 1%, batch 100, 1 thread). Chunk
    widths (batch columns per register block) were chosen by measurement on each CPU vendor's machine
    (:attr:`CHUNKS`): :attr:`FWD_CHUNK` / :attr:`BWD_CHUNK` up to batch :attr:`SMALL_BATCH`,
    :attr:`FWD_CHUNK_LARGE` / :attr:`BWD_CHUNK_LARGE` above. Tensors off the
    CPU or not float32 take the ``torch_csr`` products. Results are deterministic for a given thread
    count (fixed summation order).

    Raises:
        ImportError: the library cannot be built or loaded here (the reason from
            :func:`sparsebench.sparsity.native.unavailable_reason`).
    """

    name = "native"
    FWD_CHUNK = 128
    FWD_CHUNK_LARGE = 64
    BWD_CHUNK = 48
    BWD_CHUNK_LARGE = 64
    SMALL_BATCH = 256
    #: ``(FWD_CHUNK, FWD_CHUNK_LARGE, BWD_CHUNK, BWD_CHUNK_LARGE)`` by ``vendor_id``, each measured on that
    #: vendor's machine; others take the class defaults, measured on the machine of sessions 1-8 (2 MB L2 per
    #: core, AVX-512; presumably Intel, its vendor was not recorded). AMD EPYC (Zen 4,
    #: 1 MB L2 per core; session 9), one training step at batch 1024, 1 thread: the wide MLP at 5% 186 ms with
    #: these against 310 ms with those defaults, at 10% 335 against 523, fc5 at 5% 27 against 35; at batch 100 the
    #: wider backward block (128 against 48) is 4-14% faster at 1 thread and 8-22% at 2 (wide MLP at 1%, 1 thread:
    #: 3.9 against 4.3 ms).
    CHUNKS = {"AuthenticAMD": (128, 128, 128, 128)}
    #: Above :attr:`SMALL_BATCH` the backward runs the fused scatter pass (as at small batch) when torch's
    #: thread count is at most this, else the transposed gather + SDDMM; by ``vendor_id`` (:attr:`FUSED_LARGE`),
    #: default 0 (never). AMD EPYC (session 10), batch 1024, 128-column blocks, min of 40 interleaved calls: on
    #: one thread fused / transposed 1.17 / 1.95 ms (1000 x 1000 at 1%), 4.5 / 6.0 (at 5%), 0.49 / 0.73
    #: (1000 x 500 at 1%), 36 / 63 (4096 x 4096 at 1%), 177 / 248 (at 10%), 0.25 / 2.4 (10 x 4096 at 1%); on two
    #: threads the transposed path stays ahead at 5% (2.5 / 3.5 ms on 1000 x 1000, 62 / 80 on 4096 x 4096).
    FUSED_LARGE_THREADS = 0
    FUSED_LARGE = {"AuthenticAMD": 1}

    def __init__(self):
        super().__init__()
        from sparsebench.sparsity import native

        if native.load() is None:  # the library itself stays in native.load's cache (models deep-copy)
            raise ImportError(f"native sparse kernels unavailable: {native.unavailable_reason()}")
        vendor = native.cpu_vendor()
        widths = self.CHUNKS.get(vendor)
        if widths is not None:
            self.FWD_CHUNK, self.FWD_CHUNK_LARGE, self.BWD_CHUNK, self.BWD_CHUNK_LARGE = widths
        self.FUSED_LARGE_THREADS = self.FUSED_LARGE.get(vendor, self.FUSED_LARGE_THREADS)

    @staticmethod
    def _lib():
        from sparsebench.sparsity import native

        return native.load()

    def _fn(self, op: str, col: torch.Tensor):
        """The library's ``sb_<op>`` entry point for column indices of ``col``'s dtype (int16 / int32),
        looked up once per (op, dtype): a step of fc5 calls ten of them, and the lookup was per call."""
        lib = self._lib()
        key = (lib, op, col.dtype)  # the library object itself: an id could be reused after a reload
        f = _NATIVE_FNS.get(key)
        if f is None:  # kept outside the instance: ctypes pointers cannot be deep-copied with a model
            f = _NATIVE_FNS[key] = getattr(lib, f"sb_{op}_{'i16' if col.dtype == torch.int16 else 'i32'}")
        return f

    def _fwd_chunk(self, b: int) -> int:
        return self.FWD_CHUNK if b <= self.SMALL_BATCH else self.FWD_CHUNK_LARGE

    def _gather(self, n_rows: int, crow: torch.Tensor, col: torch.Tensor, v: torch.Tensor,
                xt: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(n_rows, B)``: row ``i`` = ``bias_i + sum_k v_k xt[col_k]`` over row ``i`` of the CSR (crow, col)."""
        b = xt.shape[1]
        yt = torch.empty(n_rows, b, dtype=torch.float32)
        self._fn("spmm", col)(n_rows, b, crow.data_ptr(), col.data_ptr(), v.data_ptr(),
                              None if bias is None else bias.data_ptr(), xt.data_ptr(), xt.stride(0),
                              yt.data_ptr(), b, self._fwd_chunk(b), torch.get_num_threads())
        return yt

    def spmm(self, s, values, x, bias=None):
        if not _cpu32(values, x, *(() if bias is None else (bias,))) or x.shape[0] == 0:
            return super().spmm(s, values, x, bias)
        b = None if bias is None else bias.detach().contiguous()
        return self._gather(s.shape[0], s.crow, s.col, values.detach().contiguous(), _feature_major(x), b).t()

    def sddmm(self, s, dy, x):
        if not _cpu32(dy, x) or x.shape[0] == 0:
            return super().sddmm(s, dy, x)
        return self._sddmm(s, _feature_major(x), _feature_major(dy))

    def _sddmm(self, s: CSRStructure, xt: torch.Tensor, dyt: torch.Tensor) -> torch.Tensor:
        """``(nnz,)`` row-parallel SDDMM of feature-major ``xt`` ``(in, B)`` and ``dyt`` ``(out, B)``."""
        b = xt.shape[1]
        dv = torch.empty(s.nnz, dtype=torch.float32)
        self._fn("sddmm", s.col)(s.shape[0], b, s.crow.data_ptr(), s.col.data_ptr(), xt.data_ptr(), xt.stride(0),
                                 dyt.data_ptr(), dyt.stride(0), dv.data_ptr(), self._bwd_chunk(b),
                                 torch.get_num_threads())
        return dv

    def _bwd_chunk(self, b: int) -> int:
        return self.BWD_CHUNK if b <= self.SMALL_BATCH else self.BWD_CHUNK_LARGE

    def transposed_workspace(self, s: CSRStructure, values: torch.Tensor):
        """``(t_crow, t_col, t_values)`` of ``W^T`` (int32, int32, float32) by one counting sort over the
        columns, O(nnz + in): a workspace for one backward call, not cached (see the class docstring)."""
        t_crow = torch.empty(s.shape[1] + 1, dtype=torch.int32)
        t_col = torch.empty(s.nnz, dtype=torch.int32)
        t_val = torch.empty(s.nnz, dtype=torch.float32)
        self._fn("transpose", s.col)(s.shape[0], s.shape[1], s.crow.data_ptr(), s.col.data_ptr(), values.data_ptr(),
                                     t_crow.data_ptr(), t_col.data_ptr(), t_val.data_ptr())
        return t_crow, t_col, t_val

    def backward(self, s, values, x, dy, need_dx, need_dv):
        if not (need_dx and _cpu32(values, x, dy)) or x.shape[0] == 0:
            return super().backward(s, values, x, dy, need_dx, need_dv)
        xt, dyt, v = _feature_major(x), _feature_major(dy), values.detach().contiguous()
        b = x.shape[0]
        if b > self.SMALL_BATCH and torch.get_num_threads() > self.FUSED_LARGE_THREADS:
            # transient W^T: gather dx, then the row-parallel SDDMM
            t_crow, t_col, t_val = self.transposed_workspace(s, v)
            dxt = self._gather(s.shape[1], t_crow, t_col, t_val, dyt)
            del t_crow, t_col, t_val
            return dxt.t(), (self._sddmm(s, xt, dyt) if need_dv else None)
        ld = -(-b // 16) * 16  # dx rows padded to whole cache lines: threads own disjoint lines
        dxt = torch.empty(s.shape[1], ld, dtype=torch.float32)[:, :b]  # zeroed by the kernel
        dv = torch.empty(s.nnz, dtype=torch.float32) if need_dv else None
        self._fn("bwd", s.col)(s.shape[0], s.shape[1], s.nnz, b, s.crow.data_ptr(), s.col.data_ptr(), v.data_ptr(),
                               xt.data_ptr(), xt.stride(0), dyt.data_ptr(), dyt.stride(0), dxt.data_ptr(), ld,
                               dv.data_ptr() if dv is not None else None, self._bwd_chunk(b), torch.get_num_threads())
        return dxt.t(), dv


def available_kernels() -> Tuple[str, ...]:
    """Names of the registered backends that can run here."""
    return tuple(n for n in KERNELS.names() if KERNELS.meta(n)["available"]())


def resolve_kernels(name: str = DEFAULT_KERNELS) -> str:
    """``name``, or for ``"auto"`` the first available name of :data:`AUTO_ORDER` (``torch_csr`` always is).

    Raises:
        ConfigError: unknown name (listing the registered ones).
    """
    if name == "auto":
        return next(n for n in AUTO_ORDER if KERNELS.meta(n)["available"]())
    KERNELS.get(name)
    return name


def get_kernels(name: str = DEFAULT_KERNELS) -> SparseKernels:
    """A backend instance: ``name`` in :data:`KERNELS` or ``"auto"`` (:func:`resolve_kernels`).

    Raises:
        ConfigError: unknown name, listing the names.
        ImportError: the backend's optional package is missing.
    """
    return KERNELS.get(resolve_kernels(name))()
