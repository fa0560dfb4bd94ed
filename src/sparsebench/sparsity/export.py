"""Export a masked model for inference with its pruned ``nn.Linear`` weights stored sparse.

:func:`export_sparse` returns a copy of the model in which every masked ``nn.Linear`` is replaced by
a :class:`SparseLinear` holding only the active weights in a sparse layout and computing
``y = x W^T + b`` on it. Mask buffers are dropped. Layouts:

* ``csr`` (default) / ``coo``: torch sparse CSR / COO, ``torch.addmm`` on the sparse weight (MKL /
  native sparse kernels on CPU, cuSPARSE on CUDA). Any mask.
* ``bsr``: torch block-sparse rows (dense square ``b x b`` blocks, only blocks holding a non-zero stored).
  Pays off when the mask is block-structured; an unstructured magnitude mask leaves almost every
  block non-empty, so BSR stores mostly zeros and is slower than CSR (measured on CPU in
  ``scripts/bench_sparse_forward.py``).
* ``semi_structured``: 2:4 semi-structured sparsity (at most 2 non-zeros in every group of 4
  consecutive input weights of a row) via ``torch.sparse.to_sparse_semi_structured``: the sparse
  tensor cores of NVIDIA GPUs with compute capability >= 8.0 (Ampere and later), fp16/bf16 weights
  only. Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (arXiv:2104.08378). Prune with
  :func:`sparsebench.sparsity.selection.nm_masks` first. CUDA only: on CPU it raises :class:`ConfigError`.
* ``dense``: mask applied, dense storage; ``auto``: CSR where the layer's density is at most
  ``max_density``, dense otherwise (at 50% density a CSR product is slower than the dense GEMM on CPU).

Models trained truly sparse (``trainer.sparse_kernels=true``, :class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear`
layers) export like masked ones. Convolutions stay dense. Unsupported requests raise a one-line :class:`ConfigError`; nothing falls
back silently to another layout.

Measured on the fc5 net (784-1000-1000-500-200-10), CPU (and CUDA when present): see
``scripts/bench_sparse_forward.py`` and ``results/bench/sparse_forward.txt``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from sparsebench.core.errors import ConfigError

LAYOUTS = ("csr", "coo", "bsr", "semi_structured", "dense", "auto")
LINEAR_LAYOUTS = ("csr", "coo", "bsr", "semi_structured", "dense")  # what a SparseLinear can hold
AUTO_BLOCKS = (16, 8, 4, 2, 1)  # square BSR block sides tried, largest first, when no blocksize is given
# 2:4 weights are zero-padded to these multiples (rows, cols): the shape constraints of both torch
# fp16/bf16 backends (cuSPARSELt: 16 x 16, CUTLASS: 32 x 64) are met whichever one torch picks.
SEMI_STRUCTURED_PAD = (32, 64)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def auto_blocksize(shape: Tuple[int, int]) -> Tuple[int, int]:
    """Largest square block ``(b, b)``, ``b`` in 16, 8, 4, 2, 1, dividing both sides of an ``(out, in)`` weight."""
    b = next(b for b in AUTO_BLOCKS if shape[0] % b == 0 and shape[1] % b == 0)
    return b, b


def check_blocksize(blocksize) -> Tuple[int, int]:
    """``blocksize`` as ``(b, b)``; :class:`ConfigError` unless it is two equal positive ints (MKL on CPU
    and cuSPARSE on CUDA run BSR products on square blocks only)."""
    ok = isinstance(blocksize, (tuple, list)) and len(blocksize) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in blocksize):
        raise ConfigError(f"blocksize={blocksize!r}: must be two equal positive ints (b, b) or None")
    if blocksize[0] != blocksize[1]:
        raise ConfigError(f"blocksize={tuple(blocksize)}: must be square (torch's BSR matmul rejects "
                          f"non-square blocks)")
    return int(blocksize[0]), int(blocksize[1])


def _fits_int32(shape, n_stored: int) -> bool:
    return max(shape) < 2**31 - 1 and n_stored < 2**31 - 1


def _to_layout(w: torch.Tensor, layout: str, blocksize: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR/BSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        if layout == "csr":  # int32 indices: 8 bytes per stored weight instead of 12, same kernel speed
            c = w.to_sparse_csr()
            if _fits_int32(w.shape, c.values().numel()):
                c = torch.sparse_csr_tensor(c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32),
                                            c.values(), c.shape)
            return c
        if layout == "bsr":
            c = w.to_sparse_bsr(blocksize)
            if _fits_int32(w.shape, c.values().numel()):
                c = torch.sparse_bsr_tensor(c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32),
                                            c.values(), c.shape)
            return c
        if layout == "coo":
            return w.to_sparse().coalesce()
    return w.contiguous()


def nm_violations(w: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of groups of ``m`` consecutive weights along the input dimension of ``w`` (``(out, in)``,
    ``in % m == 0``; other shapes are flattened per output row) holding more than ``n`` non-zeros."""
    nz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    return int((nz > n).sum())


def check_semi_structured(w: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`ConfigError` unless ``w`` (``(out, in)``) can be stored 2:4 semi-structured here.

    Checked in this order: a CUDA device of compute capability >= 8.0, dtype float16/bfloat16,
    ``in % 4 == 0``, at most 2 non-zeros in every group of 4 consecutive weights of a row.
    """
    if w.device.type != "cuda":
        raise ConfigError(f"layout=semi_structured needs a CUDA GPU with compute capability >= 8.0 (found: {w.device})")
    cap = torch.cuda.get_device_capability(w.device)
    if cap < (8, 0):
        raise ConfigError(f"layout=semi_structured needs a CUDA GPU with compute capability >= 8.0 (found: "
                          f"{torch.cuda.get_device_name(w.device)}, compute capability {cap[0]}.{cap[1]})")
    if w.dtype not in SEMI_STRUCTURED_DTYPES:
        raise ConfigError(f"layout=semi_structured needs float16 or bfloat16 weights ({name} is {w.dtype}; "
                          f"export model.half() or model.bfloat16())")
    if w.shape[1] % 4:
        raise ConfigError(f"layout=semi_structured: {name} of shape {tuple(w.shape)} has an input dimension "
                          f"{w.shape[1]} that is not a multiple of 4")
    bad = nm_violations(w, 2, 4)
    if bad:
        raise ConfigError(f"layout=semi_structured: {name} of shape {tuple(w.shape)} breaks the 2:4 pattern in "
                          f"{bad} of {w.numel() // 4} groups of 4 input weights "
                          f"(prune with sparsebench.sparsity.selection.nm_masks)")


class SparseLinear(nn.Module):
    """Inference-only linear layer ``y = x W^T + b`` with ``W`` stored in a sparse layout.

    Args:
        weight: dense ``(out, in)`` weight; exact zeros are dropped (for ``bsr``: blocks of zeros).
        bias: ``(out,)`` or None.
        layout: ``csr`` (compressed sparse rows), ``coo`` (coordinate list), ``bsr`` (block-sparse rows),
            ``semi_structured`` (2:4, CUDA with compute capability >= 8.0, fp16/bf16) or ``dense``.
        blocksize: ``(b, b)`` BSR block (square: torch's BSR products reject others), must divide
            ``(out, in)``; None: :func:`auto_blocksize`.
        name: the layer's name in error messages.

    Input ``(N, in)`` (or ``(*, in)``), output ``(N, out)`` (``(*, out)``), dtype of the weight.

    Raises:
        ConfigError: unknown layout; BSR blocksize not square or not dividing the weight; ``semi_structured`` on a
            CPU / a GPU below compute capability 8.0 / with float32 weights / weights not 2:4 sparse.

    For ``semi_structured`` the weight is zero-padded to multiples of :data:`SEMI_STRUCTURED_PAD` (the
    shapes torch's 2:4 kernels accept) and the input is zero-padded to match; both are exact.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, layout: str = "csr",
                 blocksize: Optional[Tuple[int, int]] = None, name: str = "weight"):
        super().__init__()
        if layout not in LINEAR_LAYOUTS:
            raise ConfigError(f"layout={layout!r}: unknown (allowed: {', '.join(LINEAR_LAYOUTS)})")
        self.layout = layout
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.nnz = int(weight.count_nonzero())
        self.blocksize: Optional[Tuple[int, int]] = None
        self.pad_in = self.pad_out = 0
        w = weight.detach()
        b = bias.detach().clone() if bias is not None else torch.zeros(self.out_features, dtype=weight.dtype,
                                                                         device=weight.device)
        if layout == "bsr":
            bs = auto_blocksize(tuple(w.shape)) if blocksize is None else check_blocksize(blocksize)
            if w.shape[0] % bs[0] or w.shape[1] % bs[1]:
                raise ConfigError(f"blocksize={bs}: does not divide {name} of shape {tuple(w.shape)} "
                                  f"(pass a blocksize dividing (out, in), or blocksize=None to pick one per layer)")
            self.blocksize = bs
            stored = _to_layout(w, layout, bs)
        elif layout == "semi_structured":
            check_semi_structured(w, name)
            ro, co = SEMI_STRUCTURED_PAD
            self.pad_out = -self.out_features % ro
            self.pad_in = -self.in_features % co
            wp = torch.nn.functional.pad(w, (0, self.pad_in, 0, self.pad_out)).contiguous()
            b = torch.nn.functional.pad(b, (0, self.pad_out))
            try:
                stored = torch.sparse.to_sparse_semi_structured(wp)
            except (RuntimeError, NotImplementedError) as err:
                msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ConfigError(f"layout=semi_structured: torch could not compress {name} of shape "
                                  f"{tuple(w.shape)}: {msg}") from err
        else:
            stored = _to_layout(w, layout)
        self.register_buffer("weight", stored, persistent=False)
        self.register_buffer("bias_col", b.reshape(-1, 1).contiguous(), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "dense":
            return torch.nn.functional.linear(x, self.weight, self.bias_col[:, 0])
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.layout == "semi_structured":  # dense (N, in_p) @ 2:4 (out_p, in_p)^T on the sparse tensor cores
            if self.pad_in:
                x2 = torch.nn.functional.pad(x2, (0, self.pad_in))
            y = torch.nn.functional.linear(x2, self.weight, self.bias_col[:, 0])
            if self.pad_out:
                y = y[:, :self.out_features]
            return y.reshape(*lead, self.out_features)
        y = torch.addmm(self.bias_col, self.weight, x2.t().contiguous())  # sparse (out, in) @ dense (in, N) + bias
        return y.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                + (f"blocksize={self.blocksize}, " if self.blocksize else "")
                + f"density={self.nnz / max(1, self.in_features * self.out_features):.4f}")


def _masked_linear_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The ``(out, in)`` weight with its mask applied of a masked ``nn.Linear`` (a ``weight_mask``
    buffer) or of a truly sparse :class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear`
    (``trainer.sparse_kernels=true``: its active values scattered into a dense tensor once, for the
    conversion to the export layout); None for any other module."""
    from sparsebench.sparsity.sparse_linear import SparseTrainLinear

    if isinstance(module, nn.Linear) and hasattr(module, "weight_mask"):
        return (module.weight * module.weight_mask).detach()
    if isinstance(module, SparseTrainLinear):
        return module.dense_weight()
    return None


def export_sparse(model: nn.Module, layout: str = "csr", max_density: float = 0.3,
                  blocksize: Optional[Tuple[int, int]] = None) -> nn.Module:
    """A copy of ``model`` for inference (eval mode) with masked ``nn.Linear`` layers made sparse.

    A layer counts as masked when it has a ``weight_mask`` buffer (see :class:`~sparsebench.sparsity.masking.Masking`);
    its weight is multiplied by the mask before conversion, so the export is exact even if the weights
    were not re-masked. A model trained with ``trainer.sparse_kernels=true`` exports the same way: each
    :class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear` becomes a :class:`SparseLinear` of its
    active weights (the same module a masked-dense run of the same weights exports to). Unmasked layers and convolutions are copied unchanged. The copy stays on the
    model's device and dtype (for ``semi_structured``: move the model to the GPU and to fp16/bf16 first).

    Args:
        model: the (masked) network; it is not modified.
        layout: ``csr`` | ``coo`` | ``bsr`` (block-sparse rows) | ``semi_structured`` (2:4, CUDA with
            compute capability >= 8.0, fp16/bf16, weights already 2:4 sparse, e.g. from
            :func:`~sparsebench.sparsity.selection.nm_masks`; Mishra et al. 2021) | ``dense`` (mask applied, dense
            storage) | ``auto`` (CSR where the layer's density is at most ``max_density``, dense otherwise).
        max_density: threshold of ``auto``.
        blocksize: ``(b, b)`` of ``bsr``, the same for every layer, square (MKL on CPU and cuSPARSE on
            CUDA reject non-square blocks) and dividing each ``(out, in)``; None (default): per layer the
            largest square block of side 16, 8, 4, 2 or 1 that divides it.

    Returns:
        the exported module (no gradients; same outputs as ``model`` up to float summation order).

    Raises:
        ConfigError: unknown layout; ``blocksize`` not two equal positive ints or not dividing a layer (the
            message names the layer and its shape); ``semi_structured`` without a CUDA GPU of compute
            capability >= 8.0 (e.g. ``layout=semi_structured needs a CUDA GPU with compute capability
            >= 8.0 (found: cpu)``), with float32 weights, or with a layer that is not 2:4 sparse.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: unknown (allowed: {', '.join(LAYOUTS)})")
    if blocksize is not None:
        blocksize = check_blocksize(blocksize)
    out = copy.deepcopy(model).eval()
    qualified = {id(m): n for n, m in out.named_modules()}
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            w = _masked_linear_weight(child)
            if w is not None:
                lay = layout
                if layout == "auto":
                    lay = "csr" if float((w != 0).float().mean()) <= max_density else "dense"
                name = f"{qualified[id(child)]}.weight"
                setattr(parent, child_name, SparseLinear(w, child.bias, lay, blocksize=blocksize, name=name))
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _stored_parts(w: torch.Tensor) -> tuple:
    """The tensors that hold ``w`` in memory (values, indices, metadata) for any supported layout."""
    if isinstance(w, torch.sparse.SparseSemiStructuredTensor):  # packed values + 2-bit index metadata
        parts = (getattr(w, a, None) for a in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"))
        return tuple(t for t in parts if t is not None)
    if w.layout in (torch.sparse_csr, torch.sparse_bsr):
        return w.values(), w.crow_indices(), w.col_indices()
    if w.layout == torch.sparse_coo:
        return w.values(), w.indices()
    return (w,)


def sparse_size_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of an exported model (sparse values + indices, dense tensors).

    CSR / BSR: values (BSR: every stored ``b x b`` block, zeros included) + row pointers + column
    indices; COO: values + ``(2, nnz)`` indices; ``semi_structured``: the packed half of the (padded)
    weight + its metadata; dense: the weight. Biases and parameters of other modules are added.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += sum(t.numel() * t.element_size() for t in _stored_parts(m.weight))
            total += m.bias_col.numel() * m.bias_col.element_size()
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
