"""interpret.ood: Mahalanobis (Ledoit-Wolf) OOD score, conformal threshold, artifact, and an end-to-end
check on a phantom-trained classifier (held-out false alarms, foreign images flagged)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from interpret.ood import (FeatureOOD, _split, conformal_rank, conformal_threshold, fit_ood, ledoit_wolf,
                           min_calibration, pooled_features)

ROOT = Path(__file__).resolve().parents[2]


def _gauss(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, k))
    return rng.normal(size=(n, k)) @ a + rng.normal(size=k)  # correlated, shifted


# ---------------------------------------------------------------------------------- the score
@pytest.mark.parametrize("n,k", [(200, 6), (20, 50)])
def test_ledoit_wolf_equals_sklearn(n, k):
    from sklearn.covariance import ledoit_wolf as sk_lw

    x = _gauss(n, k)
    mean, cov, s = ledoit_wolf(x)
    ref_cov, ref_s = sk_lw(x - x.mean(0), assume_centered=True)
    np.testing.assert_allclose(mean, x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s, ref_s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-10)


def test_score_equals_direct_mahalanobis():
    x = _gauss(300, 5)
    det = fit_ood(x, layer="f", seed=3)
    cal, fit = _split(300, 150, None, 3)
    from sklearn.covariance import ledoit_wolf as sk_lw

    mu = x[fit].mean(0)
    prec = np.linalg.inv(sk_lw(x[fit])[0])
    y = _gauss(7, 5, seed=1)
    direct = np.array([(v - mu) @ prec @ (v - mu) for v in y])  # eq. 2 of Lee et al. 2018, squared
    np.testing.assert_allclose(det.score(y), direct, rtol=1e-9)
    np.testing.assert_allclose(det.precision, prec, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(det.score(torch.from_numpy(y).float()), direct, rtol=1e-5)  # torch input
    assert det.score(y[0]).shape == (1,)  # one (K,) vector
    np.testing.assert_allclose(np.sort(det.score(x[cal])), det.calibration_scores)


def test_pooled_features_is_gap():
    f = torch.rand(3, 4, 5, 6)
    np.testing.assert_allclose(pooled_features(f), f.double().mean((2, 3)).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(pooled_features(np.ones((2, 4))), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        pooled_features(np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------------- the threshold
@pytest.mark.parametrize("n,expected", [(19, 19), (20, 20), (39, 38), (100, 96), (999, 950)])
def test_conformal_quantile_on_known_scores(n, expected):
    scores = np.random.default_rng(0).permutation(np.arange(1.0, n + 1))  # the k-th smallest is k
    assert conformal_rank(n, 0.05) == math.ceil((n + 1) * 0.95 - 1e-9) == expected
    thr, calibrated = conformal_threshold(scores, 0.05)
    assert (thr, calibrated) == (float(expected), True)


def test_too_few_calibration_scores_is_not_calibrated():
    thr, calibrated = conformal_threshold(np.arange(1.0, 19), 0.05)  # 18 < 19 needed
    assert (thr, calibrated) == (18.0, False)
    assert min_calibration(0.05) == 19 and min_calibration(0.05, 0.9) == 45
    assert conformal_rank(44, 0.05, 0.9) == 45 and conformal_rank(45, 0.05, 0.9) == 45


def test_conformal_guarantees_by_simulation():
    """Uniform scores: the false-alarm rate of the k-th smallest is 1 - s_(k). Marginal rule: mean <= a;
    conditional rule (c = 0.9): P(rate > a) <= 0.1."""
    rng = np.random.default_rng(0)
    n, a = 100, 0.05
    u = np.sort(rng.random((4000, n)), axis=1)
    marginal = 1 - u[:, conformal_rank(n, a) - 1]
    conditional = 1 - u[:, conformal_rank(n, a, 0.9) - 1]
    assert marginal.mean() <= a + 3 * marginal.std() / np.sqrt(len(marginal))
    assert abs(marginal.mean() - (1 - 96 / 101)) < 0.002  # E = 1 - k / (n + 1) exactly
    assert (conditional > a).mean() <= 0.1 + 0.015


# ---------------------------------------------------------------------------------- small sets, splits
def test_small_probing_set_with_many_features():
    x = np.abs(_gauss(40, 512, seed=2))  # 40 images, K = 512 (ReLU-like)
    det = fit_ood(x, layer="features.layer4")
    assert (det.n_fit, det.n_calibration, det.calibrated) == (20, 20, True)
    assert 0 < det.shrinkage <= 1 and np.isfinite(det.threshold)
    assert det.flags(np.full((1, 512), x.max() * 3)).all()
    with pytest.warns(UserWarning, match="fewer than the 19"):
        small = fit_ood(x[:30], layer="features.layer4")
    assert small.calibrated is False and small.threshold == small.calibration_scores.max()
    assert "NOT calibrated" in small.to_dict()["threshold_rule"]


def test_groups_stay_on_one_side():
    groups = np.repeat(np.arange(25), 2)  # patients with two images each
    cal, fit = _split(50, 25, groups, seed=1)
    assert set(groups[cal]).isdisjoint(groups[fit]) and len(cal) + len(fit) == 50
    det = fit_ood(_gauss(50, 4), layer="f", groups=[f"p{g}" for g in groups])
    assert det.n_fit + det.n_calibration == 50


@pytest.mark.parametrize("kwargs,match", [
    ({"pooled": np.zeros((2, 3))}, r"shape \(2, 3\)"),
    ({"pooled": np.zeros((5, 3, 2))}, r"\(5, 3, 2\)"),
    ({"pooled": np.where(np.eye(6, 3) > 0, np.nan, 1.0)}, "3 non-finite"),
    ({"target_false_alarm": 1.5}, "1.5"),
    ({"calibration_fraction": 0.0}, "0.0"),
    ({"groups": [1, 2]}, r"\(2,\)"),
    ({"confidence": 2.0}, "2.0"),
    ({"pooled": np.ones((6, 3))}, "zero variance"),
])
def test_fit_validation(kwargs, match):
    args = {"pooled": _gauss(6, 3), "layer": "f", **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_ood(args.pop("pooled"), **args)


def test_score_validation():
    det = fit_ood(_gauss(40, 3), layer="f")
    with pytest.raises(ValueError, match=r"\(N, 3\).*shape \(2, 4\)"):
        det.score(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        det.flags(np.array([[0.0, np.inf, 0.0]]))


# ---------------------------------------------------------------------------------- the artifact
def test_save_load_round_trip_is_bit_exact(tmp_path):
    det = fit_ood(_gauss(60, 8), layer="features.layer4", confidence=None, info={"model": "abc", "size": 64})
    path = det.save(tmp_path / "ood.npz")
    with np.load(path, allow_pickle=False) as z:  # no pickled object inside
        assert sorted(z.files) == ["calibration_scores", "mean", "meta", "whitening"]
    back = FeatureOOD.load(path)
    for name in ("mean", "whitening", "calibration_scores"):
        a, b = getattr(det, name), getattr(back, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    for name in ("layer", "threshold", "target_false_alarm", "n_fit", "n_calibration", "calibration_false_alarm",
                 "calibrated", "confidence", "shrinkage", "method", "seed", "info"):
        assert getattr(det, name) == getattr(back, name), name
    y = _gauss(5, 8, seed=9)
    assert det.score(y).tobytes() == back.score(y).tobytes()
    assert json.loads(json.dumps(back.to_dict())) == det.to_dict()
    assert "whitening" not in json.dumps(det.to_dict())
    np.savez(tmp_path / "other.npz", mean=det.mean)
    with pytest.raises(ValueError, match="missing"):
        FeatureOOD.load(tmp_path / "other.npz")


def test_p_value():
    det = fit_ood(_gauss(200, 3), layer="f")
    far = np.full((1, 3), 1e6)
    assert det.p_value(far)[0] == pytest.approx(1 / (det.n_calibration + 1))
    assert det.p_value(det.mean[None])[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- end to end
def _bench():
    """benchmarks/ood_calibration.py as a module (one copy of the setup: training, phantom sets, foreign
    images through the service's input path)."""
    if "ood_calibration" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ood_calibration", ROOT / "benchmarks" / "ood_calibration.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ood_calibration"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["ood_calibration"]


@pytest.mark.slow
def test_phantom_classifier_heldout_false_alarms_and_foreign_images(deterministic):
    """A test_resnet trained 3 epochs on phantom seed 0; detector fitted and calibrated on phantom seed 1
    (200 images, split by patient, conditional rule c = 0.9); false alarms on 1000 held-out phantom images
    (seed 1000); natural photos, blank images, a CT slice and an inverted radiograph through the service's
    input path must be flagged."""
    bench = _bench()
    cfg = bench.Config(n_train=400, epochs=3, n_probe=200, n_heldout=1000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, _ = bench.train_classifier(cfg, tmp)
        probe, patients = bench.phantom_images(tmp, cfg.n_probe, cfg.image_size, seed=1)
        held, _ = bench.phantom_images(tmp, cfg.n_heldout, cfg.image_size, seed=1000)
    cases = bench.ood_cases(cfg.image_size, phantom_image=held[0, 0].numpy())
    f_probe, f_held = bench.pooled_of(model, probe), bench.pooled_of(model, held)
    f_cases = bench.pooled_of(model, torch.from_numpy(np.stack(list(cases.values()))))

    det = fit_ood(f_probe, layer=model.feature_layer, groups=patients, confidence=0.9)
    assert det.calibrated and det.n_calibration >= 90
    flags = det.flags(f_held)
    k, n = int(flags.sum()), len(flags)
    lo, hi = bench.clopper_pearson(k, n)
    assert k / n <= 0.05, (k, n, (lo, hi))
    case_flags = dict(zip(cases, det.flags(f_cases).tolist()))
    assert all(case_flags.values()), {c: float(s / det.threshold) for c, s in zip(cases, det.score(f_cases))}


def test_float32_features_fit_the_same_detector_as_float64_and_torch():
    """The audit passes float32 GAP features (split before the float64 conversion, to save memory): the
    detector is bit-identical to the one fitted from float64 or from a torch tensor; non-finite values are
    still refused."""
    import torch

    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    a = fit_ood(x, layer="l", seed=3)
    for other in (x.astype(np.float64), torch.from_numpy(x)):
        b = fit_ood(other, layer="l", seed=3)
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.whitening, b.whitening)
        assert a.threshold == b.threshold and np.array_equal(a.calibration_scores, b.calibration_scores)
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_ood(x, layer="l")
