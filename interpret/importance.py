"""Neuron importance: which units of the feature layer drive a prediction, with their concepts.

For a classifier whose head is global average pooling followed by a linear layer (every
:mod:`training.models` classifier), the logit of class ``c`` decomposes exactly over units::

    y_c = sum_k a_k W_ck + b_c,    a_k = mean_{h,w} A_k(h, w)

so ``a_k * W_ck`` is the contribution of unit ``k`` (no backward pass; the contributions sum to the
logit minus the bias). For other heads the first-order Taylor estimate ``sum_{h,w} A_k * dy_c/dA_k``
(activation x gradient) is used; for a GAP + linear head it equals the exact contribution.

Example:
    >>> from training.models import create_model
    >>> model = create_model("test_resnet", classes=["Effusion", "Nodule"]).eval()
    >>> res = unit_contributions(model, torch.rand(2, 1, 32, 32))
    >>> res.contributions.shape  # (B, T, K)
    torch.Size([2, 2, 32])
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from interpret.devices import model_device

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Contributions", "is_gap_linear", "linear_contributions", "unit_contributions",
           "class_importance", "concept_lookup", "top_units", "explain_prediction"]

METHODS = ("auto", "linear", "taylor")


@dataclass
class Contributions:
    """Per-image unit contributions.

    Attributes:
        contributions: (B, T, K) contribution of unit k to target t of image b.
        targets: (B, T) class indices the contributions refer to.
        logits: (B, C) model logits.
        bias: (C,) head bias (None for non-linear heads / Taylor).
        method: ``"linear"`` (exact) or ``"taylor"``.
        layer: the layer whose units are scored.
    """

    contributions: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    bias: torch.Tensor | None
    method: str
    layer: str


def is_gap_linear(model: nn.Module) -> bool:
    """Whether the model exposes ``forward_features`` + ``forward_head`` with an ``nn.Linear`` ``head``
    (GAP + linear, the contract of :mod:`training.models`)."""
    return (hasattr(model, "forward_features") and hasattr(model, "forward_head")
            and isinstance(getattr(model, "head", None), nn.Linear))


def linear_contributions(pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact contributions ``a_k * W_ck`` of a linear head.

    Args:
        pooled: (N, K) pooled unit activations; weight: (C, K) head weight.

    Returns:
        (N, C, K); summing over K gives the logits minus the bias.
    """
    if pooled.ndim != 2 or weight.ndim != 2 or pooled.shape[1] != weight.shape[1]:
        raise ValueError(f"pooled (N, K) and weight (C, K) must agree in K; got {tuple(pooled.shape)} and "
                         f"{tuple(weight.shape)}")
    return pooled[:, None, :] * weight[None, :, :]


def _targets(targets: Any, batch: int, num_classes: int, device) -> torch.Tensor:
    """(B, T) class indices: None -> every class; a scalar -> that class for every image; (B,) -> (B, 1)."""
    if targets is None:
        return torch.arange(num_classes, device=device).expand(batch, -1)
    t = torch.as_tensor(targets, device=device).long()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"targets must be one class index per image (B,) or (B, T) with B = {batch}; "
                         f"got shape {tuple(t.shape)}")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes}); got {t.unique().tolist()}")
    return t


def unit_contributions(model: nn.Module, images: torch.Tensor, targets: Any = None, *, method: str = "auto",
                       layer: str | None = None) -> Contributions:
    """Contributions of the units of ``layer`` to the logits of ``targets``.

    Args:
        model: a classifier; GAP + linear heads (:func:`is_gap_linear`) are decomposed exactly.
        images: (B, 1, S, S) in [0, 1]; moved to the model's device (the results stay there).
        targets: class indices, one per image (B,), or (B, T); default: every class.
        method: ``"auto"`` (``linear`` when possible, else ``taylor``), ``"linear"`` or ``"taylor"``.
        layer: dotted layer name for ``taylor`` (default ``model.feature_layer``); ``linear`` always
            uses the features feeding the head.

    Returns:
        :class:`Contributions` with (B, T, K) contributions.

    Raises:
        ValueError: unknown method (valid ones listed), ``linear`` on a model without a GAP + linear head,
            bad targets, no layer for ``taylor``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; valid: {', '.join(METHODS)}")
    linear_ok = is_gap_linear(model)
    if method == "linear" and not linear_ok:
        raise ValueError("method='linear' needs a model with forward_features/forward_head and an nn.Linear "
                         "head; use method='taylor'")
    use_linear = method == "linear" or (method == "auto" and linear_ok and layer in (None, model.feature_layer))
    images = images.to(model_device(model))  # run where the model lives
    if use_linear:
        with torch.no_grad():
            feats = model.forward_features(images)  # (B, K, h, w)
            logits = model.forward_head(feats)  # (B, C)
            pooled = feats.mean(dim=tuple(range(2, feats.ndim)))  # (B, K)
            w = model.head.weight  # (C, K)
            t = _targets(targets, images.shape[0], logits.shape[1], logits.device)
            rows = torch.arange(images.shape[0], device=t.device)[:, None]
            contrib = linear_contributions(pooled, w)[rows, t]  # (B, T, K)
            bias = model.head.bias.detach().clone() if model.head.bias is not None else None
        return Contributions(contrib, t, logits, bias, "linear", getattr(model, "feature_layer", ""))
    return _taylor(model, images, targets, layer or getattr(model, "feature_layer", None))


def _taylor(model: nn.Module, images: torch.Tensor, targets: Any, layer: str | None) -> Contributions:
    from interpret.hooks import capture

    if not layer:
        raise ValueError("taylor importance needs a layer name (the model has no feature_layer)")
    x = images.detach().to(model_device(model)).clone().requires_grad_(True)
    with capture(model, layer, gradients=True) as cap, torch.enable_grad():
        logits = model(x)  # (B, C)
        t = _targets(targets, x.shape[0], logits.shape[1], logits.device)
        out = []
        for j in range(t.shape[1]):
            score = logits.gather(1, t[:, j:j + 1]).sum()  # images are independent: one backward per target
            torch.autograd.grad(score, x, retain_graph=j < t.shape[1] - 1)
            a, g = cap.activations[layer], cap.gradients[layer]  # (B, K, h, w)
            out.append((a * g).flatten(2).sum(2))  # (B, K) activation x gradient, summed spatially
    contrib = torch.stack(out, 1) if out else torch.zeros(x.shape[0], 0, 0)
    return Contributions(contrib.detach(), t, logits.detach(), None, "taylor", layer)


def class_importance(contributions: torch.Tensor, labels: Any) -> torch.Tensor:
    """Class-wise mean contribution over the images of each class.

    Args:
        contributions: (N, C, K) contributions to every class (``targets=None``).
        labels: (N, C) multi-hot labels (an image counts for every class it is positive for).

    Returns:
        (C, K); rows of classes without a positive image are NaN.
    """
    y = torch.as_tensor(np.asarray(labels), dtype=contributions.dtype, device=contributions.device)
    if y.shape != contributions.shape[:2]:
        raise ValueError(f"labels shape {tuple(y.shape)} must be (N, C) = {tuple(contributions.shape[:2])}")
    y = (y > 0).to(contributions.dtype)
    n = y.sum(0)  # (C,)
    sums = torch.einsum("nc,nck->ck", y, contributions)
    out = sums / n.clamp(min=1)[:, None]
    return out.masked_fill((n == 0)[:, None], float("nan"))


def concept_lookup(table: pd.DataFrame | Mapping[int, Sequence[str]] | None,
                   layer: str | None = None) -> dict[int, list[str]]:
    """``unit -> concepts`` from an annotation table (``unit``, ``concepts`` [, ``layer``]) or a mapping."""
    if table is None:
        return {}
    if isinstance(table, Mapping):
        return {int(k): list(v) for k, v in table.items()}
    rows = table if layer is None or "layer" not in table.columns else table[table["layer"] == layer]
    return {int(u): [str(c) for c in cs] for u, cs in zip(rows["unit"], rows["concepts"])}


def top_units(contribution: torch.Tensor, k: int = 5, concepts: Mapping[int, Sequence[str]] | None = None
              ) -> list[dict[str, Any]]:
    """The ``k`` units with the largest (signed) contribution, best first, with their concepts.

    Args:
        contribution: (K,) contributions of one image (or class mean) to one class.
        k: how many units; concepts: ``unit -> concept names`` (:func:`concept_lookup`).

    Returns:
        ``[{"unit", "contribution", "concepts"}, ...]``; NaN contributions are ranked last.
    """
    c = torch.nan_to_num(contribution.detach().float().cpu(), nan=-float("inf"))
    k = max(0, min(int(k), c.numel()))
    vals, idx = torch.topk(c, k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    lookup = concepts or {}
    return [{"unit": int(u), "contribution": float(contribution[int(u)]), "concepts": list(lookup.get(int(u), []))}
            for u in idx.tolist()]


def explain_prediction(model: nn.Module, images: torch.Tensor, targets: Any = None, *, top_k: int = 5,
                       concepts: pd.DataFrame | Mapping[int, Sequence[str]] | None = None,
                       method: str = "auto", class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per image and target class: the logit and its top-k contributing units with their concepts.

    Args:
        model, images, method: as in :func:`unit_contributions`.
        targets: class indices (B,) or (B, T); default: each image's highest-scoring class.
        top_k: units per prediction.
        concepts: annotation table or ``unit -> concepts`` for the scored layer.
        class_names: defaults to ``model.class_names`` (indices when absent).

    Returns:
        One dict per image: ``{"targets": [{"class", "index", "logit", "probability", "bias", "units"}]}``.
    """
    images = images.to(model_device(model))
    if targets is None:
        with torch.no_grad():
            targets = model(images).argmax(1)
    res = unit_contributions(model, images, targets, method=method)
    names = list(class_names or getattr(model, "class_names", []) or [])
    lookup = concept_lookup(concepts, res.layer)
    probs = torch.sigmoid(res.logits)
    out = []
    for b in range(images.shape[0]):
        entries = []
        for j, c in enumerate(res.targets[b].tolist()):
            entries.append({"class": names[c] if c < len(names) else str(c), "index": int(c),
                            "logit": float(res.logits[b, c]), "probability": float(probs[b, c]),
                            "bias": float(res.bias[c]) if res.bias is not None else None,
                            "method": res.method,
                            "units": top_units(res.contributions[b, j], top_k, lookup)})
        out.append({"targets": entries})
    return out
