"""interpret.stats: seeded percentile bootstrap CIs against scipy, coverage, stratification, edge cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import average_precision_score, roc_auc_score

from interpret.stats import CI, ap_ci, auroc_ci, bootstrap_ci, mean_ci, resample_indices


def test_same_seed_same_ci_and_other_seed_differs():
    x = np.random.default_rng(0).normal(size=80)
    a = bootstrap_ci(np.mean, x, seed=3)
    assert a == bootstrap_ci(np.mean, x, seed=3)
    assert a != bootstrap_ci(np.mean, x, seed=4)
    assert a.estimate == pytest.approx(x.mean())
    assert a.n == 80 and a.n_resamples == 1000 and a.n_valid == 1000 and a.method == "percentile"


def test_vectorized_path_draws_the_same_resamples_as_the_loop():
    x = np.random.default_rng(1).exponential(size=60)
    loop = bootstrap_ci(np.median, x, n_resamples=300, seed=5)
    vec = bootstrap_ci(lambda v: np.median(v, axis=-1), x, n_resamples=300, seed=5, vectorized=True)
    assert loop == vec
    assert mean_ci(x, n_resamples=300, seed=5) == bootstrap_ci(np.mean, x, n_resamples=300, seed=5)


def test_matches_scipy_percentile_bootstrap_of_the_mean():
    # Two independent Monte-Carlo estimates of the same quantiles (R = 10,000 each). The Monte-Carlo
    # standard error of a 2.5 % quantile of the mean's bootstrap distribution is ~0.027 sigma/sqrt(n),
    # i.e. ~0.003 sigma at n = 100; the tolerance 0.02 sigma is about five standard errors of the
    # difference.
    x = np.random.default_rng(2).normal(loc=1.0, scale=2.0, size=100)
    ours = mean_ci(x, n_resamples=10_000, confidence=0.95, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                        random_state=np.random.default_rng(1)).confidence_interval
    tol = 0.02 * x.std(ddof=1)
    assert abs(ours.low - ref.low) < tol
    assert abs(ours.high - ref.high) < tol


def test_coverage_of_the_mean_of_standard_normal_samples():
    # 200 data sets of n = 50 from N(0, 1): the 95 % percentile interval should cover the true mean 0
    # in about 95 % of them (binomial sd ~1.5 %; percentile intervals under-cover slightly at small n).
    rng = np.random.default_rng(123)
    hits = [mean_ci(rng.normal(size=50), n_resamples=1000, seed=k).touches(0.0) for k in range(200)]
    assert 0.90 <= np.mean(hits) <= 0.99


def test_resampling_is_joint_across_arrays():
    x = np.random.default_rng(3).normal(size=30)
    ci = bootstrap_ci(lambda a, b: float(np.mean(a - b)), x, x.copy(), n_resamples=200)
    assert (ci.low, ci.high) == (0.0, 0.0)


def test_stratified_resamples_keep_strata_sizes():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # 2 positives of 20
    for block in resample_indices(len(y), 500, seed=0, strata=y):               # (r, N)
        assert (y[block].sum(1) == 2).all()
    seen = []

    def stat(yy, ss):
        seen.append((int(yy.sum()), len(yy)))
        return roc_auc_score(yy, ss)

    ci = bootstrap_ci(stat, y, np.linspace(0, 1, 20), n_resamples=200, strata=y)
    assert set(seen) == {(2, 20)} and ci.n_valid == 200
    # unstratified, many resamples miss the positives (P = 0.9^20 = 12 %) and would break AUROC
    assert any((y[b].sum(1) == 0).any() for b in resample_indices(len(y), 200, seed=0))


def test_auroc_ci_equals_sklearn_on_every_resample():
    rng = np.random.default_rng(4)
    y = (rng.random(120) < 0.2).astype(int)
    s = np.round(y + rng.normal(size=120), 1)  # ties
    ours = auroc_ci(y, s, n_resamples=300, seed=7)
    ref = bootstrap_ci(roc_auc_score, y, s, n_resamples=300, seed=7, strata=y)
    assert ours.estimate == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ours.low == pytest.approx(ref.low, abs=1e-12) and ours.high == pytest.approx(ref.high, abs=1e-12)
    assert ours.n_valid == 300 and ours.low <= ours.estimate <= ours.high


def test_ap_ci_equals_sklearn_on_every_resample():
    rng = np.random.default_rng(5)
    y = (rng.random(90) < 0.3).astype(bool)
    s = np.round(y + rng.normal(size=90), 1)  # ties
    ours = ap_ci(y, s, n_resamples=200, seed=2)
    ref = bootstrap_ci(average_precision_score, y.astype(int), s, n_resamples=200, seed=2, strata=y)
    assert ours.estimate == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert ours.low == pytest.approx(ref.low, abs=1e-12) and ours.high == pytest.approx(ref.high, abs=1e-12)


def test_degenerate_inputs_give_nan_bounds_not_errors():
    for values in ([], [2.0], [np.nan, 1.0]):
        ci = mean_ci(values)
        assert math.isnan(ci.low) and math.isnan(ci.high) and ci.n_valid == 0
    assert mean_ci([2.0]).estimate == 2.0
    one_class = auroc_ci([1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(one_class.estimate) and math.isnan(one_class.low)
    assert math.isnan(ap_ci([0, 0], [0.1, 0.2]).high)
    always_nan = bootstrap_ci(lambda v: float("nan"), np.arange(5.0), n_resamples=50)
    assert always_nan.n_valid == 0 and math.isnan(always_nan.low)
    d = always_nan.to_dict()
    assert d["low"] is None and d["high"] is None and d["estimate"] is None
    json.dumps(d)
    assert not always_nan.touches(0.0)


def test_nan_resamples_are_dropped_and_counted():
    x = np.arange(10.0)

    def stat(v):  # undefined when the resample misses the largest value
        return float(v.mean()) if v.max() == 9.0 else float("nan")

    ci = bootstrap_ci(stat, x, n_resamples=400, seed=1)
    expected = sum(int((x[b] == 9.0).any(1).sum()) for b in resample_indices(10, 400, seed=1))
    assert ci.n_valid == expected and 0 < expected < 400  # P(miss) = 0.9^10 = 35 %
    assert ci.to_dict()["n_valid"] == expected


def test_ci_to_dict_and_touches():
    ci = CI(0.5, 0.4, 0.6, 10, 100, 0.95, 100)
    assert ci.to_dict() == {"estimate": 0.5, "low": 0.4, "high": 0.6, "n": 10, "n_resamples": 100,
                            "confidence": 0.95, "n_valid": 100, "method": "percentile"}
    assert ci.touches(0.4) and ci.touches(0.6) and not ci.touches(0.61)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_resamples": 0}, "n_resamples"),
    ({"confidence": 1.0}, "confidence"),
    ({"strata": [0, 1]}, "strata"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(np.mean, np.arange(5.0), **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"same number of rows.*\[3, 4\]"):
        bootstrap_ci(lambda a, b: 0.0, np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="binary"):
        auroc_ci([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        ap_ci([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="one value per resample"):
        bootstrap_ci(lambda v: v.mean(), np.arange(5.0), vectorized=True)
