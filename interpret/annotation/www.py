"""WWW (Ahn et al., CVPR 2024) as the MAMMI paper uses it: a fixed number of top-activating images per
unit (``top_k`` = 40) scored with MAMMI's template-adjusted mean cosine."""
from __future__ import annotations

import logging

import torch

from interpret.annotation.base import UNIT_CHUNK, RepresentativeAnnotator, check_positive_int, register

__all__ = ["Www", "topk_representatives"]

log = logging.getLogger(__name__)


def topk_representatives(acts: torch.Tensor, top_k: int = 40) -> torch.Tensor:
    """The ``top_k`` highest-activating images per unit (all images when N < top_k).

    Ties at the k-th value are broken by ``torch.topk`` (deterministic on CPU for a given input).

    Args:
        acts: (N, U) pooled activations.

    Returns:
        (U, N) boolean selection with exactly ``min(top_k, N)`` images per unit.
    """
    k = min(check_positive_int(top_k, "top_k"), acts.shape[0])
    idx = torch.topk(acts, k, dim=0).indices  # (k, U)
    sel = torch.zeros(acts.shape[1], acts.shape[0], dtype=torch.bool, device=acts.device)
    sel.scatter_(1, idx.T, True)
    return sel


@register("www")
class Www(RepresentativeAnnotator):
    """Fixed top-k representative images, MAMMI score. Evidence: ``min(top_k, N)`` (0 for a constant unit).

    Args:
        top_k: images per unit (40).
        unit_chunk: units processed together.
    """

    def __init__(self, top_k: int = 40, unit_chunk: int = UNIT_CHUNK) -> None:
        super().__init__(unit_chunk)
        self.top_k = check_positive_int(top_k, "top_k")

    def representatives(self, acts: torch.Tensor) -> torch.Tensor:
        if acts.shape[0] < self.top_k:
            log.info("www: only %d probing images, fewer than top_k=%d; using all", acts.shape[0], self.top_k)
        return topk_representatives(acts, self.top_k)
