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
returned ``masking`` (the masked-dense layers), hands the conversion to every callback that supports
this mode (``adopt_sparse_layers``; others are refused with a ConfigError) and logs
:meth:`SparseConversion.density`. Checkpoints and resume work through ``state_dict`` (values + int32
structure buffers, loaded in place); data-parallel ranks get rank 0's structures, values and value
optimizer state from :func:`sparsebench.core.distributed.sync_from_rank0` after a topology update
chosen from rank-local data; :func:`sparsebench.sparsity.export.export_sparse` exports these layers.

Dynamic sparse training in this mode (``method=set|rigl|faiss_grow`` or any ``method.grow``) runs the
one generic drop/grow step of :mod:`sparsebench.dst.updater` through its
:class:`~sparsebench.dst.updater.SparseLayer` adapter: drop = the smallest ``|values|``, grow by flat
position, then :meth:`SparseTrainLinear.update_topology` rebuilds the structure, grown weights and
their optimizer state start at zero and the number of active weights stays exact. :func:`set_update`
runs one SET update of given layers through the same step (scripts, benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from sparsebench.sparsity.kernels import DEFAULT_KERNELS, CSRStructure, SparseKernels, get_kernels, resolve_kernels
from sparsebench.sparsity.masking import Masking

DEFAULT_MAX_DENSITY = 0.15  # above this a layer stays masked-dense (break-even measured near 0.1-0.2 on CPU)
_BREAK_EVEN_BATCH = 128  # DEFAULT_MAX_DENSITY holds up to this batch size


def default_max_density(batch_size: int) -> float:
    """The per-layer density up to which sparse kernels beat masked-dense ones on the CPU, for a
    training batch of ``batch_size`` rows: :data:`DEFAULT_MAX_DENSITY` (0.15) up to batch 128, then
    ``0.15 * (128 / batch_size) ** 0.15`` (0.11 at batch 1024).

    Source: ``results/bench/sparse_train.txt`` (fc5 and 784-4096-4096-10, 1 and 2 threads, SGD momentum,
    the ``native`` kernels). At batch 100 sparse steps are 1.8-2.8x faster than masked-dense at density
    0.1 and slower at 0.5; at batch 1024 the dense GEMM amortises better and density 0.1 is about the
    break-even (fc5 1.08-1.17x faster sparse, the wide MLP 0.94-1.07x). ``trainer.sparse_max_density``
    overrides it.

    Raises:
        ValueError: ``batch_size < 1``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    return DEFAULT_MAX_DENSITY * min(1.0, (_BREAK_EVEN_BATCH / int(batch_size)) ** 0.15)
_BUFFERS = ("crow", "col")  # the transposed structure is a cache of the kernels (kernels.CSRStructure.transposed)
_LEGACY_BUFFERS = ("t_crow", "t_col", "perm")  # saved by earlier versions; derivable, dropped on load


def _sort(t: torch.Tensor) -> torch.Tensor:
    """Ascending copy of a 1-D integer tensor; on the CPU numpy's (SIMD) sort: 50k int64 in 0.3 ms
    against 1.6 ms for ``torch.sort``, one thread."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sort(t.numpy()))
    return torch.sort(t).values


def _searchsorted(seq: torch.Tensor, values: torch.Tensor, right: bool = False) -> torch.Tensor:
    """``torch.searchsorted(seq, values, right=right)`` (long); on the CPU numpy's, 2x faster on the sorted
    queries of a topology merge (118k into 50k: 2.1 ms against 4.1 ms)."""
    if seq.device.type == "cpu":
        return torch.from_numpy(np.searchsorted(seq.numpy(), values.numpy(), side="right" if right else "left"))
    return torch.searchsorted(seq, values, right=right)


class _SparseLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` given by (structure, values); gradients for ``x``, ``values`` and ``b``.
    The bias is added inside the product (the native gather starts its sums at ``b``): no separate add
    node in the graph."""

    @staticmethod
    def forward(ctx, x, values, bias, structure, kernels):
        ctx.structure, ctx.kernels = structure, kernels
        if x.stride(0) != 1 and x.device.type == "cpu" and x.shape[0] > 1:
            x = x.t().contiguous().t()  # feature-major once, for the forward and the backward (no second copy)
        ctx.save_for_backward(x, values)
        return kernels.spmm(structure, values, x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        dx, dv = ctx.kernels.backward(ctx.structure, values, x, dy, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dv, db, None, None


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
        self.kernels_name = resolve_kernels(kernels)  # "auto" -> the backend it chose here
        self.kernels: SparseKernels = get_kernels(self.kernels_name)
        s = CSRStructure.from_mask(mask.detach() != 0)
        if s.nnz == 0:
            raise ValueError("mask has no active weight")
        self.values = nn.Parameter(weight.detach().reshape(-1)[s.flat()].clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._set_structure(s)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.structure_written())

    def _set_structure(self, s: CSRStructure) -> None:
        """Write ``s`` into the structure buffers: in place when a buffer keeps its shape and dtype (a
        topology update keeps ``nnz``; DDP and optimizers keep references to module tensors), else as a
        new buffer. The one place the structure buffers are written."""
        for name in _BUFFERS:
            new, cur = getattr(s, name), self._buffers.get(name)
            if cur is not None and cur.shape == new.shape and cur.dtype == new.dtype and cur.device == new.device:
                cur.copy_(new)
            else:
                self.register_buffer(name, new)
        self.structure_written()

    @property
    def structure(self) -> CSRStructure:
        """The :class:`CSRStructure` over the current buffers; one object kept while they are unchanged,
        so a backend's cached transposed structure lives until the next topology update / load."""
        s = self.__dict__.get("_structure")
        b = self._buffers  # not through nn.Module.__getattr__: this runs twice per layer and step
        if s is None or not s.backed_by(b["crow"], b["col"]):
            s = CSRStructure((self.out_features, self.in_features), b["crow"], b["col"])
            self.__dict__["_structure"] = s
        return s

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _LEGACY_BUFFERS:  # checkpoints of the earlier layout
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return _SparseLinearFn.apply(x, self.values, self.bias, self.structure, self.kernels)
        lead = x.shape[:-1]
        y = _SparseLinearFn.apply(x.reshape(-1, self.in_features), self.values, self.bias, self.structure, self.kernels)
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
    def update_topology(self, drop: torch.Tensor, grow: torch.Tensor,
                        optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Deactivate the value slots ``drop`` and activate the flat positions ``grow`` (``row * in + col``).

        Which slots and positions is decided by the one generic drop/grow step,
        :func:`sparsebench.dst.updater.drop_grow_layer` (SET, RigL, similarity growth); this method only
        edits the storage. Kept weights and their optimizer state move with them to their new slots;
        grown weights and every per-value optimizer buffer (SGD momentum, Adam ``exp_avg`` /
        ``exp_avg_sq``: any state tensor of ``values``' shape) start at zero; ``values.grad`` is remapped
        the same way. ``values`` keeps its identity and size (the active count is exactly constant), so
        an optimizer built on it stays valid, and the structure buffers are rewritten in place.

        Args:
            drop: ``(n,)`` distinct value slots (indices into ``values``).
            grow: ``(n,)`` distinct flat positions, inactive after the drop (a position dropped here may
                be grown again: RigL's ``allow_regrow``).
            optimizer: whose state of ``values`` is remapped (None: no state).

        Raises:
            ValueError: ``drop`` and ``grow`` differ in length, ``drop`` repeats a slot, or ``grow``
                repeats a position or hits a kept active one.
        """
        dev = self.values.device
        drop = torch.as_tensor(drop, dtype=torch.long).to(dev).reshape(-1)
        grow = torch.as_tensor(grow, dtype=torch.long).to(dev).reshape(-1)
        n = drop.numel()
        if grow.numel() != n:
            raise ValueError(f"update_topology: {grow.numel()} positions to grow for {n} dropped")
        if n == 0:
            return
        s = self.structure
        merged = self._merge_native(s, drop, grow)
        if merged is not None:  # one O(nnz + out) pass on the CPU; src: each new slot's old slot (-1: grown)
            new_s, src = merged
            lib, tmp = _native_lib(), torch.empty_like(self.values.data)

            def remap(t: torch.Tensor) -> None:
                if t.dtype == torch.float32 and t.is_contiguous():
                    lib.sb_remap(src.ctypes.data, src.size, t.data_ptr(), tmp.data_ptr())
                else:
                    a = t.numpy()
                    a[:] = np.where(src >= 0, a[np.maximum(src, 0)], 0)
        else:
            keep_slot = torch.ones(self.nnz, dtype=torch.bool, device=dev)
            keep_slot[drop] = False
            keep = keep_slot.nonzero().squeeze(1)
            if keep.numel() != self.nnz - n:
                raise ValueError("update_topology: repeated slots in drop")
            # merge the kept positions (still sorted) with the sorted grown ones: O(nnz log n), no sort of nnz
            kept_flat, grow_sorted = s.flat()[keep], _sort(grow)
            at_kept = torch.arange(keep.numel(), device=dev) + _searchsorted(grow_sorted, kept_flat)
            # a clash (a grown position equal to a kept one) stays two entries: from_flat refuses it
            at_grow = torch.arange(n, device=dev) + _searchsorted(kept_flat, grow_sorted, right=True)
            new_flat = torch.empty(self.nnz, dtype=torch.long, device=dev)
            new_flat[at_kept], new_flat[at_grow] = kept_flat, grow_sorted
            new_s = CSRStructure.from_flat(new_flat, s.shape, is_sorted=True)  # merged: ascending; raises on duplicates

            def remap(t: torch.Tensor) -> None:  # kept values to their new slots, grown ones 0
                new = torch.zeros_like(t)
                new[at_kept] = t[keep]
                t.copy_(new)

        remap(self.values.data)
        if optimizer is not None:
            for v in optimizer.state.get(self.values, {}).values():
                if torch.is_tensor(v) and v.shape == self.values.shape:
                    remap(v)
        if self.values.grad is not None:
            remap(self.values.grad)
        self._set_structure(new_s)

    _MERGE_ERRORS = {1: "a grown position repeats or is a kept active one", 2: "a grown position is out of range",
                     3: "repeated or out-of-range slots in drop", 4: "more entries than slots"}

    def _merge_native(self, s: CSRStructure, drop: torch.Tensor, grow: torch.Tensor):
        """The merged structure by the native one-pass merge (``sb_merge``): ``(new_structure, src)`` with
        ``src`` (int32 array) the old slot of each new slot (-1 for a grown one), or None where the
        library does not run (CUDA, not built here). Raises ValueError for the edits the torch merge
        refuses (repeated slots, grown positions repeated, on kept ones or out of range)."""
        if self.values.device.type != "cpu":
            return None
        lib = _native_lib()
        if lib is None:
            return None
        d, g = np.sort(drop.numpy()), np.sort(grow.numpy())
        nnz = self.nnz
        crow, col = torch.empty_like(s.crow), torch.empty_like(s.col)
        src = np.empty(nnz, dtype=np.int32)
        suffix = "i16" if s.col.dtype == torch.int16 else "i32"
        rc = getattr(lib, f"sb_merge_{suffix}")(s.shape[0], s.shape[1], s.crow.data_ptr(), s.col.data_ptr(),
                                                d.ctypes.data, d.size, g.ctypes.data, g.size, crow.data_ptr(),
                                                col.data_ptr(), src.ctypes.data, nnz)
        if rc != 0:
            raise ValueError(f"update_topology: {self._MERGE_ERRORS.get(rc, f'merge error {rc}')}")
        return CSRStructure(s.shape, crow, col), src

    def structure_written(self) -> None:
        """The structure buffers were overwritten in place from outside (``load_state_dict``, the DDP
        broadcast of :func:`sparsebench.core.distributed.sync_from_rank0`): drop anything derived from
        them: the cached :attr:`structure` and its transposed structure."""
        self.__dict__.pop("_structure", None)


def _native_lib():
    """The native kernels library (:func:`sparsebench.sparsity.native.load`), or None."""
    from sparsebench.sparsity import native

    return native.load()


def set_update(layers: Dict[str, SparseTrainLinear], drop_fraction: float,
               optimizer: Optional[torch.optim.Optimizer] = None,
               generator: Optional[torch.Generator] = None) -> Dict[str, int]:
    """One SET topology update (Mocanu et al. 2018) of the given layers through the generic drop/grow
    step (:func:`sparsebench.dst.updater.drop_grow_layer` with ``grow=random``): per layer drop the
    ``round(drop_fraction * nnz)`` smallest ``|w|`` and grow as many uniformly random inactive
    positions (new weights 0, optimizer state 0). For scripts and benchmarks; training runs use
    ``method=set trainer.sparse_kernels=true``. Returns ``{name: n}``."""
    from sparsebench.dst.grow import RandomGrow
    from sparsebench.dst.updater import SparseLayer, drop_grow_layer

    grow = RandomGrow(generator if generator is not None else torch.Generator())
    out = {}
    for name, layer in layers.items():
        n = min(int(round(drop_fraction * layer.nnz)), layer.nnz, layer.out_features * layer.in_features - layer.nnz)
        out[name] = drop_grow_layer(SparseLayer(name, layer), n, grow, optimizer)
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
        version: topology-update counter of the sparse layers (the ``Masking.version`` of this mode),
            bumped by :class:`~sparsebench.dst.updater.DSTUpdater` when rank-local data chose the growth.
    """

    sparse: Dict[str, SparseTrainLinear] = field(default_factory=dict)
    dense: List[str] = field(default_factory=list)
    masking: Optional[Masking] = None
    version: int = 0  # incremented by every topology update of a sparse layer (data-parallel ranks sync on change)

    def counts(self) -> Dict[str, tuple]:
        """``{name: (active, total)}`` over all masked layers, sparse and masked-dense."""
        c = {n: (m.nnz, m.out_features * m.in_features) for n, m in self.sparse.items()}
        if self.masking is not None:
            c.update(self.masking.counts())
        return c

    def density(self) -> float:
        c = self.counts().values()
        return sum(a for a, _ in c) / max(1, sum(t for _, t in c))


def structure_buffer_names(conversion: SparseConversion) -> List[str]:
    """Fully qualified names (``<module>.crow``, ...) of the structure buffers of the converted layers.

    The trainer tells DistributedDataParallel to leave them alone: DDP would broadcast every buffer at
    construction and before every forward, which gloo and NCCL refuse for the int16 ``col`` and which
    is wasted work anyway; :func:`sparsebench.core.distributed.sync_from_rank0` syncs them (as bytes)
    when a topology update chose from rank-local data."""
    return [f"{name[:-len('.weight')]}.{b}" for name in conversion.sparse for b in _BUFFERS]


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
    """Bytes of parameters, their gradients, optimizer state, index / mask buffers of ``model`` and the
    transposed structures the kernels cached for its :class:`SparseTrainLinear` layers."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(m.structure.cache_nbytes() for m in model.modules() if isinstance(m, SparseTrainLinear))
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    if optimizer is not None:
        for st in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total
