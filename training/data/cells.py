"""Reading manifest cells: the values pandas and Parquet hand back, turned into plain Python.

A cell may arrive as a Python value, a numpy array or scalar, ``NaN``, ``pd.NA`` or ``pd.NaT``
depending on how the frame was built or read; validation (:mod:`training.data.schema`), Parquet I/O
(:mod:`training.data.manifest`) and rasterisation (:mod:`training.data.masks`) read cells with these.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["is_null", "as_list", "as_number"]


def is_null(v: Any) -> bool:
    """Whether a cell is missing: ``None``, ``NaN``, ``pd.NA`` or ``pd.NaT`` (lists and strings never are)."""
    if v is None:
        return True
    if isinstance(v, float):
        return v != v
    if isinstance(v, (str, list, dict, tuple, np.ndarray, int)):
        return False
    if v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, np.floating) and bool(np.isnan(v))


def as_list(v: Any) -> list | None:
    """Parquet list cells arrive as numpy arrays, lists, tuples or null.

    Returns:
        The items as a list (``[]`` for a null cell), or ``None`` when the cell is not a list.
    """
    if is_null(v):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(v)
    return None


def as_number(v: Any) -> float | None:
    """A finite number as ``float``; ``None`` for null, booleans, non-numbers and infinities."""
    if type(v) is float or type(v) is int:   # fast path (the common case)
        return float(v) if v == v and v not in (math.inf, -math.inf) else None
    if isinstance(v, (bool, np.bool_)) or is_null(v):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
