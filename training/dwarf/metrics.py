"""Evaluation of DWARF-family models: classification (AUC, F1, MCC) and Max Dice of the maps.

Max Dice (DWARF): maps are min-max normalised to [0, 1]; for each threshold t of a sweep, the Dice of
the binarised map ``M >= t`` against the mask is averaged over the images where the disease is present
(non-empty mask); Max Dice is the best such mean over t, per disease. The per-disease sweep is
accumulated batch by batch (:class:`MaxDiceAccumulator`) so maps never need to be held all at once.

Classification metrics (AUC, F1, MCC, max-F1 thresholds) are the project's shared ones in
:mod:`training.metrics`, renamed to the DWARF paper's column names: a disease with fewer than
``min_positives`` validation positives gets no threshold (NaN) and no F1 / MCC (NaN).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from training.dwarf.model import minmax_normalize
from training.metrics import MIN_VAL_POSITIVES, classification_metrics
from training.metrics import choose_thresholds as shared_choose_thresholds

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))


def dice_at_thresholds(maps: torch.Tensor, masks: torch.Tensor, thresholds: Sequence[float],
                       normalize: bool = True) -> torch.Tensor:
    """Hard Dice of thresholded maps for every threshold.

    Args:
        maps: (B, C, H, W) maps (min-max normalised here unless ``normalize=False``).
        masks: (B, C, H, W) masks in {0, 1}.
        thresholds: T thresholds in [0, 1].

    Returns:
        (T, B, C) Dice; 1 where both the binarised map and the mask are empty.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape")
    maps = minmax_normalize(maps.float()) if normalize else maps.float()
    y = masks.float().flatten(-2) > 0.5  # (B, C, HW)
    size_y = y.sum(-1)
    out = []
    for t in thresholds:  # loop over T only; vectorised over images, classes and pixels
        p = maps.flatten(-2) >= t
        inter = (p & y).sum(-1)
        denom = p.sum(-1) + size_y
        out.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom, dtype=torch.float)))
    return torch.stack(out).float()


class MaxDiceAccumulator:
    """Streaming per-disease Max Dice over a fixed threshold sweep.

    Args:
        num_classes: C.
        thresholds: sweep on min-max normalised maps.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = list(thresholds)
        self.sums = torch.zeros(len(self.thresholds), num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch: ``maps``, ``masks`` (B, C, H, W). Only non-empty masks count."""
        present = (masks.flatten(-2).amax(-1) > 0.5).double().cpu()  # (B, C)
        dice = dice_at_thresholds(maps.detach().cpu(), masks.detach().cpu(), self.thresholds).double()
        self.sums += (dice * present).sum(1)
        self.counts += present.sum(0)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(max_dice (C,), best_threshold (C,))``; NaN for diseases never present."""
        mean = self.sums / self.counts.clamp_min(1)  # (T, C)
        best = mean.argmax(0)
        max_dice = mean.max(0).values.numpy()
        max_dice[self.counts.numpy() == 0] = np.nan
        return max_dice, np.asarray(self.thresholds)[best.numpy()]


def max_dice(maps: torch.Tensor, masks: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
             ) -> np.ndarray:
    """Per-disease Max Dice of (B, C, H, W) maps against masks; NaN where a disease is never present."""
    acc = MaxDiceAccumulator(maps.shape[1], thresholds)
    acc.update(maps, masks)
    return acc.compute()[0]


# ---- classification --------------------------------------------------------------------------
def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray, min_positives: int = MIN_VAL_POSITIVES) -> np.ndarray:
    """Per-class threshold maximising F1 on (N, C) validation labels/probabilities
    (:func:`training.metrics.choose_thresholds`; NaN for classes with fewer than ``min_positives``
    known positives)."""
    return np.asarray(shared_choose_thresholds(y_true, y_prob, min_positives=min_positives), dtype=float)


def classification_table(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray,
                         classes: Sequence[str]) -> pd.DataFrame:
    """AUC, F1 and MCC per class from :func:`training.metrics.classification_metrics`.

    Args:
        y_true: (N, C) labels in {0, 1} (NaN = unknown, ignored for that class).
        y_prob: (N, C) probabilities.
        thresholds: (C,) decision thresholds (chosen on validation).
        classes: C class names.

    Returns:
        DataFrame indexed by class with columns ``auc``, ``f1``, ``mcc`` (AUC NaN for a class with one
        label value only; F1/MCC 0 when undefined, NaN for a class without a threshold).
    """
    table = classification_metrics(y_true, y_prob, thresholds, list(classes))
    return table[["auroc", "f1", "mcc"]].rename(columns={"auroc": "auc"})
