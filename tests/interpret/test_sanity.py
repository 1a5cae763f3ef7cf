"""interpret.sanity: the model-parameter randomisation test on known answers; SSIM and Spearman against
scikit-image and SciPy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from interpret.sanity import (model_randomisation, randomisation_layers, randomise_block_, sanity_summary,
                              spearman, ssim)
from training.models import create_model

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass"]


class _Echo(nn.Module):
    """No parameters: the input image repeated over ``k`` channels."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.k, 1, 1)                                  # (B, k, H, W)


class EchoModel(nn.Module):
    """Feature maps = the image itself, then GAP + linear: CAM = (sum_k w_ck) * image, so every map
    with a positive weight sum is the min-max normalised image, whatever the weights."""

    feature_layer = "features"

    def __init__(self, k: int = 4, classes: int = 8):
        super().__init__()
        self.features = nn.Sequential(_Echo(k))
        self.head = nn.Linear(k, classes)
        with torch.no_grad():
            self.head.weight.uniform_(0.1, 1.0)                          # positive: maps = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(12, 1, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("test_resnet", classes=CLASSES, image_size=64)


def test_randomisation_layers_go_from_the_head_to_the_input(resnet):
    assert randomisation_layers(resnet) == ["head", "features.layer4", "features.layer3", "features.layer2",
                                            "features.layer1", "features.bn1", "features.conv1"]
    assert randomisation_layers(EchoModel()) == ["head"]


def test_maps_that_ignore_the_weights_fail(images):
    torch.manual_seed(1)
    model = EchoModel()
    targets = [list(range(8))] * len(images)
    table = model_randomisation(model, images[:, :, :32, :32], targets, method="cam")
    assert list(table["layer"].unique()) == ["head"] and len(table) == 12 * 8
    # A randomised class whose weights sum to a positive number still shows the image: Spearman 1,
    # SSIM 1. One whose weights sum to a negative number is zero after the served ReLU (a constant map:
    # Spearman undefined, NaN).
    defined = table.dropna(subset=["spearman"])
    assert 0 < len(defined) < len(table)
    np.testing.assert_allclose(defined["spearman"], 1.0, atol=1e-9)
    np.testing.assert_allclose(defined["ssim"], 1.0, atol=1e-9)
    summary = sanity_summary(table, n_resamples=200)
    verdict = summary["methods"]["cam"]["cascading"]
    assert summary["passed"] is False and verdict["passed"] is False and verdict["failed_layers"] == ["head"]
    step = verdict["steps"][0]
    assert step["spearman"]["estimate"] == pytest.approx(1.0)
    assert step["n_undefined_spearman"] == len(table) - len(defined)


def test_a_real_network_passes_and_correlation_falls_down_the_cascade(resnet, images):
    table = model_randomisation(resnet, images, [[0, 1, 2, 3]] * len(images), method=["cam", "gradcam"],
                                mode=["cascading", "independent"])
    assert len(table) == 2 * 2 * 7 * 12 * 4
    assert set(table.columns) == {"method", "mode", "step", "layer", "image_index", "target", "spearman",
                                  "ssim"}
    summary = sanity_summary(table, n_resamples=200)
    json.dumps(summary)
    assert summary["passed"] is True
    for method in ("cam", "gradcam"):
        steps = summary["methods"][method]["cascading"]["steps"]
        assert summary["methods"][method]["cascading"]["passed"]
        rho = [s["spearman"]["estimate"] for s in steps]
        assert rho[0] < 0.5 and rho[-1] < 0.2 and rho[-1] < rho[0]
        assert all(s["spearman"]["low"] <= s["spearman"]["estimate"] <= s["spearman"]["high"] for s in steps)
    # a block gets the same random weights in both modes: the head step is the same in both
    cam = table[table["method"] == "cam"]
    first = [cam[(cam["mode"] == m) & (cam["step"] == 1)].reset_index(drop=True) for m in ("cascading",
                                                                                           "independent")]
    np.testing.assert_array_equal(first[0][["spearman", "ssim"]], first[1][["spearman", "ssim"]])
    # CAM = h w Grad-CAM for a GAP + linear head, so both methods give the same comparisons
    grad = table[table["method"] == "gradcam"]
    np.testing.assert_allclose(cam["spearman"].to_numpy(), grad["spearman"].to_numpy(), atol=1e-4)


def test_the_callers_model_is_untouched_and_the_table_is_reproducible(resnet, images):
    resnet.train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    rng_before = torch.get_rng_state()
    kwargs = dict(method="cam", mode="independent", layers=["head", "features.layer3"])
    a = model_randomisation(resnet, images[:4], [0, 1, 2, 3], seed=3, **kwargs)
    b = model_randomisation(resnet, images[:4], [0, 1, 2, 3], seed=3, **kwargs)
    c = model_randomisation(resnet, images[:4], [0, 1, 2, 3], seed=4, **kwargs)
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert resnet.training and all(p.requires_grad for p in resnet.parameters())
    assert torch.equal(rng_before, torch.get_rng_state())
    resnet.eval()
    assert a.equals(b) and not a.equals(c)
    assert list(a["layer"].unique()) == ["head", "features.layer3"] and list(a["target"]) == [0, 1, 2, 3] * 2


def test_randomise_block_is_seeded_and_resets_batchnorm():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 3))
    with torch.no_grad():
        block[1].running_mean.fill_(5.0)
        block[1].weight.fill_(2.0)
    one = randomise_block_(block, seed=0)
    two = randomise_block_(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 3)), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(one.state_dict().values(), two.state_dict().values()))
    assert torch.equal(one[1].running_mean, torch.zeros(3)) and torch.equal(one[1].weight, torch.ones(3))
    assert not torch.equal(one[0].weight.flatten()[:3], one[2].weight.flatten()[:3])


def test_ssim_equals_scikit_image_and_spearman_equals_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 20, 24, generator=g)
    b = (a + 0.5 * torch.rand(5, 20, 24, generator=g)).clamp(max=1)
    a[0] = torch.round(a[0] * 3) / 3                                      # heavy ties
    b[1] = torch.relu(b[1] - 0.7)                                         # mostly zeros, as after ReLU
    b[2] = torch.rand(20, 24, generator=g)                                # unrelated
    ours_ssim, ours_rho = ssim(a, b), spearman(a, b)
    assert ours_ssim.shape == (5,) and ours_rho.shape == (5,)
    for i in range(5):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        ref = structural_similarity(x, y, win_size=7, data_range=1.0, gaussian_weights=False)
        assert float(ours_ssim[i]) == pytest.approx(ref, abs=1e-4)
        assert float(ours_rho[i]) == pytest.approx(spearmanr(x.ravel(), y.ravel()).statistic, abs=1e-10)
    assert float(ssim(a[3], a[3])) == pytest.approx(1.0) and float(spearman(a[3], a[3])) == pytest.approx(1.0)
    assert math.isnan(float(spearman(torch.zeros(8, 8), a[0, :8, :8])))


def test_bad_arguments_raise_naming_the_value(resnet, images):
    with pytest.raises(ValueError, match="unknown randomisation mode 'both'.*cascading"):
        model_randomisation(resnet, images[:2], 0, mode="both")
    with pytest.raises(ValueError, match="unknown attention method 'lime'"):
        model_randomisation(resnet, images[:2], 0, method="lime")
    with pytest.raises(ValueError, match="unknown layer 'features.layer9'"):
        model_randomisation(resnet, images[:2], 0, layers=["features.layer9"])
    with pytest.raises(ValueError, match="win_size"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8), win_size=4)
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.zeros(8, 8), torch.zeros(8, 9))
    with pytest.raises(ValueError, match="lacks columns"):
        sanity_summary(model_randomisation(resnet, images[:2], 0).drop(columns="ssim"))
    with pytest.raises(ValueError, match="max_spearman"):
        sanity_summary(model_randomisation(resnet, images[:2], 0), max_spearman=1.5)
