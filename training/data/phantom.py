"""The phantom: a deterministic generator of synthetic chest radiographs with known ground truth.

Every image is rendered from a small anatomical model evaluated on the pixel grid with vectorised
numpy: body outline and soft tissue, two lungs (dark) with vessel markings radiating from the hila,
heart (on the image right: radiological convention, patient's left on the image right), mediastinum
with trachea and spine, curved posterior ribs, clavicles, diaphragm domes (the right one higher) and
an optional gastric bubble. Variation that is *not* a finding (patient size, small rotation and
shift, exposure/contrast/gamma, noise, support devices and an "L"/"R" text marker) is drawn
independently of the findings, so a model can learn shortcuts if nothing stops it; ``meta`` records
all of it for shortcut audits.

Findings have distinct signatures and places: Cardiomegaly (heart shadow with cardiothoracic ratio
> 0.5), Effusion (basal opacity with a meniscus blunting the costophrenic angle), Pneumothorax
(apical lucency without lung markings and a visible pleural line), Nodule (small round opacity), Mass
(larger lobulated opacity), Atelectasis (plate-like band with elevation of the hemidiaphragm: volume
loss), Consolidation (dense patchy opacity, optional air bronchograms), Infiltration (diffuse hazy
reticular opacity) and Hernia (rare retrocardiac opacity with an air bubble above the diaphragm).
Each finding is an additive density layer with compact support; its box is the bounding box of the
pixels it changed (by at least half an 8-bit grey level), so boxes are tight by construction.

Image ``i`` depends only on ``(seed, i)`` (``numpy.random.SeedSequence([seed, i, stream])``), so
generation can run in parallel and any subset can be re-rendered. Images ``2g`` and ``2g + 1`` share a
patient (same anatomy, different findings and exposure) for 20 % of groups ``g``; the split is
patient-wise, 14/3/3 out of every 20 groups (70/15/15).

Example:
    >>> case = render_case(seed=0, index=3, size=128)
    >>> case.image.shape, case.image.dtype
    ((128, 128), dtype('float32'))
    >>> all(b["label"] in case.labels for b in case.boxes)
    True
"""
from __future__ import annotations

import io
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.data.reports_phantom import Finding, write_report
from training.data.schema import PHANTOM_CLASSES

logger = logging.getLogger(__name__)

__all__ = ["PhantomCase", "render_case", "generate_phantom", "PREVALENCE", "MIN_SIZE", "MAX_SIZE",
           "case_row"]

MIN_SIZE, MAX_SIZE = 64, 1024

# Target marginal prevalence per class (NIH ChestX-ray14 is the model: Infiltration most common,
# Hernia rare); about half of the images have no finding.
PREVALENCE: dict[str, float] = {
    "Infiltration": 0.18,
    "Effusion": 0.12,
    "Atelectasis": 0.10,
    "Nodule": 0.06,
    "Mass": 0.05,
    "Pneumothorax": 0.05,
    "Consolidation": 0.045,
    "Cardiomegaly": 0.035,
    "Hernia": 0.005,
}
P_NO_FINDING = 0.5
_MASK_LEVEL = 0.5 / 255.0  # a finding "drew" a pixel where it changes it by >= half an 8-bit level
_PATIENT_PAIR_P = 0.2
_SPLIT_TABLE = ["train"] * 14 + ["val"] * 3 + ["test"] * 3
_MM_PER_UNIT = 380.0  # one canonical unit (image width at scale 1) in millimetres


SHORTCUT_P_POS, SHORTCUT_P_NEG = 0.9, 0.05  # P(shortcut tag | class present / absent)


def _abnormal_rates() -> np.ndarray:
    """Per-class Bernoulli rates q for abnormal images (redrawn until one is positive) such that the
    marginal prevalence is ``PREVALENCE``: ``P_abn * q_c / P(any | q) = target_c`` (fixed point)."""
    t = np.array([PREVALENCE[c] for c in PHANTOM_CLASSES])
    q = t / (1 - P_NO_FINDING)
    for _ in range(200):
        p_any = 1 - np.prod(1 - q)
        q = np.clip(t * p_any / (1 - P_NO_FINDING), 0, 0.95)
    return q


_Q = _abnormal_rates()


# --------------------------------------------------------------------------------------------------
# Public data structure


@dataclass
class PhantomCase:
    """One rendered phantom radiograph and everything known about it.

    Attributes:
        image: (S, S) float32 in [0, 1], bright = dense.
        labels: positive classes, unique, in ``PHANTOM_CLASSES`` order (empty = no finding).
        boxes: one dict per finding instance ``{label, x, y, w, h}`` in pixels; the box covers pixel
            columns ``x .. x + w - 1`` and rows ``y .. y + h - 1`` and equals the bounding box of
            the instance mask.
        instance_masks: (S, S) bool per box, the pixels that instance changed.
        masks: class name -> (S, S) bool union of its instance masks.
        findings: structured description of each instance (side, zone, size) used by the report.
        report: free-text report.
        meta: non-finding variation (view, patient scale/rotation, exposure, noise, devices,
            marker letter/corner/box, cardiothoracic ratio, gastric bubble) for shortcut audits.
        image_id, patient_id, split, view: manifest fields.
    """

    image: np.ndarray
    labels: list[str]
    boxes: list[dict]
    instance_masks: list[np.ndarray]
    masks: dict[str, np.ndarray]
    findings: list[Finding]
    report: str
    meta: dict
    image_id: str
    patient_id: str
    split: str
    view: str


# --------------------------------------------------------------------------------------------------
# Small vectorised shape helpers (all in canonical coordinates u, v ~ [0, 1])


def _ellipse(u, v, cx, cy, rx, ry, edge):
    """Soft ellipse alpha in [0, 1] with exactly zero support outside the ellipse."""
    rho = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return np.clip((1.0 - rho) * (min(rx, ry) / edge), 0.0, 1.0)


def _segment_dist(u, v, p0, p1):
    """Distance of every point to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * dx + (v - p0[1]) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(u - p0[0] - t * dx, v - p0[1] - t * dy)


def _smooth_noise(rng, cells, size):
    """Low-frequency noise in about [-1, 1]: a (cells x cells) normal grid upsampled bilinearly."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]))


# --------------------------------------------------------------------------------------------------
# Case sampling (what to draw) -- separate generator streams, so findings never change anatomy noise


@dataclass
class _Anatomy:
    habitus: float      # body half-width
    lx: float           # lung centre offset from midline
    lrx: float          # lung half-width
    lcy: float
    lry: float
    dome_r: float       # hemidiaphragm peak (v), right is higher (smaller v)
    dome_l: float
    heart_cx: float
    heart_ry: float
    ctr: float          # normal cardiothoracic ratio
    rib_spacing: float
    bubble: bool


def _sample_anatomy(rng) -> _Anatomy:
    return _Anatomy(
        habitus=rng.uniform(0.42, 0.49), lx=rng.uniform(0.175, 0.195), lrx=rng.uniform(0.150, 0.170),
        lcy=rng.uniform(0.46, 0.49), lry=rng.uniform(0.29, 0.32), dome_r=rng.uniform(0.69, 0.72),
        dome_l=rng.uniform(0.725, 0.75), heart_cx=0.5 + rng.uniform(0.035, 0.055),
        heart_ry=rng.uniform(0.105, 0.125), ctr=rng.uniform(0.38, 0.47),
        rib_spacing=rng.uniform(0.95, 1.05), bubble=bool(rng.random() < 0.4),
    )


def _split_of(seed: int, group: int) -> str:
    perm = _rng(seed, 0xFFFF).permutation(20)
    return _SPLIT_TABLE[perm[group % 20]]


def _patient_of(seed: int, index: int) -> tuple[str, int]:
    """Patient id and the patient-level key for image ``index`` (pairs 2g, 2g+1 share 20 % of the time)."""
    g = index // 2
    paired = _rng(seed, g, 7).random() < _PATIENT_PAIR_P
    if paired:
        return f"phantom_p{g:06d}", g * 2
    return f"phantom_p{g:06d}_{index % 2}", index * 2 + 1


def _sample_labels(rng) -> list[str]:
    if rng.random() < P_NO_FINDING:
        return []
    while True:
        hits = rng.random(len(PHANTOM_CLASSES)) < _Q
        if hits.any():
            return [c for c, h in zip(PHANTOM_CLASSES, hits) if h]


# --------------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
    """Pixel grid mapped into canonical patient coordinates by the inverse similarity transform."""

    def __init__(self, size: int, scale: float, angle_deg: float, shift: tuple[float, float]):
        self.size, self.scale = size, scale
        a = math.radians(angle_deg)
        self.cos, self.sin, self.shift = math.cos(a), math.sin(a), shift
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        px, py = c[None, :] - 0.5 - shift[0], c[:, None] - 0.5 - shift[1]
        self.u = ((self.cos * px + self.sin * py) / scale + 0.5).astype(np.float32)
        self.v = ((-self.sin * px + self.cos * py) / scale + 0.5).astype(np.float32)
        self.px = 1.0 / (size * scale)  # one pixel in canonical units

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        """Canonical (N, 2) points -> pixel coordinates (N, 2)."""
        q = (np.asarray(pts, dtype=np.float64) - 0.5) * self.scale
        x = self.cos * q[:, 0] - self.sin * q[:, 1] + 0.5 + self.shift[0]
        y = self.sin * q[:, 0] + self.cos * q[:, 1] + 0.5 + self.shift[1]
        return np.stack([x, y], 1) * self.size


def _dome(u, cx, rx, peak):
    """Hemidiaphragm height: highest (smallest v) at the lung centre, dropping laterally."""
    return peak + 0.09 * ((u - cx) / rx) ** 2


def _lung_alpha(cv: _Canvas, an: _Anatomy, side: str, dome_lift: float = 0.0):
    u, v = cv.u, cv.v
    sgn = -1.0 if side == "right" else 1.0
    cx = 0.5 + sgn * an.lx
    rx = an.lrx * (0.94 if side == "left" else 1.0)
    peak = (an.dome_r if side == "right" else an.dome_l) - dome_lift
    e = 1.5 * cv.px
    ell = _ellipse(u, v, cx, an.lcy, rx, an.lry, e)
    below = np.clip((_dome(u, cx, rx, peak) - v) / e, 0.0, 1.0)
    return ell * below, (cx, rx, peak)


def _lung_geometry(an: _Anatomy) -> dict:
    geo = {}
    for side in ("right", "left"):
        sgn = -1.0 if side == "right" else 1.0
        cx = 0.5 + sgn * an.lx
        rx = an.lrx * (0.94 if side == "left" else 1.0)
        peak = an.dome_r if side == "right" else an.dome_l
        geo[side] = (cx, rx, peak)
    return geo


def _heart(cv: _Canvas, an: _Anatomy, ctr: float):
    thw = 2 * an.lx + an.lrx + an.lrx * 0.94  # thoracic width between lateral lung margins
    rx = ctr * thw / 2
    ry = an.heart_ry * (1.0 + 0.6 * max(ctr - an.ctr, 0.0))
    cy = an.dome_l - 0.55 * ry
    e = 2.0 * cv.px
    alpha = _ellipse(cv.u, cv.v, an.heart_cx, cy, rx, ry, e)
    alpha *= np.clip((an.dome_l + 0.015 - cv.v) / e, 0.0, 1.0)
    return alpha


def _sample_point_in_lung(rng, an: _Anatomy, geo, side: str, zone: str, margin: float):
    cx, rx, peak = geo[side]
    apex = an.lcy - an.lry
    h = peak - apex
    lo, hi = {"upper": (0.10, 0.36), "mid": (0.36, 0.64), "lower": (0.64, 0.88)}[zone]
    hx, hcy = an.heart_cx, an.dome_l - 0.55 * an.heart_ry
    for _ in range(50):
        v = apex + h * rng.uniform(lo, hi)
        t = (v - an.lcy) / an.lry
        half = rx * math.sqrt(max(1 - t * t, 0.0))
        u = cx + rng.uniform(-1, 1) * max(half - margin, 0.01)
        in_heart = ((u - hx) / (an.lrx * 0.9)) ** 2 + ((v - hcy) / (an.heart_ry * 1.3)) ** 2 < 1
        if not in_heart and v < _dome(u, cx, rx, peak) - margin * 0.5:
            return u, v
    return cx, apex + h * (lo + hi) / 2


def _draw_findings(rng, cv: _Canvas, an: _Anatomy, labels: list[str], lungs: dict, markings):
    """Density layers, one per finding instance: list of (Finding, contribution (S, S) float32).
    Also returns the heart CTR and the per-side dome lift (volume loss) that the anatomy must use."""
    u, v, px = cv.u, cv.v, cv.px
    geo = _lung_geometry(an)
    out: list[tuple[Finding, np.ndarray]] = []
    ctr, lift = an.ctr, {"right": 0.0, "left": 0.0}
    sides = ("right", "left")
    heart_n = _heart(cv, an, an.ctr)

    for label in labels:
        if label == "Cardiomegaly":
            ctr = float(rng.uniform(0.55, 0.66))
            sev = "mild" if ctr < 0.58 else ("moderate" if ctr < 0.62 else "marked")
            out.append((Finding(label, "midline", "central", severity=sev, extra={"ctr": round(ctr, 3)}),
                        None))  # contribution filled in by the anatomy pass (heart layer)
        elif label in ("Nodule", "Mass"):
            count = 1 if (label == "Mass" or rng.random() < 0.8) else 2
            for _ in range(count):
                side = sides[int(rng.integers(2))]
                zone = ("upper", "mid", "lower")[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
                r = rng.uniform(0.010, 0.018) if label == "Nodule" else rng.uniform(0.035, 0.06)
                r = max(r, 1.8 * px)
                cu, cvv = _sample_point_in_lung(rng, an, geo, side, zone, r)
                dens = rng.uniform(0.22, 0.32)
                if label == "Mass":
                    ang = np.arctan2(v - cvv, u - cu)
                    k, ph = int(rng.integers(3, 6)), rng.uniform(0, 2 * np.pi)
                    rr = r * (1 + 0.12 * np.sin(k * ang + ph))
                    rho = np.hypot(u - cu, v - cvv) / rr
                else:
                    rho = np.hypot(u - cu, v - cvv) / r
                layer = dens * np.sqrt(np.clip(1 - rho * rho, 0, 1)) ** 0.5
                out.append((Finding(label, side, zone, size_mm=round(2 * r * _MM_PER_UNIT, 1)),
                            layer.astype(np.float32)))
        elif label == "Effusion":
            bil = rng.random() < 0.25
            chosen = sides if bil else (sides[int(rng.integers(2))],)
            sev_i = int(rng.choice(3, p=[0.5, 0.35, 0.15]))
            for side in chosen:
                cx, rx, peak = geo[side]
                height = (0.05, 0.10, 0.17)[sev_i] * rng.uniform(0.8, 1.2)
                outward = np.clip(np.where(side == "right", cx - u, u - cx) / rx, 0, 1.2)
                level = peak + 0.05 - height - 0.06 * outward ** 2 * (1 + height * 3)
                e = 2.5 * px
                fluid = np.clip((v - level) / (e + 0.02 * height), 0, 1)
                # fluid replaces aerated lung: it takes the density of the soft tissue around it
                layer = (0.27 * fluid * lungs[side] * (1 - 0.8 * heart_n)).astype(np.float32)
                out.append((Finding(label, side, "lower", severity=("small", "moderate", "large")[sev_i]),
                            layer))
        elif label == "Pneumothorax":
            side = sides[int(rng.integers(2))]
            cx, rx, peak = geo[side]
            sev_i = int(rng.choice(3, p=[0.55, 0.35, 0.10]))
            depth = (0.10, 0.18, 0.28)[sev_i]
            apex = an.lcy - an.lry
            v_cut = apex + (0.35 + 0.3 * depth) * (peak - apex)
            rho = np.sqrt(((u - cx) / rx) ** 2 + ((v - an.lcy) / an.lry) ** 2)
            taper = np.clip((v_cut - v) / (v_cut - apex), 0, 1) ** 0.7
            edge = 1 - depth * taper  # pleural line at rho == edge
            inside_lung = lungs[side]
            gap = np.clip((rho - edge) / (1.5 * px / rx), 0, 1) * (taper > 0)
            region = gap * inside_lung
            lw = max(0.006, 1.2 * px) / rx
            line = np.clip(1 - np.abs(rho - edge) / lw, 0, 1) * (taper > 0.05) * inside_lung
            layer = -(markings * region) - 0.07 * region + 0.16 * line
            out.append((Finding(label, side, "upper", severity=("small", "moderate", "large")[sev_i]),
                        layer.astype(np.float32)))
        elif label == "Atelectasis":
            side = sides[int(rng.integers(2))]
            zone = "lower" if rng.random() < 0.75 else "mid"
            cx, rx, peak = geo[side]
            # volume loss (elevated hemidiaphragm) with basal atelectasis only
            dl = float(rng.uniform(0.015, 0.035)) if zone == "lower" else 0.0
            lift[side] = dl
            apex = an.lcy - an.lry
            vy = apex + (peak - dl - apex) * (rng.uniform(0.68, 0.82) if zone == "lower"
                                              else rng.uniform(0.45, 0.55))
            half = rx * 0.75
            ang = rng.uniform(-0.25, 0.25)
            p0 = (cx - half * math.cos(ang), vy - half * math.sin(ang))
            p1 = (cx + half * math.cos(ang), vy + half * math.sin(ang))
            th = max(rng.uniform(0.008, 0.016), 1.2 * px)
            band = np.clip(1 - _segment_dist(u, v, p0, p1) / th, 0, 1)
            before = lungs[side]
            after = _lung_alpha(cv, an, side, dome_lift=dl)[0] if dl else before
            layer = 0.30 * band * before
            # volume loss: the lung above the old dome becomes soft tissue (density of the lung gap)
            layer = layer + 0.26 * (before - after) + markings * (before - after)
            out.append((Finding(label, side, zone, extra={"dome_lift": round(dl, 4)}), layer.astype(np.float32)))
        elif label == "Consolidation":
            side = sides[int(rng.integers(2))]
            zone = ("upper", "mid", "lower")[int(rng.choice(3, p=[0.3, 0.3, 0.4]))]
            r = rng.uniform(0.055, 0.09)
            cu, cvv = _sample_point_in_lung(rng, an, geo, side, zone, r * 0.5)
            blob = np.zeros_like(u)
            for _ in range(int(rng.integers(4, 8))):
                bu, bv = cu + rng.normal(0, r * 0.5), cvv + rng.normal(0, r * 0.5)
                br = r * rng.uniform(0.5, 0.9)
                blob = np.maximum(blob, _ellipse(u, v, bu, bv, br, br * rng.uniform(0.7, 1.2), br * 0.5))
            air = bool(rng.random() < 0.5)
            dens = 0.30 * blob
            if air:
                for _ in range(3):
                    a0 = rng.uniform(0, 2 * np.pi)
                    q1 = (cu + 0.8 * r * math.cos(a0), cvv + 0.8 * r * math.sin(a0))
                    tube = np.clip(1 - _segment_dist(u, v, (cu, cvv), q1) / max(0.004, 0.8 * px), 0, 1)
                    dens = dens - 0.14 * tube * blob
            layer = (dens * lungs[side]).astype(np.float32)
            out.append((Finding(label, side, zone, extra={"air_bronchograms": air}), layer))
        elif label == "Infiltration":
            bil = rng.random() < 0.3
            chosen = sides if bil else (sides[int(rng.integers(2))],)
            tex = None
            for side in chosen:
                cx, rx, peak = geo[side]
                zone = "mid" if rng.random() < 0.5 else "lower"
                cy = an.lcy + (0.02 if zone == "mid" else 0.12)
                reg = _ellipse(u, v, cx + rng.normal(0, 0.01), cy, rx * 0.85, an.lry * 0.55, 0.05)
                if tex is None:
                    tex = 0.6 + 0.4 * np.abs(np.sin(u * 140 + 3 * np.sin(v * 60)) * np.sin(v * 120))
                layer = (0.11 * reg * tex * lungs[side]).astype(np.float32)
                out.append((Finding(label, side, zone), layer))
        elif label == "Hernia":
            cu = 0.5 + rng.uniform(0.0, 0.04)
            cvv = an.dome_l - rng.uniform(0.04, 0.06)
            rx, ry = rng.uniform(0.045, 0.06), rng.uniform(0.035, 0.045)
            sac = _ellipse(u, v, cu, cvv, rx, ry, 2 * px)
            bubble = _ellipse(u, v, cu, cvv - ry * 0.3, rx * 0.6, ry * 0.45, 1.5 * px)
            bubble = bubble * (v < cvv)  # air above an air-fluid level
            layer = (0.16 * sac - 0.28 * bubble).astype(np.float32)
            out.append((Finding(label, "midline", "central", size_mm=round(2 * rx * _MM_PER_UNIT, 1)), layer))
        else:
            raise ValueError(f"phantom cannot draw {label!r}; valid: {PHANTOM_CLASSES}")
    return out, ctr, lift


def _anatomy_layers(cv: _Canvas, an: _Anatomy, rng_tex):
    """Lung alphas and vessel markings (needed by the findings) for this canvas."""
    lungs = {s: _lung_alpha(cv, an, s)[0] for s in ("right", "left")}
    u, v = cv.u, cv.v
    mark = np.zeros_like(u)
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        hx, hy = 0.5 + sgn * 0.07, an.lcy - 0.02
        r = np.hypot(u - hx, v - hy)
        th = np.arctan2(v - hy, (u - hx) * sgn)
        n = rng_tex.integers(9, 14)
        ph = rng_tex.uniform(0, 2 * np.pi)
        mark += (0.5 + 0.5 * np.cos(n * th + ph + 9.0 * r)) ** 6 * np.exp(-r / 0.16) * lungs[side]
    tex = _smooth_noise(rng_tex, 14, cv.size)
    markings = (0.09 * mark + 0.015 * tex * (lungs["right"] + lungs["left"])).astype(np.float32)
    return lungs, markings


def _compose(cv: _Canvas, an: _Anatomy, lungs, markings, heart):
    """Base density image without findings (heart given, lungs given)."""
    u, v, px = cv.u, cv.v, cv.px
    d = np.abs(u - 0.5)
    body = np.maximum(_ellipse(u, v, 0.5, 0.62, an.habitus, 0.62, 0.03),
                      _ellipse(u, v, 0.5, 0.16, an.habitus + 0.06, 0.13, 0.03))
    neck = np.clip((0.085 - d) / 0.02, 0, 1) * (v < 0.2)
    body = np.maximum(body, neck)
    lung = lungs["right"] + lungs["left"]
    img = 0.06 + 0.40 * body
    img -= 0.27 * lung * (1 - 0.8 * heart)
    img += markings * (1 - heart)
    img += 0.10 * heart
    # mediastinum, trachea (air), spine
    med_w = 0.045 + 0.03 * np.clip((v - 0.15) / 0.25, 0, 1)
    med = np.clip((med_w - d) / (3 * px), 0, 1) * (v > 0.12) * (v < an.dome_l)
    img += 0.10 * med * (1 - heart)
    trachea = np.clip((0.016 - d) / (2 * px), 0, 1) * np.clip((0.40 - v) / (3 * px), 0, 1) * (v > 0.03)
    img -= 0.12 * trachea
    img += 0.06 * np.clip((0.035 - d) / (3 * px), 0, 1)
    # posterior ribs: a periodic function of the height above a curve that drops laterally
    cage = np.maximum(_ellipse(u, v, 0.5 - an.lx, an.lcy, an.lrx * 1.12, an.lry * 1.08, 0.02),
                      _ellipse(u, v, 0.5 + an.lx, an.lcy, an.lrx * 1.12, an.lry * 1.08, 0.02))
    t = (v - (0.50 * d - 0.4 * d * d) - 0.08) / (0.075 * an.rib_spacing)
    t = np.maximum(t, 0.0) ** 0.92
    ph = t - np.floor(t)
    rib = np.clip(np.minimum(ph, 0.38 - ph) / 0.07, 0, 1) * (t > 0.5)
    img += 0.075 * rib * cage
    # clavicles
    for sgn in (-1.0, 1.0):
        dist = _segment_dist(u, v, (0.5 + sgn * 0.04, 0.185), (0.5 + sgn * 0.30, 0.12))
        img += 0.09 * np.clip((0.014 - dist) / (3 * px), 0, 1)
    if an.bubble:  # gastric air under the left hemidiaphragm
        img -= 0.12 * _ellipse(u, v, 0.5 + an.lx + 0.02, an.dome_l + 0.07, 0.05, 0.03, 0.01)
    return img


def _draw_marker_and_devices(rng, cv: _Canvas, view: str):
    """Text marker and support devices drawn in pixel space; returns (layer (S, S) float32, meta)."""
    S = cv.size
    layer = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(layer)
    devices: list[dict] = []
    w = max(1, round(S / 160))
    if rng.random() < (0.25 if view == "PA" else 0.6):
        pts = [(0.28, 0.02), (0.33, 0.14), (0.42, 0.22), (0.47, 0.30)]  # right IJ -> SVC
        pix = cv.to_pixels(np.array(pts))
        draw.line([tuple(p) for p in pix], fill=200, width=w)
        devices.append({"kind": "cvc", "tip": [float(x) for x in pix[-1]]})
    if view == "AP" and rng.random() < 0.35:
        cm = int(rng.integers(3, 7))
        pts = [(0.5, 0.0), (0.5, 0.40 - 0.012 * cm)]
        pix = cv.to_pixels(np.array(pts))
        draw.line([tuple(p) for p in pix], fill=150, width=max(2, round(S / 60)))
        devices.append({"kind": "ett", "cm": cm})
    if rng.random() < (0.15 if view == "PA" else 0.4):
        leads = cv.to_pixels(np.array([[0.25, 0.30], [0.75, 0.30], [0.70, 0.80]]))
        r = max(2, round(S / 45))
        for (x, y) in leads:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=230, width=w)
            draw.line([(x, y), (x + rng.uniform(-0.3, 0.3) * S, S)], fill=170, width=w)
        devices.append({"kind": "ecg"})
    letter = "L" if rng.random() < 0.5 else "R"
    corner = ("top-left", "top-right", "bottom-left", "bottom-right")[int(rng.integers(4))]
    fs = max(8, round(S * 0.07))
    try:
        font = ImageFont.load_default(size=fs)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        font = ImageFont.load_default()
    m = round(S * 0.04)
    bx = draw.textbbox((0, 0), letter, font=font)
    tw, th = bx[2] - bx[0], bx[3] - bx[1]
    x = m if "left" in corner else S - m - tw
    y = m if "top" in corner else S - m - th
    draw.text((x - bx[0], y - bx[1]), letter, fill=255, font=font)
    marker = {"letter": letter, "corner": corner, "box": [int(x), int(y), int(tw), int(th)]}
    return np.asarray(layer, dtype=np.float32) / 255.0, {"devices": devices, "marker": marker}


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    return int(size)


def _check_shortcut(shortcut: str | None) -> str | None:
    from training.data.schema import PHANTOM_CLASSES as classes

    if shortcut is not None and shortcut not in classes:
        raise ValueError(f"unknown shortcut class {shortcut!r}; valid: {', '.join(classes)}")
    return shortcut


def _draw_shortcut_tag(size: int) -> tuple[np.ndarray, list[int]]:
    """A bright square tag at the right edge, outside the thorax: the planted shortcut.

    Returns the layer (S, S) float32 and its box [x, y, w, h] in pixels.
    """
    side = max(3, round(size * 0.07))
    x, y = size - round(size * 0.03) - side, round(size * 0.22)
    layer = np.zeros((size, size), np.float32)
    layer[y:y + side, x:x + side] = 1.0
    return layer, [int(x), int(y), int(side), int(side)]


def _render(seed: int, index: int, size: int, draw_findings: bool = True,
            shortcut: str | None = None) -> PhantomCase:
    size = _check_size(size)
    shortcut = _check_shortcut(shortcut)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    patient_id, pkey = _patient_of(seed, index)
    an = _sample_anatomy(_rng(seed, pkey, 1))
    r_img = _rng(seed, index, 2)      # pose, exposure, view
    r_tex = _rng(seed, index, 3)      # textures and noise
    r_find = _rng(seed, index, 4)     # labels and finding geometry
    r_dev = _rng(seed, index, 5)      # devices and marker
    r_txt = _rng(seed, index, 6)      # report wording

    view = "AP" if r_img.random() < 0.2 else "PA"
    scale = float(r_img.uniform(0.86, 1.04))
    angle = float(r_img.uniform(-5, 5))
    shift = (float(r_img.uniform(-0.03, 0.03)), float(r_img.uniform(-0.03, 0.03)))
    contrast, bright, gamma = (float(r_img.uniform(0.8, 1.25)), float(r_img.uniform(-0.06, 0.06)),
                               float(r_img.uniform(0.8, 1.2)))
    noise_sd = float(r_img.uniform(0.006, 0.022))
    cv = _Canvas(size, scale, angle, shift)
    lungs, markings = _anatomy_layers(cv, an, r_tex)
    noise = (noise_sd * r_tex.standard_normal((size, size))).astype(np.float32)

    labels = _sample_labels(r_find)
    found, ctr, lift = _draw_findings(r_find, cv, an, labels, lungs, markings)
    if not draw_findings:
        found, ctr, lift = [], an.ctr, {"right": 0.0, "left": 0.0}
    heart_n = _heart(cv, an, an.ctr)
    heart = _heart(cv, an, ctr) if ctr != an.ctr else heart_n
    # the atelectasis layer already accounts for the lung lost to the raised dome, so compose with
    # the unlifted lungs; cardiomegaly replaces the heart layer
    base = _compose(cv, an, lungs, markings, heart)

    boxes, inst, kept = [], [], []
    density = base
    for f, layer in found:
        if layer is None:  # cardiomegaly: drawn = the enlarged heart shadow
            mask = heart > 0
        else:
            density = density + layer
            mask = np.abs(layer) * contrast >= _MASK_LEVEL
        bb = _bbox(mask)
        if bb is None:  # pragma: no cover - nothing visible (should not happen at >= 64 px)
            continue
        boxes.append({"label": f.label, "x": float(bb[0]), "y": float(bb[1]),
                      "w": float(bb[2]), "h": float(bb[3])})
        inst.append(mask)
        kept.append(f)

    overlay, dmeta = _draw_marker_and_devices(r_dev, cv, view)
    img = np.clip(density, 0, 1) ** gamma
    img = (img - 0.5) * contrast + 0.5 + bright + noise
    img = np.maximum(img, overlay)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    labels_out = [c for c in PHANTOM_CLASSES if any(f.label == c for f in kept)]
    tag_box = None
    if shortcut is not None:
        # planted shortcut: a tag that co-occurs with `shortcut` (90%) and rarely without it (5%)
        p_tag = SHORTCUT_P_POS if shortcut in labels_out else SHORTCUT_P_NEG
        if _rng(seed, index, 7).random() < p_tag:
            tag, tag_box = _draw_shortcut_tag(size)
            img = np.maximum(img, tag)
    masks = {}
    for f, m in zip(kept, inst):
        masks[f.label] = masks[f.label] | m if f.label in masks else m.copy()
    report = write_report(kept, dmeta["devices"], view, r_txt)
    thw = 2 * an.lx + an.lrx * 1.94
    meta = {
        "view": view, "scale": scale, "rotation_deg": angle, "shift": list(shift),
        "contrast": contrast, "brightness": bright, "gamma": gamma, "noise_sd": noise_sd,
        "ctr": float(ctr), "thoracic_width_px": float(thw * scale * size),
        "gastric_bubble": an.bubble, **dmeta,
        "shortcut": {"class": shortcut, "box": tag_box},
    }
    return PhantomCase(
        image=img, labels=labels_out, boxes=boxes, instance_masks=inst, masks=masks, findings=kept,
        report=report, meta=meta, image_id=f"phantom_{index:06d}", patient_id=patient_id,
        split=_split_of(seed, index // 2), view=view,
    )


def render_case(seed: int = 0, index: int = 0, size: int = 224,
                shortcut: str | None = None) -> PhantomCase:
    """Render one phantom case in memory.

    The case depends only on ``(seed, index, size)``; the anatomy of the patient is shared with the
    paired image when the pair ``(2g, 2g + 1)`` belongs to one patient.

    Args:
        seed: data-set seed.
        index: image index within the data set (>= 0).
        size: image side in pixels, 64 to 1024.
        shortcut: a class name to plant a shortcut for: a bright square tag at the right edge
            (outside the thorax) drawn on 90% of the images positive for that class and 5% of the
            others; ``meta["shortcut"]["box"]`` gives its box. ``None`` (default) plants nothing.

    Returns:
        A :class:`PhantomCase` (image (S, S) float32 in [0, 1], labels, tight boxes, masks, report,
        meta).

    Raises:
        ValueError: ``size`` outside [64, 1024], a negative ``index`` or an unknown ``shortcut``.

    Example:
        >>> c = render_case(0, 5, 64)
        >>> c.image.shape
        (64, 64)
    """
    return _render(seed, index, size, shortcut=shortcut)


def case_row(case: PhantomCase, path: str) -> dict:
    """The manifest row (DESIGN.md schema) of a rendered case stored at ``path``."""
    size = case.image.shape[0]
    return {
        "image_id": case.image_id, "path": path, "patient_id": case.patient_id, "split": case.split,
        "view": case.view, "labels": list(case.labels), "boxes": [dict(b) for b in case.boxes],
        "width": size, "height": size, "report": case.report, "source": "phantom",
    }


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_one(args) -> dict:
    seed, index, size, out_dir, masks, shortcut = args
    case = _render(seed, index, size, shortcut=shortcut)
    out = Path(out_dir)
    rel = f"images/{case.image_id}.png"
    (out / rel).write_bytes(_png_bytes(np.round(case.image * 255).astype(np.uint8)))
    row = case_row(case, rel)
    if masks:
        paths = {}
        for label, m in case.masks.items():
            mrel = f"masks/{case.image_id}__{label}.png"
            (out / mrel).write_bytes(_png_bytes(m.astype(np.uint8) * 255))
            paths[label] = mrel
        row["_mask_paths"] = paths
    m = case.meta
    row["_meta"] = {"image_id": case.image_id, "marker_box": m["marker"]["box"],
                    "marker_letter": m["marker"]["letter"],
                    "devices": [d["kind"] for d in m["devices"]],
                    "shortcut_box": m["shortcut"]["box"]}
    return row


def generate_phantom(out_dir: str | os.PathLike, n: int = 2000, size: int = 224, seed: int = 0,
                     masks: bool = False, workers: int | None = None,
                     shortcut: str | None = None) -> Path:
    """Generate a phantom data set on disk.

    Writes ``out_dir/images/{image_id}.png`` (8-bit grey), optionally ``out_dir/masks/
    {image_id}__{label}.png`` (per-class union masks, 0/255) and ``out_dir/manifest.parquet`` through
    :func:`training.data.schema.write_manifest` (source ``phantom``, relative image paths, patient-wise
    train/val/test split, view, labels, boxes in pixels, width/height, report).

    Args:
        out_dir: output folder (created).
        n: number of images (>= 1).
        size: image side in pixels, 64 to 1024.
        seed: data-set seed; the same seed gives identical pixels and manifest.
        masks: also write per-class masks.
        workers: processes to render with; ``None`` uses ``min(os.cpu_count(), 8)`` for ``n >= 200``
            and 1 below; 1 renders in this process.
        shortcut: plant a shortcut tag correlated with this class (see :func:`render_case`).

    Also writes ``out_dir/phantom_meta.parquet`` (image_id, marker_box, marker_letter, devices,
    shortcut_box; boxes as [x, y, w, h] pixels): the non-finding content, for shortcut audits.

    Returns:
        Path of the written manifest.

    Raises:
        ValueError: bad ``n``, ``size`` or ``workers``.
    """
    from tqdm.auto import tqdm

    from training.data.schema import write_manifest

    size = _check_size(size)
    shortcut = _check_shortcut(shortcut)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 200 else 1
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    jobs = [(int(seed), i, size, str(out), bool(masks), shortcut) for i in range(int(n))]
    bar = tqdm(total=n, desc="phantom", unit="img", disable=n < 200)
    rows: list[dict] = []
    try:
        if workers == 1:
            for job in jobs:
                rows.append(_write_one(job))
                bar.update()
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for row in pool.map(_write_one, jobs, chunksize=max(1, min(64, n // (workers * 8)))):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    import pandas as pd

    mask_paths = [r.pop("_mask_paths", None) for r in rows]
    pd.DataFrame([r.pop("_meta") for r in rows]).to_parquet(out / "phantom_meta.parquet", index=False)
    df = pd.DataFrame(rows)
    path = out / "manifest.parquet"
    write_manifest(df, path)
    if masks:
        # masks are not part of the manifest schema: a side table keyed by image_id
        mt = pd.DataFrame([{"image_id": r["image_id"], "label": lab, "path": p}
                           for r, mp_ in zip(rows, mask_paths) for lab, p in (mp_ or {}).items()],
                          columns=["image_id", "label", "path"])
        mt.to_parquet(out / "masks.parquet", index=False)
    logger.info("phantom: %d images of %d px (seed %d) -> %s", n, size, seed, path)
    return path
