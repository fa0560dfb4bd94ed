"""Networks: the MLP family (incl. LeNet-300-100 and the 784-1000-1000-500-200-10 "fc5") and WideResNet.

Plain PyTorch modules; every ``nn.Linear`` / ``nn.Conv2d`` weight is prunable by default (see
:mod:`sparsebench.sparsity.masking`).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from sparsebench.config import ModelConfig
from sparsebench.core.errors import ConfigError


class BipolarSigmoid(nn.Module):
    """``2 / (1 + exp(-x)) - 1`` in (-1, 1): the sigmoid-type activation of document 004."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x) - 1.0


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
               "bipolar_sigmoid": BipolarSigmoid}


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
                layers.append(ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


class _WideBasic(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016): depth = 6n + 4, widths 16, 16k, 32k, 64k.

    Input ``(N, C, H, W)`` (32x32 for CIFAR; MNIST padded with ``dataset.pad_to=32``); output ``(N, classes)``.

    Raises:
        ConfigError: depth is not 6n+4.
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 28, width: int = 5, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"model.depth={depth}: WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(_WideBasic(cin, cout, 2 if (i == 0 and stage > 0) else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        x = torch.relu(self.bn(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def build_model(cfg: ModelConfig, input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured network for inputs of ``input_shape`` (without batch dimension).

    Raises:
        ConfigError: a WideResNet on non-image (1-D) input.
    """
    if cfg.arch == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= int(d)
        return MLP(in_features, num_classes, list(cfg.hidden), cfg.activation, cfg.bias)
    if len(input_shape) != 3:
        raise ConfigError(f"model={cfg.name}: a WideResNet needs image input (C, H, W), got shape {tuple(input_shape)}")
    return WideResNet(input_shape[0], num_classes, cfg.depth, cfg.width, cfg.dropout)
