"""``falcon_simplified``: a simplified, report-based variant of FALCON (Kalibhat et al., ICCV 2023), after the
FALCON_M baseline of the MAMMI paper: a unit's top-activating images retrieve their closest reports by CLIP
similarity, and the concepts mentioned in those reports describe the unit.

It is **not** the paper's FALCON, and is named apart for that reason. Departures from FALCON: whole images
instead of crops of the images around the unit's activation; ``reports_per_image`` (1) nearest report
instead of a set of nearest captions per crop; no scoring of the retrieved captions' words by their CLIP
similarity to the crops (a concept scores by its similarity-weighted frequency among the retrieved
reports); the concepts are selected with MAMMI's relative ``beta`` rule, not MAMMI's 0.25 threshold for
FALCON.

Score of concept ``j`` for unit ``i``::

    g_oj = (1/r) sum_{q in NN_r(o)} cos(v_o, e_q) * C_qj          (image o, its r nearest reports q)
    s_ij = mean_{o in top_k(i)} g_oj  [ - mean_{o in bottom_k(i)} g_oj  when contrastive ]

i.e. the similarity-weighted frequency of the concept among the retrieved reports. ``contrastive``
follows FALCON's use of low-activating images: concepts that are just as frequent among the reports of
the unit's *least* activating images (e.g. "lung", in every report) are cancelled out.

Extra parameters (required): ``report_embeddings`` (R, d) (same CLIP, L2-normalised) and
``report_concepts``: an (R, M) 0/1 incidence matrix, or R lists of concept indices (see
:func:`interpret.concepts.concept_incidence`).

Evidence: the ``min(top_k, N)`` top-activating images whose reports describe the unit (the bottom images
of the contrastive term only cancel concepts; they are not counted); 0 for a unit that never varies.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from interpret.annotation.base import Annotator, as_tensor, check_positive_int, register

__all__ = ["FalconSimplified", "incidence_matrix"]


def incidence_matrix(report_concepts: Any, num_reports: int, num_concepts: int) -> torch.Tensor:
    """(R, M) float 0/1 matrix from a tensor/array or from a Python list of R lists of concept indices.

    Raises:
        ValueError: wrong shape, wrong number of reports, or an index outside ``[0, M)``.
    """
    if isinstance(report_concepts, (list, tuple)):  # R lists of indices (a matrix must be a tensor/array)
        if len(report_concepts) != num_reports:
            raise ValueError(f"report_concepts has {len(report_concepts)} entries but there are {num_reports} "
                             "report embeddings")
        c = torch.zeros(num_reports, num_concepts)
        for q, idx in enumerate(report_concepts):
            idx = [int(i) for i in idx]
            bad = [i for i in idx if not 0 <= i < num_concepts]
            if bad:
                raise ValueError(f"report {q}: concept indices {bad} outside [0, {num_concepts})")
            c[q, idx] = 1.0
        return c
    c = as_tensor(report_concepts, "report_concepts", 2)
    if tuple(c.shape) != (num_reports, num_concepts):
        raise ValueError(f"report_concepts must be (R, M) = ({num_reports}, {num_concepts}), got {tuple(c.shape)}")
    return c


@register("falcon_simplified")
class FalconSimplified(Annotator):
    """Simplified FALCON_M scores (see module docstring; not the paper's FALCON).

    Args:
        report_embeddings: (R, d) report embeddings.
        report_concepts: (R, M) incidence or R lists of concept indices.
        top_k: top-activating images per unit (10, as in FALCON).
        reports_per_image: nearest reports retrieved per image (1).
        contrastive: subtract the same score over the ``top_k`` lowest-activating images (True).
    """

    def __init__(self, report_embeddings: Any = None, report_concepts: Sequence | Any = None, top_k: int = 10,
                 reports_per_image: int = 1, contrastive: bool = True, unit_chunk: int = 128) -> None:
        super().__init__(unit_chunk)
        if report_embeddings is None or report_concepts is None:
            raise ValueError("falcon_simplified needs report_embeddings (R, d) and report_concepts ((R, M) or R index lists)")
        self.reports = as_tensor(report_embeddings, "report_embeddings", 2)
        self.report_concepts = report_concepts
        self.top_k = check_positive_int(top_k, "top_k")
        self.reports_per_image = check_positive_int(reports_per_image, "reports_per_image")
        self.contrastive = bool(contrastive)

    def compute(self, acts, v, t, tem):
        n, u = acts.shape
        e = F.normalize(self.reports.to(v.device), dim=-1)
        if e.shape[1] != v.shape[1]:
            raise ValueError(f"report_embeddings dim {e.shape[1]} != image embedding dim {v.shape[1]}")
        c = incidence_matrix(self.report_concepts, e.shape[0], t.shape[0]).to(v.device, v.dtype)  # (R, M)
        k = min(self.top_k, n)
        r = min(self.reports_per_image, e.shape[0])
        groups = [torch.topk(acts, k, dim=0).indices]  # (k, U)
        if self.contrastive:
            groups.append(torch.topk(-acts, k, dim=0).indices)
        rows, inv = torch.unique(torch.cat(groups), return_inverse=True)
        sim, near = torch.topk(v[rows] @ e.T, r, dim=1)  # (n', r) nearest reports per needed image
        g = (sim[:, :, None] * c[near]).mean(1)  # (n', M) similarity-weighted concept frequency
        top = inv[:k]
        scores = torch.empty(u, t.shape[0], dtype=v.dtype, device=v.device)
        for lo in range(0, u, self.unit_chunk):
            s = g[top[:, lo:lo + self.unit_chunk]].mean(0)  # (u', M)
            if self.contrastive:
                s = s - g[inv[k:, lo:lo + self.unit_chunk]].mean(0)
            scores[lo:lo + self.unit_chunk] = s
        return scores
