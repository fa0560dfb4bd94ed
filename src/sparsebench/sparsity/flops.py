"""FLOPs of a masked network relative to its dense version, counted as RigL reports them.

Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", Appendix H:

* inference: the dense model's FLOPs ``f_D`` for one sample, with each prunable layer's share scaled
  by its density, ``f_S = f_D - sum_l f_l + sum_l d_l f_l``;
* training, per step: forward plus a backward of twice the forward (gradients w.r.t. activations and
  weights), ``3 f_S`` for a fixed mask (static sparse, SET), ``3 f_D`` dense;
* RigL (``method.grow=gradient``): every ΔT steps the dense weight gradient is formed, so on average
  ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)`` per step; mask updates stop at ``T_end``, after which the
  step costs ``3 f_S`` (a fraction ``t_end`` of training at the first rate, the rest at the second).

``f_D`` and its per-layer parts ``f_l`` come from :class:`torch.utils.flop_counter.FlopCounterMode`
on one zero sample (its module hierarchy gives each ``nn.Linear`` / ``nn.Conv*``'s count), so only
what that counter counts enters (matrix products and convolutions; bias adds, activations and
normalisation count zero, as in RigL's tables, which count multiply-adds of the weighted layers).
The dense counts are taken afresh on every call (milliseconds: 2 ms for fc5, 26 ms for WRN-28x5 on CPU).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsebench.sparsity.masking import Masking


@torch.no_grad()
def dense_flops(masking: Masking, input_shape: Tuple[int, ...]) -> Tuple[float, Dict[str, float]]:
    """Dense inference FLOPs of ``masking.model`` on one sample of ``input_shape`` (no batch dim).

    Returns:
        ``(total, {prunable weight name: FLOPs of its module})``; FLOPs as counted by
        :class:`FlopCounterMode` (a multiply-add = 2 FLOPs). The model's train/eval mode is restored.
    """
    model = masking.model
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, depth=None) as counter:
            model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_layer = {}
    for name in masking.names:
        mod = name[: -len(".weight")] if name.endswith(".weight") else ""
        key = f"{root}.{mod}" if mod else root
        per_layer[name] = float(sum(counts.get(key, {}).values()))
    return float(counter.get_total_flops()), per_layer


def inference_flops_rel(masking: Masking, input_shape: Tuple[int, ...]) -> float:
    """``f_S / f_D``: inference FLOPs of the masked model relative to the dense one (1.0 when dense)."""
    total, per_layer = dense_flops(masking, input_shape)
    if total <= 0:
        return 1.0
    dens = masking.layer_densities()
    sparse = total - sum(per_layer.values()) + sum(dens[n] * f for n, f in per_layer.items())
    return sparse / total


def train_flops_rel(inference_rel: float, delta_t: Optional[int] = None, t_end: float = 1.0) -> float:
    """Training FLOPs per step relative to dense training (``3 f_D``), Evci et al. 2020 Appendix H.

    Args:
        inference_rel: ``f_S / f_D`` (:func:`inference_flops_rel`).
        delta_t: steps between RigL mask updates (a dense gradient each time), or None for a mask
            that needs no dense gradient (static sparse, SET, dense training).
        t_end: fraction of training during which the masks are updated (RigL's ``T_end``).

    Returns:
        ``3 f_S / 3 f_D`` without ``delta_t``; with it
        ``t_end * (3 f_S ΔT + 2 f_S + f_D) / (3 f_D (ΔT + 1)) + (1 - t_end) * f_S / f_D``.

    Raises:
        ValueError: ``delta_t < 1`` or ``t_end`` outside [0, 1].
    """
    s = float(inference_rel)
    if delta_t is None:
        return s
    if int(delta_t) < 1 or not 0.0 <= t_end <= 1.0:
        raise ValueError(f"delta_t={delta_t!r} must be >= 1 and t_end={t_end!r} in [0, 1]")
    dt = int(delta_t)
    rigl = (3.0 * s * dt + 2.0 * s + 1.0) / (3.0 * (dt + 1))
    return t_end * rigl + (1.0 - t_end) * s


def flops_columns(masking: Optional[Masking], input_shape: Tuple[int, ...], method_cfg=None,
                  steps_per_epoch: Optional[int] = None) -> Dict[str, float]:
    """The two summary columns ``inference_flops_rel`` and ``train_flops_rel`` of a run.

    Args:
        masking: the run's masks (None = a dense model: both 1.0).
        input_shape: one sample's shape (no batch dimension).
        method_cfg: the ``method`` config; ``grow == "gradient"`` (RigL) adds the dense-gradient steps
            every ``delta_t`` (or ``delta_t_epochs * steps_per_epoch``) until ``t_end``.
        steps_per_epoch: needed only when ΔT is given in epochs.
    """
    if masking is None or not masking.names:
        return {"inference_flops_rel": 1.0, "train_flops_rel": 1.0}
    inf = inference_flops_rel(masking, input_shape)
    delta_t = None
    if method_cfg is not None and method_cfg.get("grow", None) == "gradient":
        delta_t = method_cfg.get("delta_t", None)
        epochs = method_cfg.get("delta_t_epochs", None)
        if epochs and steps_per_epoch:
            delta_t = max(1, int(round(float(epochs) * steps_per_epoch)))
        delta_t = int(delta_t) if delta_t else None
    t_end = float(method_cfg.get("t_end", 1.0) if method_cfg is not None else 1.0)
    return {"inference_flops_rel": inf, "train_flops_rel": train_flops_rel(inf, delta_t, t_end)}
