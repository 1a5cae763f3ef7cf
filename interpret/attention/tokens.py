"""Layer maps of transformer blocks: Grad-CAM and Grad-CAM++ on a ViT's token maps.

A ViT block outputs tokens ``(B, N, D)``: prefix tokens (class, registers) then ``h * w`` patch tokens. A
model that declares ``token_grid = (prefix, h, w)`` (:class:`training.imported.ImportedClassifier` for timm
and torchvision ViTs) has its layer activations and gradients turned into maps ``(B, D, h, w)`` (prefix
tokens dropped, patch tokens reshaped to the grid: :func:`training.imported.tokens_to_maps`) before the
method's channel weights, so :class:`~interpret.attention.gradcam.GradCAM` and
:class:`~interpret.attention.gradcampp.GradCAMPlusPlus` keep their one signature
``method(images, targets) -> (B, T, H, W)``. CAM needs a global-average-pool + linear head, which a ViT's
class-token head is not: it refuses such a model (``head`` is None) and says to use Grad-CAM.

Example:
    >>> maps = attention_maps(vit, images, [0] * len(images), method="gradcam")  # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["layer_maps"]


def layer_maps(model: nn.Module, layer: str, tensor: torch.Tensor) -> torch.Tensor:
    """A layer's activations (or gradients) as maps ``(B, K, h, w)``.

    Args:
        model: the explained model (its ``token_grid``, when it has one, describes token layers).
        layer: the layer's dotted name (for the error message).
        tensor: (B, K, h, w) maps (returned as they are) or (B, N, D) tokens of a model with ``token_grid``.

    Returns:
        (B, K, h, w).

    Raises:
        ValueError: tokens from a model without ``token_grid``, or any other shape.
    """
    if tensor.dim() == 4:
        return tensor
    grid = getattr(model, "token_grid", None)
    if tensor.dim() == 3 and grid is not None:
        from training.imported import tokens_to_maps

        return tokens_to_maps(tensor, grid)                                     # (B, N, D) -> (B, D, h, w)
    raise ValueError(f"layer {layer!r} output has shape {tuple(tensor.shape)}; a layer method needs a (B, K, h, w) "
                     "feature map, or (B, N, D) tokens of a model with a token_grid (prefix, h, w)")
