"""Box-aware image transforms for the manifest Dataset.

All functions take a float image tensor ``(C, H, W)`` in [0, 1], boxes ``(K, 4)`` as ``xyxy`` in
continuous pixel coordinates of that image (pixel ``j`` spans ``[j, j + 1)``) and optionally a mask
stack ``(M, H, W)``; geometric ones move boxes and masks with the content. For an affine warp a box
becomes the enclosing box of its four transformed corners, clipped to the image; a box that leaves the
image entirely is dropped (its index disappears from ``keep``).

Example:
    >>> import torch
    >>> img = torch.zeros(1, 10, 10); img[:, 2:4, 1:3] = 1
    >>> out, boxes, _ = hflip(img, torch.tensor([[1., 2., 3., 4.]]))
    >>> boxes.tolist(), out[0, 2:4, 7:9].min().item()
    ([[7.0, 2.0, 9.0, 4.0]], 1.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "resize", "hflip", "affine", "brightness_contrast", "random_augment",
           "boxes_to_mask", "box_union"]


@dataclass
class AugmentConfig:
    """Training augmentation ranges (defaults: mild, anatomy-preserving)."""

    flip_p: float = 0.5                       # probability of a horizontal flip
    rotate_deg: float = 7.0                   # rotation drawn from [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.9, 1.1)   # isotropic zoom range
    translate: float = 0.06                   # shift, fraction of the side, per axis
    affine_p: float = 0.8                     # probability of applying the affine warp
    brightness: float = 0.08                  # additive offset drawn from [-b, b]
    contrast: tuple[float, float] = (0.85, 1.15)  # multiplicative contrast about 0.5

    def __post_init__(self):
        for name in ("flip_p", "affine_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.contrast[0] <= 0 or self.contrast[0] > self.contrast[1]:
            raise ValueError(f"contrast must be (low, high) with 0 < low <= high, got {self.contrast}")


def _check(image: torch.Tensor, boxes: torch.Tensor) -> None:
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (K, 4) xyxy, got shape {tuple(boxes.shape)}")


def resize(image: torch.Tensor, boxes: torch.Tensor, size: int, mask: torch.Tensor | None = None,
           box_scale: tuple[float, float] | None = None):
    """Resize to ``size x size`` (bilinear, antialiased) and scale boxes per axis.

    Args:
        image: (C, H, W) float.
        boxes: (K, 4) xyxy in the pixel frame the boxes were given in.
        size: output side S.
        mask: optional (M, H, W) mask stack, resized bilinearly and re-binarised at 0.5.
        box_scale: ``(sx, sy)`` to multiply box x and y by; default ``(S / W, S / H)``. Use it when the
            boxes refer to an original image of another size than ``image`` (e.g. NIH boxes at 1024 px
            with a downsampled image).

    Returns:
        ``(image (C, S, S), boxes (K, 4), mask (M, S, S) or None)``.
    """
    _check(image, boxes)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    _, h, w = image.shape
    sx, sy = box_scale if box_scale is not None else (size / w, size / h)
    if (h, w) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=(h > size or w > size))[0]
        if mask is not None and mask.numel():
            mask = (F.interpolate(mask[None].float(), size=(size, size), mode="bilinear",
                                  align_corners=False)[0] >= 0.5).float()
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
    return image.clamp_(0, 1), boxes * scale, mask


def hflip(image: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor | None = None):
    """Mirror left-right; ``x -> W - x`` for box edges. Labels are unchanged (a side-specific report
    no longer matches the flipped image: acceptable for training a classifier)."""
    _check(image, boxes)
    w = image.shape[-1]
    out = image.flip(-1)
    b = boxes.clone()
    b[:, 0], b[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return out, b, (mask.flip(-1) if mask is not None else None)


def _affine_matrix(angle_deg: float, scale: float, translate: tuple[float, float], size: int):
    """Forward pixel map p' = s R (p - c) + c + t*S as a 2x3 tensor, and the grid_sample theta
    (destination -> source in normalised coordinates, align_corners=False)."""
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    c = size / 2.0
    tx, ty = translate[0] * size, translate[1] * size
    fwd = torch.tensor([[scale * cos, -scale * sin, 0.0], [scale * sin, scale * cos, 0.0]],
                       dtype=torch.float64)
    fwd[:, 2] = torch.tensor([c + tx, c + ty], dtype=torch.float64) - fwd[:, :2] @ torch.tensor(
        [c, c], dtype=torch.float64)
    # normalised n = 2p/S - 1  =>  n_src = R^-1 (n_dst - 2t) / s
    rinv = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64) / scale
    theta = torch.zeros(2, 3, dtype=torch.float64)
    theta[:, :2] = rinv
    theta[:, 2] = -rinv @ torch.tensor([2 * translate[0], 2 * translate[1]], dtype=torch.float64)
    return fwd, theta


def affine(image: torch.Tensor, boxes: torch.Tensor, angle_deg: float = 0.0, scale: float = 1.0,
           translate: tuple[float, float] = (0.0, 0.0), mask: torch.Tensor | None = None):
    """Rotate (degrees, about the centre; positive turns the content clockwise on screen, y down),
    zoom and shift a square image, moving boxes and masks with the content.

    Args:
        image: (C, S, S) float, square.
        boxes: (K, 4) xyxy pixels.
        angle_deg: rotation.
        scale: zoom factor (> 0).
        translate: ``(tx, ty)`` shift as a fraction of S.
        mask: optional (M, S, S) stack warped the same way (binarised at 0.5).

    Returns:
        ``(image, boxes (K', 4), mask, keep (K',) long)`` where ``keep`` indexes the input boxes that
        are still (partly) inside the image. Outside pixels are filled with 0.

    Raises:
        ValueError: non-square image or ``scale <= 0``.
    """
    _check(image, boxes)
    _, h, w = image.shape
    if h != w:
        raise ValueError(f"affine expects a square image, got {h}x{w}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    fwd, theta = _affine_matrix(angle_deg, scale, translate, w)
    grid = F.affine_grid(theta[None].to(image.dtype), [1, 1, h, w], align_corners=False)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0].clamp_(0, 1)
    if mask is not None and mask.numel():
        mask = (F.grid_sample(mask[None].float(), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0] >= 0.5).float()
    if boxes.numel() == 0:
        return out, boxes, mask, torch.zeros(0, dtype=torch.long)
    x0, y0, x1, y1 = boxes.double().unbind(-1)
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                           torch.stack([x0, y1], -1), torch.stack([x1, y1], -1)], 1)  # (K, 4, 2)
    moved = corners @ fwd[:, :2].T + fwd[:, 2]                                          # (K, 4, 2)
    nb = torch.cat([moved.amin(1), moved.amax(1)], -1)                                  # (K, 4)
    nb[:, 0::2] = nb[:, 0::2].clamp(0, w)
    nb[:, 1::2] = nb[:, 1::2].clamp(0, h)
    keep = torch.nonzero((nb[:, 2] - nb[:, 0] > 1e-3) & (nb[:, 3] - nb[:, 1] > 1e-3)).flatten()
    return out, nb[keep].to(boxes.dtype), mask, keep


def brightness_contrast(image: torch.Tensor, brightness: float = 0.0, contrast: float = 1.0):
    """``clip((x - 0.5) * contrast + 0.5 + brightness, 0, 1)``."""
    return ((image - 0.5) * contrast + 0.5 + brightness).clamp_(0, 1)


def random_augment(image: torch.Tensor, boxes: torch.Tensor, box_labels: torch.Tensor,
                   mask: torch.Tensor | None = None, config: AugmentConfig | None = None,
                   generator: torch.Generator | None = None):
    """Random flip, affine and brightness/contrast (torch RNG: DataLoader workers are seeded).

    Returns:
        ``(image, boxes, box_labels, mask)`` with boxes that left the image removed.
    """
    cfg = config or AugmentConfig()

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    if torch.rand((), generator=generator).item() < cfg.flip_p:
        image, boxes, mask = hflip(image, boxes, mask)
    if torch.rand((), generator=generator).item() < cfg.affine_p:
        image, boxes, mask, keep = affine(
            image, boxes, angle_deg=u(-cfg.rotate_deg, cfg.rotate_deg), scale=u(*cfg.scale),
            translate=(u(-cfg.translate, cfg.translate), u(-cfg.translate, cfg.translate)), mask=mask)
        box_labels = box_labels[keep]
    image = brightness_contrast(image, u(-cfg.brightness, cfg.brightness), u(*cfg.contrast))
    return image, boxes, box_labels, mask


def box_union(boxes, size: int | tuple[int, int]) -> np.ndarray:
    """The one box rasteriser: the union of ``xyxy`` boxes as a boolean (H, W) mask, end-exclusive by the
    pixel-centre rule (pixel ``(i, j)`` is inside when ``(j + 0.5, i + 0.5)`` lies in a box).

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1`` in pixels (array, tensor or nested list; K may be 0).
        size: S or (H, W).

    Returns:
        (H, W) bool.
    """
    H, W = (size, size) if np.isscalar(size) else size
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes,
                   dtype=np.float32).reshape(-1, 4)
    cy = np.arange(H, dtype=np.float32) + 0.5
    cx = np.arange(W, dtype=np.float32) + 0.5
    rows = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])         # (K, H)
    cols = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])         # (K, W)
    return (rows[:, :, None] & cols[:, None, :]).any(0)                   # (H, W)


def boxes_to_mask(boxes: torch.Tensor, box_labels: torch.Tensor, num_classes: int, size: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class masks (C, S, S) float of xyxy boxes (:func:`box_union` per class). Boxes add to ``out``
    (logical or) when given."""
    mask = out if out is not None else torch.zeros(num_classes, size, size)
    if boxes.numel() == 0:
        return mask
    labels = box_labels.reshape(-1)
    for lab in torch.unique(labels).tolist():
        union = torch.from_numpy(box_union(boxes[labels == lab], size)).to(mask.dtype)
        mask[lab] = torch.maximum(mask[lab], union)
    return mask
    c = torch.arange(size, dtype=torch.float32) + 0.5
    for (x0, y0, x1, y1), lab in zip(boxes.tolist(), box_labels.tolist()):
        rows = (c >= y0) & (c < y1)
        cols = (c >= x0) & (c < x1)
        mask[lab] = torch.maximum(mask[lab], (rows[:, None] & cols[None, :]).float())
    return mask
