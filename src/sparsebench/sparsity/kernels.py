"""Sparse-dense products for truly sparse training of ``nn.Linear`` layers (issue 14).

A weight ``W`` of shape ``(out, in)`` is held as a :class:`CSRStructure` (the positions of its active
weights, int32 indices, in row-major order) plus a 1-D value vector ``values`` of length ``nnz`` in
that order. A :class:`SparseKernels` backend computes the three products of a training step:

* forward   ``y  = x W^T``            ``(B, in)  -> (B, out)``   sparse-dense (SpMM)
* input grad ``dx = dy W``             ``(B, out) -> (B, in)``    sparse-dense with the transposed structure
* weight grad ``dW[i, j] = sum_b dy[b, i] x[b, j]`` only at the active ``(i, j)``: a sampled
  dense-dense product (SDDMM), returned as a ``(nnz,)`` vector in the order of ``values``.

No dense ``(out, in)`` tensor is formed. Backends are registered in :data:`KERNELS` (config name ->
class, with a ``description`` metadata entry); :data:`DEFAULT_KERNELS` is the fastest correct one
measured in ``scripts/bench_sparse_train.py`` (``results/bench/sparse_train.txt``).

``torch_csr`` (the default): torch CSR tensors, ``torch.sparse.mm`` (MKL sparse BLAS on CPU,
cuSPARSE on CUDA) and ``torch.sparse.sampled_addmm``. ``dy W`` runs as ``(W^T) dy^T`` on a cached
CSR copy of the transposed structure (``t_crow``, ``t_col``) whose values are gathered from
``values`` by ``perm`` each step: torch's products of a transposed (CSC) or right-hand sparse
operand are 10-20x slower on CPU (measured: 4096 x 4096 at 1%, batch 100, one thread: 1.9 ms with
the cached transpose, 25 ms through CSC, 35 ms as ``dense @ csr``), and rebuilding the transpose
every step costs more than the three products together. Outputs are returned as transposed views of
the ``(out, B)`` product (no copy): element-wise layers keep that layout, so the next layer's
``x.t()`` is contiguous again and MKL copies nothing (fc5 at 1%, batch 100: 3.3 ms a step instead of
17 ms with contiguous outputs). ``chunk`` optionally splits large batches (off by default: with
transposed activations a chunk is a strided slice and the copy it needs ate the cache gain measured
on contiguous inputs). ``sparseprop`` and ``sparselab`` are measured in the benchmark only; none of them,
and no kernel of our own, is a dependency of the package.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from sparsebench.core.registry import Registry

KERNELS: Registry = Registry("trainer.sparse_backend")
DEFAULT_KERNELS = "torch_csr"


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@dataclass
class CSRStructure:
    """Positions of the active weights of an ``(out, in)`` weight, both orientations.

    Attributes:
        shape: ``(out, in)``.
        crow: ``(out + 1,)`` int32 row pointers of ``W``.
        col: ``(nnz,)`` int32 column (input) index of every active weight, row-major order; the order of
            the layer's ``values``.
        t_crow: ``(in + 1,)`` int32 row pointers of ``W^T``.
        t_col: ``(nnz,)`` int32 row (output) index of every active weight in column-major order.
        perm: ``(nnz,)`` int32: ``values[perm]`` are the values of ``W^T`` in CSR order.
    """

    shape: Tuple[int, int]
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    perm: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: Tuple[int, int]) -> "CSRStructure":
        """Build from flat row-major positions ``row * in + col`` (``(nnz,)`` int64, any order, unique).

        The value order of the result is ``flat`` sorted ascending.

        Raises:
            ValueError: duplicate or out-of-range positions.
        """
        out, inp = int(shape[0]), int(shape[1])
        flat = torch.sort(flat.to(torch.int64)).values
        if flat.numel() and (flat[0] < 0 or flat[-1] >= out * inp):
            raise ValueError(f"positions out of range for a weight of shape {(out, inp)}")
        if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
            raise ValueError("duplicate positions in a sparse structure")
        rows, cols = flat // inp, flat % inp
        dev = flat.device
        crow = torch.zeros(out + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
        perm = torch.argsort(cols * out + rows)  # column-major order of the same positions
        t_crow = torch.zeros(inp + 1, dtype=torch.int64, device=dev)
        t_crow[1:] = torch.cumsum(torch.bincount(cols, minlength=inp), 0)
        i32 = torch.int32
        return cls((out, inp), crow.to(i32), cols.to(i32), t_crow.to(i32), rows[perm].to(i32), perm.to(i32))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "CSRStructure":
        """From a 0/1 (or bool) mask of shape ``(out, in)``; active = non-zero."""
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D (out, in), got shape {tuple(mask.shape)}")
        return cls.from_flat(torch.nonzero(mask.reshape(-1)).reshape(-1), tuple(mask.shape))

    def flat(self) -> torch.Tensor:
        """``(nnz,)`` int64 row-major positions ``row * in + col`` in value order."""
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.col.device),
                                       (self.crow[1:] - self.crow[:-1]).to(torch.int64))
        return rows * self.shape[1] + self.col.to(torch.int64)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` dense weight (zeros at inactive positions); for tests and export."""
        w = torch.zeros(self.shape[0] * self.shape[1], dtype=values.dtype, device=values.device)
        w[self.flat()] = values
        return w.view(self.shape)

    def nbytes(self) -> int:
        """Bytes of the index tensors (both orientations)."""
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.t_crow, self.t_col, self.perm))


class SparseKernels:
    """Interface of a product backend; all inputs are 2-D and ``values`` is ``(nnz,)``.

    Subclasses implement :meth:`spmm` (``x W^T``), :meth:`spmm_t` (``dy W``) and :meth:`sddmm`.
    """

    def spmm(self, s: CSRStructure, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(B, in) -> (B, out)``: ``x W^T``."""
        raise NotImplementedError

    def spmm_t(self, s: CSRStructure, values: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """``(B, out) -> (B, in)``: ``dy W``."""
        raise NotImplementedError

    def sddmm(self, s: CSRStructure, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(nnz,)``: ``(dy^T x)`` at the active positions, in value order."""
        raise NotImplementedError


@KERNELS.register("torch_csr", description="torch CSR: sparse.mm (MKL / cuSPARSE) + sparse.sampled_addmm, "
                                           "cached transposed structure")
class TorchCSRKernels(SparseKernels):
    """torch CSR backend (see the module docstring).

    Args:
        chunk: batch rows per product call (``>= 1``) or None (one call per product).

    Raises:
        ValueError: ``chunk < 1``.
    """

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

    def spmm(self, s, values, x):
        return self._apply(_csr(s.crow, s.col, values, s.shape), x, s.shape[0])

    def spmm_t(self, s, values, dy):
        wt = _csr(s.t_crow, s.t_col, values[s.perm], (s.shape[1], s.shape[0]))
        return self._apply(wt, dy, s.shape[1])

    def sddmm(self, s, dy, x):
        pattern = _csr(s.crow, s.col, torch.zeros(s.nnz, dtype=x.dtype, device=x.device), s.shape)
        b = x.shape[0]
        acc = pattern
        for k in range(0, b, self.chunk):
            acc = torch.sparse.sampled_addmm(acc, dy[k:k + self.chunk].t(), x[k:k + self.chunk],
                                             beta=1.0, alpha=1.0)
        return acc.values()


def get_kernels(name: str = DEFAULT_KERNELS) -> SparseKernels:
    """The backend registered as ``name`` (ConfigError listing the names when unknown)."""
    return KERNELS.get(name)()
