"""TSI / network dissection (Bau et al., CVPR 2017) read into the annotation interface: a unit's concept
is the box class whose IoU with the unit's thresholded, upsampled maps is highest, when that IoU
exceeds ``iou_threshold`` (0.04). The IoU table comes from :mod:`interpret.dissection` (masks or
boxes are needed, so there are no embeddings here).

Scores are the IoU where it exceeds the threshold and 0 elsewhere, so ``select_concepts(scores,
beta=1.0)`` (the default of :func:`interpret.annotation.annotate` for ``tsi``) yields the best concept of
each unit above the threshold and nothing for the others.

Evidence: the IoU is computed over the whole probing set, so a unit's evidence is N, the number of
probing images (0 for a unit that never varies).
"""
from __future__ import annotations

from typing import Any

import torch

from interpret.annotation.base import Annotator, as_tensor, register

__all__ = ["Tsi"]


@register("tsi")
class Tsi(Annotator):
    """Dissection IoU as concept scores.

    Args:
        iou: (U, M) IoU per unit and concept (box class), a tensor/array or an object with an ``iou``
            attribute (:class:`interpret.dissection.DissectionResult`).
        iou_threshold: minimum IoU (exclusive) for a concept to count (0.04).
    """

    default_beta = 1.0
    needs_embeddings = False

    def __init__(self, iou: Any = None, iou_threshold: float = 0.04, unit_chunk: int = 256) -> None:
        super().__init__(unit_chunk)
        if iou is None:
            raise ValueError("tsi needs iou=(U, M) IoU table (e.g. interpret.dissection's DissectionResult.iou)")
        self.iou = as_tensor(getattr(iou, "iou", iou), "iou", 2)
        self.iou_threshold = float(iou_threshold)
        if not 0.0 <= self.iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")

    def compute(self, acts, v, t, tem):
        if acts.shape[1] != self.iou.shape[0]:
            raise ValueError(f"iou has {self.iou.shape[0]} units but activations have {acts.shape[1]}")
        if t is not None and t.shape[0] != self.iou.shape[1]:
            raise ValueError(f"iou has {self.iou.shape[1]} concepts but concept_embeddings have {t.shape[0]}")
        iou = self.iou.to(acts.device)
        return torch.where(iou > self.iou_threshold, iou, torch.zeros_like(iou))
