"""The phantom's pixel grid and the vectorised shape helpers it draws with.

Everything is evaluated on the pixel grid in canonical patient coordinates ``u, v`` ~ [0, 1] (the image
width at scale 1 is one unit), mapped by :class:`_Canvas`'s inverse similarity transform (patient size,
rotation and shift).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["_Canvas", "_ellipse", "_segment_dist", "_smooth_noise", "_rng"]


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

