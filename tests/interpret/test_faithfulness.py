"""Faithfulness metrics against known answers and against well-kept implementations.

- an analytic model, logit = w * mean(x over a planted square R) + b, whose curves are computable by
  hand (deletion / insertion with the zero and mean baselines);
- Quantus 0.6.0 ``PixelFlipping`` (deletion curve, "black" baseline) and pytorch-grad-cam 1.5.7's ROAD
  (``NoisyLinearImputer``, ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst``) on identical inputs;
- the blur baseline against ``scipy.ndimage.gaussian_filter``;
- batched == per-image, seeds, model modes, bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from interpret.faithfulness import (BASELINES, FAITHFULNESS_METRICS, FaithfulnessResult,
                                    baseline_images, faithfulness, gaussian_blur, noisy_linear_impute,
                                    removal_counts)

H = 16
W_EVID, BIAS = 4.0, -1.0


class SquareModel(nn.Module):
    """Two logits: ``w_k * mean(x[0] over R) + b_k``, R the square [4:12, 4:12] of a 16 x 16 image."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(H, H)
        mask[4:12, 4:12] = 1
        self.register_buffer("mask", mask)
        self.register_buffer("w", torch.tensor([W_EVID, -2.0]))
        self.register_buffer("b", torch.tensor([BIAS, 0.5]))

    def forward(self, x):
        m = (x[:, 0] * self.mask).sum((1, 2)) / self.mask.sum()            # (B,)
        return m[:, None] * self.w + self.b                                 # (B, 2)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(6, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _images(n: int, size: int = H, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 0.5 + 0.5


def _square_maps(n: int) -> torch.Tensor:
    return SquareModel().mask.expand(n, 1, H, H).clone()                    # (n, 1, H, W): 1 on R


def _distinct_maps(n: int, size: int, seed: int = 1) -> torch.Tensor:
    """Maps whose values are a permutation of 0..N-1: no ties, exact percentiles."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(size * size, generator=g).float().view(1, size, size)
                        for _ in range(n)])


# ------------------------------------------------------------------------------ known answers
def test_deletion_exact_curve_zero_baseline():
    x = _images(2)
    res = faithfulness(SquareModel(), x, 0, _square_maps(2), "deletion", steps=4, baseline="zero",
                       score="probability")
    full = torch.sigmoid(W_EVID * x[:, 0, 4:12, 4:12].mean((1, 2)) + BIAS).double().numpy()
    np.testing.assert_allclose(res.fractions, [0, .25, .5, .75, 1])
    np.testing.assert_allclose(res.curves[:, 0, 0], full, rtol=1e-6)
    # R is exactly the first quarter of the pixels in attribution order: after step 1 it is all zero.
    expected = 1 / (1 + np.exp(-BIAS))
    np.testing.assert_allclose(res.curves[:, 0, 1:], expected, rtol=1e-6)
    auc = (0.125 * (full + expected) + 0.75 * expected)                     # trapezoid by hand
    np.testing.assert_allclose(res.auc[:, 0], auc, rtol=1e-6)


def test_insertion_exact_curve_and_mean_baseline():
    x = _images(2)
    res = faithfulness(SquareModel(), x, 0, _square_maps(2), "insertion", steps=4, baseline="mean",
                       score="logit")
    mean_img = x.mean((1, 2, 3)).double().numpy()                           # per-image mean
    full = (W_EVID * x[:, 0, 4:12, 4:12].mean((1, 2)) + BIAS).double().numpy()
    np.testing.assert_allclose(res.curves[:, 0, 0], W_EVID * mean_img + BIAS, rtol=1e-5)
    np.testing.assert_allclose(res.curves[:, 0, 1:], np.repeat(full[:, None], 4, 1), rtol=1e-5)


@pytest.mark.parametrize("metric", ["deletion", "insertion"])
def test_evidence_map_beats_random_and_complement_loses(metric):
    x = _images(3)
    model = SquareModel()
    kw = dict(steps=8, baseline="zero", score="logit", random_repeats=16)
    good = faithfulness(model, x, [[0, 1]] * 3, _square_maps(3).expand(3, 2, H, H), metric, **kw)
    bad = faithfulness(model, x, [[0, 1]] * 3, 1 - _square_maps(3).expand(3, 2, H, H), metric, **kw)
    const = faithfulness(model, x, [[0, 1]] * 3, torch.zeros(3, 2, H, H), metric, **kw)
    span = np.abs(good.curves[..., 0] - good.curves[..., -1])               # (B, T) full range
    # class 1 has a negative weight: removing its evidence *raises* the score, so compare class 0.
    g, b, c = good.gain[:, 0], bad.gain[:, 0], const.gain[:, 0]
    assert (g > 0.3 * span[:, 0]).all(), g
    assert (b < -0.3 * span[:, 0]).all(), b
    # a constant map ranks pixels in raster order (stable sort); R is centred, so with a linear score
    # its expected curve area equals the random order's: equal within the random repeats' spread.
    assert (np.abs(c) < 0.05 * span[:, 0]).all(), c
    assert good.lower_is_better == (metric == "deletion")


# ------------------------------------------------------------------------------ reference: Quantus
def test_deletion_matches_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    model = TinyCNN().eval()
    x = _images(3, 16)
    x[:, :, 0, 0] = 0.0          # Quantus' "black" is the *current* array's minimum: make it 0 always
    maps = _distinct_maps(3, 16)                                            # no ties: Quantus' argsort
    y = np.array([0, 2, 1])                                                 # is not stable
    steps = 8
    metric = quantus.PixelFlipping(features_in_step=16 * 16 // steps, perturb_baseline="black",
                                   normalise=False, abs=False, disable_warnings=True)
    ref = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=maps.numpy(),
                            channel_first=True, softmax=False, device="cpu"))  # (B, S): no s=0
    ours = faithfulness(model, x, torch.as_tensor(y), maps, "deletion", steps=steps,
                        baseline="zero", score="logit")
    assert np.ptp(ref, axis=1).min() > 0.1                                   # the curves do move
    np.testing.assert_allclose(ours.curves[:, 0, 1:], ref, atol=1e-5, rtol=0)  # measured: identical


# ------------------------------------------------------------------------------ reference: grad-cam ROAD
def _blob_mask(size: int, frac: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    blob = torch.exp(-((yy - 0.4 * size) ** 2 + (xx - 0.6 * size) ** 2) / (0.1 * size ** 2))
    return blob >= torch.quantile(blob.flatten(), 1 - frac)


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_noisy_linear_imputation_matches_grad_cam(frac):
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g)
    removed = torch.stack([_blob_mask(32, frac),                            # one large region
                           torch.rand(32, 32, generator=g) < frac])          # scattered pixels
    ours = noisy_linear_impute(x, removed, noise=0.0)
    imputer = road.NoisyLinearImputer(noise=0.0)
    ref = torch.stack([imputer(x[i], (~removed[i]).float()) for i in range(2)])
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=0)   # spsolve is exact; measured <= 9e-6
    assert torch.equal(ours[:, :, ~removed[0]][0], x[0][:, ~removed[0]])    # known pixels untouched


@pytest.mark.parametrize("metric", ["road_morf", "road_lerf"])
def test_road_scores_match_grad_cam(metric):
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = TinyCNN().eval()
    size, steps = 32, 3                        # fractions 0, .25, .5, .75 of 1024 pixels: exact counts
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()  # binary: imputing moves scores a lot
    maps = _distinct_maps(2, size)
    y = [1, 2]
    ours = faithfulness(model, x, y, maps, metric, steps=steps, score="logit", road_noise=0.0)
    np.testing.assert_allclose(ours.fractions, [0, .25, .5, .75])
    cls = road.ROADMostRelevantFirst if metric == "road_morf" else road.ROADLeastRelevantFirst
    for s, frac in enumerate(ours.fractions[1:], start=1):
        ref_metric = cls(percentile=100 * (1 - frac))   # grad-cam's percentile is the share *kept*
        ref_metric.perturbation.imputer.noise = 0.0
        diff = ref_metric(x, maps[:, 0].numpy(), [ClassifierOutputTarget(k) for k in y], model)
        assert np.abs(diff).max() > 0.01                                     # not a vacuous match
        # measured: <= 3e-7 (spsolve vs our multigrid CG at rtol 1e-5; float32 forward passes)
        np.testing.assert_allclose(ours.curves[:, 0, s] - ours.curves[:, 0, 0], diff, atol=1e-5,
                                   rtol=0)


def test_road_noise_is_seeded_and_small():
    model = TinyCNN()
    x, maps = _images(2, 32), _distinct_maps(2, 32)
    a = faithfulness(model, x, 0, maps, "road_morf", steps=3, score="logit", seed=3)
    b = faithfulness(model, x, 0, maps, "road_morf", steps=3, score="logit", seed=3)
    c = faithfulness(model, x, 0, maps, "road_morf", steps=3, score="logit", seed=4)
    quiet = faithfulness(model, x, 0, maps, "road_morf", steps=3, score="logit", road_noise=0.0)
    np.testing.assert_array_equal(a.curves, b.curves)
    assert not np.array_equal(a.curves, c.curves)
    assert a.baseline == "noisy_linear"
    np.testing.assert_allclose(a.curves, quiet.curves, atol=0.05)           # 0.01 noise: small effect


# ------------------------------------------------------------------------------ baselines
def test_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _images(2, 20)
    for sigma in (0.7, 2.0, 7.0):                                           # radius beyond the image too
        ref = np.stack([ndimage.gaussian_filter(x[i, 0].double().numpy(), sigma, mode="nearest",
                                                truncate=3.0) for i in range(2)])
        np.testing.assert_allclose(gaussian_blur(x, sigma)[:, 0].numpy(), ref, atol=1e-6)
    default = baseline_images(x, "blur")                                    # 5 * 20 / 224 px
    torch.testing.assert_close(default, gaussian_blur(x, 5 * 20 / 224))
    assert set(BASELINES) == {"blur", "mean", "zero"}


# ------------------------------------------------------------------------------ batching, seeds, modes
@pytest.mark.parametrize("metric", FAITHFULNESS_METRICS)
def test_batched_equals_per_image(metric):
    model = TinyCNN()
    x = _images(3, 16, seed=2)
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(3, 2, 16, 16, generator=g)
    tg = [[0, 1], [2, 0], [1, 1]]
    kw = dict(steps=5, random_repeats=2, seed=7)
    whole = faithfulness(model, x, tg, maps, metric, batch_size=4, **kw)
    for i in range(3):
        one = faithfulness(model, x[i:i + 1], tg[i:i + 1], maps[i:i + 1], metric, **kw)
        np.testing.assert_allclose(whole.curves[i], one.curves[0], atol=1e-5)
        np.testing.assert_allclose(whole.random_curves[i], one.random_curves[0], atol=1e-5)
        np.testing.assert_allclose(whole.auc[i], one.auc[0], atol=1e-5)


def test_seeds_reproduce_and_ties_are_stable():
    model = TinyCNN()
    x = _images(2, 16)
    maps = torch.zeros(2, 1, 16, 16)
    maps[:, :, 4:8] = 1.0                                                   # many ties
    a = faithfulness(model, x, 0, maps, "deletion", steps=4, random_repeats=2, seed=1)
    b = faithfulness(model, x, 0, maps, "deletion", steps=4, random_repeats=2, seed=1)
    c = faithfulness(model, x, 0, maps, "deletion", steps=4, random_repeats=2, seed=2)
    np.testing.assert_array_equal(a.curves, b.curves)
    np.testing.assert_array_equal(a.random_curves, b.random_curves)
    np.testing.assert_array_equal(a.curves, c.curves)                       # order is deterministic
    assert not np.array_equal(a.random_curves, c.random_curves)


def test_model_mode_restored_and_result_frame():
    model = TinyCNN().train()
    x = _images(2, 16)
    res = faithfulness(model, x, [[0, 2], [1, 0]], torch.rand(2, 2, 16, 16), "insertion", steps=3)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(res, FaithfulnessResult)
    assert res.curves.shape == (2, 2, 4) and res.auc.shape == (2, 2) and res.fractions.shape == (4,)
    assert ((res.curves > 0) & (res.curves < 1)).all()                      # probabilities
    df = res.to_frame(image_ids=["a", "b"], classes=["x", "y", "z"])
    assert len(df) == 4 and list(df["class"]) == ["x", "z", "y", "x"]
    assert {"auc", "random_auc", "gain", "curve", "random_curve", "metric", "baseline", "steps",
            "fractions"} <= set(df.columns)
    assert len(df["curve"].iloc[0]) == 4 and df["baseline"].iloc[0] == "blur"


def test_removal_counts():
    np.testing.assert_array_equal(removal_counts("deletion", 3, 10), [0, 3, 6, 10])
    np.testing.assert_array_equal(removal_counts("road_lerf", 9, 100), np.arange(0, 100, 10))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(metric="flip"), "unknown faithfulness metric 'flip'.*deletion"),
    (dict(baseline="black"), "unknown baseline 'black'.*blur"),
    (dict(score="softmax"), "unknown score 'softmax'.*probability"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(random_repeats=-1), "random_repeats"),
    (dict(metric="road_morf", baseline="blur"), "baseline must be None"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(kwargs, match):
    x = _images(2, 16)
    with pytest.raises(ValueError, match=match):
        faithfulness(TinyCNN(), x, 0, torch.rand(2, 1, 16, 16), **kwargs)


def test_no_random_order_leaves_the_curves_and_marks_the_random_side_missing():
    model, x = TinyCNN(), _images(3, 16)
    maps = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    full = faithfulness(model, x, 0, maps, "road_morf", steps=4, seed=0)
    bare = faithfulness(model, x, 0, maps, "road_morf", steps=4, seed=0, random_repeats=0)
    np.testing.assert_array_equal(bare.curves, full.curves)
    assert np.isnan(bare.random_auc).all() and np.isnan(bare.gain).all()


def test_bad_shapes_and_values():
    model, x = TinyCNN(), _images(2, 16)
    with pytest.raises(ValueError, match=r"maps must be \(B, T, H, W\) = \(2, 1, 16, 16\)"):
        faithfulness(model, x, 0, torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"maps must be .*\(2, 2, 16, 16\)"):
        faithfulness(model, x, [[0, 1], [1, 2]], torch.rand(2, 1, 16, 16))
    nan = torch.rand(2, 1, 16, 16)
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf at \(image, target\) \[\[1, 0\]\]"):
        faithfulness(model, x, 0, nan)
    with pytest.raises(ValueError, match=r"images must be a \(B, C, H, W\) float tensor"):
        faithfulness(model, x[:, 0], 0, torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"target class indices must lie in \[0, 3\)"):
        faithfulness(model, x, 5, torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="every pixel removed"):
        noisy_linear_impute(x, torch.ones(2, 16, 16, dtype=torch.bool))
