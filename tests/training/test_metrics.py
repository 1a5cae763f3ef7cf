"""Per-class metrics against hand-computed values and sklearn; thresholds maximise F1 where a class has
enough validation positives, and are NaN (no threshold, no F1 / MCC) where it has not."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef

from training.metrics import (MIN_VAL_POSITIVES, choose_thresholds, classification_metrics, positive_counts,
                              summarize, threshold_reason, thresholds_from_json, thresholds_to_json)


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
    y[:, 2] = 0  # no positives -> no threshold (never a 0.5 stand-in)
    thr = choose_thresholds(y, p)
    assert positive_counts(y)[:2].min() >= MIN_VAL_POSITIVES and math.isnan(thr[2])
    best = classification_metrics(y, p, thr)["f1"].to_numpy()
    for j in range(2):
        grid = [f1_score(y[:, j], (p[:, j] >= t).astype(int)) for t in np.unique(p[:, j])]
        assert best[j] == pytest.approx(max(grid))


def test_min_positives_boundary_four_versus_five():
    """Known answer: 4 positives get no threshold at min_positives=5, 5 positives get the max-F1 one."""
    neg = [0.1, 0.2, 0.3, 0.4, 0.5]
    y4 = np.array([1, 1, 1, 1] + [0] * 5, dtype=float)
    p4 = np.array([0.9, 0.8, 0.7, 0.6] + neg)
    y5 = np.array([1, 1, 1, 1, 1] + [0] * 5, dtype=float)
    p5 = np.array([0.95, 0.9, 0.8, 0.7, 0.6] + neg)
    assert math.isnan(choose_thresholds(y4, p4, min_positives=5)[0])
    assert choose_thresholds(y4, p4, min_positives=4)[0] == pytest.approx(0.6)  # separable: lowest positive
    assert choose_thresholds(y5, p5, min_positives=5)[0] == pytest.approx(0.6)
    assert MIN_VAL_POSITIVES == 5 and math.isnan(choose_thresholds(y4, p4)[0])  # the default is 5


def test_one_positive_gets_no_threshold_not_one_fitted_below_it():
    """The demo's Hernia: one validation positive at 0.016 used to give the threshold 0.016, so a normal
    image at 0.029 was called positive. Now: no threshold, and no F1 / MCC for the class."""
    rng = np.random.default_rng(0)
    p = np.column_stack([rng.random(150) * 0.05, rng.random(150)])
    y = np.zeros((150, 2))
    y[0, 0], p[0, 0] = 1, 0.016
    y[:30, 1] = 1
    thr = choose_thresholds(y, p)
    assert math.isnan(thr[0]) and np.isfinite(thr[1])
    assert positive_counts(y).tolist() == [1, 30]
    t = classification_metrics(y, p, thr, ["Hernia", "Effusion"])
    assert math.isnan(t.loc["Hernia", "f1"]) and math.isnan(t.loc["Hernia", "mcc"])
    assert math.isnan(t.loc["Hernia", "threshold"]) and np.isfinite(t.loc["Effusion", "f1"])
    assert np.isfinite(t.loc["Hernia", "auroc"])  # ranking metrics do not need a threshold
    assert summarize(t)["f1_mean"] == pytest.approx(t.loc["Effusion", "f1"])  # NaN skipped, not counted as 0
    # None (JSON null) is accepted as "no threshold" too
    t2 = classification_metrics(y, p, [None, float(thr[1])], ["Hernia", "Effusion"])
    assert math.isnan(t2.loc["Hernia", "f1"]) and t2.loc["Effusion", "f1"] == t.loc["Effusion", "f1"]


def test_nan_labels_are_not_positives():
    """Unknown labels count neither as positives nor negatives: 6 labels of which 2 NaN -> 4 known positives."""
    y = np.array([1, 1, 1, 1, np.nan, np.nan, 0, 0, 0, 0], dtype=float)
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.05, 0.01, 0.1, 0.2, 0.3, 0.4])
    assert positive_counts(y).tolist() == [4]
    assert math.isnan(choose_thresholds(y, p, min_positives=5)[0])
    y[4] = 1  # the fifth positive becomes known (at p = 0.05: the max-F1 threshold moves up to 0.6)
    thr = choose_thresholds(y, p, min_positives=5)
    assert thr[0] == pytest.approx(0.6)


def test_min_positives_is_validated():
    y, p = np.ones((3, 1)), np.full((3, 1), 0.5)
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(ValueError, match="min_positives must be an integer >= 1"):
            choose_thresholds(y, p, min_positives=bad)


def test_threshold_json_and_reason():
    values = [0.25, float("nan"), 0.5]
    as_json = thresholds_to_json(values)
    assert as_json == [0.25, None, 0.5]
    import json

    assert json.loads(json.dumps(as_json, allow_nan=False)) == [0.25, None, 0.5]
    back = thresholds_from_json(as_json)
    assert back[0] == 0.25 and math.isnan(back[1]) and back[2] == 0.5
    assert threshold_reason(1, 5) == "no reliable threshold: 1 validation positive (< 5)"
    assert threshold_reason(0, 5) == "no reliable threshold: 0 validation positives (< 5)"
    assert threshold_reason(None, None) == "no reliable threshold: too few validation positives"
