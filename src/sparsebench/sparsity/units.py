"""Unit (neuron) pruning: layer-wise weight vs unit criteria, dead-unit biases, and least-squares
compensation of a removed hidden unit.

* :data:`UNIT_CRITERIA` (``method.criteria`` of ``unit_prune`` / ``forward_time``, document 002):
  ``weight`` removes the ``k`` fraction of each layer's weights with the smallest ``|w|``; ``unit``
  removes the ``k`` fraction of each layer's units (rows of ``W``: a unit's incoming weights) with the
  smallest L2 norm.
* :data:`LS_UPDATES` (``method.updates`` of ``ls_unit_prune``, document 004): after removing hidden unit
  ``h`` feeding the output layer, ``ls`` solves for the change of the remaining hidden-to-output
  weights that best reproduces the old net inputs of the outputs (Castellano, Fanelli & Pelillo 1997,
  "An iterative pruning algorithm for feedforward neural networks", IEEE TNN 8(3)); ``none`` does not.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Optional

import torch
from torch import nn

from sparsebench.config import check
from sparsebench.core.registry import Registry
from sparsebench.sparsity.masking import Masking, unit_connectivity
from sparsebench.sparsity.scores import MagnitudeScore
from sparsebench.sparsity.selection import layer_topk_masks, topk_mask

UNIT_CRITERIA: Registry = Registry("method.criteria")
LS_UPDATES: Registry = Registry("method.updates")

DEFAULT_KS = [0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]  # document 002's grid of k


def check_ks(key: str, ks: List[float]) -> None:
    """Raise :class:`~sparsebench.core.errors.ConfigError` unless ``ks`` is a non-empty list in [0, 1)."""
    check(len(ks) > 0, key, list(ks), "needs at least one value")
    for k in ks:
        check(0.0 <= float(k) < 1.0, key, list(ks), "every k must be in [0, 1)")


def prunable_layers(masking: Masking, prune_output: bool) -> List[str]:
    """The layers a post-training criterion prunes: all, or all but the output layer (document 002
    leaves the logits dense) unless the network has a single layer."""
    return list(masking.names) if prune_output or len(masking.names) == 1 else list(masking.names[:-1])


# --------------------------------------------------------------------------- criteria (002)
class PruneCriterion:
    """A post-training layer-wise pruning criterion.

    Attributes:
        removes_units: whole units are removed, so their biases are zeroed too
            (:func:`zero_dead_unit_biases`).
    """

    removes_units: ClassVar[bool] = False

    def masks(self, masking: Masking, names: List[str], k: float) -> Dict[str, torch.Tensor]:
        """``{name: float 0/1 mask}`` for ``names``, removing the ``k`` fraction (in [0, 1)) per layer."""
        raise NotImplementedError


@UNIT_CRITERIA.register("weight")
class WeightCriterion(PruneCriterion):
    """Per layer, prune the ``round(k * numel)`` weights with the smallest ``|w|`` (among active ones)."""

    def masks(self, masking, names, k):
        scores = MagnitudeScore()(masking)
        counts = {n: scores[n].numel() - int(round(k * scores[n].numel())) for n in names}
        return layer_topk_masks({n: scores[n] for n in names}, counts)


@UNIT_CRITERIA.register("unit")
class UnitCriterion(PruneCriterion):
    """Per layer, prune the ``round(k * out)`` units (rows of the ``(out, in, ...)`` weight, i.e. a unit's
    incoming weights) with the smallest L2 norm; the mask zeroes whole rows."""

    removes_units: ClassVar[bool] = True

    def masks(self, masking, names, k):
        out = {}
        for n in names:
            w = masking.weight(n).detach()
            norms = w.reshape(w.shape[0], -1).norm(dim=1)
            keep_rows = topk_mask(norms, w.shape[0] - int(round(k * w.shape[0])))
            out[n] = keep_rows.view(-1, *([1] * (w.dim() - 1))).expand_as(w).contiguous()
        return out


@torch.no_grad()
def zero_dead_unit_biases(masking: Masking, names: List[str]) -> int:
    """Zero the bias of every unit of ``names`` with no active incoming weight; returns how many units."""
    n_dead = 0
    for n in names:
        mod = masking.module(n)
        dead, _ = unit_connectivity(masking.mask(n))
        if getattr(mod, "bias", None) is not None:
            mod.bias[dead] = 0.0
        n_dead += int(dead.sum())
    return n_dead


# --------------------------------------------------------------------------- least-squares unit removal (004)
@LS_UPDATES.register("ls")
def ls_update(y: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], rest: torch.Tensor, h: int,
              include_bias: bool) -> None:
    """Castellano et al. 1997 update after removing hidden unit ``h``, in place.

    Solves ``A delta = B`` in the least-squares sense (``torch.linalg.lstsq``, float64) with
    ``A = [Y_rest (, 1)]`` ``(n, |rest| (+1))`` and ``B = y_h w_:,h^T`` ``(n, C)`` (the removed unit's
    contribution to every output), then ``w[:, rest] += delta[:|rest|]^T`` (and ``b += delta[-1]``).

    Args:
        y: ``(n, H)`` hidden activations (inputs of the output layer) on the training samples.
        w: ``(C, H)`` output-layer weight; b: ``(C,)`` its bias or None.
        rest: indices of the hidden units that remain; h: the removed unit.
        include_bias: also adjust the output biases (document 004's bias unit).
    """
    a = y[:, rest].double()
    if include_bias and b is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
    target = y[:, h:h + 1].double() * w[:, h].double()[None, :]
    delta = torch.linalg.lstsq(a, target).solution  # (|rest| (+1), C)
    w[:, rest] += delta[:len(rest)].t().to(w.dtype)
    if include_bias and b is not None:
        b += delta[len(rest)].to(b.dtype)


@LS_UPDATES.register("none")
def no_update(y, w, b, rest, h, include_bias) -> None:
    """Remove the unit without adjusting anything (the control of document 004)."""


@torch.no_grad()
def hidden_outputs(model: nn.Module, out_layer: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Inputs of ``out_layer`` (the last hidden layer's activations) for every sample: ``(N, H)``
    (model in eval mode while recording; its mode is restored)."""
    store: List[torch.Tensor] = []
    handle = out_layer.register_forward_pre_hook(lambda mod, inp: store.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(store)
