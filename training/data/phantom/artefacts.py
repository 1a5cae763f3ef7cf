"""What a phantom radiograph shows besides anatomy and findings: devices, the side marker, the shortcut tag.

Drawn independently of the findings (their own random stream), so a model can learn them as shortcuts
if nothing stops it; the case's ``meta`` records all of it for shortcut audits.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.data.phantom.canvas import _Canvas

__all__ = ["SHORTCUT_P_POS", "SHORTCUT_P_NEG", "_draw_marker_and_devices", "_draw_shortcut_tag"]

SHORTCUT_P_POS, SHORTCUT_P_NEG = 0.9, 0.05  # P(shortcut tag | class present / absent)


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


def _draw_shortcut_tag(size: int) -> tuple[np.ndarray, list[int]]:
    """A bright square tag at the right edge, outside the thorax: the planted shortcut.

    Returns the layer (S, S) float32 and its box [x, y, w, h] in pixels.
    """
    side = max(3, round(size * 0.07))
    x, y = size - round(size * 0.03) - side, round(size * 0.22)
    layer = np.zeros((size, size), np.float32)
    layer[y:y + side, x:x + side] = 1.0
    return layer, [int(x), int(y), int(side), int(side)]

