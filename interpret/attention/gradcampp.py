"""Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential-score closed form): pixel
weights ``a^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` with ``g = dY^c / dA^k_ij``; channel weights
``w^c_k = sum_ij a^kc_ij ReLU(g_ij)``. Same closed form as pytorch-grad-cam.
"""
from __future__ import annotations

import torch

from interpret.attention.base import GradientLayerMethod

__all__ = ["GradCAMPlusPlus"]


class GradCAMPlusPlus(GradientLayerMethod):
    """Grad-CAM++: positive gradients weighted per position."""

    name = "gradcampp"
    eps: float = 1e-7

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        denom = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3     # (B, K, h, w)
        denom = torch.where(denom != 0, denom, torch.full_like(denom, self.eps))
        alpha = torch.where(gradients != 0, g2 / denom, torch.zeros_like(g2))
        return (alpha * gradients.clamp(min=0)).sum(dim=(2, 3))             # (B, K)
