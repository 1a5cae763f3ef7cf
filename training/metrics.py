"""Per-class classification metrics (AUROC, AP, F1, MCC) and validation thresholds, as pure functions.

NaN labels are unknown and ignored per class. A class whose known labels are all one value has no
AUROC / AP (NaN), and means over classes skip NaN (``summarize``).

A decision threshold is fitted only on enough evidence: a class with fewer than ``min_positives``
(default :data:`MIN_VAL_POSITIVES` = 5) known validation positives gets **no** threshold (NaN), never a
max-F1 point fitted on one or two images nor a 0.5 stand-in; such a class has no F1 / MCC (NaN) and no
call. The number of positives each threshold rests on is :func:`positive_counts`; in JSON (``meta.json``,
registry tags) a missing threshold is ``null`` (:func:`thresholds_to_json` / :func:`thresholds_from_json`);
:func:`threshold_reason` says why one is missing.

Example:
    >>> y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    >>> p = np.array([[.9, .2], [.1, .8], [.7, .4], [.3, .6]])
    >>> classification_metrics(y, p, classes=["A", "B"]).loc["A", "auroc"]
    1.0
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["classification_metrics", "choose_thresholds", "summarize", "METRIC_COLUMNS", "MIN_VAL_POSITIVES",
           "positive_counts", "threshold_reason", "thresholds_to_json", "thresholds_from_json"]

METRIC_COLUMNS = ("auroc", "ap", "f1", "mcc")
MIN_VAL_POSITIVES = 5  # fewer known validation positives than this: no threshold is fitted for the class


def _as_2d(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[:, None], p.reshape(-1, 1) if p.ndim == 1 else p
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and y_prob {p.shape} must both be (N, C)")
    known = y[~np.isnan(y)]
    if known.size and not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 0, 1 or NaN")
    return y, p


def positive_counts(y_true) -> np.ndarray:
    """Known positives per class of (N, C) labels (NaN = unknown, not counted); (C,) int64."""
    y = np.asarray(y_true, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"y_true must be (N, C), got shape {y.shape}")
    return (y == 1.0).sum(0).astype(np.int64)


def choose_thresholds(y_true, y_prob, min_positives: int = MIN_VAL_POSITIVES) -> np.ndarray:
    """Per-class threshold maximising F1 on (validation) data, where there is enough evidence for one.

    The threshold is the predicted probability at the best point of the precision-recall curve
    (predict positive when ``p >= threshold``). A class with fewer than ``min_positives`` known positives
    gets NaN: no threshold (a max-F1 point fitted on one positive just sits below that image's
    probability; we choose to make no call rather than a confident-looking one).

    Args:
        y_true: (N, C) labels in {0, 1}, NaN = unknown.
        y_prob: (N, C) probabilities.
        min_positives: known positives a class needs for a threshold (>= 1).

    Returns:
        (C,) float64 thresholds, NaN where a class has fewer than ``min_positives`` known positives.

    Raises:
        ValueError: shape mismatches, labels outside {0, 1, NaN}, or ``min_positives`` < 1.

    Example:
        >>> y = np.array([[1, 1], [1, 0], [0, 0]], dtype=float)
        >>> choose_thresholds(y, [[.9, .8], [.6, .1], [.2, .3]], min_positives=2)
        array([0.6, nan])
    """
    if isinstance(min_positives, bool) or not isinstance(min_positives, (int, np.integer)) or min_positives < 1:
        raise ValueError(f"min_positives must be an integer >= 1, got {min_positives!r}")
    y, p = _as_2d(y_true, y_prob)
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        known = ~np.isnan(y[:, c])
        yc, pc = y[known, c], p[known, c]
        if yc.sum() < min_positives:
            continue
        precision, recall, thr = precision_recall_curve(yc, pc)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)  # (T,)
        out[c] = float(thr[int(np.argmax(f1))])
    return out


def threshold_reason(positives: int | None, min_positives: int | None) -> str:
    """Why a class has no threshold, for people (the service's ``threshold_reason``).

    Args:
        positives: the class's known validation positives (None: not recorded, e.g. an older model).
        min_positives: the minimum the threshold needed (None: not recorded).

    Example:
        >>> threshold_reason(1, 5)
        'no reliable threshold: 1 validation positive (< 5)'
    """
    if positives is None:
        need = f" (< {int(min_positives)})" if min_positives is not None else ""
        return f"no reliable threshold: too few validation positives{need}"
    n = int(positives)
    need = f" (< {int(min_positives)})" if min_positives is not None else ""
    return f"no reliable threshold: {n} validation positive{'' if n == 1 else 's'}{need}"


def thresholds_to_json(thresholds) -> list[float | None]:
    """Thresholds as JSON values: floats, ``None`` (JSON ``null``) for a class without one (NaN)."""
    return [float(t) if t is not None and np.isfinite(float(t)) else None for t in thresholds]


def thresholds_from_json(values) -> list[float]:
    """Inverse of :func:`thresholds_to_json`: ``None`` (and NaN) become NaN floats."""
    return [float("nan") if v is None else float(v) for v in values]


def _binary_scores(y: np.ndarray, pred: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 and MCC per class from (N, C) 0/1 labels, 0/1 predictions and a known-mask (vectorised)."""
    k = known.astype(np.float64)
    tp = (y * pred * k).sum(0)
    fp = ((1 - y) * pred * k).sum(0)
    fn = (y * (1 - pred) * k).sum(0)
    tn = ((1 - y) * (1 - pred) * k).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom_f1 = 2 * tp + fp + fn
        f1 = np.where(denom_f1 > 0, 2 * tp / np.where(denom_f1 > 0, denom_f1, 1), 0.0)
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1), 0.0)
    return f1, mcc


def classification_metrics(y_true, y_prob, thresholds: Sequence[float] | np.ndarray | None = None,
                           classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-class AUROC, AP, F1, MCC (+ counts, threshold, mean predicted probability).

    Args:
        y_true: (N, C) labels in {0, 1}; NaN = unknown (ignored for that class).
        y_prob: (N, C) predicted probabilities.
        thresholds: (C,) decision thresholds for F1/MCC (default 0.5 each); NaN (or None) = the class has no
            threshold: no call is made, so its F1 and MCC are NaN.
        classes: C class names (default ``class_0`` ...).

    Returns:
        DataFrame indexed by class with columns ``n_pos``, ``n_neg``, ``auroc``, ``ap``, ``f1``, ``mcc``,
        ``threshold``, ``mean_prob`` (over known labels), ``prevalence``. AUROC/AP are NaN for a class
        with a single label value; F1/MCC are 0 when undefined (no predicted and no true positives) and NaN
        for a class without a threshold.

    Raises:
        ValueError: shape mismatches or labels outside {0, 1, NaN}.
    """
    y, p = _as_2d(y_true, y_prob)
    n, c = y.shape
    names = [f"class_{i}" for i in range(c)] if classes is None else [str(x) for x in classes]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} columns")
    if thresholds is None:
        thr = np.full(c, 0.5)
    else:
        thr = np.asarray(thresholds_from_json(np.asarray(thresholds, dtype=object).reshape(-1)), dtype=np.float64)
    if thr.shape != (c,):
        raise ValueError(f"thresholds must have {c} values, got {thr.shape[0]}")
    known = ~np.isnan(y)
    y0 = np.where(known, y, 0.0)
    no_threshold = np.isnan(thr)  # (C,): no call is made for these classes
    pred = (p >= np.where(no_threshold, np.inf, thr)[None, :]).astype(np.float64)
    f1, mcc = _binary_scores(y0, pred, known)
    f1[no_threshold], mcc[no_threshold] = np.nan, np.nan
    n_pos = (y0 * known).sum(0)
    n_known = known.sum(0)
    auroc, ap = np.full(c, np.nan), np.full(c, np.nan)
    for j in range(c):
        yj, pj = y[known[:, j], j], p[known[:, j], j]
        if 0 < yj.sum() < len(yj):
            auroc[j] = roc_auc_score(yj, pj)
            ap[j] = average_precision_score(yj, pj)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(n_known > 0, (p * known).sum(0) / np.maximum(n_known, 1), np.nan)
        prevalence = np.where(n_known > 0, n_pos / np.maximum(n_known, 1), np.nan)
    return pd.DataFrame({"n_pos": n_pos.astype(np.int64), "n_neg": (n_known - n_pos).astype(np.int64),
                         "auroc": auroc, "ap": ap, "f1": f1, "mcc": mcc, "threshold": thr, "mean_prob": mean_prob,
                         "prevalence": prevalence}, index=pd.Index(names, name="class"))


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Means over classes (NaN skipped) of the metric columns: ``{auroc_mean, ap_mean, f1_mean, mcc_mean}``.

    A mean over no defined values is NaN.
    """
    out = {}
    for col in METRIC_COLUMNS:
        values = table[col].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        out[f"{col}_mean"] = float(values.mean()) if values.size else float("nan")
    return out
