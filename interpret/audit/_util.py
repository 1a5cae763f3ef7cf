"""Small helpers shared by the audit sections: finite-number coercion, JSON encoding, section status."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("interpret.audit")

def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _nanmean(values) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class Sections:
    """Records the status of each section (``ok`` or ``skipped`` with a reason)."""

    def __init__(self) -> None:
        self.status: dict[str, dict[str, str]] = {}

    def ok(self, name: str, note: str = "") -> None:
        self.status[name] = {"status": "ok", **({"reason": note} if note else {})}

    def skip(self, name: str, reason: str) -> None:
        log.warning("audit: section %s skipped: %s", name, reason)
        self.status[name] = {"status": "skipped", "reason": reason}
