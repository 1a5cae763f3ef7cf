"""Findings of the phantom: one drawer per class, registered by name.

A drawer turns a class name into density layers, one per finding instance: ``draw(rng, ctx, label) ->
[(Finding, layer (S, S) float32 or None), ...]``, where ``ctx`` (:class:`FindingContext`) holds the
canvas, the patient's anatomy and the layers a finding depends on (lungs, vessel markings, the normal
heart). A drawer may also change what the anatomy pass draws: Cardiomegaly sets ``ctx.ctr`` (its layer
is ``None``: the enlarged heart itself), basal Atelectasis raises a hemidiaphragm in ``ctx.lift``.

Each drawer draws only from its own ``rng`` calls, in a fixed order, so the pixels of a phantom depend on
``(seed, index)`` alone; :func:`draw_findings` calls them in the order of the case's labels.

Example:
    >>> list_findings()[:3]
    ['Atelectasis', 'Cardiomegaly', 'Consolidation']
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from training.data.phantom.anatomy import (_Anatomy, _heart, _lung_alpha, _lung_geometry,
                                           _sample_point_in_lung)
from training.data.phantom.canvas import _Canvas, _ellipse, _segment_dist
from training.data.reports_phantom import Finding
from training.data.schema import PHANTOM_CLASSES

__all__ = ["FindingContext", "register_finding", "get_drawer", "list_findings", "draw_findings", "SIDES"]

SIDES = ("right", "left")
_MM_PER_UNIT = 380.0  # one canonical unit (image width at scale 1) in millimetres

Layers = list[tuple[Finding, np.ndarray | None]]  # one (finding, layer (S, S) float32 or None) per instance
Drawer = Callable[[np.random.Generator, "FindingContext", str], Layers]
_DRAWERS: dict[str, Drawer] = {}


@dataclass
class FindingContext:
    """What a drawer reads (canvas, anatomy, layers) and what it may change (``ctr``, ``lift``)."""

    cv: _Canvas
    an: _Anatomy
    lungs: dict  # side -> (S, S) lung alpha, before any volume loss
    markings: np.ndarray  # (S, S) vessel markings
    heart_n: np.ndarray  # (S, S) alpha of the normal heart
    geo: dict = field(init=False)  # side -> (centre u, half-width, dome peak v)
    ctr: float = field(init=False)  # cardiothoracic ratio the anatomy pass draws
    lift: dict = field(init=False)  # side -> hemidiaphragm lift (volume loss)

    def __post_init__(self) -> None:
        self.geo = _lung_geometry(self.an)
        self.ctr = self.an.ctr
        self.lift = {"right": 0.0, "left": 0.0}


def register_finding(name: str) -> Callable[[Drawer], Drawer]:
    """Decorator: register ``fn`` as the drawer of class ``name``.

    Raises:
        ValueError: ``name`` is not a phantom class, or already has a drawer.
    """
    if name not in PHANTOM_CLASSES:
        raise ValueError(f"unknown phantom class {name!r}; valid: {', '.join(PHANTOM_CLASSES)}")

    def deco(fn: Drawer) -> Drawer:
        if name in _DRAWERS:
            raise ValueError(f"phantom class {name!r} already has a drawer ({_DRAWERS[name].__name__})")
        _DRAWERS[name] = fn
        return fn
    return deco


def list_findings() -> list[str]:
    """Classes the phantom can draw, sorted."""
    return sorted(_DRAWERS)


def get_drawer(name: str) -> Drawer:
    """The drawer of class ``name``.

    Raises:
        ValueError: no drawer for ``name`` (the message lists the valid ones).
    """
    try:
        return _DRAWERS[name]
    except KeyError:
        raise ValueError(f"phantom cannot draw {name!r}; valid: {PHANTOM_CLASSES}") from None


def draw_findings(rng: np.random.Generator, cv: _Canvas, an: _Anatomy, labels: list[str], lungs: dict,
                  markings: np.ndarray) -> tuple[Layers, float, dict]:
    """Density layers of a case's findings, drawn in the order of ``labels``.

    Args:
        rng: the case's finding stream.
        cv: the canvas; an: the patient's anatomy; lungs: side -> (S, S) lung alpha; markings: (S, S).
        labels: classes to draw (each with a registered drawer).

    Returns:
        ``(found, ctr, lift)``: one ``(Finding, layer (S, S) float32 or None)`` per instance, the
        cardiothoracic ratio and the per-side dome lift (volume loss) that the anatomy must use.

    Raises:
        ValueError: a label without a drawer.
    """
    ctx = FindingContext(cv, an, lungs, markings, _heart(cv, an, an.ctr))
    out: Layers = []
    for label in labels:
        out += get_drawer(label)(rng, ctx, label)
    return out, ctx.ctr, ctx.lift


# ---- the drawers, one per class ----------------------------------------------------------------
@register_finding("Cardiomegaly")
def draw_cardiomegaly(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Enlarged heart shadow (cardiothoracic ratio 0.55-0.66); its layer (None) is the heart the anatomy draws."""
    out: Layers = []
    ctr = float(rng.uniform(0.55, 0.66))
    sev = "mild" if ctr < 0.58 else ("moderate" if ctr < 0.62 else "marked")
    out.append((Finding(label, "midline", "central", severity=sev, extra={"ctr": round(ctr, 3)}),
                None))  # contribution filled in by the anatomy pass (heart layer)
    ctx.ctr = ctr
    return out


@register_finding("Nodule")
@register_finding("Mass")
def draw_nodule_or_mass(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Small round opacity (Nodule, one or two) or a larger lobulated one (Mass) in a lung zone."""
    u, v, px = ctx.cv.u, ctx.cv.v, ctx.cv.px
    an = ctx.an
    geo = ctx.geo
    sides = SIDES
    out: Layers = []
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
    return out


@register_finding("Effusion")
def draw_effusion(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Basal opacity with a meniscus blunting the costophrenic angle, one side or both."""
    u, v, px = ctx.cv.u, ctx.cv.v, ctx.cv.px
    geo = ctx.geo
    lungs = ctx.lungs
    heart_n = ctx.heart_n
    sides = SIDES
    out: Layers = []
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
    return out


@register_finding("Pneumothorax")
def draw_pneumothorax(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Apical lucency without lung markings, bounded by a visible pleural line."""
    u, v, px = ctx.cv.u, ctx.cv.v, ctx.cv.px
    an = ctx.an
    geo = ctx.geo
    lungs = ctx.lungs
    markings = ctx.markings
    sides = SIDES
    out: Layers = []
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
    return out


@register_finding("Atelectasis")
def draw_atelectasis(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Plate-like band; basal ones raise the hemidiaphragm (volume loss, recorded in ``ctx.lift``)."""
    u, v, px = ctx.cv.u, ctx.cv.v, ctx.cv.px
    cv = ctx.cv
    an = ctx.an
    geo = ctx.geo
    lungs = ctx.lungs
    markings = ctx.markings
    sides = SIDES
    lift = ctx.lift
    out: Layers = []
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
    return out


@register_finding("Consolidation")
def draw_consolidation(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Dense patchy opacity, optionally with air bronchograms."""
    u, v, px = ctx.cv.u, ctx.cv.v, ctx.cv.px
    an = ctx.an
    geo = ctx.geo
    lungs = ctx.lungs
    sides = SIDES
    out: Layers = []
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
    return out


@register_finding("Infiltration")
def draw_infiltration(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Diffuse hazy reticular opacity in the mid or lower zone, one side or both."""
    u, v = ctx.cv.u, ctx.cv.v
    an = ctx.an
    geo = ctx.geo
    lungs = ctx.lungs
    sides = SIDES
    out: Layers = []
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
    return out


@register_finding("Hernia")
def draw_hernia(rng: np.random.Generator, ctx: FindingContext, label: str) -> Layers:
    """Rare retrocardiac opacity with an air bubble above the diaphragm."""
    u, v, px = ctx.cv.u, ctx.cv.v, ctx.cv.px
    an = ctx.an
    out: Layers = []
    cu = 0.5 + rng.uniform(0.0, 0.04)
    cvv = an.dome_l - rng.uniform(0.04, 0.06)
    rx, ry = rng.uniform(0.045, 0.06), rng.uniform(0.035, 0.045)
    sac = _ellipse(u, v, cu, cvv, rx, ry, 2 * px)
    bubble = _ellipse(u, v, cu, cvv - ry * 0.3, rx * 0.6, ry * 0.45, 1.5 * px)
    bubble = bubble * (v < cvv)  # air above an air-fluid level
    layer = (0.16 * sac - 0.28 * bubble).astype(np.float32)
    out.append((Finding(label, "midline", "central", size_mm=round(2 * rx * _MM_PER_UNIT, 1)), layer))
    return out
