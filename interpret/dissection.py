"""Network dissection against boxes (Khakzar et al., imbalance study) and TSI-style unit IoU.

For one layer with C units:

1. **Threshold** per unit ``T_u`` at the dataset-wide quantile ``1 - q`` of its (low-resolution)
   activation values over all images and positions (q = 0.01 for T-DenseNet, 0.04 for ResNet50).
   The quantile is the order statistic of rank ``floor((1 - q)(n - 1))`` (numpy's ``"lower"``).
   ``quantile="exact"`` keeps every value (4 N C h w bytes, one forward pass);
   ``quantile="histogram"`` streams two more passes (per-unit min/max, then a ``bins``-bin histogram)
   and returns the upper edge of the bin holding that order statistic, so
   ``T_u <= T_hat_u <= T_u + (max_u - min_u) / bins`` (reported per unit in ``threshold_error``):
   the thresholded set is a subset of the exact one, missing only values within one bin above
   ``T_u`` (ties at ``T_u``, e.g. a zero background after a ReLU, are excluded by both).
2. **Maps** are upsampled bilinearly to the image size and thresholded, ``A_u > T_u``.
3. **Concepts**: connected components (``scipy.ndimage.label``, 4-connectivity by default) of the
   thresholded map that overlap a box of class k. All units of an image are labelled in one call (a
   3-D structure without connections across units), chunked over units to bound memory. A unit whose
   low-resolution map never exceeds ``T_u`` on an image is skipped there: bilinear upsampling is a
   convex combination of low-resolution values, so no pixel of it can exceed ``T_u`` either.
4. **Counts** (DESIGN.md): per class k over the n_k images with a box of k,
   ``Disjoint_k = (# components overlapping a k box, over all units and images) / n_k`` and
   ``Unique_k = (# (image, unit) pairs with >= 1 such component) / n_k``; ``overall`` uses the union
   of every box of an image and the images with any box.
5. **TSI / NetDissect IoU** per unit u and concept k, over the whole set:
   ``IoU_uk = sum_i |A_u(x_i) > T_u  and  L_k(x_i)| / sum_i |(A_u > T_u)  or  L_k(x_i)|`` with L_k the
   union of k's boxes (or the dataset's ``mask`` of class k when ``concept_masks="masks"``: boxes
   plus polygons / mask files); the unit's label is its best concept when that IoU exceeds 0.04.
   Intersections for all units and concepts are one matrix product per image.

**Protocols** (``protocol=``). ``"paper"`` (default) is the counting above: NetDissect's dataset-wide
quantile of the low-resolution activations, ``>``, 4-connected components that *overlap* a box of the class,
counted per class over the images with a box of that class. ``"authors_code"`` reproduces how the
authors' released code (imba-explain ``ConceptDetector.detect``, config ``count_concepts.py``) counts, which
differs in five places:

- the quantile is taken **per batch** (their loaders: 128 images for T-DenseNet, 64 for ResNet50), over the
  **upsampled** maps (bilinear, ``align_corners=False``), with ``torch.quantile``'s linear interpolation;
- the map is thresholded with ``>=``;
- the thresholded map is **clipped to the union of all boxes** of the image (``binary_mask *= boxes``), and
  its pieces are counted as OpenCV **contours** (``cv2.findContours(RETR_TREE)``): every 8-connected piece
  has an outer contour and every hole (a 4-connected background region enclosed by it) one more; computed
  here with ``scipy.ndimage`` (equal to OpenCV's count, tested where OpenCV is installed);
- Disjoint of an image = contours over all channels, Unique = channels with at least one contour, both over
  the union of *all* its boxes; that per-image count is appended once **per box label** of the image (an
  image with two boxes of a class counts twice for it), and the global figure averages all those entries
  (``overall["n_images"]`` is then the number of (image, box) entries);
- no IoU (``iou`` is NaN, no unit labels).

Two things are not reproduced: the authors rasterise boxes with integer slicing ``[y1:y2, x1:x2]`` where
this library uses :func:`interpret.localization.boxes_to_mask`, and their ResNet50 counts are taken on
``layer3.5`` (14 x 14 at 224 px; T-DenseNet on ``features.norm5``, 28 x 28) where the study dissects the
model's ``feature_layer`` unless ``layer=`` is given.

Example:
    >>> res = dissect(model, "phantom/manifest.parquet", q=0.01, image_size=224)  # doctest: +SKIP
    >>> res.per_class[["disjoint", "unique"]]                                      # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from interpret.activations import iter_layer, make_loader
from interpret.hooks import resolve_layer
from interpret.localization import boxes_to_mask

logger = logging.getLogger(__name__)

__all__ = ["DissectionResult", "dissect", "dissect_activations", "unit_thresholds", "count_contours",
           "QUANTILE_METHODS", "PROTOCOLS"]

QUANTILE_METHODS = ("exact", "histogram", "auto")
#: Counting protocols: the paper's (NetDissect) and the authors' released code's (see the module docstring).
PROTOCOLS = ("paper", "authors_code")

# A batch for the counting step: activations (B, C, h, w), boxes per image (K_i, 4) xyxy in image
# pixels, box labels per image (K_i,), optional concept masks (B, K, H, W), image size (H, W), ids.
Batch = tuple[torch.Tensor, list, list, "torch.Tensor | None", tuple[int, int], list[str]]


@dataclass
class DissectionResult:
    """Dissection of one layer.

    Attributes:
        thresholds: (C,) per-unit activation thresholds.
        threshold_error: (C,) bound on |threshold - exact quantile| (0 for ``exact``).
        per_class: DataFrame indexed by class: ``n_images``, ``disjoint``, ``unique``,
            ``components`` (total), ``unit_hits`` (total (image, unit) pairs), ``units_detecting``
            (distinct units with a component on that class anywhere).
        overall: the same figures over the union of all boxes (dict).
        iou: (C, K) TSI IoU per unit and concept.
        unit_concepts: DataFrame per unit: ``unit``, ``concept`` (best, or None when its IoU is not
            above ``iou_threshold``), ``iou``.
        per_image: DataFrame ``image_id, class, components, units`` for every (image, boxed class).
        params: q, quantile method, bins, connectivity, ...
    """

    thresholds: np.ndarray
    threshold_error: np.ndarray
    per_class: pd.DataFrame
    overall: dict[str, float]
    iou: np.ndarray
    unit_concepts: pd.DataFrame
    per_image: pd.DataFrame
    classes: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (``dissection.json`` of the audit)."""
        pc = self.per_class.reset_index()
        return {"params": self.params, "overall": self.overall,
                "per_class": pc.to_dict(orient="records"),
                "units": self.unit_concepts.to_dict(orient="records"),
                "thresholds": [float(t) for t in self.thresholds],
                "threshold_error_max": float(np.max(self.threshold_error, initial=0.0))}


# ---------------------------------------------------------------------------------- thresholds
def _rank(n: int, q: float) -> int:
    return int(math.floor((1.0 - q) * (n - 1)))


def _check_q(q: float) -> float:
    if not 0.0 < float(q) < 1.0:
        raise ValueError(f"q must lie in (0, 1) (top fraction of activations), got {q}")
    return float(q)


def _exact_thresholds(values: torch.Tensor, q: float) -> torch.Tensor:
    """values (C, n) -> (C,) order statistic of rank floor((1 - q)(n - 1))."""
    r = _rank(values.shape[1], q)
    return values.kthvalue(r + 1, dim=1).values


def _unit_values(acts: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (C, B h w)."""
    if acts.dim() != 4:
        raise ValueError(f"dissection needs (B, C, h, w) feature maps, got {tuple(acts.shape)}")
    return acts.transpose(0, 1).reshape(acts.shape[1], -1)


def unit_thresholds(batches: Callable[[], Iterable[torch.Tensor]], q: float,
                    method: str = "exact", bins: int = 2048
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit thresholds at the dataset quantile ``1 - q``.

    Args:
        batches: callable returning a fresh iterable of (B, C, h, w) activations (called once for
            ``exact``, twice for ``histogram``).
        q: top fraction (0.01 = 99th percentile).
        method: ``"exact"`` (keeps all values) or ``"histogram"`` (streaming, memory C x bins).
        bins: histogram bins per unit.

    Returns:
        ``(thresholds (C,), error_bound (C,))``.

    Raises:
        ValueError: bad ``q``, ``method`` or ``bins``; no data.
    """
    q = _check_q(q)
    if method == "exact":
        vals = [_unit_values(a.float()).cpu() for a in batches()]
        if not vals:
            raise ValueError("no activations to threshold")
        v = torch.cat(vals, 1)
        return _exact_thresholds(v, q), torch.zeros(v.shape[0])
    if method != "histogram":
        raise ValueError(f"quantile method must be one of ('exact', 'histogram'), got {method!r}")
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    lo = hi = None
    n = 0
    for a in batches():                                                    # pass 1: range
        v = _unit_values(a.float())
        blo, bhi = v.amin(1), v.amax(1)
        lo = blo if lo is None else torch.minimum(lo, blo)
        hi = bhi if hi is None else torch.maximum(hi, bhi)
        n += v.shape[1]
    if lo is None:
        raise ValueError("no activations to threshold")
    C = lo.shape[0]
    width = torch.where(hi > lo, (hi - lo) / bins, torch.ones_like(hi))
    counts = torch.zeros(C * bins, dtype=torch.long, device=lo.device)
    offs = (torch.arange(C, device=lo.device) * bins)[:, None]
    for a in batches():                                                    # pass 2: histogram
        v = _unit_values(a.float())
        idx = ((v - lo[:, None]) / width[:, None]).floor().long().clamp_(0, bins - 1)
        counts += torch.bincount((idx + offs).flatten(), minlength=C * bins)
    cum = counts.view(C, bins).cumsum(1)                                   # (C, bins)
    r = _rank(n, q)
    b = (cum <= r).sum(1)                                                  # bin holding rank r
    thr = torch.where(b >= bins - 1, hi, lo + (b.float() + 1.0) * width)  # upper edge of that bin
    thr = torch.where(hi > lo, thr, lo)
    err = torch.where(hi > lo, width, torch.zeros_like(width))
    return thr.cpu(), err.cpu()


# ---------------------------------------------------------------------------------- counting
class _Counter:
    """Accumulates components, unit hits and IoU terms batch by batch (vectorised over units)."""

    def __init__(self, thresholds: torch.Tensor, num_classes: int, unit_chunk: int,
                 connectivity: int):
        self.thr = thresholds.float()
        self.C, self.K = thresholds.shape[0], num_classes
        self.unit_chunk = max(1, int(unit_chunk))
        s2 = ndimage.generate_binary_structure(2, connectivity)
        self.structure = np.zeros((3, 3, 3), bool)
        self.structure[1] = s2                                              # no links across units
        self.inter = np.zeros((self.C, self.K))                              # pixel counts
        self.area_t = np.zeros(self.C)
        self.area_l = np.zeros(self.K)
        self.detect = np.zeros((self.C, self.K), bool)                     # unit ever hit class k
        self.rows: list[tuple[str, int, int, int]] = []                    # id, class(-1=any), comps, units
        self.map_size: tuple[int, ...] = ()

    def add(self, acts: torch.Tensor, boxes: list, box_labels: list, masks: torch.Tensor | None,
            size: tuple[int, int], ids: list[str]) -> None:
        H, W = size
        acts = acts.float()
        self.map_size = tuple(int(v) for v in acts.shape[-2:])
        thr = self.thr.to(acts.device)
        # bilinear upsampling is a convex combination of low-resolution values, so a unit whose
        # low-resolution map never exceeds T_u has no pixel above it: only the others are upsampled,
        # thresholded and labelled (exactly the same components, a fraction of the work at q = 0.01)
        live = (acts.flatten(2).amax(2) > thr).cpu().numpy()                   # (B, C)
        # after the upsampling everything is counted in NumPy: the small per-image torch ops (sums, casts,
        # zeros) each waited for a thread pool to wake, which dominated on a busy 2-core machine
        for i in range(acts.shape[0]):
            b = np.asarray(boxes[i], np.float32).reshape(-1, 4)
            lab = np.asarray(box_labels[i]).reshape(-1).astype(int)
            present = sorted(set(lab.tolist()))
            box_masks = {k: boxes_to_mask(b[lab == k], (H, W)) for k in present}
            any_mask = np.logical_or.reduce(list(box_masks.values())) if present else None
            if masks is not None:
                L = masks[i].reshape(self.K, -1).float().cpu().numpy() > 0.5   # (K, HW) bool
            else:
                L = np.zeros((self.K, H * W), bool)
                for k, m in box_masks.items():
                    L[k] = m.reshape(-1)
            self.area_l += np.count_nonzero(L, axis=1)
            concepts = np.flatnonzero(L.any(1))                                # classes with pixels
            comps = {k: 0 for k in present}
            units = {k: 0 for k in present}
            comps_any = units_any = 0
            alive = np.flatnonzero(live[i])                                    # (C',) unit indices
            for c0 in range(0, len(alive), self.unit_chunk):
                cu = alive[c0:c0 + self.unit_chunk]                            # (Cc,)
                cd = torch.from_numpy(cu).to(acts.device)
                up = F.interpolate(acts[i, cd][:, None], size=(H, W), mode="bilinear",
                                   align_corners=False)[:, 0]                  # (Cc, H, W)
                on = (up > thr[cd, None, None]).cpu().numpy()                  # (Cc, H, W) bool
                flat = on.reshape(len(cu), -1)                                 # (Cc, HW)
                self.area_t[cu] += np.count_nonzero(flat, axis=1)
                for k in concepts:
                    self.inter[cu, k] += np.count_nonzero(flat & L[k], axis=1)
                if not present:
                    continue
                # one labelling call for the chunk: a 3-D structure without links across units
                labels, n = ndimage.label(on, structure=self.structure)
                if n == 0:
                    continue
                # component ids grow in raster order over (unit, y, x): unit of a component id
                last = np.maximum.accumulate(labels.reshape(len(cu), -1).max(1))  # (Cc,)
                seen = np.zeros(n + 1, bool)
                for k, m in list(box_masks.items()) + [(-1, any_mask)]:
                    seen[:] = False
                    seen[labels[:, m]] = True                                  # ids touching the mask
                    ids_k = np.flatnonzero(seen[1:]) + 1                       # sorted, as np.unique
                    if not len(ids_k):
                        continue
                    hit_units = np.unique(np.searchsorted(last, ids_k))        # rows in [0, Cc)
                    if k < 0:
                        comps_any += len(ids_k)
                        units_any += len(hit_units)
                    else:
                        comps[k] += len(ids_k)
                        units[k] += len(hit_units)
                        self.detect[cu[hit_units], k] = True
            for k in present:
                self.rows.append((ids[i], k, comps[k], units[k]))
            if present:
                self.rows.append((ids[i], -1, comps_any, units_any))


# ---------------------------------------------------------------------------------- authors' code
_S8 = np.zeros((3, 3, 3), bool)
_S8[1] = ndimage.generate_binary_structure(2, 2)                          # 8-connected, no links across planes
_S4 = np.zeros((3, 3, 3), bool)
_S4[1] = ndimage.generate_binary_structure(2, 1)                          # 4-connected background


def count_contours(masks: np.ndarray) -> np.ndarray:
    """Number of contours OpenCV's ``findContours(mask, RETR_TREE, ...)`` returns, per plane.

    Every 8-connected foreground piece has one outer contour and every hole (a 4-connected background region
    that does not reach the image border) one inner contour (Suzuki & Abe 1985, OpenCV's convention).

    Args:
        masks: (P, H, W) boolean planes (counted independently).

    Returns:
        (P,) int64 contour counts.
    """
    m = np.asarray(masks, bool)
    if m.ndim != 3:
        raise ValueError(f"count_contours needs (P, H, W) planes, got shape {m.shape}")
    P = m.shape[0]
    out = np.zeros(P, np.int64)
    if P == 0 or not m.any():
        return out
    fg, n_fg = ndimage.label(m, structure=_S8)
    if n_fg:
        first = np.unique(fg.reshape(P, -1), axis=None, return_index=True)
        ids, pos = first
        plane = pos[ids > 0] // (m.shape[1] * m.shape[2])
        out += np.bincount(plane, minlength=P)
    bg, n_bg = ndimage.label(~m, structure=_S4)
    if n_bg:
        ids, pos = np.unique(bg.reshape(P, -1), return_index=True)
        keep = ids > 0
        ids, plane = ids[keep], pos[keep] // (m.shape[1] * m.shape[2])
        border = np.zeros(n_bg + 1, bool)
        for edge in (bg[:, 0, :], bg[:, -1, :], bg[:, :, 0], bg[:, :, -1]):
            border[np.unique(edge)] = True
        holes = ~border[ids]
        out += np.bincount(plane[holes], minlength=P)
    return out


def _linear_quantile(values: torch.Tensor, p: float) -> torch.Tensor:
    """(C, n) -> (C,) ``torch.quantile(values, p, dim=1)`` (linear interpolation), without its size limit."""
    n = values.shape[1]
    pos = p * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = values.kthvalue(lo + 1, dim=1).values
    v_hi = values.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


class _AuthorsCounter:
    """imba-explain's ``ConceptDetector.detect`` counting (``count_disjoint=True`` and its Unique twin)."""

    def __init__(self, q: float, num_classes: int, unit_chunk: int):
        self.q, self.K, self.unit_chunk = q, num_classes, max(1, int(unit_chunk))
        self.rows: list[tuple[str, int, int, int]] = []
        self.detect: np.ndarray | None = None
        self.map_size: tuple[int, ...] = ()
        self.thresholds: list[np.ndarray] = []                            # per batch (C,)

    def add(self, acts: torch.Tensor, boxes: list, box_labels: list, masks, size: tuple[int, int],
            ids: list[str]) -> None:
        H, W = size
        acts = acts.float()
        B, C = acts.shape[:2]
        self.map_size = tuple(int(v) for v in acts.shape[-2:])
        if self.detect is None:
            self.detect = np.zeros((C, self.K), bool)
        union = np.stack([boxes_to_mask(np.asarray(b, np.float32).reshape(-1, 4), (H, W)) for b in boxes])  # (B, H, W)
        contours = np.zeros((B, C), np.int64)
        thr_all = np.zeros(C)
        for c0 in range(0, C, self.unit_chunk):
            up = F.interpolate(acts[:, c0:c0 + self.unit_chunk], size=(H, W), mode="bilinear",
                               align_corners=False)                        # (B, Cc, H, W)
            Cc = up.shape[1]
            thr = _linear_quantile(up.transpose(0, 1).reshape(Cc, -1), 1.0 - self.q)   # (Cc,) per batch
            thr_all[c0:c0 + Cc] = thr.cpu().numpy()
            on = (up >= thr.view(1, Cc, 1, 1)).cpu().numpy() & union[:, None]           # (B, Cc, H, W)
            for i in range(B):
                if not union[i].any():
                    continue
                ys, xs = np.nonzero(union[i])
                crop = on[i][:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]   # zeros outside: same count
                contours[i, c0:c0 + Cc] = count_contours(crop)
        self.thresholds.append(thr_all)
        for i in range(B):
            labs = np.asarray(box_labels[i]).reshape(-1).astype(int)
            disjoint, unique = int(contours[i].sum()), int((contours[i] > 0).sum())
            for k in labs.tolist():                                        # once per box label, repeats kept
                self.rows.append((ids[i], k, disjoint, unique))
                self.rows.append((ids[i], -1, disjoint, unique))
                self.detect[contours[i] > 0, k] = True


def _authors_result(counter: _AuthorsCounter, classes: Sequence[str], params: dict) -> DissectionResult:
    C = counter.detect.shape[0] if counter.detect is not None else 0
    counter.inter = np.zeros((C, len(classes)))
    counter.area_t, counter.area_l = np.zeros(C), np.zeros(len(classes))
    if counter.detect is None:
        counter.detect = np.zeros((0, len(classes)), bool)
    thr = np.mean(counter.thresholds, 0) if counter.thresholds else np.zeros(0)
    spread = np.ptp(counter.thresholds, 0) if counter.thresholds else np.zeros(0)
    res = _result(counter, classes, thr, spread, float("inf"), params)
    res.iou = np.full_like(res.iou, np.nan)
    res.unit_concepts = res.unit_concepts.assign(iou=np.nan)
    return res


def _result(counter: _Counter, classes: Sequence[str], thresholds, errors, iou_threshold: float,
            params: dict) -> DissectionResult:
    per_image = pd.DataFrame(counter.rows, columns=["image_id", "k", "components", "units"])
    names = list(classes)
    rows = []
    for k, name in enumerate(names):
        part = per_image[per_image["k"] == k]
        n = len(part)
        rows.append({"class": name, "n_images": n,
                     "disjoint": part["components"].sum() / n if n else float("nan"),
                     "unique": part["units"].sum() / n if n else float("nan"),
                     "components": int(part["components"].sum()),
                     "unit_hits": int(part["units"].sum()),
                     "units_detecting": int(counter.detect[:, k].sum())})
    per_class = pd.DataFrame(rows).set_index("class")
    anyp = per_image[per_image["k"] == -1]
    n = len(anyp)
    overall = {"n_images": n,
               "disjoint": float(anyp["components"].sum() / n) if n else float("nan"),
               "unique": float(anyp["units"].sum() / n) if n else float("nan"),
               "components": int(anyp["components"].sum()), "unit_hits": int(anyp["units"].sum()),
               "units_detecting": int(counter.detect.any(1).sum())}
    union = counter.area_t[:, None] + counter.area_l[None, :] - counter.inter
    iou = np.where(union > 0, counter.inter / np.maximum(union, 1e-12), 0.0)
    best = iou.argmax(1) if iou.shape[1] else np.zeros(iou.shape[0], int)
    best_iou = iou[np.arange(iou.shape[0]), best] if iou.shape[1] else np.zeros(iou.shape[0])
    unit_concepts = pd.DataFrame({
        "unit": np.arange(iou.shape[0]),
        "concept": pd.Series([names[b] if v > iou_threshold else None
                              for b, v in zip(best, best_iou)], dtype=object),
        "iou": best_iou})
    per_image = per_image.assign(**{"class": [names[k] if k >= 0 else "any"
                                              for k in per_image["k"]]})
    per_image = per_image[["image_id", "class", "components", "units"]]
    return DissectionResult(np.asarray(thresholds, np.float64), np.asarray(errors, np.float64),
                            per_class, overall, iou, unit_concepts, per_image, names, params)


def _run(acts_factory: Callable[[], Iterator[Batch]], classes: Sequence[str], q: float,
         quantile: str, bins: int, iou_threshold: float, unit_chunk: int, connectivity: int,
         exact_budget_bytes: int, n_hint: int | None, params: dict, protocol: str = "paper") -> DissectionResult:
    q = _check_q(q)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown dissection protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    if protocol == "authors_code":
        counter = _AuthorsCounter(q, len(classes), unit_chunk)
        for acts, boxes, labels, _masks, size, ids in acts_factory():
            counter.add(acts, boxes, labels, None, size, ids)
        return _authors_result(counter, classes, {**params, "q": q, "protocol": protocol,
                                                  "quantile": "per-batch linear, upsampled maps",
                                                  "threshold": ">=", "counting": "contours (RETR_TREE) in the union of boxes",
                                                  "map_size": list(counter.map_size)})
    if quantile not in QUANTILE_METHODS:
        raise ValueError(f"quantile must be one of {QUANTILE_METHODS}, got {quantile!r}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbour) or 2 (8-neighbour), got "
                         f"{connectivity}")
    K = len(classes)
    if quantile == "auto":                                  # one batch to learn C x h x w
        first = next(iter(acts_factory()), None)
        if first is None:
            raise ValueError("the probing set is empty")
        per_image = first[0][0].numel() * 4
        quantile = ("exact" if n_hint is not None and n_hint * per_image <= exact_budget_bytes
                    else "histogram")
    params = {**params, "q": q, "quantile": quantile, "bins": bins, "iou_threshold": iou_threshold,
              "connectivity": connectivity, "protocol": protocol}
    if quantile == "exact":
        stored: list[Batch] = []

        def keep() -> Iterator[torch.Tensor]:
            for item in acts_factory():
                stored.append((item[0].cpu(),) + tuple(item[1:]))
                yield item[0]

        thr, err = unit_thresholds(keep, q, "exact")
        batches: Iterable[Batch] = stored                                    # no second forward
    else:
        thr, err = unit_thresholds(lambda: (b[0] for b in acts_factory()), q, "histogram", bins)
        batches = acts_factory()
    counter = _Counter(thr, K, unit_chunk, connectivity)
    for acts, boxes, labels, masks, size, ids in batches:
        counter.add(acts, boxes, labels, masks, size, ids)
    params["map_size"] = list(counter.map_size)
    return _result(counter, classes, thr.numpy(), err.numpy(), iou_threshold, params)


def dissect(model: nn.Module, data: Any, layer: str | None = None,
            classes: Sequence[str] | None = None, q: float = 0.01, quantile: str = "auto",
            bins: int = 2048, iou_threshold: float = 0.04, concept_masks: str = "boxes",
            unit_chunk: int = 64, connectivity: int = 1, batch_size: int = 32,
            image_size: int | None = None, exact_budget_bytes: int = 1 << 30,
            progress: bool = True, protocol: str = "paper") -> DissectionResult:
    """Dissect ``layer`` of ``model`` over a probing set with boxes.

    Args:
        model: the network (eval mode during the run; state restored).
        data: a manifest path, a ``ManifestDataset`` or a sequential DataLoader whose batches are
            dicts with ``image`` (B, C, H, W), ``boxes`` (list of (K_i, 4) xyxy in image pixels),
            ``box_labels`` (list of (K_i,)), optionally ``image_id`` and ``mask`` (B, K, H, W).
        layer: dotted layer name; default ``model.feature_layer``.
        classes: concept (class) names indexed by box label; default ``data.dataset.classes``.
        q: top fraction per unit (0.01 T-DenseNet / DenseNet, 0.04 ResNet50).
        quantile: ``"exact"``, ``"histogram"`` or ``"auto"`` (exact when the set's activations fit
            in ``exact_budget_bytes``).
        bins: histogram bins (error bound (max - min) / bins per unit, threshold never below the
            exact one).
        iou_threshold: a unit is labelled with its best concept when IoU exceeds this (0.04).
        concept_masks: ``"boxes"`` (union of boxes) or ``"masks"`` (the batch's ``mask``: boxes plus
            polygons / mask files) for the IoU.
        unit_chunk: units upsampled and labelled at once (memory: unit_chunk x H x W per image).
        connectivity: 1 = 4-neighbour components, 2 = 8-neighbour.
        batch_size, image_size: used when ``data`` is a manifest path.
        exact_budget_bytes: memory allowed for the exact quantile under ``"auto"``.
        progress: tqdm bars.
        protocol: ``"paper"`` (default) or ``"authors_code"`` (module docstring: per-batch quantile of the
            upsampled maps, ``>=``, contours inside the union of boxes; the batches are the loader's, so pass a
            loader with the authors' batch size, 128 T-DenseNet / 64 ResNet50, or ``batch_size``).

    Returns:
        A :class:`DissectionResult`.

    Raises:
        ValueError: unknown layer or protocol, bad parameters, batches without boxes, or no class names.
    """
    if layer is None:
        layer = getattr(model, "feature_layer", None)
        if not layer:
            raise ValueError(f"{type(model).__name__} has no 'feature_layer'; pass layer=")
    resolve_layer(model, layer)
    if concept_masks not in ("boxes", "masks"):
        raise ValueError(f"concept_masks must be 'boxes' or 'masks', got {concept_masks!r}")
    if image_size is None:
        image_size = (getattr(model, "input_spec", None) or {}).get("size")
    loader = make_loader(data, batch_size, image_size, masks=concept_masks == "masks")
    if classes is None:
        classes = getattr(loader.dataset, "classes", None)
        if not classes:
            raise ValueError("pass classes= (names indexed by box label); the data has none")

    def factory() -> Iterator[Batch]:
        for _, acts, ids, batch in iter_layer(model, loader, layer, progress, "dissection"):
            if not isinstance(batch, dict) or "boxes" not in batch or "box_labels" not in batch:
                raise ValueError("dissection batches must be dicts with 'boxes' and 'box_labels'")
            masks = batch.get("mask") if concept_masks == "masks" else None
            if concept_masks == "masks" and masks is None:
                raise ValueError("concept_masks='masks' needs batches with a 'mask' entry")
            size = tuple(batch["image"].shape[-2:])
            yield acts, batch["boxes"], batch["box_labels"], masks, size, ids

    n_hint = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    return _run(factory, classes, q, quantile, bins, iou_threshold, unit_chunk, connectivity,
                exact_budget_bytes, n_hint, {"layer": layer}, protocol)


def dissect_activations(activations: torch.Tensor, boxes: Sequence, box_labels: Sequence,
                        classes: Sequence[str], image_size: int | tuple[int, int],
                        q: float = 0.01, quantile: str = "exact", bins: int = 2048,
                        iou_threshold: float = 0.04, masks: torch.Tensor | None = None,
                        image_ids: Sequence[str] | None = None, batch_size: int = 16,
                        unit_chunk: int = 64, connectivity: int = 1,
                        exact_budget_bytes: int = 1 << 62, protocol: str = "paper") -> DissectionResult:
    """Dissection from precomputed feature maps (e.g. the audit's probing features).

    Args:
        activations: (N, C, h, w): a tensor, an array, or an object with ``shape``, ``dim()`` and slicing
            that returns tensors (the audit's on-disk :class:`interpret.audit.store.SpillArray`, read in
            ``batch_size`` slices).
        exact_budget_bytes: under ``quantile="auto"``, exact quantiles while the maps fit in this many bytes
            (they are then held in memory), else the streaming histogram.
        boxes: per image (K_i, 4) xyxy in pixels of the ``image_size`` image.
        box_labels: per image (K_i,) class indices.
        classes: class names.
        image_size: S or (H, W) the maps are upsampled to.
        masks: optional (N, K, H, W) concept masks for the IoU (default: from boxes).
        image_ids: N ids (default positions).
        protocol: ``"paper"`` or ``"authors_code"`` (its quantile batches are ``batch_size`` images).
        Others: as :func:`dissect`.

    Returns:
        A :class:`DissectionResult`.
    """
    acts = activations if hasattr(activations, "dim") and hasattr(activations, "shape") else torch.as_tensor(
        activations)
    if acts.dim() != 4 or len(boxes) != acts.shape[0] or len(box_labels) != acts.shape[0]:
        raise ValueError(f"need activations (N, C, h, w) and N boxes / box_labels; got "
                         f"{tuple(acts.shape)}, {len(boxes)}, {len(box_labels)}")
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    ids = [str(i) for i in (image_ids if image_ids is not None else range(acts.shape[0]))]

    def factory() -> Iterator[Batch]:
        for s in range(0, acts.shape[0], batch_size):
            e = s + batch_size
            yield (acts[s:e], list(boxes[s:e]), list(box_labels[s:e]),
                   masks[s:e] if masks is not None else None, size, ids[s:e])

    return _run(factory, classes, q, quantile, bins, iou_threshold, unit_chunk, connectivity,
                exact_budget_bytes, acts.shape[0], {"layer": None}, protocol)
