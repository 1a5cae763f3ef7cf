"""Grad-CAM (Selvaraju et al. 2017, eq. 1-2): channel weights are the spatially averaged gradients
of the class score, ``alpha_k^c = 1/Z sum_ij dy^c / dA^k_ij``; map ``ReLU(sum_k alpha_k^c A^k)``.

Matches Captum's ``LayerGradCam(..., relu_attributions=True)`` followed by bilinear upsampling and
min-max normalisation (tested to 1e-4, including a DenseNet-like in-place ReLU after the layer).

Example:
    >>> maps, raw = GradCAM(model, layer="features")(images, [[0, 3]] * len(images),
    ...                                              return_raw=True)  # doctest: +SKIP
"""
from __future__ import annotations

import torch

from interpret.attention.base import GradientLayerMethod

__all__ = ["GradCAM"]


class GradCAM(GradientLayerMethod):
    """Gradient-weighted class activation mapping."""

    name = "gradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3))                                   # (B, K)
