"""Seeded bootstrap confidence intervals for every figure the audit reports.

One implementation for AUROC, AP, IoBB, IoR, pointing game, faithfulness AUCs and concept hit-rate:
:func:`bootstrap_ci` resamples rows with replacement (the same row indices for every array passed),
recomputes the statistic on each resample and reports the **percentile interval** (Efron &
Tibshirani 1993, ch. 13: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
bootstrap distribution, linear interpolation as ``numpy.quantile``; the same interval as
``scipy.stats.bootstrap(method="percentile")``). The point estimate is the statistic on the full data,
not the mean of the resamples.

Choices, stated once:

- **Seeded**: ``numpy.random.default_rng(seed)``; the same seed and data give the same interval, and
  the looped and ``vectorized`` paths draw the same resamples (the indices are drawn in blocks whose
  size depends only on the number of rows), so they give the same interval too.
- **Stratified** resampling (``strata``): rows are resampled within each stratum, so every resample
  keeps each stratum's size. :func:`auroc_ci` and :func:`ap_ci` stratify by the label, so every
  resample has exactly as many positives and negatives as the data: the metric is always defined and
  a rare class is not judged on resamples that happen to miss it.
- **Undefined resamples are dropped**: resamples whose statistic is NaN are left out of the quantiles;
  how many were kept is :attr:`CI.n_valid` (a warning is logged when fewer than half were).
- **Degenerate input is not an error**: fewer than two rows, or no resample with a defined statistic,
  gives a :class:`CI` with NaN bounds (``to_dict`` writes them as ``None``).

Example:
    >>> import numpy as np
    >>> ci = mean_ci(np.arange(10.0), seed=0)
    >>> ci.estimate
    4.5
    >>> ci.low < 4.5 < ci.high
    True
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CI", "bootstrap_ci", "mean_ci", "auroc_ci", "ap_ci", "resample_indices"]

#: Index-matrix entries drawn per block (rows x resamples): bounds memory for large N while keeping the
#: draws a function of (seed, N, strata) only.
_BLOCK_ELEMENTS = 1 << 21
#: Index-matrix entries handed to the statistic at a time: :func:`bootstrap_ci` takes each block's resamples in
#: sub-blocks of at most this many entries (the same resamples, drawn in the same order), so that a vectorised
#: statistic's intermediates (a few (r, N) arrays) take the same memory whatever N is: with whole blocks they grew
#: with N up to ``_BLOCK_ELEMENTS`` entries each (about 2,100 rows at R = 1000), 100-200 MB at the peak.
_CHUNK_ELEMENTS = 1 << 17


@dataclass(frozen=True)
class CI:
    """A bootstrap confidence interval.

    Attributes:
        estimate: the statistic on the full data (NaN when undefined).
        low: lower bound, the ``(1 - confidence) / 2`` quantile of the resampled statistics (NaN when
            there is no interval).
        high: upper bound, the ``(1 + confidence) / 2`` quantile.
        n: number of rows the statistic was computed on.
        n_resamples: resamples drawn.
        confidence: nominal coverage, e.g. 0.95.
        n_valid: resamples whose statistic was defined (not NaN) and entered the quantiles.
        method: how the interval was formed (``"percentile"``).
    """

    estimate: float
    low: float
    high: float
    n: int
    n_resamples: int
    confidence: float
    n_valid: int = 0
    method: str = "percentile"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: floats, with ``None`` for NaN (JSON has no NaN)."""
        def num(v: float) -> float | None:
            v = float(v)
            return None if math.isnan(v) else v
        return {"estimate": num(self.estimate), "low": num(self.low), "high": num(self.high),
                "n": int(self.n), "n_resamples": int(self.n_resamples),
                "confidence": float(self.confidence), "n_valid": int(self.n_valid), "method": self.method}

    def touches(self, value: float) -> bool:
        """Whether ``low <= value <= high`` (False when the bounds are NaN)."""
        return bool(self.low <= value <= self.high)

    @property
    def width(self) -> float:
        """``high - low`` (NaN when there is no interval)."""
        return float(self.high - self.low)


def _check_args(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def _as_arrays(arrays: Sequence[Any]) -> tuple[list[np.ndarray], int]:
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    out = [np.asarray(a) for a in arrays]
    for i, a in enumerate(out):
        if a.ndim == 0:
            raise ValueError(f"array {i} is a scalar; pass arrays with rows to resample, shape (N, ...)")
    lengths = [len(a) for a in out]
    if len(set(lengths)) != 1:
        raise ValueError(f"arrays must have the same number of rows to be resampled jointly, got {lengths}")
    return out, lengths[0]


def _groups(strata: Any, n: int) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    s = np.asarray(strata)
    if s.shape != (n,):
        raise ValueError(f"strata must be one label per row, shape ({n},), got shape {s.shape}")
    _, inverse = np.unique(s, return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if n else [np.arange(0)]


def resample_indices(n: int, n_resamples: int, seed: int | np.random.Generator = 0,
                     strata: Any = None, max_elements: int | None = None) -> Iterator[np.ndarray]:
    """Bootstrap row indices, in blocks.

    Every resample has ``n`` rows drawn with replacement; with ``strata``, each stratum's rows are
    drawn from that stratum only (so each resample keeps the strata sizes), strata in sorted label
    order.

    Args:
        n: number of rows N.
        n_resamples: number of resamples R.
        seed: seed of ``numpy.random.default_rng`` (or a generator).
        strata: optional (N,) stratum labels.
        max_elements: yield at most this many indices at a time (at least one resample a block): the
            same resamples in the same order, only cut into smaller blocks, so memory does not grow with N.
            None: whole draw blocks.

    Returns:
        An iterator of (r, N) int64 index blocks whose r sum to R. The resamples depend only on
        ``(seed, n, n_resamples, strata)``, not on ``max_elements``.

    Raises:
        ValueError: ``strata`` of the wrong shape, or ``max_elements`` below 1.
    """
    if max_elements is not None and int(max_elements) < 1:
        raise ValueError(f"max_elements must be a positive int or None, got {max_elements!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    groups = [g for g in _groups(strata, n) if len(g)]
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // max(n, 1)))  # the draw block: fixes the draws
    step = block if max_elements is None else max(1, min(block, int(max_elements) // max(n, 1)))
    done = 0
    while done < n_resamples:
        r = min(block, n_resamples - done)
        if step >= r:
            parts = [g[rng.integers(0, len(g), size=(r, len(g)))] for g in groups]
            yield np.concatenate(parts, axis=1) if parts else np.zeros((r, 0), dtype=np.int64)  # (r, N)
        else:
            yield from _sub_blocks(rng, groups, r, step)
        done += r


def _sub_blocks(rng: np.random.Generator, groups: list[np.ndarray], r: int, step: int) -> Iterator[np.ndarray]:
    """One draw block of ``r`` resamples, yielded ``step`` resamples at a time with exactly the draws of
    ``[g[rng.integers(0, len(g), size=(r, len(g)))] for g in groups]`` (stratum by stratum, each stratum's r x n_g
    values in row-major order), leaving ``rng`` where that would leave it.

    A generator's values do not depend on how a run of draws is cut into calls, so each stratum's draws come
    from a copy of the generator positioned where that stratum's draws start (found by drawing, and dropping,
    the strata before it), advanced ``step`` rows at a time; the last copy ends where the block ends."""
    import copy

    gens = [rng]
    for g in groups[:-1]:  # position a copy at the start of each later stratum's draws
        nxt = copy.deepcopy(gens[-1])
        for start in range(0, r, step):
            nxt.integers(0, len(g), size=(min(step, r - start), len(g)))
        gens.append(nxt)
    for start in range(0, r, step):
        s = min(step, r - start)
        parts = [g[gen.integers(0, len(g), size=(s, len(g)))] for g, gen in zip(groups, gens)]
        yield np.concatenate(parts, axis=1) if parts else np.zeros((s, 0), dtype=np.int64)
    if len(gens) > 1:
        rng.bit_generator.state = gens[-1].bit_generator.state


def _finite_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"statistic must return a float, got {type(v).__name__}: {v!r}") from None


def bootstrap_ci(statistic: Callable[..., Any], *arrays: Any, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, strata: Any = None,
                 vectorized: bool = False) -> CI:
    """Percentile bootstrap confidence interval of ``statistic(*arrays)``.

    Rows are resampled jointly: resample ``r`` calls ``statistic(*(a[idx_r] for a in arrays))`` with the
    same indices ``idx_r`` (N,) for every array. Resamples whose statistic is NaN are dropped
    (:attr:`CI.n_valid` counts those kept).

    Args:
        statistic: ``statistic(*resampled_arrays) -> float``. With ``vectorized=True`` it receives each
            array indexed by an (R, N) index matrix, i.e. arrays of shape (R, N, ...), and must return
            (R,) values, one per resample (e.g. ``lambda x: x.mean(axis=1)``); the point estimate calls
            it with arrays of shape (1, N, ...).
        *arrays: one or more arrays with the same number of rows N (first dimension).
        n_resamples: number of bootstrap resamples R.
        confidence: nominal coverage of the interval, in (0, 1).
        seed: seed of ``numpy.random.default_rng``; same seed and data -> same interval.
        strata: optional (N,) labels; rows are resampled within each stratum (use the binary label for
            AUROC / AP so every resample has both classes).
        vectorized: call ``statistic`` once per block of resamples (see ``statistic``) instead of once per
            resample. Same draws, same interval, much faster for mean-type statistics.

    Returns:
        A :class:`CI`. With fewer than two rows, or when no resample has a defined statistic, the bounds
        are NaN (no exception); ``estimate`` is the statistic on the full data whenever it is defined.

    Raises:
        ValueError: arrays with different numbers of rows, ``strata`` of the wrong shape, a bad
            ``n_resamples`` or ``confidence``, or a statistic that returns the wrong shape.
    """
    _check_args(n_resamples, confidence)
    data, n = _as_arrays(arrays)
    _groups(strata, n)  # validates strata before the statistic runs

    def full() -> float:
        if n == 0:
            return float("nan")
        if vectorized:
            v = np.asarray(statistic(*(a[None] for a in data)), dtype=float).reshape(-1)
            if v.shape != (1,):
                raise ValueError(f"a vectorized statistic must return one value per resample, got shape "
                                 f"{v.shape} for 1 resample")
            return float(v[0])
        return _finite_float(statistic(*data))

    estimate = full()
    nan_ci = CI(estimate, float("nan"), float("nan"), n, int(n_resamples), float(confidence), 0)
    if n < 2:
        logger.debug("bootstrap_ci: %d row(s), no interval", n)
        return nan_ci

    values = np.empty(n_resamples, dtype=float)
    start = 0
    for idx in resample_indices(n, n_resamples, seed, strata, _CHUNK_ELEMENTS):     # (r, N) row indices
        r = idx.shape[0]
        if vectorized:
            v = np.asarray(statistic(*(a[idx] for a in data)), dtype=float).reshape(-1)
            if v.shape != (r,):
                raise ValueError(f"a vectorized statistic must return one value per resample, got shape "
                                 f"{v.shape} for {r} resamples")
            values[start:start + r] = v
        else:
            for j in range(r):
                values[start + j] = _finite_float(statistic(*(a[idx[j]] for a in data)))
        start += r

    valid = values[~np.isnan(values)]
    if valid.size == 0:
        logger.warning("bootstrap_ci: the statistic is undefined (NaN) on all %d resamples", n_resamples)
        return nan_ci
    if valid.size < n_resamples / 2:
        logger.warning("bootstrap_ci: only %d of %d resamples have a defined statistic", valid.size,
                       n_resamples)
    alpha = (1.0 - float(confidence)) / 2.0
    low, high = np.quantile(valid, [alpha, 1.0 - alpha])
    return CI(estimate, float(low), float(high), n, int(n_resamples), float(confidence), int(valid.size))


def mean_ci(values: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> CI:
    """Bootstrap CI of the mean (vectorised: all resample means in one pass per block).

    NaN values (e.g. an IoBB for an image without a box) are removed first; ``n`` counts the rest.

    Args:
        values: (N,) numbers.
        n_resamples: number of resamples.
        confidence: nominal coverage.
        seed: seed of the resampling.

    Returns:
        A :class:`CI` of the mean (NaN bounds with fewer than two non-NaN values).

    Raises:
        ValueError: ``values`` not one-dimensional, or bad ``n_resamples`` / ``confidence``.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"values must be one-dimensional (N,), got shape {v.shape}")
    v = v[~np.isnan(v)]
    return bootstrap_ci(lambda x: x.mean(axis=-1), v, n_resamples=n_resamples, confidence=confidence,
                        seed=seed, vectorized=True)


def _binary_inputs(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    s = np.asarray(score, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y and score must both be (N,), got shapes {y.shape} and {s.shape}")
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1}:
        raise ValueError(f"y must hold binary labels 0/1 (or booleans), got values {sorted(labels)}")
    if not np.isfinite(s).all():
        raise ValueError(f"score has {int((~np.isfinite(s)).sum())} non-finite value(s); drop or fill them "
                         f"before computing a CI")
    return y.astype(np.int64), s


def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U with average ranks for ties; equals sklearn's roc_auc_score).

    Args:
        y: (R, N) binary labels; s: (R, N) scores.

    Returns:
        (R,) AUROC (NaN for a row with one class only).
    """
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=-1)                                  # (R, N) average ranks
    pos = y.sum(-1).astype(float)                                  # (R,)
    neg = y.shape[-1] - pos
    u = (ranks * y).sum(-1) - pos * (pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), u / (pos * neg), np.nan)


def _ap_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision of each row, as ``sklearn.metrics.average_precision_score``.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, highest first (tied scores
    form one threshold).

    Args:
        y: (R, N) binary labels; s: (R, N) scores.

    Returns:
        (R,) AP (NaN for a row without positives).
    """
    order = np.argsort(-s, axis=-1, kind="stable")                 # (R, N) highest score first
    ys = np.take_along_axis(y, order, -1).astype(float)
    ss = np.take_along_axis(s, order, -1)
    tp = np.cumsum(ys, -1)                                          # (R, N) true positives above
    rank = np.arange(1, y.shape[-1] + 1, dtype=float)               # (N,) predicted positives
    end = np.ones_like(ys, dtype=bool)                              # last position of each tie group
    end[:, :-1] = ss[:, 1:] != ss[:, :-1]
    tp_end = np.where(end, tp, 0.0)
    prev = np.zeros_like(tp)
    prev[:, 1:] = np.maximum.accumulate(tp_end, -1)[:, :-1]         # tp at the previous threshold
    pos = tp[:, -1]                                                 # (R,)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (np.where(end, (tp - prev) * tp / rank, 0.0)).sum(-1) / pos
    return np.where(pos > 0, ap, np.nan)


def auroc_ci(y: Any, score: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> CI:
    """Bootstrap CI of the area under the ROC curve, resampled within positives and negatives.

    Stratified by ``y``, so every resample has as many positives and negatives as the data and the
    AUROC is always defined. The estimate is ``sklearn.metrics.roc_auc_score``; resamples use the
    equivalent Mann-Whitney form, vectorised (ties count one half, as in sklearn; tested equal).

    Args:
        y: (N,) binary labels (0/1 or bool).
        score: (N,) finite scores, higher = more likely positive.
        n_resamples: number of resamples.
        confidence: nominal coverage.
        seed: seed of the resampling.

    Returns:
        A :class:`CI`; estimate and bounds are NaN when ``y`` has only one class.

    Raises:
        ValueError: shapes differ, labels not binary, or non-finite scores.
    """
    from sklearn.metrics import roc_auc_score

    return _stratified_ci("AUROC", roc_auc_score, _auroc_rows, y, score, n_resamples, confidence, seed)


def _stratified_ci(name: str, metric: Callable, rows: Callable, y: Any, score: Any, n_resamples: int,
                   confidence: float, seed: int) -> CI:
    """A label-stratified CI of a ranking metric: ``metric(y, s)`` (sklearn) as the estimate, ``rows`` its
    vectorised form over resamples; NaN when ``y`` has one class."""
    y, s = _binary_inputs(y, score)
    if len(np.unique(y)) < 2:
        logger.info("%s CI: only one class among %d labels; %s undefined", name, len(y), name)
        return CI(float("nan"), float("nan"), float("nan"), len(y), int(n_resamples), float(confidence), 0)
    ci = bootstrap_ci(rows, y, s, n_resamples=n_resamples, confidence=confidence, seed=seed,
                      strata=y, vectorized=True)
    return CI(float(metric(y, s)), ci.low, ci.high, ci.n, ci.n_resamples, ci.confidence, ci.n_valid)


def ap_ci(y: Any, score: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> CI:
    """Bootstrap CI of average precision (``sklearn.metrics.average_precision_score``), stratified by ``y``.

    Stratified as :func:`auroc_ci`. The estimate is sklearn's; resamples use the same step-wise sum,
    vectorised over resamples (tied scores form one threshold, as in sklearn; tested equal).

    Args:
        y: (N,) binary labels (0/1 or bool).
        score: (N,) finite scores, higher = more likely positive.
        n_resamples: number of resamples.
        confidence: nominal coverage.
        seed: seed of the resampling.

    Returns:
        A :class:`CI`; estimate and bounds are NaN when ``y`` has only one class.

    Raises:
        ValueError: shapes differ, labels not binary, or non-finite scores.
    """
    from sklearn.metrics import average_precision_score

    return _stratified_ci("AP", average_precision_score, _ap_rows, y, score, n_resamples, confidence, seed)
