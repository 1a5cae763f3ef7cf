"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023) with its soft-WPMI similarity, as in the authors' code
(``similarity.soft_wpmi``, defaults ``top_k=100, a=10, lam=1, p_start=0.998, p_end=0.97,
min_prob=1e-7``).

With ``P = softmax(a * cos(v, t), over concepts)`` (N, M) and the ``top_k`` highest-activating images
``e_1..e_k`` of unit ``i`` (best first):

    log p(t_j | E_i) = sum_r log(1 + p_r (P[e_r, j] - 1) + min_prob),  p_r = p_start - r/k (p_start - p_end)
    log p(t_j)       = logsumexp_i log p(t_j | E_i) - log U
    s_ij             = log p(t_j | E_i) - lam * log p(t_j)

Faithfulness notes (ambiguities resolved as the reference code does):

- ``p_r`` runs from ``p_start`` down to ``p_start - (k-1)/k (p_start - p_end)``: the last example's
  weight is just above ``p_end``, not ``p_end``.
- ``log p(t_j)`` is the mean over the *units being dissected*, so a unit's scores depend on which other
  units are scored in the same call (dissect a whole layer at once, as the paper does).
- CLIP-Dissect uses no base template: ``template_embedding`` is ignored. Concept embeddings are
  whatever the caller encoded (the paper encodes the bare concept words).
- With fewer than ``top_k`` probing images all images are used (``k = N``), and ``p_r`` is spread over
  that ``k``.
- Scores are log-ratios whose sign carries no meaning, so :func:`select_concepts` is told to keep the
  best concept of a unit even when its score is negative (``on_nonpositive="best"``); CLIP-Dissect itself
  reports only the arg-max concept (``beta = 1``).
- Evidence (the ``evidence`` column of :func:`interpret.annotation.annotate`): the ``k = min(top_k, N)``
  top-activating images whose concept probabilities the soft-WPMI multiplies, the same for every unit
  (0 for a unit that never varies: its "top" images are arbitrary ties). ``log p(t_j)`` uses every
  unit's top images but describes no unit in particular, so it is not counted.
"""
from __future__ import annotations

import logging
import math

import torch

from interpret.annotation.base import Annotator, check_fraction, check_positive_int, register

__all__ = ["ClipDissect", "soft_wpmi"]

log = logging.getLogger(__name__)


def soft_wpmi(acts: torch.Tensor, v: torch.Tensor, t: torch.Tensor, top_k: int = 100, a: float = 10.0,
              lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
              unit_chunk: int = 64, row_chunk: int = 4096) -> torch.Tensor:
    """Soft-WPMI scores (U, M); see the module docstring for the formula.

    Args:
        acts: (N, U) pooled activations; v: (N, d) and t: (M, d) unit-norm embeddings.
        top_k, a, lam, p_start, p_end, min_prob: CLIP-Dissect's parameters (its defaults).
        unit_chunk: units whose (k, units, M) probabilities are held at once.
        row_chunk: images whose softmax is computed at once.

    Returns:
        (U, M) scores.
    """
    n, u = acts.shape
    k = min(check_positive_int(top_k, "top_k"), n)
    if k < top_k:
        log.info("clip_dissect: only %d probing images, fewer than top_k=%d; using k=%d", n, top_k, k)
    inds = torch.topk(acts, k, dim=0).indices  # (k, U) best first
    rows, inv = torch.unique(inds, return_inverse=True)  # only the images some unit needs
    probs = torch.empty(rows.numel(), t.shape[0], dtype=v.dtype, device=v.device)
    for lo in range(0, rows.numel(), row_chunk):
        probs[lo:lo + row_chunk] = torch.softmax(a * (v[rows[lo:lo + row_chunk]] @ t.T), dim=1)
    p = p_start - torch.arange(k, dtype=v.dtype, device=v.device) / k * (p_start - p_end)  # (k,)
    log_pde = torch.empty(u, t.shape[0], dtype=v.dtype, device=v.device)
    for lo in range(0, u, unit_chunk):
        g = probs[inv[:, lo:lo + unit_chunk]]  # (k, u', M)
        log_pde[lo:lo + unit_chunk] = torch.log(1 + p[:, None, None] * (g - 1) + min_prob).sum(0)
    log_pd = torch.logsumexp(log_pde, dim=0, keepdim=True) - math.log(u)  # (1, M)
    return log_pde - lam * log_pd


@register("clip_dissect")
class ClipDissect(Annotator):
    """CLIP-Dissect soft-WPMI (see module docstring for parameters and faithfulness notes)."""

    default_beta = 1.0
    on_nonpositive = "best"

    def __init__(self, top_k: int = 100, a: float = 10.0, lam: float = 1.0, p_start: float = 0.998,
                 p_end: float = 0.97, min_prob: float = 1e-7, unit_chunk: int = 64) -> None:
        super().__init__(unit_chunk)
        self.top_k = check_positive_int(top_k, "top_k")
        self.a, self.lam, self.min_prob = float(a), float(lam), float(min_prob)
        self.p_start, self.p_end = check_fraction(p_start, "p_start"), check_fraction(p_end, "p_end")
        if self.p_end > self.p_start:
            raise ValueError(f"p_end ({p_end}) must not exceed p_start ({p_start})")

    def compute(self, acts, v, t, tem):
        return soft_wpmi(acts, v, t, self.top_k, self.a, self.lam, self.p_start, self.p_end, self.min_prob,
                         self.unit_chunk)
