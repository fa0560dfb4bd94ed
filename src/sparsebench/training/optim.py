"""Optimizers, learning-rate schedules and losses, chosen by ``trainer.optimizer``, ``trainer.schedule``
and ``trainer.loss`` through the registries :data:`OPTIMIZERS`, :data:`LR_SCHEDULES` and :data:`LOSSES`."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.config.schemas import TrainerConfig
from sparsebench.core.registry import Registry

OPTIMIZERS: Registry = Registry("trainer.optimizer")
LR_SCHEDULES: Registry = Registry("trainer.schedule")
LOSSES: Registry = Registry("trainer.loss")


# --------------------------------------------------------------------------- optimizers
@OPTIMIZERS.register("sgd")
def sgd(cfg: TrainerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with ``momentum``, ``nesterov`` (only with momentum > 0) and coupled ``weight_decay``."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def adam(cfg: TrainerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015) with L2 ``weight_decay`` added to the gradient."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_optimizer(cfg: TrainerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``trainer.optimizer`` optimizer over ``params``; raises ConfigError for an unknown name."""
    return OPTIMIZERS.get(cfg.optimizer)(cfg, params)


# --------------------------------------------------------------------------- LR schedules
# each returns the multiplicative LR factor as a function of the step s (0 <= s <= total_steps)
@LR_SCHEDULES.register("constant")
def constant(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """Factor 1."""
    return lambda s: 1.0


@LR_SCHEDULES.register("cosine")
def cosine(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """Cosine decay to 0 at ``total_steps`` (Loshchilov & Hutter 2017, without restarts)."""
    return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))


@LR_SCHEDULES.register("step")
def step(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiply by ``gamma`` at each milestone (fractions of ``total_steps``)."""
    marks = [int(m * total_steps) for m in cfg.milestones]
    return lambda s: cfg.gamma ** sum(s >= m for m in marks)


def lr_lambda(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """The ``trainer.schedule`` factor function for a run of ``total_steps`` steps."""
    return LR_SCHEDULES.get(cfg.schedule)(cfg, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`lr_lambda`, continuing from ``start_step`` (late rewinding)."""
    factor = lr_lambda(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s + start_step))


# --------------------------------------------------------------------------- losses
@LOSSES.register("cross_entropy")
def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``out (N, C)`` and labels ``y (N,)``."""
    return F.cross_entropy(out, y)


@LOSSES.register("mse")
def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between ``out (N, C)`` and one-hot targets of ``y (N,)`` (document 004)."""
    return F.mse_loss(out, F.one_hot(y, out.shape[1]).to(out.dtype))
