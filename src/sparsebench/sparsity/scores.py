"""Scores of prunable weights (higher = more important), shared by pruning and by growth.

A scorer maps a :class:`~sparsebench.sparsity.masking.Masking` to ``{name: tensor of the weight's
shape}``; :mod:`sparsebench.sparsity.selection` turns scores into masks (layer-wise or global top-k).
Pruning keeps the highest scores; a grow step can rank the inactive positions by the same scores.
The split into small scorer objects follows mklasby/sparsimony's scorers; written anew.

* :class:`MagnitudeScore`: ``|w|`` (Han et al. 2015; the IMP criterion of Frankle & Carbin 2019).
* :class:`RandomScore`: i.i.d. uniform scores from a seeded generator (random pruning / growth).
* :class:`SnipScore`: connection sensitivity ``|w * dL/dw|`` at initialisation (SNIP, Lee, Ajanthan &
  Torr 2019, eq. 6).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from sparsebench.sparsity.masking import Masking


class Scorer:
    """Base class: :meth:`layer` scores one prunable weight; ``scorer(masking)`` scores all of them
    in module order (the order in which a random scorer draws its numbers)."""

    def layer(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores ``(weight's shape)``, float; higher = keep."""
        raise NotImplementedError

    def __call__(self, masking: Masking) -> Dict[str, torch.Tensor]:
        return {n: self.layer(n, w, m) for n, w, m in masking.items()}


class MagnitudeScore(Scorer):
    """``|w|`` as float32 on the weight's device.

    Args:
        among_active: pruned positions (mask 0) score ``-inf``, so a top-k never revives them.
    """

    def __init__(self, among_active: bool = True):
        self.among_active = among_active

    def layer(self, name, weight, mask):
        score = weight.detach().abs().float()
        if self.among_active:
            score = torch.where(mask > 0, score, torch.full_like(score, -float("inf")))
        return score


class RandomScore(Scorer):
    """Uniform ``[0, 1)`` scores drawn on the CPU from ``generator`` (layer by layer, in module order), so a
    top-k of them is a uniformly random mask with an exact count."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def layer(self, name, weight, mask):
        return torch.rand(weight.shape, generator=self.generator)


class SnipScore(Scorer):
    """Connection sensitivity ``|w * g|`` of every prunable weight (SNIP, Lee et al. 2019, eq. 6).

    ``g`` is the gradient of the mean loss over ``batches`` minibatches of ``batch_size`` samples drawn
    without replacement (seeded by ``generator``) from ``(x, y)``; the model is left unchanged
    (gradients are cleared, train/eval mode restored). The normalisation of eq. 6 does not change a
    top-k and is omitted.

    Args:
        model: the network (at initialisation).
        x: ``(N, *)`` inputs; y: ``(N,)`` labels.
        loss_fn: ``(logits (B, C), labels (B,)) -> scalar``.
        batches: minibatches averaged (at most ``ceil(N / batch_size)``); batch_size: samples per minibatch.

    Returns (on call):
        ``{name: float32 tensor of the weight's shape, >= 0}`` on the weight's device.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches: int, batch_size: int,
                 generator: Optional[torch.Generator] = None):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.batches, self.batch_size, self.generator = batches, batch_size, generator

    def layer(self, name, weight, mask):
        return (weight.detach() * weight.grad.detach()).abs().float()

    def __call__(self, masking: Masking) -> Dict[str, torch.Tensor]:
        model, x, y = self.model, self.x, self.y
        n = x.shape[0]
        perm = torch.randperm(n, generator=self.generator)
        was = model.training
        model.train()
        model.zero_grad(set_to_none=True)
        batches = max(1, min(self.batches, math.ceil(n / self.batch_size)))
        for b in range(batches):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size].to(x.device)
            loss = self.loss_fn(model(x[idx]), y[idx]) / batches
            loss.backward()
        scores = super().__call__(masking)
        model.zero_grad(set_to_none=True)
        model.train(was)
        return scores
