"""The MLP family (``model.arch=mlp``): LeNet-300-100, the 784-1000-1000-500-200-10 "fc5", ...

Every ``nn.Linear`` weight is prunable by default (see :mod:`sparsebench.sparsity.masking`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Tuple

import torch
from torch import nn

from sparsebench.models.registry import ACTIVATIONS, ARCHS

if TYPE_CHECKING:  # pragma: no cover
    from sparsebench.config.schemas import ModelConfig


@ACTIVATIONS.register("bipolar_sigmoid")
class BipolarSigmoid(nn.Module):
    """``2 / (1 + exp(-x)) - 1`` in (-1, 1): the sigmoid-type activation of document 004."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x) - 1.0


for _name, _cls in (("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid), ("gelu", nn.GELU)):
    ACTIVATIONS.register(_name)(_cls)


class MLP(nn.Module):
    """Fully connected network ``in -> hidden[0] -> ... -> num_classes``.

    Input of any shape ``(N, *)`` is flattened to ``(N, in_features)``; output is logits ``(N, C)``.
    Layers are named ``layers.0``, ``layers.2``, ... (activations between them); the last Linear is
    the output layer.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (100,), activation: str = "relu",
                 bias: bool = True):
        super().__init__()
        dims = [in_features, *hidden, num_classes]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS.get(activation)())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


@ARCHS.register("mlp", input_kind=None, title="MLP")
def build_mlp(cfg: "ModelConfig", input_shape: Tuple[int, ...], num_classes: int) -> MLP:
    """An :class:`MLP` on the flattened input (``prod(input_shape)`` features)."""
    in_features = 1
    for d in input_shape:
        in_features *= int(d)
    return MLP(in_features, num_classes, list(cfg.hidden), cfg.activation, cfg.bias)
