"""Region masks from annotations: polygon outlines (ChestX-Det) rasterised to boolean masks."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from training.data.cells import as_list

__all__ = ["polygon_mask"]


def polygon_mask(polygons: Iterable[Any], height: int, width: int, *, label: str | None = None,
                 scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Rasterise polygons into one boolean mask (their union).

    Args:
        polygons: polygons as ``[[x, y], ...]`` point lists, flat ``[x0, y0, x1, y1, ...]`` lists,
            or manifest ``{label, points}`` dicts.
        height: mask height in pixels.
        width: mask width in pixels.
        label: with dict polygons, keep only this label.
        scale: ``(sx, sy)`` applied to the points first (original -> current image pixels).

    Returns:
        Boolean array (height, width); polygons with fewer than 3 points are skipped.

    Raises:
        ValueError: non-positive ``height``/``width`` or malformed points.

    Example:
        >>> int(polygon_mask([[[0, 0], [3, 0], [3, 3], [0, 3]]], 5, 5).sum())
        16
    """
    from PIL import Image, ImageDraw

    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    img = Image.new("1", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(img)
    sx, sy = scale
    for k, poly in enumerate(polygons):
        if isinstance(poly, dict):
            if label is not None and poly.get("label") != label:
                continue
            poly = poly.get("points")
        pts = as_list(poly)
        if pts is None:
            raise ValueError(f"polygon {k} must be a list of points, got {type(poly).__name__}")
        try:
            arr = np.asarray([np.asarray(p, dtype=np.float64) for p in pts], dtype=np.float64)
            arr = arr.reshape(-1, 2)
        except (TypeError, ValueError):
            raise ValueError(f"polygon {k} has malformed points (want [[x, y], ...])") from None
        if len(arr) < 3:
            continue
        arr = arr * np.array([sx, sy])
        draw.polygon([tuple(p) for p in arr.tolist()], fill=1, outline=1)
    return np.array(img, dtype=bool)
