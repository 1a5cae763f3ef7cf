"""Out-of-distribution score of an image against the feature statistics of the audited probing set.

Method: the squared **Mahalanobis distance** of an image's globally average-pooled feature-layer
activations (the GAP vector the linear head sees) to the probing set's mean, under a **Ledoit-Wolf
shrinkage** covariance (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018, eq. 2, with one class-agnostic Gaussian instead of
one per class; Ledoit & Wolf, J. Multivariate Anal. 2004, shrinkage towards ``mu * I``)::

    score(x) = (f(x) - mean)^T  Sigma_LW^-1  (f(x) - mean)        f(x) = GAP of the feature maps, (K,)

Why this method: it needs only what every request already computes (the served model returns the
feature maps; their GAP is what the head uses), it costs one (K,) x (K, K) product per image, and it
has no parameter to tune. Shrinkage keeps the covariance invertible and well conditioned when the
probing set is small against K (40 images, K = 512): the estimate moves towards a scaled identity
as much as the data warrant. Per-class Gaussians (Lee et al.'s original) are not used: the audit's
classes are multi-label and rare, so class-conditional means would rest on a handful of images.

The threshold is calibrated the split-conformal way: the probing set is split at random (``seed``);
one part fits the mean and covariance, the other (``calibration_fraction``) is scored, and the
threshold is the ``k``-th smallest calibration score with ``k = ceil((n + 1) (1 - a))`` (the
finite-sample-corrected ``1 - a`` quantile, ``n`` calibration images, ``a`` the target false-alarm
rate). For a new in-distribution image exchangeable with the calibration images,
``P(score > threshold) <= a`` (Vovk et al. 2005; Angelopoulos & Bates 2021, sec. 1). This bound is
marginal over the draw of the calibration set: the false-alarm rate of one calibrated detector is
Beta(n + 1 - k, k) distributed around it (100 calibration images at a = 5%: sd ~ 2 points, so one
detector in six is above 6.5%). ``confidence=c`` instead picks the rank that keeps the rate <= a with
probability >= c over the calibration draw (training-conditional, Vovk 2012), at the price of a higher
threshold and more calibration images (45 for a = 5%, c = 0.9). When no rank works (fewer than
``ceil(1 / a) - 1`` calibration images, 19 for a = 5%, in the marginal case) the threshold is the
largest calibration score, ``calibrated`` is ``False`` and :meth:`FeatureOOD.to_dict` says so.
Pass ``groups`` (patient ids) when a patient has several images, so that no calibration image has a
twin among the fitting images (it would score lower than a new patient's image).

No pixel-statistics component: blank (all-0, all-1, grey) images, natural photos and a CT slice all
score far above the threshold on the GAP features alone, for a trained and for an untrained
classifier (``benchmarks/ood_calibration.py``).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ood = fit_ood(rng.normal(size=(200, 8)), layer="features.layer4")
    >>> ood.flags(np.vstack([rng.normal(size=(1, 8)), np.full((1, 8), 6.0)])).tolist()
    [False, True]
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FeatureOOD", "fit_ood", "pooled_features", "ledoit_wolf", "conformal_rank", "conformal_threshold",
           "min_calibration", "METHOD", "FORMAT"]

METHOD = "mahalanobis (Ledoit-Wolf shrinkage) on GAP features"
FORMAT = "cxr-ood/1"
MIN_FIT = 2  # images needed to estimate a mean and a (shrunk) covariance
_EIG_FLOOR = 1e-9  # eigenvalues of the shrunk covariance are floored at this fraction of its mean eigenvalue


# ---------------------------------------------------------------------------------- helpers
def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device (torch imported only then)
        from interpret.devices import to_numpy

        x = to_numpy(x.float())
    return np.asarray(x, dtype=np.float64)


def _check_finite(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (NaN or inf) in rows "
                         f"{rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}")


def pooled_features(feats: Any) -> np.ndarray:
    """Global average pooling of feature maps, as the model's head and the service do.

    Args:
        feats: (N, K, h, w) feature maps (numpy or torch), e.g. the second output of
            :func:`interpret.audit.sections.infer` or of the served model; (N, K) is returned as is.

    Returns:
        (N, K) float64 spatial means.

    Raises:
        ValueError: ``feats`` is neither 2-D nor 4-D, or has non-finite values.
    """
    x = _as_array(feats, "feats")
    if x.ndim == 4:
        x = x.mean(axis=(2, 3))  # (N, K, h, w) -> (N, K)
    elif x.ndim != 2:
        raise ValueError(f"feats must be (N, K, h, w) maps or (N, K) pooled features, got shape {x.shape}")
    _check_finite(x, "feats")
    return x


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage of samples ``x`` (N, K).

    ``Sigma = (1 - s) S + s mu I`` with ``S`` the maximum-likelihood covariance (divided by N),
    ``mu = tr(S) / K`` and ``s`` the Ledoit-Wolf (2004) estimate of the optimal shrinkage (the
    formula of ``sklearn.covariance.ledoit_wolf``, tested equal).

    Returns:
        ``(mean (K,), covariance (K, K), shrinkage)``.
    """
    n, p = x.shape
    mean = x.mean(axis=0)
    xc = x - mean  # (N, K)
    emp = xc.T @ xc / n  # (K, K)
    mu = float(np.trace(emp)) / p
    x2 = np.square(xc, out=xc)  # xc is not needed any more: one (N, K) float64 fewer at the peak
    beta_ = float((x2.T @ x2).sum())
    delta_ = float((emp ** 2).sum())  # ||X^T X / n||_F^2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(emp)) + p * mu ** 2) / p
    beta = min(beta, delta)
    s = 0.0 if beta == 0 else beta / delta
    cov = (1.0 - s) * emp
    cov[np.diag_indices(p)] += s * mu
    return mean, cov, float(s)


def conformal_rank(n: int, target_false_alarm: float, confidence: float | None = None) -> int:
    """Rank ``k`` (1-based) of the calibration score used as threshold; ``n + 1`` when none works.

    - ``confidence=None`` (marginal, split-conformal): ``k = ceil((n + 1)(1 - a))``, so that
      ``P(score_new > s_(k)) <= a`` over the draw of calibration set and new image.
    - ``confidence=c`` (training-conditional): the smallest ``k`` with
      ``P(Binomial(n, 1 - a) >= k) <= 1 - c``: with probability >= c over the calibration draw, the
      false-alarm rate of the calibrated threshold is <= a (Vovk 2012, "Conditional validity of
      inductive conformal predictors", prop. 2a; the rate of ``s_(k)`` is Beta(n + 1 - k, k)).

    Raises:
        ValueError: ``n < 1`` or ``a`` / ``confidence`` outside (0, 1).
    """
    a = float(target_false_alarm)
    if not 0.0 < a < 1.0:
        raise ValueError(f"target_false_alarm must be in (0, 1), got {target_false_alarm!r}")
    if int(n) < 1:
        raise ValueError(f"need at least one calibration score, got n={n!r}")
    n = int(n)
    if confidence is None:
        # tolerance: (19 + 1) * 0.95 is 19.000000000000004 in floating point, and must give 19
        return math.ceil((n + 1) * (1.0 - a) - 1e-9)
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1) or None, got {confidence!r}")
    from scipy.stats import binom

    tail = binom.sf(np.arange(n + 1) - 1, n, 1.0 - a)  # tail[k] = P(Bin >= k), k = 0..n
    ok = np.nonzero(tail <= 1.0 - c)[0]
    return int(ok[0]) if ok.size else n + 1


def conformal_threshold(scores: np.ndarray, target_false_alarm: float,
                        confidence: float | None = None) -> tuple[float, bool]:
    """Threshold at the :func:`conformal_rank` ``k``: the ``k``-th smallest calibration score.

    Args:
        scores: (n,) calibration scores of in-distribution images.
        target_false_alarm: ``a`` in (0, 1).
        confidence: None for the marginal guarantee, or ``c`` in (0, 1) (see :func:`conformal_rank`).

    Returns:
        ``(threshold, calibrated)``; when ``k > n`` (too few scores for the guarantee) the threshold is
        ``max(scores)`` and ``calibrated`` is False.

    Raises:
        ValueError: empty or non-finite ``scores``, or ``a`` / ``confidence`` out of range.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("no calibration scores")
    _check_finite(s[None], "scores")
    k = conformal_rank(s.size, target_false_alarm, confidence)
    if k > s.size:
        return float(s[-1]), False
    return float(s[max(k, 1) - 1]), True


def min_calibration(target_false_alarm: float, confidence: float | None = None) -> int:
    """Fewest calibration images for which :func:`conformal_rank` is <= n (19 for a = 5%, 45 with c = 0.9)."""
    a = float(target_false_alarm)
    if confidence is None:
        return max(1, math.ceil(1.0 / a - 1e-9) - 1)
    return max(1, math.ceil(math.log(1.0 - float(confidence)) / math.log(1.0 - a) - 1e-9))


# ---------------------------------------------------------------------------------- the detector
@dataclass
class FeatureOOD:
    """A fitted, calibrated OOD detector on pooled features of one layer (build with :func:`fit_ood`).

    Attributes:
        layer: dotted name of the layer whose GAP features it models.
        mean: (K,) mean pooled feature of the fitting images.
        whitening: (K, K) ``W`` with ``W W^T = Sigma_LW^-1``: ``score = ||(f - mean) W||^2``.
        threshold: scores above it are flagged.
        target_false_alarm: the rate ``a`` the threshold was calibrated for.
        n_fit: images that fitted mean and covariance.
        n_calibration: images that calibrated the threshold.
        calibration_false_alarm: share of calibration scores above the threshold (in-sample, <= a
            by construction; the held-out rate is what a benchmark measures).
        calibrated: False when there were too few calibration images for the conformal quantile.
        confidence: None when the threshold carries the marginal guarantee, else ``c``: with probability
            >= c over the calibration draw the false-alarm rate is <= ``target_false_alarm``.
        shrinkage: the Ledoit-Wolf shrinkage ``s`` in [0, 1].
        calibration_scores: (n_calibration,) sorted calibration scores (for conformal p-values).
        method: a description of the method.
        seed: seed of the fit / calibration split.
        info: JSON-able extra metadata (e.g. the model fingerprint or image size the caller checks).
    """

    layer: str
    mean: np.ndarray
    whitening: np.ndarray
    threshold: float
    target_false_alarm: float
    n_fit: int
    n_calibration: int
    calibration_false_alarm: float
    calibrated: bool = True
    confidence: float | None = None
    shrinkage: float = 0.0
    calibration_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    method: str = METHOD
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def precision(self) -> np.ndarray:
        """(K, K) inverse of the shrunk covariance (``W W^T``)."""
        return self.whitening @ self.whitening.T

    def _pooled(self, pooled: Any) -> np.ndarray:
        x = _as_array(pooled, "pooled")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"pooled must be (N, {self.num_features}) GAP features of layer {self.layer!r} "
                             f"(or one (K,) vector), got shape {x.shape}")
        _check_finite(x, "pooled")
        return x

    def score(self, pooled: Any) -> np.ndarray:
        """Squared Mahalanobis distance of each image's pooled features.

        Args:
            pooled: (N, K) GAP features (numpy or torch), or one (K,) vector; see :func:`pooled_features`.

        Returns:
            (N,) float64 scores (>= 0; higher = further from the probing set).

        Raises:
            ValueError: wrong K, not 1-/2-D, or non-finite values.
        """
        z = (self._pooled(pooled) - self.mean) @ self.whitening  # (N, K) whitened
        return np.einsum("nk,nk->n", z, z)

    def flags(self, pooled: Any) -> np.ndarray:
        """(N,) bool: score above the calibrated threshold."""
        return self.score(pooled) > self.threshold

    def p_value(self, pooled: Any) -> np.ndarray:
        """(N,) conformal p-values ``(1 + #{calibration scores >= s}) / (n + 1)``; small = unusual."""
        s = self.score(pooled)
        cal = np.sort(self.calibration_scores)
        n_ge = cal.size - np.searchsorted(cal, s, side="left")
        return (1.0 + n_ge) / (cal.size + 1.0)

    def to_dict(self) -> dict[str, Any]:
        """Small JSON summary (no matrices)."""
        n, a, c = self.n_calibration, self.target_false_alarm, self.confidence
        k = conformal_rank(n, a, c)
        out = {"method": self.method, "layer": self.layer, "num_features": self.num_features,
               "threshold": self.threshold, "target_false_alarm": a, "confidence": c,
               "n_fit": self.n_fit, "n_calibration": n, "calibration_false_alarm": self.calibration_false_alarm,
               "calibrated": self.calibrated, "shrinkage": self.shrinkage, "seed": self.seed,
               "score": "squared Mahalanobis distance of the GAP feature vector; flagged when above threshold"}
        if not self.calibrated:
            out["threshold_rule"] = (f"NOT calibrated: {n} calibration images < {min_calibration(a, c)} needed for "
                                     f"a = {a:g}{'' if c is None else f' at confidence {c:g}'}; threshold = largest "
                                     f"calibration score; false-alarm rate not guaranteed (about 1/(n + 1) = "
                                     f"{1 / (n + 1):.3f} on average)")
        elif c is None:
            out["threshold_rule"] = (f"split-conformal: {k}-th smallest of {n} calibration scores "
                                     f"(k = ceil((n + 1)(1 - a))); P(false alarm) <= a on average over calibration "
                                     "sets, for in-distribution images exchangeable with the calibration images")
        else:
            out["threshold_rule"] = (f"training-conditional conformal: {k}-th smallest of {n} calibration scores "
                                     f"(smallest k with P(Binomial(n, 1 - a) >= k) <= 1 - c); with probability "
                                     f">= {c:g} the false-alarm rate is <= a")
        if self.info:
            out["info"] = self.info
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` (arrays + a JSON metadata string; loadable without pickle)."""
        path = Path(path)
        meta = {"format": FORMAT, "layer": self.layer, "threshold": self.threshold,
                "target_false_alarm": self.target_false_alarm, "n_fit": self.n_fit,
                "n_calibration": self.n_calibration, "calibration_false_alarm": self.calibration_false_alarm,
                "calibrated": self.calibrated, "confidence": self.confidence, "shrinkage": self.shrinkage,
                "method": self.method,
                "seed": self.seed, "info": self.info}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # a file object: numpy does not append ".npz" to the name
            np.savez(fh, mean=self.mean, whitening=self.whitening,
                     calibration_scores=self.calibration_scores, meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureOOD":
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: not such a file (missing arrays, another format) or inconsistent shapes.
        """
        with np.load(Path(path), allow_pickle=False) as z:
            missing = {"mean", "whitening", "calibration_scores", "meta"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not an OOD detector file: missing {sorted(missing)}")
            meta = json.loads(str(z["meta"][()]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
            mean, whitening, cal = z["mean"], z["whitening"], z["calibration_scores"]
        k = mean.shape[0]
        if mean.ndim != 1 or whitening.shape != (k, k):
            raise ValueError(f"{path}: mean {mean.shape} and whitening {whitening.shape} do not match")
        meta.pop("format")
        return cls(mean=mean, whitening=whitening, calibration_scores=cal, **meta)


# ---------------------------------------------------------------------------------- fitting
def _split(n: int, n_cal: int, groups: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(calibration, fitting)`` indices: a random permutation of images, or of whole groups taken for
    calibration until they hold at least ``n_cal`` images (at least ``MIN_FIT`` left to fit)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        return np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    g = np.asarray(groups.tolist() if hasattr(groups, "tolist") else list(groups), dtype=object)
    if g.shape != (n,):
        raise ValueError(f"groups must hold one label per image ({n}), got shape {g.shape}")
    _, inverse = np.unique(g.astype(str), return_inverse=True)
    order = rng.permutation(inverse.max() + 1)  # groups in random order
    sizes = np.bincount(inverse)[order]
    before = np.cumsum(sizes) - sizes  # images in the groups drawn before each one
    cal_groups = order[before < n_cal]
    cal = np.isin(inverse, cal_groups)
    if (~cal).sum() < MIN_FIT or not cal.any():
        raise ValueError(f"groups leave {int((~cal).sum())} fitting and {int(cal.sum())} calibration images; "
                         f"need >= {MIN_FIT} and >= 1 ({inverse.max() + 1} groups over {n} images)")
    return np.nonzero(cal)[0], np.nonzero(~cal)[0]


def fit_ood(pooled: Any, *, layer: str, target_false_alarm: float = 0.05, calibration_fraction: float = 0.5,
            seed: int = 0, groups: Any = None, confidence: float | None = None,
            info: dict[str, Any] | None = None) -> FeatureOOD:
    """Fit mean and Ledoit-Wolf covariance on one part of a probing set, calibrate on the other.

    Args:
        pooled: (N, K) GAP features of the in-distribution probing images (numpy or torch; (N, K, h, w)
            maps are pooled first).
        layer: dotted name of the layer the features come from (recorded; the caller checks it).
        target_false_alarm: ``a`` in (0, 1), the false-alarm rate on in-distribution images.
        calibration_fraction: share of the N images (in (0, 1)) that calibrates the threshold; the
            rest fits the mean and covariance. At least 2 fitting and 1 calibration image.
        seed: seed of the random split.
        groups: (N,) group labels (e.g. patient ids): every group goes wholly to the fitting or to the
            calibration part. Pass them whenever one patient has several images: a calibration image
            whose twin was fitted scores lower than a new patient's image would, and the threshold
            comes out too low.
        confidence: None (default): the threshold's false-alarm rate is <= a on average over
            calibration sets (split conformal). ``c`` in (0, 1): <= a with probability >= c
            (training-conditional; needs more calibration images, :func:`min_calibration`, and gives a
            higher threshold).
        info: JSON-able metadata stored with the detector.

    Returns:
        A :class:`FeatureOOD`.

    Raises:
        ValueError: bad shape, non-finite values, too few images for the split, ``a`` or
            ``calibration_fraction`` out of range, or features without any variance.

    Warns:
        UserWarning: too few calibration images for a conformal threshold (``calibrated=False``).
    """
    if isinstance(pooled, np.ndarray) and pooled.ndim == 2 and pooled.dtype in (np.float32, np.float64):
        # (N, K) as given (the audit's float32 GAP features): only the two halves are made float64 below, the
        # same values (float32 -> float64 is exact) without a whole (N, K) float64 copy at the audit's peak
        x = pooled
        _check_finite(x, "feats")
    else:
        x = pooled_features(pooled)  # (N, K) float64
    n, k = x.shape
    if not 0.0 < float(target_false_alarm) < 1.0:
        raise ValueError(f"target_false_alarm must be in (0, 1), got {target_false_alarm!r}")
    if not 0.0 < float(calibration_fraction) < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    if n < MIN_FIT + 1 or k < 1:
        raise ValueError(f"need at least {MIN_FIT + 1} images with K >= 1 features to fit and calibrate, "
                         f"got pooled of shape {x.shape}")
    conformal_rank(1, target_false_alarm, confidence)  # validates confidence before any work
    n_cal = int(round(n * float(calibration_fraction)))
    n_cal = min(max(n_cal, 1), n - MIN_FIT)
    if info is not None:
        json.dumps(info)  # fails early (TypeError) on something the artifact could not store
    cal_idx, fit_idx = _split(n, n_cal, groups, seed)
    x_fit, x_cal = x[fit_idx].astype(np.float64, copy=False), x[cal_idx].astype(np.float64, copy=False)
    del x  # the two halves only: the audit's peak memory held x, its fitting half and two more (N/2, K) copies

    n_cal = len(cal_idx)
    mean, cov, shrink = ledoit_wolf(x_fit)
    del x_fit
    evals, evecs = np.linalg.eigh(cov)  # cov = V diag(l) V^T
    mu = float(np.trace(cov)) / k
    if not mu > 0:
        raise ValueError(f"the {len(fit_idx)} fitting images have identical pooled features (zero variance); "
                         "cannot model their distribution")
    evals = np.maximum(evals, _EIG_FLOOR * mu)
    whitening = evecs / np.sqrt(evals)  # (K, K): W W^T = V diag(1/l) V^T

    det = FeatureOOD(layer=str(layer), mean=mean, whitening=whitening, threshold=math.inf,
                     target_false_alarm=float(target_false_alarm), n_fit=int(len(fit_idx)),
                     n_calibration=int(n_cal), calibration_false_alarm=0.0, shrinkage=shrink,
                     confidence=None if confidence is None else float(confidence),
                     seed=int(seed), info=dict(info or {}))
    cal_scores = np.sort(det.score(x_cal))
    threshold, calibrated = conformal_threshold(cal_scores, target_false_alarm, confidence)
    det.threshold, det.calibrated, det.calibration_scores = threshold, calibrated, cal_scores
    det.calibration_false_alarm = float((cal_scores > threshold).mean())
    if not calibrated:
        need = min_calibration(target_false_alarm, confidence)
        warnings.warn(f"fit_ood: {n_cal} calibration images are fewer than the {need} a conformal threshold "
                      f"at target_false_alarm={target_false_alarm:g}, confidence={confidence} needs; the "
                      "threshold is the largest "
                      "calibration score and the false-alarm rate is not guaranteed (calibrated=False)",
                      stacklevel=2)
    logger.info("ood: fitted on %d, calibrated on %d images, K=%d, shrinkage %.3f, threshold %.4g",
                len(fit_idx), n_cal, k, shrink, threshold)
    return det
