"""Truly sparse training of masked ``nn.Linear`` layers (issue 14, ``trainer.sparse_kernels=true``).

:class:`SparseTrainLinear` replaces a masked ``nn.Linear``: it holds only the active weights, a
``values`` parameter of shape ``(nnz,)``, and their positions (:class:`~sparsebench.sparsity.kernels.CSRStructure`,
saved as int32 buffers in ``state_dict``). Forward ``y = x W^T + b`` and the input gradient ``dx = dy W``
run as sparse-dense products, the weight gradient only at the active positions as a sampled
dense-dense product (SDDMM); see :mod:`sparsebench.sparsity.kernels`. Any ``torch.optim`` optimizer
built on the model's parameters afterwards keeps its momentum / Adam state on ``values``: no dense
weight, dense gradient or dense optimizer state exists for these layers.

:func:`sparsify_for_training` swaps the masked Linear layers of a model in place. A layer whose
density is above ``max_density`` stays masked-dense (a CSR product is slower than the dense GEMM
there: at 50% density 2.5-4x on CPU, ``results/bench/sparse_train.txt``), so the switch never costs
more than masked-dense training. Convolutions always stay masked-dense (no im2col path in this issue).

Under ``trainer.sparse_kernels=true`` the :class:`~sparsebench.training.trainer.Trainer` calls
:func:`sparsify_for_training` before it builds the optimizer and DDP wrapper; it then attaches the
returned ``masking`` (the masked-dense layers) and logs :meth:`SparseConversion.density`. Checkpoints
and resume work through ``state_dict`` (values + int32 structure buffers; DDP broadcasts the buffers).
Method callbacks are refused in that mode for now: they still act on the replaced dense layers.

Dynamic sparse training in this mode: :meth:`SparseTrainLinear.drop_grow` drops the smallest
``|values|`` and grows new positions given by the caller; :func:`set_update` grows them uniformly at
random among the inactive positions (SET, Mocanu et al. 2018, Nat. Commun. 9:2383). The structure is
rebuilt, new weights and their optimizer state start at zero, the number of active weights stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from sparsebench.sparsity.kernels import DEFAULT_KERNELS, CSRStructure, SparseKernels, get_kernels
from sparsebench.sparsity.masking import Masking

DEFAULT_MAX_DENSITY = 0.15  # above this a layer stays masked-dense (break-even measured near 0.1-0.2 on CPU)
_BUFFERS = ("crow", "col", "t_crow", "t_col", "perm")


class _SparseLinearFn(torch.autograd.Function):
    """``y = x W^T`` with ``W`` given by (structure, values); gradients for ``x`` and ``values`` only."""

    @staticmethod
    def forward(ctx, x, values, structure, kernels):
        ctx.structure, ctx.kernels = structure, kernels
        ctx.save_for_backward(x, values)
        return kernels.spmm(structure, values, x)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        dx = ctx.kernels.spmm_t(ctx.structure, values, dy) if ctx.needs_input_grad[0] else None
        dv = ctx.kernels.sddmm(ctx.structure, dy, x) if ctx.needs_input_grad[1] else None
        return dx, dv, None, None


class SparseTrainLinear(nn.Module):
    """A Linear layer ``(*, in) -> (*, out)`` whose weight exists only at its active positions.

    Args:
        weight: dense ``(out, in)`` weight; only the entries where ``mask`` is non-zero are kept.
        mask: ``(out, in)`` 0/1 mask (the :class:`~sparsebench.sparsity.masking.Masking` buffer).
        bias: ``(out,)`` tensor or None (copied into a new parameter).
        kernels: backend name in :data:`sparsebench.sparsity.kernels.KERNELS`.

    Attributes:
        values: ``(nnz,)`` parameter, the active weights in row-major order.
        structure: the :class:`CSRStructure`; its tensors are this module's buffers.

    Raises:
        ValueError: mask and weight shapes differ, or the mask has no active weight.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 kernels: str = DEFAULT_KERNELS):
        super().__init__()
        if weight.shape != mask.shape or weight.dim() != 2:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be the same 2-D shape")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.kernels_name = kernels
        self.kernels: SparseKernels = get_kernels(kernels)
        s = CSRStructure.from_mask(mask.detach() != 0)
        if s.nnz == 0:
            raise ValueError("mask has no active weight")
        self.values = nn.Parameter(weight.detach().reshape(-1)[s.flat()].clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._set_structure(s)

    def _set_structure(self, s: CSRStructure) -> None:
        for name in _BUFFERS:
            self.register_buffer(name, getattr(s, name))

    @property
    def structure(self) -> CSRStructure:
        return CSRStructure((self.out_features, self.in_features), *(getattr(self, n) for n in _BUFFERS))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _SparseLinearFn.apply(x.reshape(-1, self.in_features), self.values, self.structure, self.kernels)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """``(out, in)`` dense copy of the weight (zeros where inactive); for tests and export."""
        return self.structure.to_dense(self.values.detach())

    def mask(self) -> torch.Tensor:
        """``(out, in)`` float 0/1 mask of the active positions."""
        return self.structure.to_dense(torch.ones(self.nnz, dtype=self.values.dtype, device=self.values.device))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
                f"(density {self.density:.4f}), bias={self.bias is not None}, kernels={self.kernels_name}")

    # ------------------------------------------------------------------ topology
    @torch.no_grad()
    def drop_grow(self, n: int, grow: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Drop the ``n`` smallest ``|values|`` and activate the flat positions ``grow`` (``row * in + col``).

        ``grow`` must hold exactly ``n`` positions that are inactive now (SET draws them with
        :func:`random_inactive`). Kept weights and their optimizer state move with them; grown weights
        and every per-value optimizer buffer (momentum, Adam moments) start at zero. ``values`` keeps
        its identity and size, so an optimizer built on it stays valid.

        Raises:
            ValueError: ``grow`` has not ``n`` entries or hits an active position.
        """
        n = int(n)
        if grow.numel() != n:
            raise ValueError(f"drop_grow: {grow.numel()} positions to grow for {n} dropped")
        if n == 0:
            return
        s = self.structure
        old_flat = s.flat()
        keep = torch.topk(self.values.abs(), self.nnz - n, sorted=False).indices
        new_flat_unsorted = torch.cat([old_flat[keep], grow.to(old_flat)])
        order = torch.argsort(new_flat_unsorted)
        new_s = CSRStructure.from_flat(new_flat_unsorted, s.shape)  # raises on duplicates
        # source of every new slot: index into old values, or -1 for a grown weight
        src = torch.cat([keep, torch.full((n,), -1, dtype=keep.dtype, device=keep.device)])[order]
        fresh = src < 0
        gather = src.clamp(min=0)

        def remap(t: torch.Tensor) -> None:
            t.copy_(t[gather].masked_fill_(fresh, 0))

        remap(self.values.data)
        if optimizer is not None:
            for v in optimizer.state.get(self.values, {}).values():
                if torch.is_tensor(v) and v.shape == self.values.shape:
                    remap(v)
        if self.values.grad is not None:
            remap(self.values.grad)
        self._set_structure(new_s)

    def random_inactive(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` distinct flat positions drawn uniformly among the inactive ones, without a dense draw
        (rejection sampling; fine while density is below ~0.9)."""
        total = self.out_features * self.in_features
        if n > total - self.nnz:
            raise ValueError(f"cannot grow {n} weights: only {total - self.nnz} inactive positions")
        active = self.structure.flat()
        got = torch.empty(0, dtype=torch.int64)
        while got.numel() < n:
            cand = torch.randint(0, total, (2 * (n - got.numel()) + 16,), generator=generator)
            cand = cand[~torch.isin(cand, active.cpu())]
            got = torch.unique(torch.cat([got, cand]))  # sorted: the draw order is lost, fine for SET
        pick = torch.randperm(got.numel(), generator=generator)[:n]
        return got[pick].to(active.device)


def set_update(layers: Dict[str, SparseTrainLinear], drop_fraction: float,
               optimizer: Optional[torch.optim.Optimizer] = None,
               generator: Optional[torch.Generator] = None) -> Dict[str, int]:
    """One SET topology update: per layer drop ``round(drop_fraction * nnz)`` smallest ``|w|`` and grow
    as many at random inactive positions (new weights 0, optimizer state 0). Returns ``{name: n}``."""
    out = {}
    for name, layer in layers.items():
        n = int(round(drop_fraction * layer.nnz))
        layer.drop_grow(n, layer.random_inactive(n, generator), optimizer)
        out[name] = n
    return out


@dataclass
class SparseConversion:
    """What :func:`sparsify_for_training` did.

    Attributes:
        sparse: ``{weight name: SparseTrainLinear}`` of the converted layers.
        dense: names of the masked weights that stayed masked-dense (density above the threshold,
            convolutions, non-Linear modules).
        masking: a new :class:`Masking` over the layers that stayed masked-dense (attach it to the
            optimizer instead of the old one), or None when every masked layer went sparse.
    """

    sparse: Dict[str, SparseTrainLinear] = field(default_factory=dict)
    dense: List[str] = field(default_factory=list)
    masking: Optional[Masking] = None

    def counts(self) -> Dict[str, tuple]:
        """``{name: (active, total)}`` over all masked layers, sparse and masked-dense."""
        c = {n: (m.nnz, m.out_features * m.in_features) for n, m in self.sparse.items()}
        if self.masking is not None:
            c.update(self.masking.counts())
        return c

    def density(self) -> float:
        c = self.counts().values()
        return sum(a for a, _ in c) / max(1, sum(t for _, t in c))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def sparsify_for_training(model: nn.Module, masking: Masking, max_density: float = DEFAULT_MAX_DENSITY,
                          kernels: str = DEFAULT_KERNELS) -> SparseConversion:
    """Replace, in place, every masked ``nn.Linear`` of ``model`` whose density is at most
    ``max_density`` by a :class:`SparseTrainLinear` with the same active weights and bias.

    Call it before the optimizer is built (the new ``values`` parameters must be in it) and use the
    returned ``masking`` for the layers that stayed masked-dense. ``masking`` itself is not changed,
    but it still points to the replaced modules: drop it. Convolutions stay masked-dense.

    Args:
        model: the network (any device); modified in place.
        masking: its :class:`Masking` (masks already set).
        max_density: per-layer threshold; ``1.0`` converts every masked Linear.
        kernels: backend name (:data:`sparsebench.sparsity.kernels.KERNELS`).

    Raises:
        ValueError: ``max_density`` outside (0, 1].
    """
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density={max_density}: must be in (0, 1]")
    conv = SparseConversion()
    for name, w, mask in masking.items():
        mod = masking.module(name)
        density = float(mask.count_nonzero()) / mask.numel()
        if type(mod) is not nn.Linear or density > max_density or density == 0.0:
            conv.dense.append(name)
            continue
        if name == "weight":
            raise ValueError("sparsify_for_training: the model is itself a Linear; wrap it in a container")
        new = SparseTrainLinear(w * mask, mask, mod.bias, kernels=kernels).to(w.device)
        _set_submodule(model, name[:-len(".weight")], new)
        conv.sparse[name] = new
    if conv.dense:
        conv.masking = Masking(model, exclude=masking.exclude)
    return conv


def state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of parameters, their gradients, optimizer state and index / mask buffers of ``model``."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    if optimizer is not None:
        for st in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total
