"""How much a unit annotation rests on, and which annotations may be served.

A concept annotation is only as good as the probing images behind it. :func:`interpret.annotation.annotate`
records per unit its ``evidence`` (how many images its scores rest on: MAMMI's adaptive set, WWW's
top-k, ...), its ``margin`` (best concept score minus the second best) and ``sufficient``
(``evidence >= min_evidence``). This module summarises those columns per layer and picks the annotations
the service may show (:func:`served_unit_concepts`): sufficient ones, not flagged by the audit's VLM
check (``vlm_blind``), first method wins.

Why a floor (default :data:`DEFAULT_MIN_EVIDENCE` = 10): with MAMMI's ``alpha = 0.93`` the adaptive set
keeps only the far tail of a unit's activation range. On the demo's 512-unit layer4 the median unit had
3 representatives and 93 % had fewer than 10; units resting on the same one or two images get the
identical description (the report's top 12 units all read the same concept at the same score). A
description of a unit drawn from fewer than ten images is an anecdote, not an annotation.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MIN_EVIDENCE", "evidence_summary", "served_unit_concepts"]

DEFAULT_MIN_EVIDENCE = 10  # images an annotation must rest on to be served


def evidence_summary(table, min_evidence: int = DEFAULT_MIN_EVIDENCE) -> dict[str, Any]:
    """Distribution of the evidence behind one layer's annotations (rows of :func:`annotate`'s table).

    Args:
        table: rows of one layer with ``evidence`` and ``scores`` columns (``margin`` optional).
        min_evidence: the floor whose shortfall is counted.

    Returns:
        ``{"n_units", "evidence_min", "evidence_median", "evidence_max", "below_min_evidence"
        (fraction of units with evidence < min_evidence), "n_sufficient", "min_evidence",
        "n_annotated" (units with at least one concept), "n_distinct_scores", "margin_median"}``.
        ``n_distinct_scores`` counts the distinct best-concept scores (rounded to 1e-6) among annotated
        units: how many different descriptions the layer really has (units resting on the same images
        share one). Figures are None for an empty table.
    """
    n = int(len(table))
    ev = np.asarray(table["evidence"], dtype=float) if n else np.zeros(0)
    best = np.array([float(s[0]) if len(s) else np.nan for s in table["scores"]]) if n else np.zeros(0)
    annotated = np.isfinite(best)
    margin = np.asarray(table["margin"], dtype=float) if n and "margin" in table else np.zeros(0)
    margin = margin[np.isfinite(margin)]
    return {"n_units": n,
            "evidence_min": int(ev.min()) if n else None,
            "evidence_median": float(np.median(ev)) if n else None,
            "evidence_max": int(ev.max()) if n else None,
            "below_min_evidence": float(np.mean(ev < min_evidence)) if n else None,
            "n_sufficient": int(np.sum(ev >= min_evidence)),
            "min_evidence": int(min_evidence),
            "n_annotated": int(annotated.sum()),
            "n_distinct_scores": int(np.unique(np.round(best[annotated], 6)).size),
            "margin_median": float(np.median(margin)) if margin.size else None}


def served_unit_concepts(table, layer: str | None, min_evidence: int = DEFAULT_MIN_EVIDENCE
                         ) -> dict[int, dict[str, Any]]:
    """The unit annotations of ``layer`` the service may show, from an audit's ``concepts.parquet``.

    A row is served when its ``evidence`` is at least ``min_evidence`` and it is not flagged ``vlm_blind``
    (:func:`interpret.audit.concepts.flag_blind_units`). When the table holds several methods for a unit,
    the first row wins (the audit writes its configured method first). A table without an ``evidence``
    column (an audit written before evidence was recorded) serves nothing: its annotations cannot be
    shown to rest on enough images.

    Args:
        table: the concept table (``layer, unit, method, concepts, scores, evidence`` [, ``vlm_blind``])
            or None.
        layer: the served feature layer (None serves nothing).
        min_evidence: the floor (default :data:`DEFAULT_MIN_EVIDENCE`).

    Returns:
        ``{unit: {"concepts": [str], "scores": [float], "evidence": int, "method": str}}`` for the served
        units only.

    Raises:
        ValueError: ``min_evidence`` below 1.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"layer": ["f", "f"], "unit": [0, 1], "method": ["mammi"] * 2,
        ...                   "concepts": [["effusion"], ["heart"]], "scores": [[0.3], [0.2]], "evidence": [1, 12]})
        >>> served_unit_concepts(t, "f")
        {1: {'concepts': ['heart'], 'scores': [0.2], 'evidence': 12, 'method': 'mammi'}}
    """
    if int(min_evidence) != min_evidence or min_evidence < 1:
        raise ValueError(f"min_evidence must be a positive integer, got {min_evidence!r}")
    if table is None or not len(table) or layer is None:
        return {}
    if "evidence" not in table:
        log.warning("the concept table has no evidence column (written before evidence was recorded): "
                    "no unit annotation is served")
        return {}
    rows = table[table["layer"] == layer].drop_duplicates("unit", keep="first")
    keep = np.asarray(rows["evidence"], dtype=float) >= min_evidence
    if "vlm_blind" in rows:
        keep &= ~np.asarray(rows["vlm_blind"], dtype=bool)
    rows = rows[keep]

    def _list(x) -> list:
        return [] if x is None else list(x)

    return {int(u): {"concepts": [str(c) for c in _list(c)], "scores": [float(s) for s in _list(s)],
                     "evidence": int(e), "method": str(m)}
            for u, c, s, e, m in zip(rows["unit"], rows["concepts"], rows["scores"], rows["evidence"],
                                     rows["method"])}
