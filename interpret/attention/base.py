"""Shared machinery of the attention-map methods: argument checks, hooks, backward, ReLU, upsampling.

A method subclasses :class:`AttentionMethod` (pixel-space Captum methods: :class:`PixelMethod`) and
overrides only what differs, in the manner of pytorch-grad-cam's ``get_cam_weights``:

- gradient-based layer methods override :meth:`GradientLayerMethod.weights`
  (activations, gradients) -> per-channel weights;
- :class:`~interpret.attention.cam.CAM` overrides :meth:`AttentionMethod.raw` (no autograd);
- pixel methods override :meth:`PixelMethod.attribute`.

Every method has one call signature, ``method(images, targets) -> (B, T, H, W)`` in [0, 1].
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from interpret.attention.tokens import layer_maps
from interpret.devices import model_device
from interpret.hooks import capture, resolve_layer

logger = logging.getLogger(__name__)

__all__ = ["AttentionMethod", "GradientLayerMethod", "PixelMethod", "format_targets",
           "minmax_normalize", "upsample", "model_state", "finalize_maps", "SERVED_RELU"]

#: The one choice of post-processing for every map this project shows or scores (the service's
#: ``/explain``, the audit's localisation, shortcut and gallery sections, the imbalance study):
#: raw map -> ReLU -> bilinear upsampling -> per-map min-max to [0, 1].
#:
#: Why ReLU by default: Grad-CAM (Selvaraju et al. 2017, eq. 2) and CAM as used by Zhou et al. keep
#: only the evidence *for* the class; the negative part is evidence for other classes and, left in,
#: it moves the min-max floor so that the least negative region reads as "attended". Captum chooses
#: the opposite default ("we choose not to apply ReLU") for a general-purpose library; here one map is
#: both shown to clinicians and audited, so they must be the same map, and it is the papers' map.
#: Pass ``relu=False`` only for an analysis that says it departs from this (and why).
SERVED_RELU = True


def finalize_maps(raw: torch.Tensor, size: tuple[int, int], relu: bool = SERVED_RELU) -> torch.Tensor:
    """Raw low-resolution maps to displayable maps: ReLU (optional) -> bilinear upsampling -> min-max.

    This is the only place that turns raw maps into [0, 1] maps; :class:`AttentionMethod`, the serving
    fast path (CAM from ONNX features) and the audit all call it, so what is audited is what is served.

    Args:
        raw: (B, T, h, w) raw maps (any float dtype).
        size: (H, W) output size.
        relu: keep only positive evidence before normalising (see :data:`SERVED_RELU`).

    Returns:
        (B, T, H, W) float32 maps, each min-max normalised to [0, 1] (a constant map becomes zeros).

    Raises:
        ValueError: ``raw`` is not 4-D.
    """
    if raw.dim() != 4:
        raise ValueError(f"raw maps must be (B, T, h, w), got shape {tuple(raw.shape)}")
    maps = F.relu(raw) if relu else raw
    return minmax_normalize(upsample(maps.float(), tuple(size)))


def format_targets(targets: Any, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """Targets as a (B, T) int64 tensor.

    Args:
        targets: an int (same class for every image), a sequence / 1-D tensor of B ints (one per
            image), or a (B, T) nested sequence / tensor (T classes per image).
        batch: the batch size B.
        num_classes: when given, every index must lie in ``[0, num_classes)``.

    Raises:
        ValueError: wrong shape, non-integer values or out-of-range class indices.
    """
    t = torch.as_tensor(targets)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != batch or t.shape[1] == 0:
        raise ValueError(f"targets must be an int, B={batch} ints or a (B={batch}, T) array, got "
                         f"shape {tuple(torch.as_tensor(targets).shape)}")
    if num_classes is not None and ((t < 0) | (t >= num_classes)).any():
        raise ValueError(f"target class indices must lie in [0, {num_classes}), got "
                         f"{sorted(set(t.flatten().tolist()))}")
    return t


def minmax_normalize(maps: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Min-max normalise each map over its last two dimensions to [0, 1]; constant maps become 0.

    A map whose range is below ``rtol`` times its magnitude is constant up to float rounding (e.g. a
    1 x 1 layer map after bilinear upsampling) and also becomes 0: stretching rounding noise to [0, 1]
    would draw a pattern that the model never computed.

    Args:
        maps: (..., H, W).
        rtol: relative range under which a map counts as constant.

    Returns:
        Same shape, float.
    """
    flat = maps.flatten(-2).float()
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi - lo
    varies = span > rtol * torch.maximum(lo.abs(), hi.abs())
    scale = torch.where(varies, span, torch.ones_like(span))
    out = torch.where(varies, (flat - lo) / scale, torch.zeros_like(flat))
    return out.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``, as Captum's ``LayerAttribution.interpolate``).

    Args:
        maps: (B, T, h, w).
        size: (H, W).

    Returns:
        (B, T, H, W).
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@contextlib.contextmanager
def model_state(model: nn.Module, freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (and parameters to ``requires_grad=False`` when ``freeze``) and
    restore each module's training flag and each parameter's ``requires_grad`` afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        if freeze:
            for p, _ in grads:
                p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor, got dtype {images.dtype}")
    return images


class AttentionMethod:
    """Base class: one attention-map method bound to a model (and a layer for layer methods).

    Args:
        model: a classifier returning logits (B, K).
        layer: dotted name of the layer to explain; default ``model.feature_layer``. Ignored by pixel
            methods.
        relu: keep only positive evidence before normalisation (Grad-CAM's ReLU).

    Call ``method(images, targets)`` for (B, T, H, W) maps in [0, 1], or ``method.raw(images,
    targets)`` for the un-normalised, not upsampled maps (B, T, h, w). Both run on the model's device
    (:func:`interpret.devices.model_device`): the images are moved there, and the maps are returned there.
    """

    name: str = "base"
    uses_layer: bool = True
    relu: bool = SERVED_RELU

    def __init__(self, model: nn.Module, layer: str | None = None, relu: bool | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        if relu is not None:
            self.relu = bool(relu)
        self.layer: str | None = None
        if self.uses_layer:
            if layer is None:
                layer = getattr(model, "feature_layer", None)
                if not layer:
                    raise ValueError(f"{type(model).__name__} has no 'feature_layer' attribute; pass "
                                     f"layer='<dotted module name>' to choose the layer to explain")
            resolve_layer(model, layer)
            self.layer = layer
        elif layer is not None:
            logger.info("%s works on input pixels; layer=%r is ignored", self.name, layer)

    # ------------------------------------------------------------------ what subclasses override
    def raw(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        """Un-normalised maps at the layer's resolution, before ReLU.

        Args:
            images: (B, C, H, W).
            targets: see :func:`format_targets`.

        Returns:
            (B, T, h, w) float.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pipeline
    def __call__(self, images: torch.Tensor, targets: Any,
                 return_raw: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention maps (B, T, H, W) in [0, 1]: raw -> ReLU -> bilinear upsampling -> min-max.

        Args:
            images: (B, C, H, W) float.
            targets: an int, B ints, or (B, T) ints.
            return_raw: also return the raw low-resolution maps (B, T, h, w) (before ReLU).

        Returns:
            maps, or ``(maps, raw)`` when ``return_raw``.
        """
        images = self._images(images)
        raw = self.raw(images, targets).detach()
        maps = finalize_maps(raw, tuple(images.shape[-2:]), relu=self.relu)
        return (maps, raw) if return_raw else maps

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images on the model's device (a no-op when they are there already)."""
        return _check_images(images).to(model_device(self.model))

    def _targets(self, targets: Any, batch: int, logits: torch.Tensor) -> torch.Tensor:
        return format_targets(targets, batch, logits.shape[-1]).to(logits.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r})"


class GradientLayerMethod(AttentionMethod):
    """Layer methods weighting activation channels by functions of the gradients (Grad-CAM family).

    One forward pass, then one backward pass per target column over the whole batch, down to the
    explained layer only: parameters are frozen (and restored afterwards) and the layer's output is cut
    into a leaf (``capture(..., cut=True)``), so no graph is built upstream of the layer and
    ``torch.autograd.grad`` w.r.t. that leaf never touches a parameter's ``.grad``.
    """

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Channel weights.

        Args:
            activations: (B, K, h, w).
            gradients: (B, K, h, w) of the target score.

        Returns:
            (B, K) weights.
        """
        raise NotImplementedError

    def raw(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        images = self._images(images)
        B = images.shape[0]
        out = []
        with model_state(self.model), torch.enable_grad(), \
                capture(self.model, self.layer, cut=True) as cap:
            logits = self.model(images.detach())                            # (B, K)
            tgt = self._targets(targets, B, logits)                         # (B, T)
            leaf = cap.leaves[self.layer]                                   # the layer's output
            acts = layer_maps(self.model, self.layer, cap.activations[self.layer])  # (B, K, h, w)
            T = tgt.shape[1]
            for t in range(T):
                score = logits.gather(1, tgt[:, t:t + 1]).sum()
                grad, = torch.autograd.grad(score, leaf, retain_graph=t < T - 1)
                grads = layer_maps(self.model, self.layer, grad)            # (B, K, h, w)
                w = self.weights(acts, grads)                               # (B, K)
                out.append(torch.einsum("bk,bkhw->bhw", w, acts))
        return torch.stack(out, 1)                                          # (B, T, h, w)


class PixelMethod(AttentionMethod):
    """Input-attribution methods (Captum): |attribution| summed over input channels."""

    uses_layer = False

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Attribution (B, C, H, W) of ``target`` (B,) for inputs ``x`` (B, C, H, W)."""
        raise NotImplementedError

    def raw(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        images = self._images(images)
        B = images.shape[0]
        out = []
        with model_state(self.model):
            with torch.no_grad():
                num_classes = self.model(images[:1]).shape[-1]
            tgt = format_targets(targets, B, num_classes).to(images.device)
            for t in range(tgt.shape[1]):
                attr = self.attribute(images.detach(), tgt[:, t])           # (B, C, H, W)
                out.append(attr.detach().abs().sum(1))                      # (B, H, W)
        return torch.stack(out, 1)                                          # (B, T, H, W)
