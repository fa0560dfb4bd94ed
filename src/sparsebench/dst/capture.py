"""Activation capture for grow criteria that read a layer's per-batch vectors (``grow=similarity``).

:class:`ActivationCapture` keeps, for one training step, each watched layer's input ``x`` and the
gradient of its output ``dL/dz`` (forward hook plus tensor hook; armed only for update steps).
:func:`layer_vectors` turns them into the vectors whose inner products are ``dL/dW``:
``U`` ``(R, n_in)`` and ``G`` ``(R, n_out)`` with ``G^T U == dL/dW`` (Linear and sparse Linear: ``R = B``;
Conv2d: the input is unfolded, ``R = B * H_out * W_out``). The hooks work on any module, so a truly sparse
layer is captured like a dense one (its grow criteria never see a dense gradient).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.sparse_linear import SparseTrainLinear


def layer_vectors(module: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-batch vectors of a layer: inputs ``U`` ``(R, n_in)`` and output gradients ``G`` ``(R, n_out)``
    with ``G.T @ U == dL/dW`` reshaped to ``(n_out, n_in)`` (the weight's ``view(n_out, -1)``).

    Linear (and the truly sparse :class:`~sparsebench.sparsity.sparse_linear.SparseTrainLinear`, whose
    ``(out, in)`` weight exists only at its active positions): ``R = B`` (leading dims flattened). Conv2d: the input is unfolded with the layer's
    kernel size, dilation, padding and stride, ``R = B * H_out * W_out`` and
    ``n_in = C_in * kh * kw`` in the weight's ``(c, kh, kw)`` order.

    Raises:
        ConfigError: a grouped or non-2-D convolution (not supported by the unfold path).
    """
    if isinstance(module, (nn.Linear, SparseTrainLinear)):
        return x.reshape(-1, x.shape[-1]), gout.reshape(-1, gout.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise ConfigError(f"method.update_layers: grow=similarity cannot unfold grouped/'same'-padded conv {module}")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        u = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * P, C*kh*kw)
        g = gout.flatten(2).transpose(1, 2).reshape(-1, gout.shape[1])  # (B * P, O)
        return u, g
    raise ConfigError(f"method.update_layers: grow=similarity supports Linear and Conv2d layers, not {type(module).__name__}")


class ActivationCapture:
    """Forward hooks that keep, for one training step, each watched layer's input ``x`` and the
    gradient of its output ``dL/dz`` (a tensor hook). Armed only for update steps, removed after."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.inputs: Dict[str, torch.Tensor] = {}
        self.grads: Dict[str, torch.Tensor] = {}
        self._handles: List = []

    def arm(self) -> None:
        if self._handles:
            return
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(mod, inputs, out):
            if not (mod.training and torch.is_grad_enabled() and out.requires_grad):
                return
            self.inputs[name] = inputs[0].detach()

            def keep(g, name=name):
                self.grads[name] = g.detach()

            out.register_hook(keep)

        return hook

    def get(self, name: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.inputs.get(name), self.grads.get(name)

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.inputs.clear()
        self.grads.clear()
