"""Class activation maps (Zhou et al. 2016, "Learning Deep Features for Discriminative
Localization", eq. 2): ``M_c(x, y) = sum_k w_ck f_k(x, y)`` for a network whose head is a linear
layer after global average pooling.

One forward pass under ``torch.no_grad`` captures the feature layer; the maps are a matrix product
with the head's weights, so CAM costs about one forward pass. The head bias is left out (it shifts
every position equally). For a GAP + linear head the Grad-CAM weights are ``w_ck / (h w)``, so CAM
equals ``h w`` times Grad-CAM before normalisation (tested).

Example:
    >>> maps = CAM(model)(images, targets=[0, 2])        # doctest: +SKIP
    >>> maps.shape                                        # doctest: +SKIP
    torch.Size([2, 1, 224, 224])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interpret.attention.base import AttentionMethod, model_state
from interpret.hooks import capture, resolve_layer

__all__ = ["CAM", "cam_from_features"]


def cam_from_features(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al. 2016, eq. 2) from feature maps and head weights: ``M_c = sum_k w_ck f_k``.

    The one implementation of the product: :class:`CAM` (torch model) and the service's ONNX fast
    path (features from ONNX Runtime) both call it.

    Args:
        features: (B, K, h, w) feature-layer activations.
        weight: (C, K) weight of the linear head after global average pooling.
        targets: (B, T) class indices.

    Returns:
        (B, T, h, w) raw maps (bias left out; no ReLU: :func:`finalize_maps` applies it).

    Raises:
        ValueError: ``features`` and ``weight`` disagree in K.
    """
    if features.dim() != 4 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"cam: features (B, K, h, w) and head weight (C, K) must agree in K; got "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    w = weight.to(features.dtype)[targets]                                  # (B, T, K)
    # a weighted sum over K per target, not einsum: its BLAS call waited ~13 ms for a thread pool woken next
    # to ONNX Runtime's in the service (2 cores), for 0.4 ms of work; memory stays B x K x h x w per target
    return torch.stack([(w[:, t, :, None, None] * features).sum(1)          # (B, h, w)
                        for t in range(w.shape[1])], 1)                     # (B, T, h, w)


class CAM(AttentionMethod):
    """Class activation map from the feature layer and the linear head.

    Args:
        model: classifier whose ``head`` (or the module named by ``head``) is an ``nn.Linear`` applied
            to the global average of the feature layer.
        layer: feature layer; default ``model.feature_layer``.
        head: dotted name of the linear head.
        relu: apply ReLU before normalisation (default True, as for Grad-CAM, so that both methods
            agree after normalisation).

    Raises:
        ValueError: no linear head, or its input size differs from the feature channels.
    """

    name = "cam"

    def __init__(self, model: nn.Module, layer: str | None = None, head: str = "head",
                 relu: bool | None = None):
        super().__init__(model, layer, relu)
        if head == "head" and hasattr(model, "head_kind") and model.head is None:
            raise ValueError(f"cam is exact only for a global-average-pool + linear head; this {model.arch} has "
                             "another head (e.g. a ViT's class token): use method='gradcam'")
        try:
            lin = resolve_layer(model, head)
        except ValueError as e:
            raise ValueError(f"cam needs a linear head after global average pooling; {e}") from None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"cam needs model.{head} to be an nn.Linear after global average "
                             f"pooling, got {type(lin).__name__}; use method='gradcam' instead")
        self.head = lin

    def raw(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        images = self._images(images)
        with model_state(self.model, freeze=False), torch.no_grad(), \
                capture(self.model, self.layer) as cap:
            logits = self.model(images)                                     # (B, C)
            feats = cap.activations[self.layer]                             # (B, K, h, w)
        tgt = self._targets(targets, images.shape[0], logits)               # (B, T)
        if feats.dim() != 4 or feats.shape[1] != self.head.in_features:
            raise ValueError(f"cam: layer {self.layer!r} gives {tuple(feats.shape)} but the head "
                             f"expects {self.head.in_features} channels after pooling")
        return cam_from_features(feats, self.head.weight.detach(), tgt)     # (B, T, h, w)
