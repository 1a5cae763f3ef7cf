"""Pixel attribution methods through Captum: Integrated Gradients (Sundararajan et al. 2017, eq. 1,
black-image baseline) and SmoothGrad (Smilkov et al. 2017: ``NoiseTunnel`` over ``Saliency``).

Attributions (B, C, H, W) are aggregated over input channels as ``sum_c |attr_c|`` and then, as for
every method, min-max normalised. One Captum call per target column covers the whole batch.
"""
from __future__ import annotations

import torch
from torch import nn

from interpret.attention.base import PixelMethod

__all__ = ["IntegratedGradientsMethod", "SmoothGradMethod"]


class IntegratedGradientsMethod(PixelMethod):
    """Integrated gradients from a constant baseline.

    Args:
        model: classifier.
        layer: ignored (pixel method).
        n_steps: Riemann steps along the path.
        baseline: constant baseline value (0 = black image).
        internal_batch_size: images x steps evaluated per forward pass (memory bound); default B.
    """

    name = "integrated_gradients"

    def __init__(self, model: nn.Module, layer: str | None = None, n_steps: int = 32,
                 baseline: float = 0.0, internal_batch_size: int | None = None,
                 relu: bool | None = None):
        super().__init__(model, layer, relu)
        if int(n_steps) < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.n_steps, self.baseline = int(n_steps), float(baseline)
        self.internal_batch_size = internal_batch_size

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(self.model)
        return ig.attribute(x, baselines=self.baseline, target=target, n_steps=self.n_steps,
                            internal_batch_size=self.internal_batch_size or x.shape[0] * 4)


class SmoothGradMethod(PixelMethod):
    """SmoothGrad: saliency |dy/dx| averaged over noisy copies of the input.

    Args:
        model: classifier.
        layer: ignored (pixel method).
        nt_samples: noisy samples per image.
        stdev: noise standard deviation, in input units (images are in [0, 1]).
        nt_samples_batch_size: noisy samples per forward pass.
    """

    name = "smoothgrad"

    def __init__(self, model: nn.Module, layer: str | None = None, nt_samples: int = 16,
                 stdev: float = 0.15, nt_samples_batch_size: int | None = None,
                 relu: bool | None = None):
        super().__init__(model, layer, relu)
        if int(nt_samples) < 1 or float(stdev) < 0:
            raise ValueError(f"need nt_samples >= 1 and stdev >= 0, got {nt_samples}, {stdev}")
        self.nt_samples, self.stdev = int(nt_samples), float(stdev)
        self.nt_samples_batch_size = nt_samples_batch_size

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import NoiseTunnel, Saliency

        nt = NoiseTunnel(Saliency(self.model))
        return nt.attribute(x, nt_type="smoothgrad", nt_samples=self.nt_samples,
                            stdevs=self.stdev, target=target,
                            nt_samples_batch_size=self.nt_samples_batch_size)
