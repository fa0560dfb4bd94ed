"""WideResNet (``model.arch=wrn``; Zagoruyko & Komodakis 2016, "Wide Residual Networks").

Every ``nn.Conv2d`` / ``nn.Linear`` weight is prunable by default (see :mod:`sparsebench.sparsity.masking`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
from torch import nn

from sparsebench.config.checks import check
from sparsebench.core.errors import ConfigError
from sparsebench.models.registry import ARCHS

if TYPE_CHECKING:  # pragma: no cover
    from sparsebench.config.schemas import ModelConfig


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


def check_wrn(cfg: "ModelConfig") -> None:
    """Depth must be 6n+4 (n >= 1) and the widen factor >= 1."""
    check(cfg.depth >= 10 and (cfg.depth - 4) % 6 == 0, "model.depth", cfg.depth,
          "WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...)")
    check(cfg.width >= 1, "model.width", cfg.width, "must be >= 1")


@ARCHS.register("wrn", input_kind="image", check=check_wrn, title="WideResNet")
def build_wrn(cfg: "ModelConfig", input_shape: Tuple[int, ...], num_classes: int) -> WideResNet:
    """A :class:`WideResNet` on ``(C, H, W)`` input.

    Raises:
        ConfigError: the input is not ``(C, H, W)``.
    """
    if len(input_shape) != 3:
        raise ConfigError(f"model={cfg.name}: a WideResNet needs image input (C, H, W), got shape {tuple(input_shape)}")
    return WideResNet(input_shape[0], num_classes, cfg.depth, cfg.width, cfg.dropout)
