"""The phantom's anatomy: patient shape, lungs, heart, and the base radiograph without findings.

Body outline and soft tissue, two lungs (dark) with vessel markings radiating from the hila, heart (on
the image right: radiological convention), mediastinum with trachea and spine, curved posterior ribs,
clavicles, diaphragm domes (the right one higher) and an optional gastric bubble.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.data.phantom.canvas import _Canvas, _ellipse, _segment_dist, _smooth_noise

__all__ = ["_Anatomy", "_sample_anatomy", "_dome", "_lung_alpha", "_lung_geometry", "_heart",
           "_sample_point_in_lung", "_anatomy_layers", "_compose"]


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
