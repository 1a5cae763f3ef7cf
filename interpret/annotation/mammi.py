"""MAMMI: mask-free neuron concept annotation (MICCAI 2024).

Per unit ``i`` an adaptive threshold ``tau_i = max(A_i) - (1 - alpha) * (max(A_i) - min(A_i))``
selects the representative images ``{k : A_ik > tau_i}``; the unit-concept score is the
template-adjusted mean cosine ``s_ij = mean_o [cos(v_o, t_j) - cos(v_o, t_tem)]`` over them, computed
for all units at once (row-normalised selection (U, N) x image embeddings (N, d) x (T - t_tem)^T).
"""
from __future__ import annotations

import torch

from interpret.annotation.base import RepresentativeAnnotator, check_fraction, register

__all__ = ["Mammi", "adaptive_representatives"]


def adaptive_representatives(acts: torch.Tensor, alpha: float = 0.93) -> torch.Tensor:
    """MAMMI's adaptive representative selection.

    ``tau_i = max(A_i) - (1 - alpha) (max(A_i) - min(A_i))``, selection ``A_ik > tau_i``. The images at
    the maximum are always selected (they can fail the strict ``>`` only when ``max == min`` or
    ``alpha == 1``), so the set is never empty.

    Args:
        acts: (N, U) pooled activations.
        alpha: in (0, 1]; larger puts tau nearer the maximum, so fewer images are selected (0.93 in the
            paper: the top 7 % of the activation range).

    Returns:
        (U, N) boolean selection.
    """
    alpha = check_fraction(alpha, "alpha")
    hi, lo = acts.amax(0), acts.amin(0)  # (U,)
    tau = hi - (1.0 - alpha) * (hi - lo)
    return ((acts > tau) | (acts == hi)).T  # (U, N)


@register("mammi")
class Mammi(RepresentativeAnnotator):
    """MAMMI scores (see module docstring).

    Args:
        alpha: adaptive threshold parameter (0.93).
        unit_chunk: units processed together (bounds memory to ``unit_chunk * N`` booleans).
    """

    def __init__(self, alpha: float = 0.93, unit_chunk: int = 256) -> None:
        super().__init__(unit_chunk)
        self.alpha = check_fraction(alpha, "alpha")

    def representatives(self, acts: torch.Tensor) -> torch.Tensor:
        return adaptive_representatives(acts, self.alpha)
