"""A factory for the bring-your-own-model tests (``factory:tests.training.byom_factory:build``)."""
from __future__ import annotations

from torch import nn


def build(outputs: int = 2, sigmoid: bool = False) -> nn.Module:
    """A tiny CNN: conv -> ReLU -> conv -> ReLU -> GAP -> linear (-> sigmoid), ``outputs`` wide."""
    layers = [nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
              nn.Flatten(), nn.Linear(8, outputs)]
    return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))
