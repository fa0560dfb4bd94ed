"""Data-parallel training with torch.distributed (DDP), launched by ``torchrun``.

``torchrun --nproc_per_node=N run.py ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`init_from_env`
then joins the process group (NCCL on CUDA, gloo on CPU). Every rank loads the same data and draws the
same batch permutation (seeded generator) and takes the ``rank::world`` shard of each global batch, so
the averaged gradient equals the single-process one. Masks stay identical on all ranks: pruning from
magnitudes of identical weights is deterministic, and whenever a mask changes during training (dynamic
sparse updates, whose inputs are rank-local activations) rank 0's masks, masked weights and their
optimizer state are broadcast (:func:`sync_from_rank0`); under ``trainer.sparse_kernels=true`` also the
sparse layers' CSR structures, values and value optimizer state. Only rank 0 writes files.
"""
from __future__ import annotations

import atexit
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the only rank that writes files."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)
    return device


def leave() -> None:
    """Leave the process group (``destroy_process_group``), registered at exit by :func:`init_from_env`: a
    group left to the interpreter's teardown can have its backend's threads destroyed while still joinable,
    and the rank then aborts after its work is done ("terminate called without an active exception",
    SIGABRT: seen in full-suite runs of sessions 8, 9, 10 and 12, each time in a two-process gloo test, never
    in 17 solo runs of session 12). Before that: a garbage collection, since a
    ``DistributedDataParallel`` left in a reference cycle (trainer <-> callbacks) keeps the backend alive
    through its reducer until the interpreter's final collection, where freeing it can abort (pytorch PR
    179291 describes that crash); then a barrier, so that no rank tears its group down while a peer is
    still in a collective (gloo: ``monitored_barrier``, 60 s, so a rank that died does not hang the exit;
    a failed barrier is ignored: the group is destroyed anyway)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:  # a peer failed or left first (DistBackendError is a RuntimeError)
            pass
        dist.destroy_process_group()


def _broadcast(t: torch.Tensor) -> None:
    """In-place broadcast from rank 0; dtypes NCCL lacks (int16, bool) travel as their bytes."""
    if t.dtype in (torch.int16, torch.bool) and t.is_contiguous():
        t = t.view(torch.uint8)
    dist.broadcast(t, 0)


def _broadcast_state(optimizer, param) -> None:
    for v in optimizer.state.get(param, {}).values():
        if torch.is_tensor(v) and v.dim() > 0:
            _broadcast(v)


@torch.no_grad()
def sync_from_rank0(masking, optimizer, sparse=None) -> None:
    """Broadcast rank 0's topology: masks, masked weights and their per-parameter optimizer state, and
    for the truly sparse layers of ``sparse`` (a
    :class:`~sparsebench.sparsity.sparse_linear.SparseConversion`, ``trainer.sparse_kernels=true``)
    every structure buffer (CSR indices), the ``values`` and their optimizer state (momentum, Adam
    moments). ``nnz`` is the same on every rank (exact per-layer counts), so every tensor keeps its
    shape and is overwritten in place; the layer is then told its structure changed
    (:meth:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear.structure_written`). Biases need
    nothing: DDP keeps parameters identical through the all-reduced gradients."""
    if world_size() <= 1:
        return
    if masking is not None:
        for name, w, m in masking.items():
            _broadcast(m)
            _broadcast(w.data)
            _broadcast_state(optimizer, w)
    if sparse is not None:
        for layer in sparse.sparse.values():
            for b in layer.buffers(recurse=False):
                _broadcast(b)
            _broadcast(layer.values.data)
            _broadcast_state(optimizer, layer.values)
            layer.structure_written()
