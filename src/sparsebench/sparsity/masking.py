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

Methods only compute new masks (:mod:`sparsebench.sparsity.scores` +
:mod:`sparsebench.sparsity.selection`); the training loop never branches on the method. Idea after
Dettmers & Zettlemoyer's ``Masking`` class (sparse_learning), written anew.

The one neuron-level accounting of masks (units left with no incoming / no outgoing active
connection) is :func:`unit_connectivity` and :func:`neuron_accounting` here.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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

    def matching(self, patterns: Iterable[str]) -> List[str]:
        """Prunable names (module order) matching any of the fnmatch ``patterns``."""
        patterns = list(patterns)
        return [n for n in self.names if any(fnmatch.fnmatch(n, p) for p in patterns)]

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
        """Per layer: counts of output units with no active incoming connection (``no_incoming``), of
        input units with no active outgoing connection (``no_outgoing``) and of output units
        (``units``); see :func:`unit_connectivity`."""
        out = {}
        for n, m in self._modules.items():
            no_in, no_out = unit_connectivity(m.weight_mask)
            out[n] = {"no_incoming": int(no_in.sum()), "no_outgoing": int(no_out.sum()), "units": int(no_in.numel())}
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



# --------------------------------------------------------------------------- neuron accounting
def unit_connectivity(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Units of one layer cut off by its mask.

    Args:
        mask: ``(out, in, *kernel)`` 0/1 mask of a weight.

    Returns:
        ``(no_incoming, no_outgoing)``: bool ``(out,)``, output units with no active incoming connection
        (a unit's row of the mask is all zero), and bool ``(in,)``, input units with no active outgoing
        connection (a column is all zero).
    """
    mk = mask.reshape(mask.shape[0], mask.shape[1], -1)
    return mk.sum(dim=(1, 2)) == 0, mk.sum(dim=(0, 2)) == 0


def neuron_accounting(masking: Masking) -> Dict[str, float]:
    """Per-layer neuron-level accounting of the current masks (flat ``{metric/layer: value}``).

    For every prunable layer ``n`` with weight ``(out, in, ...)``:

    * ``units_no_in/<n>``: fraction of its ``out`` units with no active incoming connection;
    * ``units_no_out/<n>``: fraction of its ``in`` units with no active outgoing connection.

    For every hidden layer of a chain of consecutive prunable ``nn.Linear`` layers whose shapes connect
    (``out`` of layer l == ``in`` of layer l+1, as in an MLP), ``hidden_dead/<n>`` is the fraction of
    the units produced by layer ``n`` that have no incoming *or* no outgoing connection, i.e. that
    carry no information forward (document 003, "neuron pruning"); ``hidden_dead_all`` pools them
    (absent when there is no such pair).

    Returns:
        dict of floats in [0, 1].
    """
    out: Dict[str, float] = {}
    items = masking.items()
    no_in, no_out = {}, {}
    for name, _, mask in items:
        no_in[name], no_out[name] = unit_connectivity(mask)
        out[f"units_no_in/{name}"] = float(no_in[name].float().mean())
        out[f"units_no_out/{name}"] = float(no_out[name].float().mean())
    dead_total, units_total = 0, 0
    for (a, wa, _), (b, wb, _) in zip(items[:-1], items[1:]):
        if isinstance(masking.module(a), nn.Linear) and isinstance(masking.module(b), nn.Linear) \
                and wa.shape[0] == wb.shape[1]:
            dead = no_in[a] | no_out[b]
            out[f"hidden_dead/{a}"] = float(dead.float().mean())
            dead_total += int(dead.sum())
            units_total += dead.numel()
    if units_total:
        out["hidden_dead_all"] = dead_total / units_total
    return out


def mask_statistics(masking: Masking) -> Dict[str, float]:
    """Summary-row columns of the current masks: ``density/<layer>`` per layer plus
    :func:`neuron_accounting`."""
    vals = {f"density/{n}": d for n, d in masking.layer_densities().items()}
    vals.update(neuron_accounting(masking))
    return vals
