"""DWARF losses: BCE for classification, a false-positive-suppressing soft Dice for the maps.

The soft Dice of DWARF replaces the mask size by an adjusted size that grows with the false positives,

    adjusted|Y| = |Y| + (w_FP - 1) * FP,
    Dice_FP = (2 TP + s) / (|P| + adjusted|Y| + s),        L_seg = 1 - Dice_FP,

with soft counts TP = sum(P * Y), FP = sum(P * (1 - Y)), FN = sum((1 - P) * Y), |P| = TP + FP and
|Y| = TP + FN. Substituting gives ``(2 TP + s) / (2 TP + w_FP FP + FN + s)``, i.e. (for s = 0) the
Tversky index ``TP / (TP + alpha FP + beta FN)`` with ``alpha = w_FP / 2`` and ``beta = 1 / 2``:
w_FP = 1 is the ordinary soft Dice, w_FP > 1 penalises attention outside the finding more than missed
area inside it. On an image with an empty mask, ``L_seg = w_FP FP / (w_FP FP + s)``: zero for an empty
map, approaching 1 as the map lights up.

The total loss is ``L = lambda * L_seg + (1 - lambda) * L_cls``.

Unknown labels (NaN, e.g. NIH/VinDr findings a reader did not grade) are masked out of both terms:
their BCE gets weight 0 and their map is not supervised, so one NaN never makes the loss NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fp_soft_dice(pred: torch.Tensor, target: torch.Tensor, w_fp: float = 2.0, smooth: float = 1.0) -> torch.Tensor:
    """False-positive-weighted soft Dice coefficient per map.

    Args:
        pred: (..., H, W) soft maps in [0, 1].
        target: (..., H, W) masks in {0, 1} (or soft in [0, 1]), same shape as ``pred``.
        w_fp: false-positive weight ``w_FP`` (>= 0; 1 = plain soft Dice).
        smooth: smoothing ``s`` added to numerator and denominator (> 0 keeps empty masks defined).

    Returns:
        (...) Dice coefficients in [0, 1].

    Raises:
        ValueError: shapes differ, ``w_fp < 0`` or ``smooth < 0``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if w_fp < 0 or smooth < 0:
        raise ValueError(f"w_fp={w_fp} and smooth={smooth} must be >= 0")
    pred, target = pred.float(), target.float()
    tp = (pred * target).flatten(-2).sum(-1)
    fp = (pred * (1 - target)).flatten(-2).sum(-1)
    size_p = pred.flatten(-2).sum(-1)
    size_y = target.flatten(-2).sum(-1) + (w_fp - 1.0) * fp  # adjusted |Y|
    return (2 * tp + smooth) / (size_p + size_y + smooth).clamp_min(1e-12)


def tversky_index(pred: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                  smooth: float = 0.0) -> torch.Tensor:
    """Soft Tversky index ``(TP + s) / (TP + alpha FP + beta FN + s)`` per map (..., H, W) -> (...)."""
    pred, target = pred.float(), target.float()
    tp = (pred * target).flatten(-2).sum(-1)
    fp = (pred * (1 - target)).flatten(-2).sum(-1)
    fn = ((1 - pred) * target).flatten(-2).sum(-1)
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(1e-12)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    weight = weight.to(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


class FPSoftDiceLoss(nn.Module):
    """``1 - fp_soft_dice`` averaged over the maps selected by ``weight``.

    Args:
        w_fp: false-positive weight (see :func:`fp_soft_dice`).
        smooth: smoothing term.
    """

    def __init__(self, w_fp: float = 2.0, smooth: float = 1.0) -> None:
        super().__init__()
        if w_fp < 0 or smooth < 0:
            raise ValueError(f"w_fp={w_fp} and smooth={smooth} must be >= 0")
        self.w_fp, self.smooth = w_fp, smooth

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``pred``, ``target`` (B, C, H, W); ``weight`` (B, C) selects/weights maps (default all)."""
        return _weighted_mean(1 - fp_soft_dice(pred, target, self.w_fp, self.smooth), weight)


class DwarfLoss(nn.Module):
    """``L = lambda * L_seg + (1 - lambda) * L_cls`` (DWARF, combined objective).

    Args:
        lam: weight ``lambda`` of the segmentation term, in [0, 1].
        w_fp: false-positive weight of the soft Dice.
        smooth: smoothing of the soft Dice.
        pos_weight: optional (C,) positive-class weights for the BCE (stored as a buffer).
    """

    def __init__(self, lam: float = 0.5, w_fp: float = 2.0, smooth: float = 1.0,
                 pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam} must be in [0, 1]")
        self.lam = lam
        self.seg = FPSoftDiceLoss(w_fp, smooth)
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, cls_weight: torch.Tensor | None = None,
                seg_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Compute the loss terms.

        Args:
            logits, labels: (B, C).
            maps, masks: (B, C, H, W) predicted maps in [0, 1] and masks; omitted -> no seg term.
            cls_weight: (B, C) which labels count (e.g. only the current disease of a cyclic epoch).
            seg_weight: (B, C) which maps are supervised (e.g. positive findings with a known mask).

        Returns:
            ``{"loss", "cls", "seg"}`` scalars. A NaN label (unknown) is masked out: weight 0 in the BCE
            mean and no segmentation supervision for that map (a NaN ``seg_weight`` counts as 0).
        """
        labels = labels.float()
        known = torch.isfinite(labels)
        if not bool(known.all()):
            labels = torch.where(known, labels, torch.zeros_like(labels))
            cls_weight = known.float() if cls_weight is None else torch.where(
                known, cls_weight.float().nan_to_num(0.0), torch.zeros_like(labels))
            if seg_weight is not None:
                seg_weight = torch.where(known, seg_weight.float(), torch.zeros_like(labels))
        if seg_weight is not None:
            seg_weight = seg_weight.float().nan_to_num(0.0)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none",
                                                 pos_weight=self.pos_weight)
        l_cls = _weighted_mean(bce, cls_weight)
        if maps is None or masks is None or self.lam == 0.0 or (seg_weight is not None and seg_weight.sum() == 0):
            l_seg = logits.new_zeros((), dtype=torch.float32)
        else:
            l_seg = self.seg(maps, masks, seg_weight)
        return {"loss": self.lam * l_seg + (1 - self.lam) * l_cls, "cls": l_cls.detach(), "seg": l_seg.detach()}
