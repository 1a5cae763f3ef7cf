"""Per-class metrics against hand-computed values and sklearn; thresholds maximise F1."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef

from training.metrics import choose_thresholds, classification_metrics, summarize


def test_hand_computed_values():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    p = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.4], [0.3, 0.6]])
    t = classification_metrics(y, p, classes=["A", "B"])
    assert t.loc["A", "auroc"] == 1.0 and t.loc["A", "f1"] == 1.0 and t.loc["A", "mcc"] == 1.0
    # B: positives {.8, .4}, negatives {.2, .6}: 3 of 4 pairs ordered -> .75
    assert t.loc["B", "auroc"] == pytest.approx(0.75)
    # B at .5: predictions [0, 1, 0, 1] vs [0, 1, 1, 0]: tp 1 fp 1 fn 1 tn 1 -> F1 .5, MCC 0
    assert t.loc["B", "f1"] == pytest.approx(0.5) and t.loc["B", "mcc"] == pytest.approx(0.0)
    # AP of B: ranking .8(+), .6(-), .4(+), .2(-) -> (1 + 2/3) / 2
    assert t.loc["B", "ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert t.loc["A", "mean_prob"] == pytest.approx(0.5) and list(t["n_pos"]) == [2, 2]


def test_agrees_with_sklearn_and_masks_nan():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(float)
    p = np.clip(y * 0.3 + rng.random((200, 4)) * 0.7, 0, 1)
    thr = np.array([0.4, 0.5, 0.6, 0.7])
    y_nan = y.copy()
    y_nan[:20, 1] = np.nan
    t = classification_metrics(y_nan, p, thr)
    for j in range(4):
        keep = ~np.isnan(y_nan[:, j])
        pred = (p[keep, j] >= thr[j]).astype(int)
        assert t.iloc[j]["f1"] == pytest.approx(f1_score(y[keep, j], pred))
        assert t.iloc[j]["mcc"] == pytest.approx(matthews_corrcoef(y[keep, j], pred))
    assert t.iloc[1]["n_pos"] + t.iloc[1]["n_neg"] == 180


def test_undefined_auroc_is_nan_and_skipped_in_means():
    y = np.array([[1, 0], [0, 0], [1, 0]], dtype=float)
    p = np.array([[0.8, 0.1], [0.2, 0.3], [0.6, 0.2]])
    t = classification_metrics(y, p)
    assert math.isnan(t.iloc[1]["auroc"]) and math.isnan(t.iloc[1]["ap"])
    assert summarize(t)["auroc_mean"] == 1.0
    with pytest.raises(ValueError, match="thresholds must have 2"):
        classification_metrics(y, p, [0.5])
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        classification_metrics(y * 2, p)


def test_choose_thresholds_maximise_f1():
    rng = np.random.default_rng(1)
    y = (rng.random((300, 3)) < 0.2).astype(float)
    p = np.clip(0.35 * y + 0.65 * rng.random((300, 3)), 0, 1)
    y[:, 2] = 0  # no positives -> default
    thr = choose_thresholds(y, p)
    assert thr[2] == 0.5
    best = classification_metrics(y, p, thr)["f1"].to_numpy()
    for j in range(2):
        grid = [f1_score(y[:, j], (p[:, j] >= t).astype(int)) for t in np.unique(p[:, j])]
        assert best[j] == pytest.approx(max(grid))
