"""Faithfulness of attribution maps: deletion, insertion and ROAD (MoRF / LeRF), one signature.

``faithfulness(model, images, targets, maps, metric) -> FaithfulnessResult`` perturbs each image in the
order its map ranks the pixels, scores the target class after every step, and does the same with a
seeded random pixel order, so that a caller reports "AUC vs random" rather than a bare number.

Metrics (:data:`FAITHFULNESS_METRICS`):

- ``deletion`` (Petsiuk et al. 2018, RISE, sec. 4.1): start from the image and replace pixels by a
  baseline image, most attributed first, in ``steps`` equal steps up to 100 %. Lower AUC = more
  faithful.
- ``insertion`` (same paper): start from the baseline and reveal image pixels, most attributed first.
  Higher AUC = more faithful.
- ``road_morf`` / ``road_lerf`` (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
  Attribution Methods", ICML, sec. 4): remove-and-debias. Removed pixels are filled by *noisy linear
  imputation*: each removed pixel equals the weighted mean of its 8 neighbours (direct neighbours 1/6,
  diagonal ones 1/12; weights of neighbours outside the image dropped and the rest renormalised), a
  sparse linear system over the removed pixels, plus Gaussian noise (std ``road_noise`` = 0.01 in image
  units, the reference code's ``NoisyLinearImputer(noise=0.01)``). MoRF removes the most relevant
  pixels first (lower AUC = more faithful), LeRF the least relevant first (higher AUC = more faithful).
  ROAD never removes 100 % (there would be nothing to impute from): its removal fractions are
  ``s / (steps + 1)``, ``s = 0 .. steps``; ``steps=9`` gives the paper's 0, 10, ..., 90 %.

Conventions shared by every metric:

- a "pixel" is a spatial position: all channels of a pixel are removed together;
- pixels are ranked by a **stable** descending sort of the map (ties go to the lower raster index
  first; LeRF uses a stable ascending sort), so a result never depends on sort internals;
- step ``s`` of deletion / insertion has ``floor(s * N / steps)`` pixels removed / revealed (N = H * W);
  ``fractions`` holds the exact fractions ``count / N``;
- AUC is the trapezoid over ``fractions`` divided by their span, i.e. the mean score level (span 1 for
  deletion / insertion);
- the random order is one seeded permutation of the N pixels per repeat, **shared by every image and
  target** of the call: the random curve then costs B (not B * T) forwards per step, and a result does
  not depend on how images are batched.

Departures from the reference code (stated because reviewers compare numbers):

- RISE's blur is ``conv2d`` with an 11-tap Gaussian kernel, sigma 5, at 224 px, zero padding (which
  darkens the border). Here: sigma ``blur_sigma`` (default ``5 * min(H, W) / 224`` px: RISE's sigma
  scaled to the image), a full kernel of radius ``int(3 * sigma + 0.5)`` (``scipy.ndimage``'s
  ``truncate=3``), separable, replicate padding (``scipy``'s ``mode="nearest"``).
- RISE removes a fixed number of pixels per step (the last step may be partial); here the counts are
  ``floor(s * N / steps)`` so that the last step always reaches 100 %.
- ROAD's reference code (``road/imputed_dataset.py``) breaks ties by adding ``1e-4 * randn`` to the
  min-max rescaled map; here ties are broken by the stable sort. It solves each image's system with
  ``scipy.sparse.linalg.spsolve`` (exact, one image at a time); here all systems of a step are solved
  at once in torch by conjugate gradients preconditioned with a multigrid V-cycle on the 3 x 3 stencil
  (:func:`noisy_linear_impute`), to a relative residual ``road_rtol`` (default 1e-5: the imputed
  values then match ``spsolve`` to about 1e-4 in image units, far below the 0.01 noise). Its noise
  is a fresh ``randn`` per image per evaluation; here it is one seeded (C, H, W) field per step,
  shared by the images of the call (each image still sees i.i.d. noise over its removed pixels), so
  that batched and per-image calls agree exactly.
- ROAD reports accuracy / mean probability over a data set; here the target score per image and
  target, as for deletion / insertion (pytorch-grad-cam's ``ROADMostRelevantFirst`` reports the score
  *change* from the unperturbed image: ``curves[..., s] - curves[..., 0]``).

Example:
    >>> from interpret.attention import attention_maps
    >>> from interpret.faithfulness import faithfulness
    >>> maps = attention_maps(model, images, targets, method="gradcam")   # doctest: +SKIP
    >>> res = faithfulness(model, images, targets, maps, "deletion", steps=10)  # doctest: +SKIP
    >>> res.auc.mean() < res.random_auc.mean()         # more faithful than random   # doctest: +SKIP
    >>> res.to_frame(image_ids, classes=model.class_names)                      # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from interpret.attention.base import format_targets, model_state
from interpret.devices import model_device, to_numpy
from training.models import probabilities

logger = logging.getLogger(__name__)

__all__ = ["FAITHFULNESS_METRICS", "BASELINES", "SCORES", "ROAD_IMPUTATION", "FaithfulnessResult",
           "faithfulness", "list_metrics", "baseline_images", "gaussian_blur", "noisy_linear_impute",
           "removal_counts"]

FAITHFULNESS_METRICS = ("deletion", "insertion", "road_morf", "road_lerf")
BASELINES = ("blur", "mean", "zero")
SCORES = ("probability", "logit")
#: What ``FaithfulnessResult.baseline`` says for the ROAD metrics (they impute instead).
ROAD_IMPUTATION = "noisy_linear"
#: Metrics where a lower AUC means a more faithful map.
LOWER_IS_BETTER = frozenset({"deletion", "road_morf"})

#: Rong et al. 2022 (reference ``NoisyLinearImputer``): direct neighbours 1/6, diagonal ones 1/12.
_ROAD_STENCIL = ((1 / 12, 1 / 6, 1 / 12),
                 (1 / 6, 0.0, 1 / 6),
                 (1 / 12, 1 / 6, 1 / 12))


def list_metrics() -> list[str]:
    """Names accepted by :func:`faithfulness`."""
    return list(FAITHFULNESS_METRICS)


@dataclass
class FaithfulnessResult:
    """Curves and AUCs of one faithfulness metric over a batch (all arrays NumPy, float64 scores).

    ``curves[b, t, s]`` is the target score of image ``b``, target column ``t`` after step ``s``
    (``s = 0``: unperturbed for deletion and ROAD, the baseline for insertion).
    """

    metric: str                # one of FAITHFULNESS_METRICS
    baseline: str              # "blur" | "mean" | "zero"; "noisy_linear" for ROAD
    score: str                 # "probability" (sigmoid of the target logit) or "logit"
    fractions: np.ndarray      # (S+1,) fraction of pixels removed (revealed, for insertion) at each step
    curves: np.ndarray         # (B, T, S+1) target score at each step, pixels in attribution order
    auc: np.ndarray            # (B, T) trapezoid over fractions / their span
    random_curves: np.ndarray  # (B, T, S+1) the same in a seeded random order (mean over repeats)
    random_auc: np.ndarray     # (B, T)
    targets: np.ndarray        # (B, T) class indices
    random_repeats: int = 1    # random orders averaged
    seed: int = 0              # seed of the random orders (and ROAD's noise)

    @property
    def steps(self) -> int:
        """Number of perturbation steps S."""
        return len(self.fractions) - 1

    @property
    def lower_is_better(self) -> bool:
        """True for ``deletion`` and ``road_morf``."""
        return self.metric in LOWER_IS_BETTER

    @property
    def gain(self) -> np.ndarray:
        """(B, T) AUC advantage over the random order, oriented so that > 0 means more faithful than
        random: ``random_auc - auc`` for deletion / MoRF, ``auc - random_auc`` otherwise."""
        d = self.auc - self.random_auc
        return -d if self.lower_is_better else d

    def to_frame(self, image_ids: Sequence[str] | None = None,
                 classes: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per (image, target column).

        Args:
            image_ids: B image ids (default: the batch index as a string).
            classes: class names indexed by class index (default: the index as a string).

        Returns:
            DataFrame with columns ``image_id``, ``target`` (class index), ``class``, ``metric``,
            ``baseline``, ``score``, ``steps``, ``random_repeats``, ``seed``, ``auc``, ``random_auc``,
            ``gain`` (see :attr:`gain`), ``lower_is_better``, ``fractions``, ``curve`` and
            ``random_curve`` (lists of S+1 floats).

        Raises:
            ValueError: ``image_ids`` not of length B, or a target index outside ``classes``.
        """
        B, T = self.auc.shape
        if image_ids is None:
            image_ids = [str(b) for b in range(B)]
        if len(image_ids) != B:
            raise ValueError(f"image_ids must hold B={B} ids, got {len(image_ids)}")
        if classes is not None and int(self.targets.max()) >= len(classes):
            raise ValueError(f"target index {int(self.targets.max())} is outside classes "
                             f"(len {len(classes)})")
        gain = self.gain
        rows = []
        for b in range(B):
            for t in range(T):
                k = int(self.targets[b, t])
                rows.append({
                    "image_id": str(image_ids[b]), "target": k,
                    "class": classes[k] if classes is not None else str(k),
                    "metric": self.metric, "baseline": self.baseline, "score": self.score,
                    "steps": self.steps, "random_repeats": self.random_repeats, "seed": self.seed,
                    "auc": float(self.auc[b, t]), "random_auc": float(self.random_auc[b, t]),
                    "gain": float(gain[b, t]), "lower_is_better": self.lower_is_better,
                    "fractions": self.fractions.tolist(), "curve": self.curves[b, t].tolist(),
                    "random_curve": self.random_curves[b, t].tolist()})
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- baselines
def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel radius ``int(3 * sigma + 0.5)``, replicate padding.

    Equals ``scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3)`` per channel.

    Args:
        images: (B, C, H, W) float.
        sigma: standard deviation in pixels (> 0).

    Returns:
        (B, C, H, W) blurred images.

    Raises:
        ValueError: ``sigma`` not positive.
    """
    if not sigma > 0:
        raise ValueError(f"blur_sigma must be > 0, got {sigma}")
    B, C, H, W = images.shape
    r = int(3 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype).to(images.device)                   # (2r+1,)
    out = images.reshape(B * C, 1, H, W)
    out = F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return out.view(B, C, H, W)


def baseline_images(images: torch.Tensor, baseline: str = "blur",
                    blur_sigma: float | None = None) -> torch.Tensor:
    """The image that removed pixels are replaced with (deletion) or revealed from (insertion).

    Args:
        images: (B, C, H, W) float.
        baseline: ``blur`` (Gaussian blur, :func:`gaussian_blur`), ``mean`` (each image's per-channel
            mean) or ``zero``.
        blur_sigma: blur sigma in pixels; default ``5 * min(H, W) / 224`` (RISE's sigma 5 at 224 px).

    Returns:
        (B, C, H, W).

    Raises:
        ValueError: unknown baseline (valid ones listed) or a non-positive sigma.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {list(BASELINES)}")
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images).contiguous()
    if blur_sigma is None:
        blur_sigma = 5.0 * min(images.shape[-2:]) / 224.0
    return gaussian_blur(images, float(blur_sigma))


# ---------------------------------------------------------------------------------------- ROAD
def noisy_linear_impute(images: torch.Tensor, removed: torch.Tensor, noise: float = 0.01,
                        generator: torch.Generator | None = None, rtol: float = 1e-5,
                        max_iter: int = 200) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022, sec. 4.2), batched.

    Every removed pixel ``i`` gets ``x_i = sum_j w_j x_j / sum_j w_j`` over its in-image 8-neighbours
    ``j`` (``w`` = 1/6 direct, 1/12 diagonal), known neighbours entering with their values: one sparse
    symmetric positive definite system per image and channel (a weighted graph Laplacian with the
    known pixels as Dirichlet boundary), the system of the reference ``NoisyLinearImputer``.

    Solver: all systems together, by conjugate gradients preconditioned with one geometric multigrid
    V-cycle (damped Jacobi smoothing, bilinear prolongation, its adjoint as restriction, the stencil
    rediscretised on 2x-coarser grids down to 4 px, a coarse cell removed when its 4 pixels are),
    stopped when ``||r|| <= rtol * ||b||`` for every system: 5 to 10 iterations whatever the image
    size. Then ``noise * N(0, 1)`` is added to the removed pixels.

    Args:
        images: (M, C, H, W) float.
        removed: (M, H, W) bool, True where the pixel is removed (all channels).
        noise: std of the Gaussian noise added to imputed pixels (image units); 0 for none.
        generator: torch generator for the noise (default: the global one).
        rtol: relative residual at which CG stops (float64 systems are solved in float64, others in
            float32).
        max_iter: CG iteration cap (a warning is logged when reached).

    Returns:
        (M, C, H, W) images with removed pixels imputed; known pixels unchanged.

    Raises:
        ValueError: shape mismatch, or an image with every pixel removed (nothing to impute from).
    """
    if images.dim() != 4 or removed.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"removed must be (M, H, W) = {(images.shape[0], *images.shape[2:])}, got "
                         f"{tuple(removed.shape)}")
    M, C, H, W = images.shape
    if M == 0:
        return images.clone()
    full = removed.flatten(1).all(1)
    if full.any():
        raise ValueError(f"images {full.nonzero().flatten().tolist()} have every pixel removed: "
                         f"linear imputation has no known pixel to start from")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    m = removed.to(dtype)[:, None].expand(M, C, H, W).reshape(M * C, 1, H, W)   # 1 = removed
    known = images.to(dtype).reshape(M * C, 1, H, W) * (1 - m)
    out = known + m * _solve(known, m, rtol, max_iter)
    if noise:
        z = torch.randn(M * C, 1, H, W, generator=generator, dtype=dtype)
        out = out + noise * m * z.to(images.device)
    return out.view(M, C, H, W).to(images.dtype)


def _stencil(u: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the 8 neighbours (1/6 direct, 1/12 diagonal; zero outside the image): the
    zero-padded ``conv2d`` with :data:`_ROAD_STENCIL`.

    The stencil is ``(outer([1, 2, 1], [1, 2, 1]) - 4 * centre) / 12``: two separable [1, 2, 1]
    passes by shifted adds (a 1-channel 3 x 3 ``conv2d`` is several times slower on CPU).
    """
    v = 2 * u
    v[..., 1:, :] += u[..., :-1, :]
    v[..., :-1, :] += u[..., 1:, :]
    w = 2 * v
    w[..., :, 1:] += v[..., :, :-1]
    w[..., :, :-1] += v[..., :, 1:]
    return (w - 4 * u) / 12


_JACOBI_OMEGA = 0.8     # damped-Jacobi smoothing weight (the stencil's spectrum of D^-1 A is in [0, 4/3])
_SMOOTHING = 2          # pre- and post-smoothing sweeps per level


def _operator(u: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A u on the removed pixels (u = 0 at known pixels): d * u minus the neighbours' weighted sum."""
    return m * (d * u - _stencil(u))


def _weight_sums(H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) sum of the in-image neighbours' weights (1 inside, less on the border)."""
    return _stencil(torch.ones(1, 1, H, W, dtype=like.dtype, device=like.device))


def _prolong(ec: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(ec, size=size, mode="bilinear", align_corners=False)


def _restrict(r: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The exact adjoint of :func:`_prolong` (autograd's vector-Jacobian product of a linear map)."""
    with torch.enable_grad():
        z = torch.zeros(r.shape[0], 1, *size, dtype=r.dtype, device=r.device, requires_grad=True)
        (g,) = torch.autograd.grad(_prolong(z, tuple(r.shape[-2:])), z, grad_outputs=r)
    return g


def _v_cycle(r: torch.Tensor, masks: list[torch.Tensor], level: int = 0) -> torch.Tensor:
    """Approximate A^-1 r by one multigrid V-cycle (a symmetric positive definite preconditioner).

    Level ``l + 1`` is the same stencil rediscretised on the 2x-coarser grid, a cell removed when its 4
    pixels are; bilinear prolongation P (masked), restriction P^T. With the stencil in this unscaled
    form the coarse operator needs no rescaling: ``A_2h e_c = P^T r``.
    """
    m = masks[level]
    H, W = m.shape[-2:]
    d = _weight_sums(H, W, r)
    if level == len(masks) - 1:                       # coarsest: plain CG, fixed count (linear map)
        return _pcg(r, m, d, rtol=0.0, max_iter=H * W, precondition=None, quiet=True)
    e = _JACOBI_OMEGA * m * r / d
    for _ in range(_SMOOTHING - 1):
        e = e + _JACOBI_OMEGA * m * (r - _operator(e, m, d)) / d
    mc = masks[level + 1]
    rc = mc * _restrict(m * (r - _operator(e, m, d)), tuple(mc.shape[-2:]))
    e = e + m * _prolong(_v_cycle(rc, masks, level + 1), (H, W))
    for _ in range(_SMOOTHING):
        e = e + _JACOBI_OMEGA * m * (r - _operator(e, m, d)) / d
    return e


def _solve(known: torch.Tensor, m: torch.Tensor, rtol: float, max_iter: int) -> torch.Tensor:
    """Solve the ROAD systems (n, 1, H, W): multigrid-preconditioned CG; u meaningful where m = 1."""
    masks = [m]
    while min(masks[-1].shape[-2:]) >= 8 and all(s % 2 == 0 for s in masks[-1].shape[-2:]):
        masks.append(-F.max_pool2d(-masks[-1], 2))                          # removed if all 4 are
    d = _weight_sums(*m.shape[-2:], known)
    b = m * _stencil(known)                                                 # (n, 1, H, W)
    pre = (lambda r: _v_cycle(r, masks)) if len(masks) > 1 else None
    return _pcg(b, m, d, rtol=rtol, max_iter=max_iter, precondition=pre)


def _pcg(b: torch.Tensor, m: torch.Tensor, d: torch.Tensor, rtol: float, max_iter: int,
         precondition: Any = None, quiet: bool = False) -> torch.Tensor:
    """Preconditioned CG for A u = b, batched over the first dimension (Jacobi when no
    ``precondition``); stops when ``||r|| <= rtol * ||b||`` for every system or at ``max_iter``."""
    def dot(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (a * c).sum((1, 2, 3), keepdim=True)                         # (n, 1, 1, 1)

    def safe_div(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ok = c > 0
        return torch.where(ok, a / torch.where(ok, c, torch.ones_like(c)), torch.zeros_like(a))

    prec = precondition or (lambda r: m * r / d)
    u = torch.zeros_like(b)
    r = b
    z = prec(r)
    p = z
    rz = dot(r, z)
    bnorm = b.flatten(1).norm(dim=1)
    tol = rtol * bnorm                                                      # (n,)
    it = 0
    for it in range(max_iter + 1):
        if rtol > 0 and bool((r.flatten(1).norm(dim=1) <= tol).all()):
            break
        if it == max_iter:
            if not quiet:
                worst = float((r.flatten(1).norm(dim=1) / bnorm.clamp_min(1e-30)).max())
                logger.warning("noisy_linear_impute: CG stopped at max_iter=%d with relative "
                               "residual %.1e (rtol %.1e)", max_iter, worst, rtol)
            break
        ap = _operator(p, m, d)
        alpha = safe_div(rz, dot(p, ap))
        u = u + alpha * p
        r = r - alpha * ap
        z = prec(r)
        rz_new = dot(r, z)
        p = z + safe_div(rz_new, rz) * p
        rz = rz_new
    if not quiet:
        logger.debug("noisy_linear_impute: %d CG iterations for %d systems of %s", it, len(b),
                     tuple(b.shape[-2:]))
    return u


# ---------------------------------------------------------------------------------------- core
def removal_counts(metric: str, steps: int, n_pixels: int) -> np.ndarray:
    """Pixels removed (revealed, for insertion) at each step: (S+1,) int.

    ``floor(s * N / steps)`` for deletion / insertion (0 .. N), ``floor(s * N / (steps + 1))`` for ROAD
    (0 .. about ``steps / (steps + 1)`` of N).

    Raises:
        ValueError: unknown metric or ``steps < 1``.
    """
    _check_metric(metric)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    s = np.arange(steps + 1, dtype=np.int64)
    denom = steps if metric in ("deletion", "insertion") else steps + 1
    return (s * n_pixels) // denom


def _check_metric(metric: str) -> None:
    if metric not in FAITHFULNESS_METRICS:
        raise ValueError(f"unknown faithfulness metric {metric!r}; valid: {list(FAITHFULNESS_METRICS)}")


_trapezoid = getattr(np, "trapezoid", None) or np.trapz          # NumPy 2 renamed trapz


def _ranks(maps: torch.Tensor, descending: bool) -> torch.Tensor:
    """(B, T, H, W) maps -> (B, T, N) rank of each pixel in the removal order (stable sort)."""
    flat = maps.flatten(2)                                                  # (B, T, N)
    order = torch.sort(flat, dim=-1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(flat.shape[-1], device=flat.device).expand_as(order)
    return ranks.scatter_(-1, order, ar)                                    # (B, T, N)


def faithfulness(model: nn.Module, images: torch.Tensor, targets: Any, maps: torch.Tensor,
                 metric: str = "deletion", *, steps: int = 20, baseline: str | None = None,
                 score: str = "probability", random_repeats: int = 1, seed: int = 0,
                 batch_size: int | None = None, blur_sigma: float | None = None,
                 road_noise: float = 0.01, road_rtol: float = 1e-5) -> FaithfulnessResult:
    """Faithfulness curves and AUCs of attribution maps, against a seeded random pixel order.

    Batched: each step runs one forward pass over the B * T perturbed images (attribution order) and
    one over the B images of each random order (shared by every target), in chunks of ``batch_size``.
    The model runs in eval mode under ``torch.no_grad``; its modes are restored afterwards.

    Args:
        model: multi-label classifier, ``forward(images) -> logits (B, K)``.
        images: (B, C, H, W) float, as the model takes them; moved to the model's device (the curves come
            back on the CPU as NumPy arrays).
        targets: class indices: an int, B ints, or (B, T).
        maps: (B, T, H, W) attribution maps at image resolution (e.g. the served maps of
            :func:`interpret.attention_maps`); only the order of the values matters.
        metric: one of :data:`FAITHFULNESS_METRICS` (see the module docstring).
        steps: S perturbation steps; the curves hold S + 1 points.
        baseline: for deletion / insertion one of :data:`BASELINES` (default ``blur``); ROAD imputes
            and takes no baseline (``None``).
        score: ``probability`` (sigmoid of the target logit: :func:`training.models.probabilities`)
            or ``logit``.
        random_repeats: random orders averaged into ``random_curves``; 0 skips them (``random_curves``,
            ``random_auc`` and ``gain`` are NaN), e.g. for ROAD, whose paper compares MoRF with LeRF instead.
        seed: seed of the random orders and of ROAD's noise.
        batch_size: images per forward pass (and per ROAD solve); default all at once.
        blur_sigma: sigma in pixels of the ``blur`` baseline; default ``5 * min(H, W) / 224``.
        road_noise: std of ROAD's imputation noise in image units (reference: 0.01); 0 for none.
        road_rtol: CG stopping tolerance of ROAD's imputation (relative residual).

    Returns:
        :class:`FaithfulnessResult` with curves (B, T, S+1) and AUCs (B, T).

    Raises:
        ValueError: unknown metric / baseline / score (valid ones listed), ``steps < 1``,
            ``random_repeats < 0``, a baseline given for ROAD, images / maps / targets of mismatched
            shapes, non-finite maps, or target indices outside the model's classes.
    """
    _check_metric(metric)
    road = metric.startswith("road")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; valid: {list(SCORES)}")
    if road and baseline is not None:
        raise ValueError(f"{metric} imputes removed pixels ({ROAD_IMPUTATION}); baseline must be None, "
                         f"got {baseline!r}")
    if not road:
        baseline = "blur" if baseline is None else baseline
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; valid: {list(BASELINES)}")
    if isinstance(random_repeats, bool) or not isinstance(random_repeats, (int, np.integer)) \
            or random_repeats < 0:
        raise ValueError(f"random_repeats must be an integer >= 0, got {random_repeats!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if road and road_noise < 0:
        raise ValueError(f"road_noise must be >= 0, got {road_noise}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a (B, C, H, W) float tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)} "
                         f"{getattr(images, 'dtype', '')}")
    images = images.to(model_device(model))  # runs where the model lives; draws below stay on the CPU generator
    B, C, H, W = images.shape
    N = H * W
    counts = removal_counts(metric, steps, N)
    tgt = format_targets(targets, B).to(images.device)                      # (B, T)
    T = tgt.shape[1]
    maps = torch.as_tensor(maps)
    if maps.shape != (B, T, H, W):
        raise ValueError(f"maps must be (B, T, H, W) = {(B, T, H, W)} (B, H, W from images, T from "
                         f"targets), got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        bad = (~torch.isfinite(maps)).flatten(2).any(-1).nonzero().tolist()
        raise ValueError(f"maps contain NaN or inf at (image, target) {bad[:10]}")

    images = images.detach()
    maps = maps.detach().to(images.device).float()
    ranks = _ranks(maps, descending=metric != "road_lerf")                  # (B, T, N)
    g = torch.Generator().manual_seed(int(seed))
    rand_ranks = [torch.argsort(torch.randperm(N, generator=g)).to(images.device)
                  for _ in range(random_repeats)]                           # R x (N,)
    gn = torch.Generator().manual_seed(int(seed) + 1)  # its own stream: the noise does not depend on random_repeats
    noise_fields = ([torch.randn(C, H, W, generator=gn) for _ in counts] if road and road_noise
                    else None)                                              # (S+1) x (C, H, W)
    base = None if road else baseline_images(images, baseline, blur_sigma)  # (B, C, H, W)
    chunk = batch_size or max(B * T, 1)

    def forward(x: torch.Tensor) -> torch.Tensor:                           # (M, C, H, W) -> (M, K)
        out = [model(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        logits = torch.cat(out).float()
        return logits if score == "logit" else probabilities(logits)

    def perturb(idx: torch.Tensor, removed: torch.Tensor, step: int) -> torch.Tensor:
        """images[idx] with ``removed`` (M, H, W) pixels removed (revealed for insertion)."""
        x = images[idx]
        if road:
            out = noisy_linear_impute(x, removed, noise=0.0, rtol=road_rtol)
            if noise_fields is not None:
                out = out + road_noise * removed[:, None] * noise_fields[step].to(out)
            return out
        keep_image = ~removed if metric == "deletion" else removed
        return torch.where(keep_image[:, None], x, base[idx])

    def run_order(rank: torch.Tensor, k: int, step: int, flat_t: int) -> torch.Tensor:
        """Scores (B, T) for one order: rank (B, flat_t, N) with flat_t in {1, T}."""
        M = B * flat_t
        out = []
        for i in range(0, M, chunk):
            j = torch.arange(i, min(i + chunk, M), device=images.device)
            removed = (rank.expand(B, flat_t, N).reshape(M, N)[j] < k).view(-1, H, W)  # (m, H, W)
            out.append(forward(perturb(j // flat_t, removed, step)))        # (m, K)
        logits = torch.cat(out).view(B, flat_t, -1)                         # (B, flat_t, K)
        return logits.expand(B, T, -1).gather(-1, tgt[..., None])[..., 0] if flat_t == 1 \
            else logits.gather(-1, tgt[..., None])[..., 0]                  # (B, T)

    S1 = len(counts)
    curves = torch.empty(B, T, S1)
    rand_curves = torch.zeros(B, T, S1)
    from tqdm.auto import tqdm

    with model_state(model), torch.no_grad():
        K = forward(images[:1]).shape[-1]
        format_targets(tgt.cpu(), B, K)                                     # range check
        for s in tqdm(range(S1), desc=f"faithfulness: {metric}", leave=False,
                      disable=S1 * B * (T + random_repeats) < 512):
            k = int(counts[s])
            if k == 0 or k == N:                # order-independent: score the B images once
                sc = run_order(torch.zeros(1, 1, N, device=images.device), k, s, 1)
                curves[:, :, s] = sc.cpu()
                rand_curves[:, :, s] = sc.cpu()
                continue
            curves[:, :, s] = run_order(ranks, k, s, T).cpu()
            for rr in rand_ranks:
                rand_curves[:, :, s] += run_order(rr.view(1, 1, N), k, s, 1).cpu() / random_repeats

    fractions = counts / N
    span = fractions[-1] - fractions[0]
    curves_np = to_numpy(curves.double())
    rand_np = to_numpy(rand_curves.double()) if random_repeats else np.full_like(curves_np, np.nan)
    auc = _trapezoid(curves_np, fractions, axis=-1) / span
    rauc = _trapezoid(rand_np, fractions, axis=-1) / span
    return FaithfulnessResult(metric=metric, baseline=ROAD_IMPUTATION if road else baseline,
                              score=score, fractions=fractions, curves=curves_np, auc=auc,
                              random_curves=rand_np, random_auc=rauc, targets=to_numpy(tgt),
                              random_repeats=int(random_repeats), seed=int(seed))
