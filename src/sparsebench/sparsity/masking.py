"""The one mask mechanism every method uses.

A :class:`Masking` finds the prunable weights of a model (every ``nn.Linear`` and ``nn.Conv*`` weight
whose name matches no exclusion pattern), gives each a mask buffer ``<module>.weight_mask`` (same
shape and dtype as the weight, 1 = active, 0 = pruned; saved in ``model.state_dict()`` and so in
every checkpoint) and keeps the invariant *pruned weights are exactly zero*:

* once attached to an optimizer, weights are multiplied by their masks in place after every
  ``optimizer.step()`` (``register_step_post_hook``, one fused ``_foreach_mul_``), so neither gradients,
  momentum nor weight decay can revive a pruned weight, and no ``weight * mask`` product is formed in
  the forward pass (``scripts/bench_train.py`` measures the cost against that reference);
* :meth:`set_mask` writes a new mask and zeroes the weights it removes at once.

Methods only compute new masks (scores + :func:`topk_mask`); the training loop never branches on
the method. Idea after Dettmers & Zettlemoyer's ``Masking`` class (sparse_learning), written anew.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from sparsebench.core.errors import ConfigError

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (same shape/dtype as ``scores``, float 0/1) keeping exactly the ``k`` largest scores.

    Ties are broken by ``torch.topk``'s order, so the count is exact: ``mask.sum() == k``.
    Use ``-inf`` scores for positions that must not be kept.
    """
    flat = scores.reshape(-1)
    k = int(max(0, min(k, flat.numel())))
    mask = torch.zeros_like(flat, dtype=torch.float32)
    if k > 0:
        idx = torch.topk(flat.float(), k, sorted=False).indices
        mask[idx] = 1.0
    return mask.view_as(scores)


def num_to_keep(numel: int, density: float) -> int:
    """Number of active weights for a layer of ``numel`` weights at ``density`` (rounded, at least 1)."""
    return max(1, min(numel, int(round(density * numel))))


class Masking:
    """Masks for the prunable weights of ``model``.

    Args:
        model: the network; masks are registered as buffers on its modules.
        exclude: fnmatch patterns of parameter names (e.g. ``"conv1.weight"``, ``"*.shortcut.*"``)
            that stay dense and are not counted in densities.

    Attributes:
        names: prunable parameter names in module order (the last one is the output layer for
            MLPs and WRNs).
    """

    def __init__(self, model: nn.Module, exclude: Iterable[str] = ()):
        self.model = model
        self.exclude = list(exclude)
        self._modules: Dict[str, nn.Module] = {}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, PRUNABLE_TYPES):
                pname = f"{mod_name}.weight" if mod_name else "weight"
                if any(fnmatch.fnmatch(pname, pat) for pat in self.exclude):
                    continue
                if not hasattr(mod, "weight_mask"):
                    mod.register_buffer("weight_mask", torch.ones_like(mod.weight, dtype=mod.weight.dtype))
                self._modules[pname] = mod
        self.names: List[str] = list(self._modules)
        self._hooks = []
        self.version = 0  # incremented by every set_mask (lets data-parallel training sync changed masks)

    # ------------------------------------------------------------------ access
    def weight(self, name: str) -> nn.Parameter:
        return self._modules[name].weight

    def mask(self, name: str) -> torch.Tensor:
        return self._modules[name].weight_mask

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def items(self) -> List[Tuple[str, nn.Parameter, torch.Tensor]]:
        """``[(name, weight, mask), ...]`` in module order."""
        return [(n, m.weight, m.weight_mask) for n, m in self._modules.items()]

    @property
    def output_layer(self) -> str:
        return self.names[-1]

    # ------------------------------------------------------------------ invariants
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned weight in place (``w *= mask``; one fused multi-tensor op)."""
        mods = list(self._modules.values())
        if mods:
            torch._foreach_mul_([m.weight.data for m in mods], [m.weight_mask for m in mods])

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights in place."""
        for m in self._modules.values():
            if m.weight.grad is not None:
                m.weight.grad.mul_(m.weight_mask)

    def attach(self, optimizer: torch.optim.Optimizer, mask_grads: bool = False) -> None:
        """Zero pruned weights after every ``optimizer.step()`` (a step post-hook; idempotent).

        That alone keeps the invariant: whatever the optimizer does to a pruned weight (momentum, Adam,
        weight decay) is undone before the next forward pass. The optimizer state of pruned positions is
        not kept at zero; methods that regrow weights reset it (:meth:`reset_optimizer_state`). With
        ``mask_grads`` gradients are also masked before the step (about twice the cost).
        """
        self.detach()
        self._hooks = [optimizer.register_step_post_hook(lambda *_: self.apply_())]
        if mask_grads:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.mask_grads_()))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of ``name`` (0/1 tensor of the weight's shape) and zero what it prunes."""
        m = self._modules[name]
        if mask.shape != m.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(m.weight.shape)}")
        m.weight_mask.copy_(mask.to(m.weight_mask.dtype))
        m.weight.mul_(m.weight_mask)
        self.version += 1

    def set_masks(self, masks: Dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            self.set_mask(name, mask)

    def masks(self) -> Dict[str, torch.Tensor]:
        """Copies of all masks, ``{name: (shape of weight) float 0/1}``."""
        return {n: m.weight_mask.detach().clone() for n, m in self._modules.items()}

    # ------------------------------------------------------------------ reporting
    def counts(self) -> Dict[str, Tuple[int, int]]:
        """``{name: (active, total)}`` per prunable layer."""
        return {n: (int(m.weight_mask.count_nonzero()), m.weight_mask.numel()) for n, m in self._modules.items()}

    def layer_densities(self) -> Dict[str, float]:
        return {n: a / t for n, (a, t) in self.counts().items()}

    def density(self) -> float:
        """Global density over all prunable weights (active / total)."""
        c = self.counts().values()
        return sum(a for a, _ in c) / max(1, sum(t for _, t in c))

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def dead_units(self) -> Dict[str, Dict[str, int]]:
        """Per layer: output units with no active incoming connection and input units with no active
        outgoing connection (neuron-level accounting, T003-neurons)."""
        out = {}
        for n, m in self._modules.items():
            mk = m.weight_mask.reshape(m.weight_mask.shape[0], m.weight_mask.shape[1], -1)
            out[n] = {"no_incoming": int((mk.sum(dim=(1, 2)) == 0).sum()),
                      "no_outgoing": int((mk.sum(dim=(0, 2)) == 0).sum()),
                      "units": int(mk.shape[0])}
        return out

    # ------------------------------------------------------------------ optimizer state
    @torch.no_grad()
    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer, name: str, positions: torch.Tensor) -> None:
        """Zero every per-parameter optimizer buffer (momentum, Adam moments) of weight ``name`` where
        ``positions`` (bool, weight's shape) is True: regrown weights start with a clean state."""
        state = optimizer.state.get(self.weight(name), {})
        for v in state.values():
            if torch.is_tensor(v) and v.shape == positions.shape:
                v.masked_fill_(positions, 0)


def magnitude_masks(masking: Masking, densities: Dict[str, float], among_active: bool = True) -> Dict[str, torch.Tensor]:
    """Layer-wise magnitude pruning: per layer keep the ``round(d * numel)`` largest ``|w|``.

    With ``among_active`` pruned weights can never come back (their score is -inf).
    """
    out = {}
    for name, w, m in masking.items():
        score = w.detach().abs().float()
        if among_active:
            score = torch.where(m > 0, score, torch.full_like(score, -float("inf")))
        out[name] = topk_mask(score, num_to_keep(w.numel(), densities[name]))
    return out


def nm_masks(masking: Masking, n: int = 2, m: int = 4) -> Dict[str, torch.Tensor]:
    """N:M structured magnitude pruning: in every group of ``m`` consecutive weights along the input
    dimension keep the ``n`` largest ``|w|`` (2:4 by default, the pattern of the sparse tensor cores).

    A Linear weight ``(out, in)`` is grouped as ``(out, in / m, m)``; a convolution weight
    ``(out, in, *kernel)`` is flattened per output row to ``(out, in * prod(kernel))`` and grouped the
    same way (groups run over the flattened ``(in, *kernel)`` in memory order). Scores are the current
    ``|w|``; pruned weights are zero and so rank last, but a group is always filled up to ``n`` (ties
    broken by ``torch.topk``'s order). Every layer ends at density exactly ``n / m``.

    Source: Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (arXiv:2104.08378), and
    NVIDIA's ASP ``m4n2_1d`` mask; written anew. Export with
    ``sparsebench.sparsity.export.export_sparse(model, "semi_structured")`` on a CUDA GPU.

    Returns:
        ``{name: float 0/1 mask of the weight's shape}`` for every prunable weight of ``masking``.

    Raises:
        ConfigError: ``n`` / ``m`` not ints with ``0 < n <= m``, or a layer whose (flattened) input
            dimension is not divisible by ``m`` (the message names it; exclude it from the
            :class:`Masking`, e.g. the first conv with 3 input channels).
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ConfigError(f"nm_masks n={n!r}, m={m!r}: need ints with 0 < n <= m")
    out = {}
    for name, w, _ in masking.items():
        rows = w.shape[0]
        cols = w.numel() // max(1, rows)
        if cols % m:
            raise ConfigError(f"nm_masks m={m}: {name} of shape {tuple(w.shape)} has an input dimension of {cols} "
                              f"(flattened per output row), not divisible by {m}; exclude it from the Masking")
        groups = w.detach().abs().float().reshape(rows, cols // m, m)
        keep = groups.topk(n, dim=-1, sorted=False).indices
        mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
        out[name] = mask.reshape(w.shape)
    return out


def global_magnitude_masks(masking: Masking, density: float) -> Dict[str, torch.Tensor]:
    """Global magnitude pruning: keep the ``round(density * total)`` largest ``|w|`` over all layers."""
    items = masking.items()
    scores = [torch.where(m > 0, w.detach().abs().float(), torch.full_like(w, -float("inf"), dtype=torch.float32))
              .reshape(-1) for _, w, m in items]
    flat = torch.cat(scores)
    keep = topk_mask(flat, num_to_keep(flat.numel(), density))
    out, i = {}, 0
    for (name, w, _), s in zip(items, scores):
        out[name] = keep[i:i + s.numel()].view_as(w)
        i += s.numel()
    return out
