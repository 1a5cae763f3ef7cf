"""MAMMI: mask-free neuron concept annotation (MICCAI 2024), and ``mammi_floor``, its selection with an
evidence floor.

Per unit ``i`` an adaptive threshold ``tau_i = max(A_i) - (1 - alpha) * (max(A_i) - min(A_i))``
selects the representative images ``{k : A_ik > tau_i}``; the unit-concept score is the
template-adjusted mean cosine ``s_ij = mean_o [cos(v_o, t_j) - cos(v_o, t_tem)]`` over them, computed
for all units at once (row-normalised selection (U, N) x image embeddings (N, d) x (T - t_tem)^T).

The adaptive set keeps the far tail of the activation range: on a real layer most units get a handful
of representatives (on the demo's layer4 the median was 3 and 93 % of units had fewer than 10), so a
unit's description rests on one or two images and many units share the identical description.
``mammi_floor`` is *not* the paper's method: it takes the adaptive set united with the unit's
``min_images`` top-activating images, so every varying unit rests on at least ``min(min_images, N)``
images while units with a wide adaptive set keep it unchanged. The paper's ``mammi`` stays the default.
"""
from __future__ import annotations

import torch

from interpret.annotation.base import (UNIT_CHUNK, RepresentativeAnnotator, check_fraction, check_positive_int,
                                       register)
from interpret.annotation.www import topk_representatives

__all__ = ["Mammi", "MammiFloor", "adaptive_representatives", "floor_representatives"]


def adaptive_representatives(acts: torch.Tensor, alpha: float = 0.93,
                             extrema: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """MAMMI's adaptive representative selection.

    ``tau_i = max(A_i) - (1 - alpha) (max(A_i) - min(A_i))``, selection ``A_ik > tau_i``. The images at
    the maximum are always selected (they can fail the strict ``>`` only when ``max == min`` or
    ``alpha == 1``), so the set is never empty.

    Args:
        acts: (N, U) pooled activations.
        alpha: in (0, 1]; larger puts tau nearer the maximum, so fewer images are selected (0.93 in the
            paper: the top 7 % of the activation range).
        extrema: ``(max, min)`` over images, (U,) each, when the caller has them already.

    Returns:
        (U, N) boolean selection.
    """
    alpha = check_fraction(alpha, "alpha")
    hi, lo = extrema if extrema is not None else (acts.amax(0), acts.amin(0))  # (U,)
    tau = hi - (1.0 - alpha) * (hi - lo)
    # ``A > tau or A == max`` in one comparison: where tau reaches the maximum, the largest float
    # below it selects exactly the images at the maximum
    tau = torch.where(tau < hi, tau, torch.nextafter(hi, torch.full_like(hi, -float("inf"))))
    return (acts > tau).T  # (U, N)


def floor_representatives(acts: torch.Tensor, alpha: float = 0.93, min_images: int = 10,
                          extrema: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """MAMMI's adaptive set united with the ``min_images`` top-activating images of each unit.

    Args:
        acts: (N, U) pooled activations.
        alpha: MAMMI's adaptive threshold parameter.
        min_images: the floor; every unit gets at least ``min(min_images, N)`` images (ties at the
            k-th value broken by ``torch.topk``).

    Returns:
        (U, N) boolean selection, a superset of :func:`adaptive_representatives`.

    Example:
        >>> acts = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
        >>> adaptive_representatives(acts).sum().item(), floor_representatives(acts, min_images=3).sum().item()
        (1, 3)
    """
    return adaptive_representatives(acts, alpha, extrema) | topk_representatives(acts, min_images)


@register("mammi")
class Mammi(RepresentativeAnnotator):
    """MAMMI scores (see module docstring). Evidence: the size of the adaptive set.

    Args:
        alpha: adaptive threshold parameter (0.93).
        unit_chunk: units processed together (bounds memory to ``unit_chunk * N`` booleans).
    """

    def __init__(self, alpha: float = 0.93, unit_chunk: int = UNIT_CHUNK) -> None:
        super().__init__(unit_chunk)
        self.alpha = check_fraction(alpha, "alpha")

    def representatives(self, acts: torch.Tensor, extrema=None) -> torch.Tensor:
        return adaptive_representatives(acts, self.alpha, extrema)

    def select(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hi, lo = acts.amax(0), acts.amin(0)  # (u,) once for the threshold and the constant units
        return self.representatives(acts, (hi, lo)), hi == lo


@register("mammi_floor")
class MammiFloor(Mammi):
    """MAMMI's adaptive threshold, but at least ``min_images`` images (:func:`floor_representatives`);
    same score. Evidence: the size of the united set, ``>= min(min_images, N)`` for a varying unit.

    Args:
        alpha: adaptive threshold parameter (0.93).
        min_images: evidence floor (10).
        unit_chunk: units processed together.
    """

    def __init__(self, alpha: float = 0.93, min_images: int = 10, unit_chunk: int = UNIT_CHUNK) -> None:
        super().__init__(alpha, unit_chunk)
        self.min_images = check_positive_int(min_images, "min_images")

    def representatives(self, acts: torch.Tensor, extrema=None) -> torch.Tensor:
        return floor_representatives(acts, self.alpha, self.min_images, extrema)
