"""interpret: attention maps, localisation metrics, dissection, VLM adapters, concept annotation.

A plain library (no mlflow, no bentoml). The stable entry points of DESIGN.md are re-exported here
lazily so that importing :mod:`interpret` stays cheap:

- :func:`interpret.attention_maps` (from :mod:`interpret.attention`)
- :func:`interpret.concept_scores`, :func:`interpret.select_concepts` (from :mod:`interpret.annotation`)
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "attention_maps": "interpret.attention",
    "concept_scores": "interpret.annotation",
    "select_concepts": "interpret.annotation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interpret' has no attribute {name!r}")
