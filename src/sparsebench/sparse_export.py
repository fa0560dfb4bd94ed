"""Export a masked model for inference with its pruned ``nn.Linear`` weights stored sparse.

:func:`export_sparse` returns a copy of the model in which every masked ``nn.Linear`` is replaced by
a :class:`SparseLinear` holding only the active weights as a torch sparse tensor (CSR by default,
COO for document 002's comparison) and computing ``y = x W^T + b`` with ``torch.addmm`` on the
sparse weight (MKL / native sparse kernels on CPU, cuSPARSE on CUDA). Mask buffers are dropped.
``layout="auto"`` keeps a layer dense when its density is above ``max_density`` (at 50% density a
CSR product is slower than the dense GEMM on CPU). Convolutions stay dense.

Measured on the fc5 net (784-1000-1000-500-200-10), batch 100, CPU: see
``scripts/bench_sparse_forward.py`` and ``results/bench/sparse_forward.txt``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError

LAYOUTS = ("csr", "coo", "dense", "auto")


def _to_layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        if layout == "csr":  # int32 indices: 8 bytes per stored weight instead of 12, same kernel speed
            c = w.to_sparse_csr()
            if max(w.shape) < 2**31 - 1 and c.values().numel() < 2**31 - 1:
                c = torch.sparse_csr_tensor(c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32),
                                            c.values(), c.shape)
            return c
        if layout == "coo":
            return w.to_sparse().coalesce()
    return w.contiguous()


class SparseLinear(nn.Module):
    """Inference-only linear layer ``y = x W^T + b`` with ``W`` stored in a sparse layout.

    Args:
        weight: dense ``(out, in)`` weight; exact zeros are dropped.
        bias: ``(out,)`` or None.
        layout: ``csr`` (compressed sparse rows), ``coo`` (coordinate list) or ``dense``.

    Input ``(N, in)`` (or ``(*, in)``), output ``(N, out)``.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, layout: str = "csr"):
        super().__init__()
        if layout not in ("csr", "coo", "dense"):
            raise ConfigError(f"layout={layout!r}: unknown (allowed: csr, coo, dense)")
        self.layout = layout
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.nnz = int(weight.count_nonzero())
        self.register_buffer("weight", _to_layout(weight.detach(), layout), persistent=False)
        b = bias.detach().clone() if bias is not None else torch.zeros(self.out_features, dtype=weight.dtype,
                                                                         device=weight.device)
        self.register_buffer("bias_col", b.reshape(-1, 1).contiguous(), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "dense":
            return torch.nn.functional.linear(x, self.weight, self.bias_col[:, 0])
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t().contiguous()  # (in, N)
        y = torch.addmm(self.bias_col, self.weight, xt)  # sparse (out, in) @ dense (in, N) + bias
        return y.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"density={self.nnz / max(1, self.in_features * self.out_features):.4f}")


def export_sparse(model: nn.Module, layout: str = "csr", max_density: float = 0.3) -> nn.Module:
    """A copy of ``model`` for inference (eval mode) with masked ``nn.Linear`` layers made sparse.

    A layer counts as masked when it has a ``weight_mask`` buffer (see :class:`~sparsebench.masking.Masking`);
    its weight is multiplied by the mask before conversion, so the export is exact even if the weights
    were not re-masked. Unmasked layers and convolutions are copied unchanged.

    Args:
        model: the (masked) network; it is not modified.
        layout: ``csr`` | ``coo`` | ``dense`` (mask applied, dense storage) | ``auto`` (CSR where the
            layer's density is at most ``max_density``, dense otherwise).
        max_density: threshold of ``auto``.

    Returns:
        the exported module (no gradients; same outputs as ``model`` up to float summation order).

    Raises:
        ConfigError: unknown layout.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: unknown (allowed: {', '.join(LAYOUTS)})")
    out = copy.deepcopy(model).eval()
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and hasattr(child, "weight_mask"):
                w = (child.weight * child.weight_mask).detach()
                lay = layout
                if layout == "auto":
                    lay = "csr" if float((w != 0).float().mean()) <= max_density else "dense"
                setattr(parent, child_name, SparseLinear(w, child.bias, lay))
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def sparse_size_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of an exported model (sparse values + indices, dense tensors)."""
    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            w = m.weight
            if w.layout == torch.sparse_csr:
                parts = (w.values(), w.crow_indices(), w.col_indices())
            elif w.layout == torch.sparse_coo:
                parts = (w.values(), w.indices())
            else:
                parts = (w,)
            total += sum(t.numel() * t.element_size() for t in parts) + m.bias_col.numel() * m.bias_col.element_size()
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
