"""Localisation metrics of attention maps against boxes or masks, per image and per class.

With ``A`` a map min-max normalised to [0, 1] and ``M`` the binary mask of a class (the union of its
boxes, rasterised end-exclusive: pixel ``(i, j)`` is inside a box ``x0, y0, x1, y1`` when its centre
``(j + .5, i + .5)`` satisfies ``x0 <= j + .5 < x1`` and ``y0 <= i + .5 < y1``; the rule of
``training.data.transforms.boxes_to_mask``):

- soft IoBB ``sum(A M) / sum(M)`` and soft IoR ``sum(A M) / sum(A)`` (Khakzar et al., DESIGN.md);
- soft IoU ``sum(A M) / sum(A + M - A M)`` (= sum(min) / sum(max) for binary M) and soft Dice
  ``2 sum(A M) / (sum(A) + sum(M))``;
- the hard variants of all four with ``A >= threshold``;
- pointing game (Zhang et al., 2018): the map's maximum falls inside M, or within ``tolerance``
  pixels of it (their protocol: 15 px at 224 px). A maximum reached on several pixels (a plateau:
  bilinear upsampling of a coarse map clamps its border cells into flat bands and corners) scores
  the fraction of those pixels that hit, i.e. the expected hit under uniform random tie-breaking,
  so a constant map scores the (dilated) mask's area share, the chance level; taking the first
  pixel in raster order instead would always point at a plateau's top-left corner;
- Max Dice (DWARF): the best mean hard Dice over a threshold sweep, over images with a non-empty
  mask, and the threshold achieving it.

Maps and masks are (N, T, H, W) (T requested classes per image, as returned by
:func:`interpret.attention_maps`); everything is vectorised over images and classes.

Example:
    >>> import numpy as np
    >>> A = np.zeros((1, 1, 4, 4)); A[0, 0, :2, :2] = 1.0
    >>> M = np.zeros((1, 1, 4, 4)); M[0, 0, :2, :] = 1.0
    >>> s = soft_scores(A, M); float(s["iobb"][0, 0]), float(s["ior"][0, 0])
    (0.5, 1.0)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from interpret.devices import to_numpy

__all__ = ["boxes_to_mask", "masks_from_boxes", "soft_scores", "hard_scores", "pointing_game",
           "pointing_tolerance", "dilate_masks",
           "max_dice", "localization_table", "class_summary", "random_map_baseline",
           "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return to_numpy(x.float())
    return np.asarray(x, dtype=np.float32)


def _check_pair(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    A, M = _np(maps), _np(masks)
    if A.shape != M.shape or A.ndim < 2:
        raise ValueError(f"maps and masks must have the same shape (..., H, W); got {A.shape} "
                         f"and {M.shape}")
    return A, (M > 0.5).astype(np.float32)


def boxes_to_mask(boxes, size: int | tuple[int, int]) -> np.ndarray:
    """Union of ``xyxy`` boxes as a boolean (H, W) mask, end-exclusive (pixel-centre rule): the data
    layer's rasteriser :func:`training.data.transforms.box_union`, so the boxes a map is scored against are
    the masks the models were trained with.

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1`` in pixels (K may be 0).
        size: S or (H, W).

    Returns:
        (H, W) bool.
    """
    from training.data.transforms import box_union

    return box_union(_np(boxes), size)


def masks_from_boxes(boxes: Sequence, box_labels: Sequence, targets, size: int | tuple[int, int]
                     ) -> np.ndarray:
    """Per image and requested class, the union of that class's boxes.

    Args:
        boxes: per image a (K_i, 4) array of ``xyxy`` boxes.
        box_labels: per image (K_i,) class indices.
        targets: (N, T) class indices (as given to :func:`interpret.attention_maps`).
        size: S or (H, W) of the maps.

    Returns:
        (N, T, H, W) float32 masks in {0, 1}.
    """
    tg = np.asarray(targets if not isinstance(targets, torch.Tensor) else to_numpy(targets))
    tg = tg.reshape(len(boxes), -1)
    H, W = (size, size) if np.isscalar(size) else size
    out = np.zeros((len(boxes), tg.shape[1], H, W), np.float32)
    for i, (b, lab) in enumerate(zip(boxes, box_labels)):
        b, lab = _np(b).reshape(-1, 4), np.asarray(lab).reshape(-1)
        for t, c in enumerate(tg[i]):
            out[i, t] = boxes_to_mask(b[lab == c], (H, W))
    return out


def _div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def _scores(A: np.ndarray, M: np.ndarray) -> dict[str, np.ndarray]:
    inter = (A * M).sum((-2, -1))
    sa, sm = A.sum((-2, -1)), M.sum((-2, -1))
    return {
        "iobb": _div(inter, sm, np.nan),                    # undefined without a box
        "ior": _div(inter, sa, 0.0),                        # an all-zero map hits nothing
        "iou": _div(inter, sa + sm - inter, np.nan),
        "dice": _div(2 * inter, sa + sm, np.nan),
    }


def soft_scores(maps, masks) -> dict[str, np.ndarray]:
    """Soft IoBB, IoR, IoU and Dice of maps in [0, 1] against binary masks.

    Args:
        maps: (..., H, W) in [0, 1].
        masks: (..., H, W) binary (values > 0.5 count as inside).

    Returns:
        ``{"iobb", "ior", "iou", "dice"}`` each (...,); NaN where undefined (empty mask for IoBB;
        empty mask and map for IoU / Dice); IoR of an all-zero map is 0.
    """
    A, M = _check_pair(maps, masks)
    return _scores(A, M)


def hard_scores(maps, masks, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """IoBB, IoR, IoU and Dice of the binarised map ``A >= threshold``.

    Args:
        maps: (..., H, W) in [0, 1].
        masks: (..., H, W) binary.
        threshold: binarisation threshold in [0, 1].

    Returns:
        As :func:`soft_scores`.
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    A, M = _check_pair(maps, masks)
    return _scores((A >= threshold).astype(np.float32), M)


def pointing_game(maps, masks, tolerance: float = 0.0, tie_rtol: float = 1e-6) -> np.ndarray:
    """Pointing-game hit of each map: does its maximum fall inside the mask (or within ``tolerance``)?

    Args:
        maps: (..., H, W).
        masks: (..., H, W) binary.
        tolerance: a maximum within this Euclidean distance (pixels) of a mask pixel is a hit; 0 is the
            strict game, Zhang et al.'s protocol uses 15 px at 224 px (see :func:`pointing_tolerance`).
        tie_rtol: pixels within ``tie_rtol * (max - min)`` of the maximum count as tied maxima.

    Returns:
        (...,) float in [0, 1]: the fraction of the tied maxima that hit (1 or 0 for a unique maximum),
        NaN where the mask is empty.

    Raises:
        ValueError: shapes differ, or a negative ``tolerance`` / ``tie_rtol``.

    Example:
        >>> A = np.zeros((4, 4)); A[:, :2] = 1.0           # plateau: the left half
        >>> M = np.zeros((4, 4)); M[:2, :] = 1              # mask: the top half
        >>> float(pointing_game(A, M))                       # 4 of the 8 tied maxima hit
        0.5
    """
    if tolerance < 0 or tie_rtol < 0:
        raise ValueError(f"tolerance and tie_rtol must be >= 0, got {tolerance!r} and {tie_rtol!r}")
    A, M = _check_pair(maps, masks)
    A = A.astype(np.float64, copy=False)
    M = dilate_masks(M, tolerance) if tolerance > 0 else M > 0.5
    hi = A.max(axis=(-2, -1), keepdims=True)
    lo = A.min(axis=(-2, -1), keepdims=True)
    tied = A >= hi - tie_rtol * (hi - lo)                                   # (..., H, W) argmax set
    hits = (tied & M).sum((-2, -1)) / tied.sum((-2, -1))
    return np.where(M.any((-2, -1)), hits, np.nan)


def pointing_tolerance(image_size: int, reference_px: float = 15.0, reference_size: int = 224) -> float:
    """Zhang et al.'s pointing-game tolerance (15 px at 224 px) scaled to ``image_size`` pixels."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    return float(reference_px) * image_size / reference_size


def dilate_masks(masks, radius: float) -> np.ndarray:
    """Masks (..., H, W) grown by a disc of ``radius`` pixels (Euclidean, centre to centre).

    A pixel is set when some mask pixel lies within ``radius`` of it; leading axes are independent.
    """
    from scipy.ndimage import binary_dilation

    M = np.asarray(masks).astype(bool)
    if M.ndim < 2:
        raise ValueError(f"masks must be (..., H, W), got shape {M.shape}")
    r = int(np.floor(radius))
    if r < 1:
        return M
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (yy ** 2 + xx ** 2) <= radius ** 2
    flat = M.reshape(-1, *M.shape[-2:])
    out = binary_dilation(flat, structure=disc[None])
    return out.reshape(M.shape)


def max_dice(maps, masks, thresholds: Sequence[float] | None = None
             ) -> tuple[float, float, np.ndarray]:
    """Max Dice: best mean hard Dice over a threshold sweep (DWARF's localisation metric).

    Maps are min-max normalised again per map; only maps with a non-empty mask take part.

    Args:
        maps: (..., H, W).
        masks: (..., H, W) binary.
        thresholds: sweep; default 0.05, 0.10, ..., 0.95.

    Returns:
        ``(max_dice, best_threshold, mean_dice_per_threshold)``; ``(nan, nan, nans)`` when no mask is
        non-empty. Ties go to the lowest threshold.
    """
    A, M = _check_pair(maps, masks)
    th = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, np.float32)
    if th.ndim != 1 or th.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence, got {thresholds!r}")
    A = A.reshape(-1, A.shape[-2] * A.shape[-1])
    M = M.reshape(-1, M.shape[-2] * M.shape[-1])
    keep = M.any(-1)
    if not keep.any():
        return float("nan"), float("nan"), np.full(th.shape, np.nan)
    A, M = A[keep], M[keep]
    lo, hi = A.min(-1, keepdims=True), A.max(-1, keepdims=True)
    A = np.where(hi > lo, (A - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    sm = M.sum(-1)
    curve = np.empty(th.shape, np.float64)
    for k, t in enumerate(th):                          # few thresholds; vectorised over maps
        B = A >= t
        inter = (B & (M > 0)).sum(-1)
        curve[k] = np.mean(2 * inter / (B.sum(-1) + sm))
    best = int(np.argmax(curve))
    return float(curve[best]), float(th[best]), curve


def localization_table(maps, masks, targets, class_names: Sequence[str] | None = None,
                       image_ids: Sequence[str] | None = None, threshold: float = 0.5,
                       pointing_tolerance: float = 0.0) -> pd.DataFrame:
    """One row per (image, requested class) with soft, hard and pointing-game scores.

    Args:
        maps: (N, T, H, W) attention maps in [0, 1].
        masks: (N, T, H, W) binary masks of the requested classes (see :func:`masks_from_boxes`).
        targets: (N, T) class indices the maps were computed for.
        class_names: names indexed by class; default the index as a string.
        image_ids: N ids; default ``"0"``, ``"1"``, ...
        threshold: threshold of the hard variants.
        pointing_tolerance: tolerance (pixels) of the pointing game (see :func:`pointing_game`).

    Returns:
        DataFrame with columns ``image_id, class, has_mask, iobb, ior, iou, dice, hard_iobb,
        hard_ior, hard_iou, hard_dice, pointing, pointing_chance`` (``pointing_chance``: the hit
        expected of a map that points anywhere at random, the share of the image within the tolerance
        of the mask).
    """
    A, M = _check_pair(maps, masks)
    if A.ndim != 4:
        raise ValueError(f"maps must be (N, T, H, W), got {A.shape}")
    N, T = A.shape[:2]
    tg = (to_numpy(targets) if isinstance(targets, torch.Tensor) else np.asarray(targets))
    tg = tg.reshape(N, -1)
    if tg.shape != (N, T):
        raise ValueError(f"targets must be (N={N}, T={T}), got {tg.shape}")
    ids = [str(i) for i in range(N)] if image_ids is None else [str(i) for i in image_ids]
    if len(ids) != N:
        raise ValueError(f"got {len(ids)} image_ids for {N} maps")
    names = (lambda c: str(c)) if class_names is None else (lambda c: class_names[c])
    soft, hard = _scores(A, M), hard_scores(A, M, threshold)
    df = pd.DataFrame({
        "image_id": np.repeat(ids, T),
        "class": [names(int(c)) for c in tg.reshape(-1)],
        "has_mask": M.reshape(N, T, -1).any(-1).reshape(-1),
        **{k: v.reshape(-1) for k, v in soft.items()},
        **{f"hard_{k}": v.reshape(-1) for k, v in hard.items()},
        "pointing": pointing_game(A, M, pointing_tolerance).reshape(-1),
        "pointing_chance": pointing_game(np.zeros_like(A), M, pointing_tolerance).reshape(-1),
    })
    return df


def class_summary(maps, masks, targets, class_names: Sequence[str] | None = None,
                  threshold: float = 0.5, thresholds: Sequence[float] | None = None,
                  pointing_tolerance: float = 0.0) -> pd.DataFrame:
    """Per-class means over images whose mask of that class is non-empty, plus Max Dice.

    Args:
        maps, masks, targets, class_names, threshold, pointing_tolerance: as
            :func:`localization_table`.
        thresholds: Max Dice sweep (default 0.05 ... 0.95).

    Returns:
        DataFrame indexed by ``class`` with ``n_images``, the mean of every score of
        :func:`localization_table`, ``max_dice`` and ``max_dice_threshold``; a final row ``"all"``
        pools every (image, class) pair.
    """
    table = localization_table(maps, masks, targets, class_names, None, threshold, pointing_tolerance)
    A, M = _check_pair(maps, masks)
    flatA, flatM = A.reshape(-1, *A.shape[-2:]), M.reshape(-1, *M.shape[-2:])
    cols = ["iobb", "ior", "iou", "dice", "hard_iobb", "hard_ior", "hard_iou", "hard_dice",
            "pointing", "pointing_chance"]
    rows = []
    groups = list(dict.fromkeys(table["class"]))
    for name in groups + ["all"]:
        sel = (table["has_mask"] if name == "all"
               else (table["class"] == name) & table["has_mask"]).to_numpy()
        md, mt, _ = max_dice(flatA[sel], flatM[sel], thresholds) if sel.any() else (np.nan,) * 3
        rows.append({"class": name, "n_images": int(sel.sum()),
                     **{c: float(np.nanmean(table.loc[sel, c])) if sel.any() else np.nan
                        for c in cols},
                     "max_dice": md, "max_dice_threshold": mt})
    return pd.DataFrame(rows).set_index("class")


def random_map_baseline(masks, n_draws: int = 8, smooth: int = 0, seed: int = 0
                        ) -> dict[str, float]:
    """Chance level of the soft scores: mean IoBB / IoR / IoU / Dice of uniform random maps
    (optionally box-blurred with a ``smooth``-pixel kernel, then min-max normalised).

    Args:
        masks: (..., H, W) binary masks (only non-empty ones count).
        n_draws: random maps per mask.
        smooth: odd box-filter size (0 = none) to mimic the blobby maps of CAM.
        seed: RNG seed.

    Returns:
        ``{"iobb", "ior", "iou", "dice"}`` means.
    """
    M = (_np(masks) > 0.5).astype(np.float32)
    M = M.reshape(-1, *M.shape[-2:])
    M = M[M.reshape(len(M), -1).any(-1)]
    if not len(M):
        return {k: float("nan") for k in ("iobb", "ior", "iou", "dice")}
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(n_draws, *M.shape, generator=g)                        # (D, N, H, W)
    if smooth > 1:
        R = torch.nn.functional.avg_pool2d(R, smooth, stride=1, padding=smooth // 2,
                                           count_include_pad=False)
    from interpret.attention.base import minmax_normalize

    R = to_numpy(minmax_normalize(R))
    s = _scores(R, np.broadcast_to(M, R.shape))
    return {k: float(np.nanmean(v)) for k, v in s.items()}
