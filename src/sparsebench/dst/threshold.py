"""Trainable-threshold masks (``method=dst_masked``; Liu et al. 2020, "Dynamic sparse training: find
efficient sparse network from scratch with trainable masked layers").

Every prunable weight is parametrized (``torch.nn.utils.parametrize``) as ``W -> W * S(|W| - t)``
with one trainable threshold ``t`` per output neuron (:class:`ThresholdMask`, eqs. 2-4). The unit
step ``S`` is differentiated with the long-tailed straight-through estimator (:class:`StepLTE`,
:func:`long_tailed_estimator`, eq. 6; the one straight-through estimator of the code base), and
:class:`ThresholdMaskCallback` adds the sparsity regulariser ``alpha * sum exp(-t)`` and resets
layers that are (almost) fully masked (Sec. 3.3).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from sparsebench.core.io import MetricsLog
from sparsebench.sparsity.masking import Masking
from sparsebench.training.callbacks import Callback


def long_tailed_estimator(x: torch.Tensor) -> torch.Tensor:
    """Liu et al. 2020, eq. 6: the surrogate derivative ``H(x)`` of the unit step used by :class:`StepLTE`,
    ``2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``, ``0`` otherwise (same shape as ``x``)."""
    a = x.abs()
    return torch.where(a <= 0.4, 2.0 - 4.0 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


class StepLTE(torch.autograd.Function):
    """Unit step ``S(x) = 1[x > 0]`` with the long-tailed straight-through estimator of Liu et al.
    2020 (eq. 6): ``dS/dx ~ H(x)`` (:func:`long_tailed_estimator`)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * long_tailed_estimator(x)


class ThresholdMask(nn.Module):
    """Parametrization ``W -> W * S(|W| - t)`` with one trainable threshold per output neuron
    (``t`` shape ``(out_features,)`` / ``(out_channels,)``), Liu et al. 2020, eqs. 2-4.

    Register with ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", ThresholdMask(n_out))``.
    """

    def __init__(self, n_out: int, init: float = 0.0):
        super().__init__()
        self.threshold = nn.Parameter(torch.full((n_out,), float(init)))

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        t = self.threshold.view(-1, *([1] * (w.dim() - 1)))
        return StepLTE.apply(w.abs() - t)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask(w)


def attach_threshold_masks(masking: Masking, init: float = 0.0) -> Dict[str, ThresholdMask]:
    """Parametrize every prunable weight of ``masking`` with a :class:`ThresholdMask` (before the
    optimizer is built, so the thresholds are trained). Returns ``{name: parametrization}``."""
    from torch.nn.utils import parametrize

    out = {}
    for name in masking.names:
        mod = masking.module(name)
        pm = ThresholdMask(mod.weight.shape[0], init).to(mod.weight.device)
        parametrize.register_parametrization(mod, "weight", pm)
        out[name] = pm
    return out


class ThresholdMaskCallback(Callback):
    """Training side of ``dst_masked``: adds the sparsity regulariser ``alpha * sum_l sum_i exp(-t_i)``
    (its gradient, in ``on_after_backward``), resets a layer's thresholds to 0 when more than
    ``reset_above`` of it is masked (Liu et al. 2020, Sec. 3.3), and mirrors the current masks into
    the Masking buffers (for densities and checkpoints) at every epoch end.
    """

    def __init__(self, masking: Masking, masks: Dict[str, ThresholdMask], alpha: float, reset_above: float = 0.99,
                 check_every: int = 50, metrics: Optional[MetricsLog] = None):
        self.masking, self.masks, self.alpha = masking, masks, float(alpha)
        self.reset_above, self.check_every, self.metrics = float(reset_above), int(check_every), metrics
        self.resets = 0

    def state_dict(self) -> dict:
        return {"resets": self.resets}  # the thresholds themselves are model parameters

    def load_state_dict(self, state: dict) -> None:
        self.resets = int(state.get("resets", 0))

    def on_after_backward(self, trainer) -> None:
        if self.alpha > 0:
            reg = self.alpha * sum(torch.exp(-pm.threshold).sum() for pm in self.masks.values())
            reg.backward()

    @torch.no_grad()
    def sync(self) -> None:
        """Write the current ``S(|W| - t)`` into each layer's ``weight_mask`` buffer."""
        for name, pm in self.masks.items():
            mod = self.masking.module(name)
            w = mod.parametrizations.weight.original
            mod.weight_mask.copy_(pm.mask(w))

    @torch.no_grad()
    def on_step_end(self, trainer) -> None:
        if trainer.step % self.check_every:
            return
        for name, pm in self.masks.items():
            w = self.masking.module(name).parametrizations.weight.original
            if float(pm.mask(w).mean()) < 1.0 - self.reset_above:
                pm.threshold.zero_()
                self.resets += 1

    def on_epoch_end(self, trainer) -> None:
        self.sync()
        if self.metrics is not None:
            self.metrics.log(trainer.step, {"dst_masked/density": self.masking.density(),
                                            **{f"dst_masked/threshold_mean/{n}": float(pm.threshold.detach().mean())
                                               for n, pm in self.masks.items()}})
