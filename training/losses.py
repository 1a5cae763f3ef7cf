"""Cost-sensitive multi-label losses in one framework (DESIGN.md, "Imbalance study", Khakzar et al.).

Every loss is the weighted binary cross-entropy

    L = - mean over (image, class) of [ w+ * y * log p  +  w- * (1 - y) * log(1 - p) ]

with ``p = sigmoid(logit)`` and per-class weights ``w+ = a+ (1 - p)^gamma``, ``w- = a- p^gamma``:

============  =======================================  =======================================  =====
loss          a+                                       a-                                       gamma
============  =======================================  =======================================  =====
``bce``       1                                        1                                        0
``wbce``      N- / N                                   N+ / N                                   0
``focal``     alpha (.25)                              1 - alpha                                2
``cb_focal``  w+ / (w+ + w-)  (beta .9999)            w- / (w+ + w-)                           2
============  =======================================  =======================================  =====

with the class-balanced weights of Cui et al. ``w+ = (1 - beta) / (1 - beta^N+)``,
``w- = (1 - beta) / (1 - beta^N-)``.

**CB-Focal scaling** (``normalize``): DESIGN.md writes the raw weights ``a+ = w+``, ``a- = w-``. With
NIH-like counts (thousands of positives, tens of thousands of negatives, beta .9999) they are about 1e-4,
so the loss is about 2e-5 and the median parameter gradient about 1e-8: half the gradients fall below
Adam's eps and the coupled L2 term (weight decay 1e-6) outweighs them, so that arm barely trains. The
authors' released code (imba-explain ``ClassBalancedLoss.receive_data_dist_info``) normalises the pair:
``alpha = (1 - beta^N-) / (1 - beta^N+)`` (= w+ / w-), ``alpha /= 1 + alpha``, and uses
``a+ = alpha``, ``a- = 1 - alpha`` (the mmcls sigmoid focal loss with a per-class alpha). That is the
default here (``normalize="authors"``); the ratio ``a+ / a-`` is the same as the raw form's, only the
scale differs. ``normalize="raw"`` keeps DESIGN.md's raw weights. One departure from the authors'
configuration: their configs multiply the CB-Focal loss by ``loss_weight=50`` (and Focal by 10);
here every loss has scale 1 (under Adam a constant factor only moves the gradients relative to eps and
weight decay).

N+ and N- are the positive and negative counts per class of the *training split*; counts of 0 are
treated as 1 (that class never occurs with that label during training, so the weight is unused). The
focal modulating factors are part of the graph (not detached), as in Lin et al. Labels that are NaN
(unknown) are masked out of both the sum and the count of the mean.

Losses are stateless ``nn.Module`` s (class weights are buffers) with functional twins.

Example:
    >>> loss = create_loss("wbce", pos_counts=[10, 2], neg_counts=[90, 98])
    >>> loss(torch.zeros(4, 2), torch.tensor([[1., 0.], [0., float("nan")], [0., 1.], [1., 0.]])).shape
    torch.Size([])
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cost_sensitive_bce", "bce_loss", "wbce_loss", "focal_loss", "cb_focal_loss", "class_balanced_weights",
           "cb_focal_weights", "CB_NORMALIZATIONS", "CostSensitiveLoss", "BCELoss", "WBCELoss", "FocalLoss", "CBFocalLoss", "create_loss", "list_losses"]

Counts = Sequence[float] | np.ndarray | torch.Tensor
_REDUCTIONS = ("mean", "sum", "none")
#: Scalings of the CB-Focal class weights: ``authors`` (imba-explain, normalised pair, the default) and ``raw``
#: (DESIGN.md's ``(1 - beta) / (1 - beta^N)``).
CB_NORMALIZATIONS = ("authors", "raw")


# ---- functional form ---------------------------------------------------------------------------
def cost_sensitive_bce(logits: torch.Tensor, targets: torch.Tensor, a_pos: torch.Tensor | float = 1.0,
                       a_neg: torch.Tensor | float = 1.0, gamma: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The framework loss ``-[a+ (1-p)^gamma y log p + a- p^gamma (1-y) log(1-p)]``.

    Args:
        logits: (B, C) raw scores.
        targets: (B, C) labels in {0, 1} (soft labels in [0, 1] work too); NaN = unknown, masked.
        a_pos, a_neg: class weights, scalars or (C,).
        gamma: focusing parameter (0 = no modulation).
        reduction: ``mean`` over known labels, ``sum``, or ``none`` ((B, C), 0 where masked).

    Returns:
        A scalar, or (B, C) for ``reduction="none"``.

    Raises:
        ValueError: shape mismatch, negative gamma or unknown reduction.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}")
    for name, a in (("a_pos", a_pos), ("a_neg", a_neg)):
        if torch.is_tensor(a) and a.numel() > 1 and tuple(a.shape) != (logits.shape[-1],):
            raise ValueError(f"{name} has {a.numel()} class weights but logits have {logits.shape[-1]} classes")
    logits = logits.float()
    targets = targets.to(logits.dtype)
    valid = ~torch.isnan(targets)
    y = torch.where(valid, targets, torch.zeros_like(targets))
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log(1 - p), stable
    w_pos = a_pos * torch.exp(gamma * log_q) if gamma else a_pos * torch.ones_like(logits)  # a+ (1-p)^gamma
    w_neg = a_neg * torch.exp(gamma * log_p) if gamma else a_neg * torch.ones_like(logits)  # a- p^gamma
    loss = -(w_pos * y * log_p + w_neg * (1 - y) * log_q)  # (B, C)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def _counts(counts: Counts, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(counts, dtype=np.float64) if not torch.is_tensor(counts) else counts,
                        dtype=torch.float64).flatten()
    if t.numel() == 0 or bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be non-empty, finite and >= 0, got {t.tolist()}")
    return t


def class_balanced_weights(counts: Counts, beta: float = 0.9999) -> torch.Tensor:
    """``(1 - beta) / (1 - beta^n)`` per class (Cui et al., effective number of samples); n = 0 -> 1.

    Returns:
        (C,) float32.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    n = _counts(counts, "counts").clamp(min=1)
    return ((1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))).float()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Plain BCE (w+ = w- = 1), NaN labels masked."""
    return cost_sensitive_bce(logits, targets, 1.0, 1.0, 0.0, reduction)


def _wbce_weights(pos_counts: Counts, neg_counts: Counts) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = _counts(pos_counts, "pos_counts"), _counts(neg_counts, "neg_counts")
    if pos.shape != neg.shape:
        raise ValueError(f"pos_counts ({pos.numel()}) and neg_counts ({neg.numel()}) differ in length")
    total = (pos + neg).clamp(min=1)
    return (neg / total).float(), (pos / total).float()


def wbce_loss(logits: torch.Tensor, targets: torch.Tensor, pos_counts: Counts, neg_counts: Counts,
              reduction: str = "mean") -> torch.Tensor:
    """Weighted BCE: w+ = N-/N, w- = N+/N per class."""
    a_pos, a_neg = _wbce_weights(pos_counts, neg_counts)
    return cost_sensitive_bce(logits, targets, a_pos.to(logits.device), a_neg.to(logits.device), 0.0, reduction)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               reduction: str = "mean") -> torch.Tensor:
    """Focal loss: w+ = alpha (1-p)^gamma, w- = (1-alpha) p^gamma (Lin et al. 2017, eq. 5)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return cost_sensitive_bce(logits, targets, alpha, 1.0 - alpha, gamma, reduction)


def cb_focal_weights(pos_counts: Counts, neg_counts: Counts, beta: float = 0.9999,
                     normalize: str = "authors") -> tuple[torch.Tensor, torch.Tensor]:
    """Class weights ``(a+, a-)`` of CB-Focal (Cui et al. 2019; Khakzar et al.).

    Args:
        pos_counts, neg_counts: (C,) positives / negatives per class of the training split (0 -> 1).
        beta: effective-number hyper-parameter in [0, 1).
        normalize: ``"authors"`` (default): ``a+ = w+ / (w+ + w-)``, ``a- = w- / (w+ + w-)``, computed as the
            imba-explain code does (``alpha = (1 - beta^N-) / (1 - beta^N+)``, ``alpha / (1 + alpha)``);
            ``"raw"``: DESIGN.md's ``a+ = w+ = (1 - beta) / (1 - beta^N+)``, ``a- = w-``.

    Returns:
        ``(a_pos, a_neg)``, each (C,) float32; with ``"authors"`` they sum to 1 per class.

    Raises:
        ValueError: unknown ``normalize`` (valid ones listed), bad beta or counts, lengths that differ.

    Example:
        >>> a_pos, a_neg = cb_focal_weights([2000], [84000])
        >>> round(float(a_pos[0]), 3), round(float(a_neg[0]), 3)
        (0.847, 0.153)
    """
    if normalize not in CB_NORMALIZATIONS:
        raise ValueError(f"unknown CB-Focal normalize {normalize!r}; valid: {', '.join(CB_NORMALIZATIONS)}")
    w_pos, w_neg = class_balanced_weights(pos_counts, beta), class_balanced_weights(neg_counts, beta)
    if w_pos.shape != w_neg.shape:
        raise ValueError(f"pos_counts ({w_pos.numel()}) and neg_counts ({w_neg.numel()}) differ in length")
    if normalize == "raw":
        return w_pos, w_neg
    b = torch.tensor(beta, dtype=torch.float64)
    n_pos = _counts(pos_counts, "pos_counts").clamp(min=1)
    n_neg = _counts(neg_counts, "neg_counts").clamp(min=1)
    alpha = (1 - torch.pow(b, n_neg)) / (1 - torch.pow(b, n_pos))   # w+ / w-
    alpha = alpha / (1 + alpha)                                       # w+ / (w+ + w-)
    return alpha.float(), (1 - alpha).float()


def cb_focal_loss(logits: torch.Tensor, targets: torch.Tensor, pos_counts: Counts, neg_counts: Counts,
                  beta: float = 0.9999, gamma: float = 2.0, reduction: str = "mean",
                  normalize: str = "authors") -> torch.Tensor:
    """Class-balanced focal loss with the weights of :func:`cb_focal_weights` (``normalize`` there)."""
    a_pos, a_neg = cb_focal_weights(pos_counts, neg_counts, beta, normalize)
    return cost_sensitive_bce(logits, targets, a_pos.to(logits.device), a_neg.to(logits.device), gamma, reduction)


# ---- modules -------------------------------------------------------------------------------------
class CostSensitiveLoss(nn.Module):
    """The framework loss with fixed class weights (buffers) and focusing parameter.

    Args:
        a_pos, a_neg: (C,) class weights of positives and negatives, or scalars.
        gamma: focusing parameter.
        reduction: ``mean`` (over known labels), ``sum`` or ``none``.
    """

    name = "cost_sensitive"

    def __init__(self, a_pos: Counts | float = 1.0, a_neg: Counts | float = 1.0, gamma: float = 0.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.register_buffer("a_pos", torch.as_tensor(np.asarray(a_pos, dtype=np.float32)))
        self.register_buffer("a_neg", torch.as_tensor(np.asarray(a_neg, dtype=np.float32)))
        self.gamma = float(gamma)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of logits (B, C) against targets (B, C) (NaN = unknown)."""
        return cost_sensitive_bce(logits, targets, self.a_pos, self.a_neg, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}, classes={self.a_pos.numel()}"


class BCELoss(CostSensitiveLoss):
    """w+ = w- = 1."""

    name = "bce"

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(1.0, 1.0, 0.0, reduction)


class WBCELoss(CostSensitiveLoss):
    """w+ = N-/N, w- = N+/N from training-split counts."""

    name = "wbce"

    def __init__(self, pos_counts: Counts, neg_counts: Counts, reduction: str = "mean") -> None:
        a_pos, a_neg = _wbce_weights(pos_counts, neg_counts)
        super().__init__(a_pos, a_neg, 0.0, reduction)


class FocalLoss(CostSensitiveLoss):
    """w+ = alpha (1-p)^gamma, w- = (1-alpha) p^gamma."""

    name = "focal"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        super().__init__(alpha, 1.0 - alpha, gamma, reduction)
        self.alpha = float(alpha)


class CBFocalLoss(CostSensitiveLoss):
    """a+ (1-p)^gamma, a- p^gamma with ``(a+, a-)`` from :func:`cb_focal_weights`.

    ``normalize="authors"`` (default): the imba-explain normalised pair ``w+ / (w+ + w-)``,
    ``w- / (w+ + w-)``; ``normalize="raw"``: DESIGN.md's ``(1-beta)/(1-beta^N+)``, ``(1-beta)/(1-beta^N-)``.
    """

    name = "cb_focal"

    def __init__(self, pos_counts: Counts, neg_counts: Counts, beta: float = 0.9999, gamma: float = 2.0,
                 reduction: str = "mean", normalize: str = "authors") -> None:
        a_pos, a_neg = cb_focal_weights(pos_counts, neg_counts, beta, normalize)
        super().__init__(a_pos, a_neg, gamma, reduction)
        self.beta = float(beta)
        self.normalize = normalize

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, normalize={self.normalize!r}"


_LOSSES: dict[str, type[CostSensitiveLoss]] = {"bce": BCELoss, "wbce": WBCELoss, "focal": FocalLoss,
                                               "cb_focal": CBFocalLoss}
_NEEDS_COUNTS = {"wbce", "cb_focal"}


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`."""
    return sorted(_LOSSES)


def create_loss(name: str, pos_counts: Counts | None = None, neg_counts: Counts | None = None,
                **kwargs: Any) -> CostSensitiveLoss:
    """Build a loss by name.

    Args:
        name: one of :func:`list_losses`.
        pos_counts, neg_counts: (C,) positives / negatives per class in the training split (required
            by ``wbce`` and ``cb_focal``, ignored by the others).
        **kwargs: ``alpha``/``gamma`` (focal), ``beta``/``gamma``/``normalize`` (cb_focal: ``"authors"`` by
            default, ``"raw"``; see :func:`cb_focal_weights`), ``reduction``.

    Raises:
        ValueError: unknown name (lists valid ones) or missing counts.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(list_losses())}")
    if name in _NEEDS_COUNTS:
        if pos_counts is None or neg_counts is None:
            raise ValueError(f"loss {name!r} needs pos_counts and neg_counts from the training split")
        return _LOSSES[name](pos_counts, neg_counts, **kwargs)
    return _LOSSES[name](**kwargs)
