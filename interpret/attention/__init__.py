"""Attention maps: one module per method, one signature.

``attention_maps(model, images, targets, method="gradcam", layer=None) -> (B, T, H, W)`` in [0, 1]
(DESIGN.md). Methods of classifiers: ``cam``, ``gradcam``, ``gradcampp``, ``integrated_gradients``,
``smoothgrad`` (:func:`list_methods`). A model that computes its own maps accepts only its own method:
``dwarf`` for a DWARF model (:mod:`interpret.attention.dwarf`, :class:`interpret.models.DwarfClassifierView`;
``list_methods(model)``). For the raw low-resolution maps use ``return_raw=True`` or the method objects
(:func:`get_method`, then ``.raw(images, targets)``).

Example:
    >>> from interpret import attention_maps
    >>> maps = attention_maps(model, images, targets=[[0, 4]] * len(images),
    ...                       method="gradcam")                  # doctest: +SKIP
    >>> maps.shape                                             # doctest: +SKIP
    torch.Size([8, 2, 224, 224])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interpret.attention.base import (SERVED_RELU, AttentionMethod, GradientLayerMethod, PixelMethod,
                                      finalize_maps, format_targets, minmax_normalize, upsample)
from interpret.attention.cam import CAM, cam_from_features
from interpret.attention.captum_methods import IntegratedGradientsMethod, SmoothGradMethod
from interpret.attention.dwarf import DwarfMaps
from interpret.attention.gradcam import GradCAM
from interpret.attention.gradcampp import GradCAMPlusPlus

__all__ = ["attention_maps", "get_method", "list_methods", "AttentionMethod", "GradientLayerMethod",
           "PixelMethod", "CAM", "DwarfMaps", "GradCAM", "GradCAMPlusPlus", "IntegratedGradientsMethod",
           "SmoothGradMethod", "format_targets", "minmax_normalize", "upsample", "finalize_maps",
           "cam_from_features", "SERVED_RELU", "method_layer"]

_METHODS: dict[str, type[AttentionMethod]] = {
    "cam": CAM,
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "integrated_gradients": IntegratedGradientsMethod,
    "smoothgrad": SmoothGradMethod,
}
# methods of models that compute their own maps (accepted only by those models: interpret.models.explained_with)
_MODEL_METHODS: dict[str, type[AttentionMethod]] = {
    "dwarf": DwarfMaps,
}


def list_methods(model: nn.Module | None = None) -> list[str]:
    """Names accepted by :func:`attention_maps` and :func:`get_method`.

    Args:
        model: None: the classifier methods; a model: the methods valid for it (``["dwarf"]`` for a DWARF
            model, the classifier methods otherwise).
    """
    if model is not None:
        from interpret.models import explained_with

        only = explained_with(model)
        if only is not None:
            return list(only)
    return list(_METHODS)


def method_layer(method: str, feature_layer: str | None) -> str | None:
    """What a method's maps are computed on, as the service's records and reports name it: the explained
    layer (``feature_layer``) for layer methods, ``"input"`` for input-attribution methods, ``"model"`` for
    maps a model computes itself (``dwarf``); None for an unknown method."""
    cls = {**_METHODS, **_MODEL_METHODS}.get(method)
    if cls is None:
        return None
    if cls in _MODEL_METHODS.values():
        return "model"
    return feature_layer if cls.uses_layer else "input"


def get_method(method: str, model: nn.Module, layer: str | None = None,
               **params: Any) -> AttentionMethod:
    """Build a method object bound to ``model`` (and ``layer``).

    Args:
        method: one of :func:`list_methods` (``dwarf`` for a DWARF model).
        model: classifier returning logits, or a DWARF model / :class:`interpret.models.DwarfClassifierView`.
        layer: dotted layer name (layer methods); default ``model.feature_layer``.
        **params: method parameters (e.g. ``n_steps`` for integrated gradients, ``nt_samples`` and
            ``stdev`` for smoothgrad, ``head`` for cam, ``relu``).

    Raises:
        ValueError: unknown method (valid ones listed), unknown layer, or a model without the parts
            the method needs.
    """
    registry = {**_METHODS, **_MODEL_METHODS}
    if method not in registry:
        raise ValueError(f"unknown attention method {method!r}; valid: {list(registry)}")
    from interpret.models import explained_with

    only = explained_with(model)
    if only is not None and method not in only:
        raise ValueError(f"method {method!r} explains classifiers through a feature layer or input gradients; "
                         f"a {type(model).__name__} computes its own maps: use method={only[0]!r}")
    return registry[method](model, layer=layer, **params)


def attention_maps(model: nn.Module, images: torch.Tensor, targets: Any, method: str = "gradcam",
                   layer: str | None = None, return_raw: bool = False,
                   **params: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention maps of ``model`` for the requested classes.

    The model is run in eval mode; its train/eval flags and parameters' ``requires_grad`` are
    restored afterwards. Batched: gradient methods do one forward pass and one backward pass per
    target column over the whole batch.

    Args:
        model: classifier, ``forward(images) -> logits (B, K)``; or a DWARF model (method ``dwarf``).
        images: (B, C, H, W) float.
        targets: class indices: an int, one per image (B,), or (B, T).
        method: one of :func:`list_methods` (``list_methods(model)``: those valid for ``model``).
        layer: dotted module name to explain (layer methods); default ``model.feature_layer``.
        return_raw: also return the raw maps (B, T, h, w): layer resolution, before ReLU, upsampling
            and normalisation.
        **params: passed to the method (see :func:`get_method`).

    Returns:
        (B, T, H, W) maps, each min-max normalised to [0, 1] (a constant map becomes zeros); with
        ``return_raw`` a tuple ``(maps, raw)``.

    Raises:
        ValueError: unknown method or layer, bad targets, or a model the method cannot explain.
    """
    return get_method(method, model, layer, **params)(images, targets, return_raw=return_raw)
