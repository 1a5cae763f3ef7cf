"""FALCON (Kalibhat et al., ICML 2023, "Identifying Interpretable Subspaces in Image Representations") for single
units, with reports as the caption set (the FALCON_M baseline of the MAMMI paper), after the authors' code
(``falcon_utils.py``, ``explain_feature_group.py`` of NehaKalibhat/falcon-explain):

1. the ``top_k`` (10) highest-activating probing images of a unit are **cropped** around the unit's activation:
   the map min-max normalised, thresholded at ``crop_threshold`` (0.6), the bounding box of its largest region
   cut out and resized back (:func:`activation_crops`); the crops are embedded with the CLIP image encoder
   (``crop_embeddings``, computed by the caller, e.g. ``concept_benchmark``);
2. each crop retrieves its ``captions_per_image`` (5) nearest **captions** (here: reports) by
   ``softmax(100 cos(crop, caption))`` over all captions;
3. **caption-word scoring**: a concept mentioned in a retrieved caption scores that caption's softmax
   probability; per image the maximum over its captions; the unit's score is the sum over its images divided by
   their number;
4. **contrast**: the same is computed on the ``top_k`` lowest-activating images (whole, uncropped, as the authors'
   lowly activating images); concepts scoring ``>= low_threshold`` (0.1) there are removed;
5. the ``max_concepts`` (8) best remaining concepts describe the unit (scores of the others set to 0; the
   default ``beta`` of :func:`interpret.annotation.annotate` is 0, i.e. every positive score is kept).

Departures (named): the crop box is that of the largest 8-connected region (the authors' "downright boxing"
keeps the largest of its boxes); the activation map is the unit's own map (CAM for a final-layer unit) rather
than Grad-CAM of a feature group; the lowly activating images are the ``top_k`` lowest, not the authors'
"below the mean and similar in the rest of the representation"; concepts come from the concept set via
``caption_concepts`` (report incidence), not from TextBlob words of the captions; MAMMI's 0.25 selection threshold
for FALCON could not be found in the MAMMI authors' code and is not applied (``max_concepts`` as FALCON).

Extra parameters (required): ``crop_embeddings`` (U, k, d), ``caption_embeddings`` (R, d), ``caption_concepts``
(R, M) incidence or R lists of concept indices. Evidence: ``min(top_k, N)``; 0 for a unit that never varies.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from interpret.annotation.base import Annotator, as_tensor, check_positive_int, register
from interpret.annotation.falcon_simplified import incidence_matrix

__all__ = ["Falcon", "activation_crops", "crop_box"]


def crop_box(act_map: Any, threshold: float = 0.6) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (end-exclusive) of the largest region of a min-max normalised map above ``threshold``.

    Args:
        act_map: (H, W) activation map; threshold: in [0, 1] on the normalised map.

    Returns:
        The box in map pixels; the whole map when the map is constant.

    Example:
        >>> m = np.zeros((6, 6)); m[1:3, 2:5] = 1.0; m[5, 5] = 0.9
        >>> crop_box(m)
        (2, 1, 5, 3)
    """
    from scipy import ndimage

    a = np.asarray(act_map, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    h, w = a.shape
    if hi <= lo:
        return 0, 0, w, h
    mask = (a - lo) / (hi - lo) >= threshold
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())[1:]
    ys, xs = np.nonzero(lab == int(np.argmax(sizes)) + 1)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def activation_crops(images: Any, maps: Any, acts: Any, top_k: int = 10, threshold: float = 0.6
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of each unit's top-activating images around the unit's activation, resized to the image size.

    Args:
        images: (N, C, H, W) probing images; maps: (N, U, h, w) per-unit activation maps (upsampled to
            (H, W) here, bilinear); acts: (N, U) pooled activations (ranking); top_k, threshold: see module.

    Returns:
        ``crops`` (U, k, C, H, W) and ``index`` (k, U) of the images cropped, k = min(top_k, N).
    """
    maps = torch.as_tensor(maps).float()
    n, c, h, w = (int(x) for x in images.shape)  # images may be a lazy array (read one image at a time)
    k = min(check_positive_int(top_k, "top_k"), n)
    idx = torch.topk(torch.as_tensor(acts).float(), k, dim=0).indices  # (k, U)
    u = idx.shape[1]
    crops = torch.empty(u, k, c, h, w)
    for unit in range(u):
        for r in range(k):
            i = int(idx[r, unit])
            m = F.interpolate(maps[i, unit][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            x0, y0, x1, y1 = crop_box(m.numpy(), threshold)
            img = torch.as_tensor(np.asarray(images[i:i + 1])).float()  # (1, C, H, W)
            crops[unit, r] = F.interpolate(img[:, :, y0:y1, x0:x1], size=(h, w), mode="bilinear",
                                           align_corners=False)[0]
    return crops, idx


@register("falcon")
class Falcon(Annotator):
    """FALCON scores (see module docstring).

    Args:
        crop_embeddings: (U, k, d) CLIP embeddings of :func:`activation_crops` (same k as ``top_k``).
        caption_embeddings: (R, d) caption (report) embeddings; caption_concepts: (R, M) or R index lists.
        top_k: images per unit (10); captions_per_image: nearest captions per image (5).
        low_threshold: contrast threshold on the lowest images' scores (0.1); max_concepts: kept per unit (8).
    """

    default_beta = 0.0

    def __init__(self, crop_embeddings: Any = None, caption_embeddings: Any = None,
                 caption_concepts: Sequence | Any = None, top_k: int = 10, captions_per_image: int = 5,
                 low_threshold: float = 0.1, max_concepts: int = 8, unit_chunk: int = 128) -> None:
        super().__init__(unit_chunk)
        if crop_embeddings is None or caption_embeddings is None or caption_concepts is None:
            raise ValueError("falcon needs crop_embeddings (U, k, d), caption_embeddings (R, d) and "
                             "caption_concepts ((R, M) or R index lists)")
        self.crops = as_tensor(crop_embeddings, "crop_embeddings", 3)
        self.captions = as_tensor(caption_embeddings, "caption_embeddings", 2)
        self.caption_concepts = caption_concepts
        self.top_k = check_positive_int(top_k, "top_k")
        self.captions_per_image = check_positive_int(captions_per_image, "captions_per_image")
        self.max_concepts = check_positive_int(max_concepts, "max_concepts")
        self.low_threshold = float(low_threshold)

    def _word_scores(self, emb: torch.Tensor, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(..., M) caption-word scores of images (..., k, d): mean over images of the max caption probability."""
        p = torch.softmax(100.0 * emb @ e.T, dim=-1)  # (..., k, R)
        top, near = torch.topk(p, min(self.captions_per_image, e.shape[0]), dim=-1)  # (..., k, 5)
        per_image = (top[..., None] * c[near]).amax(-2)  # (..., k, M) max over the image's captions
        return per_image.mean(-2)

    def compute(self, acts, v, t, tem):
        n, u = acts.shape
        k = min(self.top_k, n)
        crops = F.normalize(self.crops.to(v.device, v.dtype), dim=-1)
        if crops.shape[:2] != (u, k):
            raise ValueError(f"crop_embeddings must be (U, k, d) = ({u}, {k}, d), got {tuple(crops.shape)}")
        e = F.normalize(self.captions.to(v.device, v.dtype), dim=-1)
        if e.shape[1] != v.shape[1] or crops.shape[2] != v.shape[1]:
            raise ValueError(f"caption/crop embedding dims {e.shape[1]}/{crops.shape[2]} != image dim {v.shape[1]}")
        c = incidence_matrix(self.caption_concepts, e.shape[0], t.shape[0]).to(v.device, v.dtype)  # (R, M)
        high = self._word_scores(crops, e, c)  # (U, M)
        low_idx = torch.topk(-acts, k, dim=0).indices.T  # (U, k) lowest-activating images, whole
        low = self._word_scores(v[low_idx], e, c)  # (U, M)
        scores = high.masked_fill(low >= self.low_threshold, 0.0)
        keep = torch.topk(scores, min(self.max_concepts, scores.shape[1]), dim=1).indices
        out = torch.zeros_like(scores)
        return out.scatter_(1, keep, scores.gather(1, keep))
