"""Model factory: an MLP for tabular rows and a small CNN for (C, H, W) images.

No dropout or batch statistics: a model's output is a pure function of its weights and
input, which is what lets a retrained shard equal one trained from scratch bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, classes)
        return self.head(self.body(x.flatten(1)))


class SmallCNN(nn.Module):
    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            c = out
        layers += [nn.AdaptiveAvgPool2d((max(1, h // 2), max(1, w // 2)))]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c * max(1, h // 2) * max(1, w // 2), num_classes)
        self.in_shape = tuple(in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C*H*W) or (B, C, H, W)
        x = x.reshape(x.shape[0], *self.in_shape)
        return self.head(self.body(x).flatten(1))


def build_model(cfg: ModelConfig, feature_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the configured model for inputs of ``feature_shape`` (per sample)."""
    if cfg.kind == "mlp":
        return MLP(math.prod(feature_shape), cfg.hidden, num_classes)
    if len(feature_shape) != 3:
        raise ValueError(
            f"model.kind=cnn needs image-shaped input (C, H, W); the data has feature shape "
            f"{tuple(feature_shape)}. Set data.feature_shape (e.g. [1, 8, 8]) or use model.kind=mlp"
        )
    return SmallCNN(feature_shape, cfg.channels, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
