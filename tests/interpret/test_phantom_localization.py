"""Localisation against chance: analytic models with known answers, and CAM of a classifier trained
on the phantom (issue 4: "CAM of a trained small classifier covers its findings far better than
chance")."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from interpret.experiments import centre_prior, localization_vs_chance
from interpret.localization import boxes_to_mask, pointing_game, soft_scores

log = logging.getLogger(__name__)

S = 32
CLASSES = ["Effusion", "Nodule", "Mass"]


class BoxData:
    """Images whose channel c is the rasterised union of the class-c boxes (so an identity feature
    layer with an identity head has CAM == the box mask), with ``boxes`` / ``box_labels`` items."""

    def __init__(self, n: int = 12, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.classes = list(CLASSES)
        self.items = []
        for i in range(n):
            k = 1 + i % 3
            x0, y0 = rng.integers(0, S - 8, k), rng.integers(0, S - 8, k)
            w, h = rng.integers(2, 9, k), rng.integers(2, 9, k)
            boxes = np.stack([x0, y0, x0 + w, y0 + h], 1).astype(np.float32)       # integer corners
            labs = rng.permutation(len(CLASSES))[:k] if i % 4 else np.array([], np.int64)[:0]
            boxes = boxes[:len(labs)]
            img = np.stack([boxes_to_mask(boxes[labs == c], S) for c in range(len(CLASSES))])
            self.items.append({"image": torch.from_numpy(img.astype(np.float32)),  # (C, S, S)
                               "boxes": torch.from_numpy(boxes), "box_labels": torch.from_numpy(labs),
                               "index": i})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class IdentityCAM(nn.Module):
    """features = the input channels, head = identity: CAM of class c is input channel c."""

    feature_layer = "features"

    def __init__(self, n: int = len(CLASSES)):
        super().__init__()
        self.class_names = list(CLASSES)
        self.features = nn.Identity()
        self.head = nn.Linear(n, n)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(n))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ConstantFeatures(nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 2, x.shape[-2] // 4, x.shape[-1] // 4)     # (B, 2, S/4, S/4)


class ConstantCAM(nn.Module):
    """Feature maps that ignore the image: every CAM is constant (no spatial preference)."""

    feature_layer = "features"

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.class_names = list(CLASSES)
        self.features = ConstantFeatures()
        self.head = nn.Linear(2, len(CLASSES))
        with torch.no_grad():
            self.head.weight.fill_(sign)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _by_hand(ds: BoxData, cls: int, sigma: float = 0.25) -> dict[str, float]:
    """Uniform and centre-prior scores of class ``cls`` computed directly from the boxes."""
    masks = [boxes_to_mask(it["boxes"].numpy()[it["box_labels"].numpy() == cls], S)
             for it in ds.items if (it["box_labels"].numpy() == cls).any()]
    M = np.stack(masks).astype(np.float32)
    area = M.reshape(len(M), -1).mean(1)
    yy, xx = np.mgrid[0:S, 0:S] + 0.5 - S / 2
    g = np.exp(-(yy ** 2 + xx ** 2) / (2 * (sigma * S) ** 2))
    g = (g - g.min()) / (g.max() - g.min())
    G = np.broadcast_to(g, M.shape)
    s = soft_scores(G, M)
    return {"n": len(M), "area": area.mean(), "iobb_centre": s["iobb"].mean(),
            "ior_centre": s["ior"].mean(), "pointing_centre": np.nanmean(pointing_game(G, M))}


def test_maps_equal_to_boxes_score_one_and_baselines_match_hand_values():
    ds = BoxData()
    t = localization_vs_chance(IdentityCAM(), ds, "cam", n_random=16, seed=3, batch_size=5,
                               progress=False)
    assert list(t.index) == CLASSES + ["mean"]
    assert (t["n_flat"] == 0).all()
    for col in ("iobb", "ior", "iou", "pointing"):
        np.testing.assert_allclose(t[col].to_numpy(), 1.0, atol=1e-6, err_msg=col)
    for c, name in enumerate(CLASSES):
        ref = _by_hand(ds, c)
        row = t.loc[name]
        assert row["n_images"] == ref["n"]
        # uniform map: IoBB 1, IoR = IoU = pointing = box share of the image
        assert row["iobb_uniform"] == pytest.approx(1.0)
        for col in ("ior_uniform", "iou_uniform", "pointing_uniform"):
            assert row[col] == pytest.approx(ref["area"], rel=1e-6), col
        for col in ("iobb_centre", "ior_centre", "pointing_centre"):
            assert row[col] == pytest.approx(ref[col], rel=1e-5), col
        # random maps at the raw (here full) resolution: mean of min-max normalised noise ~ 0.5,
        # IoR ~ box share; 16 draws of >= 4 px boxes keep the sampling error well under 0.1
        assert row["iobb_random"] == pytest.approx(0.5, abs=0.1)
        assert row["ior_random"] == pytest.approx(ref["area"], rel=0.3)
        # shuffled = the box mask's own pixels permuted: k ones among N pixels, so IoBB and IoR both
        # have expectation k / N = the box share
        assert row["iobb_shuffled"] == pytest.approx(ref["area"], rel=0.3)
        assert row["ior_shuffled"] == pytest.approx(ref["area"], rel=0.3)
    # the mean row is the unweighted mean of the class rows
    np.testing.assert_allclose(t.loc["mean", "iobb_random"], t.loc[CLASSES, "iobb_random"].mean())
    assert t.loc["mean", "n_images"] == t.loc[CLASSES, "n_images"].sum()
    assert t.attrs["raw_map_size"] == (S, S) and t.attrs["image_size"] == (S, S)
    # deterministic given the seed, whatever the batch size (to float32 summation order); another
    # seed moves only the random baseline
    again = localization_vs_chance(IdentityCAM(), ds, "cam", n_random=16, seed=3, progress=False)
    other = localization_vs_chance(IdentityCAM(), ds, "cam", n_random=16, seed=4, progress=False)
    np.testing.assert_allclose(t.to_numpy(), again.to_numpy(), rtol=1e-6)
    assert not np.allclose(t["iobb_random"], other["iobb_random"])
    np.testing.assert_array_equal(t["iobb_centre"], other["iobb_centre"])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_constant_map_model_equals_the_uniform_baseline(sign):
    # sign -1: the CAM is negative everywhere, nothing survives the ReLU: no spatial preference either
    t = localization_vs_chance(ConstantCAM(sign), BoxData(), "cam", n_random=2, progress=False)
    assert (t["n_flat"] == t["n_images"]).all()
    for m in ("iobb", "ior", "iou", "pointing"):
        np.testing.assert_allclose(t[m].to_numpy(), t[f"{m}_uniform"].to_numpy(), rtol=1e-6)
        # a constant map shuffled is still constant
        np.testing.assert_allclose(t[f"{m}_shuffled"].to_numpy(), t[f"{m}_uniform"].to_numpy(),
                                   rtol=1e-6)
    assert t.attrs["raw_map_size"] == (S // 4, S // 4)


def test_class_selection_and_bad_arguments():
    ds = BoxData()
    t = localization_vs_chance(IdentityCAM(), ds, "cam", classes=["Nodule"], n_random=1,
                               min_images=10_000, progress=False)
    assert list(t.index) == ["Nodule", "mean"] and np.isnan(t.loc["mean", "iobb"])
    with pytest.raises(ValueError, match="unknown attention method 'camm'.*gradcam"):
        localization_vs_chance(IdentityCAM(), ds, "camm")
    with pytest.raises(ValueError, match="unknown classes \\['Hernia'\\].*Effusion"):
        localization_vs_chance(IdentityCAM(), ds, classes=["Hernia"])
    with pytest.raises(ValueError, match="n_random"):
        localization_vs_chance(IdentityCAM(), ds, n_random=0)
    with pytest.raises(ValueError, match="centre_sigma"):
        localization_vs_chance(IdentityCAM(), ds, centre_sigma=0)
    empty = BoxData(n=1)                                   # item 0 has no boxes
    with pytest.raises(ValueError, match="no image of the dataset has a box"):
        localization_vs_chance(IdentityCAM(), empty, progress=False)


def test_centre_prior_shape_and_peak():
    g = centre_prior((8, 12), 0.25)
    assert g.shape == (8, 12) and float(g.min()) == 0.0 and float(g.max()) == 1.0
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))      # symmetric about the centre


# Five findings drawn as local opacities with enough positives in 2000 phantom images.
PHANTOM_FINDINGS = ["Atelectasis", "Effusion", "Mass", "Nodule", "Consolidation"]


@pytest.mark.slow
def test_cam_of_a_phantom_classifier_covers_findings_better_than_chance(tmp_path):
    """Issue 4: CAM of a small classifier trained on the phantom (training.train's loop) localises
    its findings better than chance, on held-out (val + test) images with boxes.

    Set-up: 2000 images at 64 px (seed 0); training set = train-split images with one of the five
    findings plus 30% as many no-finding images (568 images), test_resnet, 16 epochs, lr 3e-3, BCE.
    Measured once (2 CPU cores): val AUROC mean 0.70; macro means over the five classes (235 pairs):
    CAM IoBB 0.507 vs shuffled 0.371 / random noise 0.504 / centre 0.637; IoR 0.058 vs random 0.023
    / shuffled 0.024; pointing 0.129 vs random 0.012 / shuffled 0.023 / centre 0.0.

    Margins, and why: soft IoBB rises with a map's mass (the uniform map scores 1; min-max
    normalised noise about 0.5), so IoBB is held against the mass-matched ``shuffled`` map (the CAM's
    own cells permuted): at least +0.05 (measured +0.14). Pointing game and IoR are mass-free and are
    held against random maps: pointing at least 3x random and +0.05 absolute (measured 10x, +0.12),
    IoR at least 1.5x random (measured 2.5x). Margins are about a third of the measured gaps, so a
    different BLAS summation order or seed jitter does not flip them, while a CAM that ignored the
    findings (lift ~0) fails all three.
    """
    from training.data.dataset import ManifestDataset
    from training.data.phantom import generate_phantom
    from training.data.schema import read_manifest
    from training.models import create_model
    from training.train import InMemoryDataset, TrainConfig, fit

    import pandas as pd

    size = 64
    manifest = generate_phantom(tmp_path / "phantom", n=2000, size=size, seed=0, workers=1)
    df = read_manifest(manifest)
    train = df[df["split"] == "train"]
    positive = train["labels"].map(lambda labs: any(c in PHANTOM_FINDINGS for c in labs))
    normal = train[train["labels"].map(len) == 0]
    curated = pd.concat([train[positive], normal.iloc[: int(0.3 * positive.sum())]])
    train_ds = InMemoryDataset(ManifestDataset(curated, classes=PHANTOM_FINDINGS, image_size=size))
    val_ds = InMemoryDataset(ManifestDataset(manifest, classes=PHANTOM_FINDINGS, image_size=size,
                                             split="val"))
    torch.manual_seed(0)
    model = create_model("test_resnet", classes=PHANTOM_FINDINGS, image_size=size)
    result = fit(model, train_ds, val_ds, TrainConfig(epochs=16, batch_size=32, lr=3e-3, seed=0,
                                                      progress=False))
    held_out = ManifestDataset(manifest, classes=PHANTOM_FINDINGS, image_size=size,
                               split=["val", "test"])
    table = localization_vs_chance(result.model, held_out, "cam", n_random=8, seed=0,
                                   min_images=20, progress=False)
    cols = ["n_images", "n_flat", "iobb", "iobb_random", "iobb_shuffled", "iobb_centre", "ior",
            "ior_random", "ior_shuffled", "pointing", "pointing_random", "pointing_shuffled",
            "pointing_centre"]
    log.info("val AUROC %s\n%s", result.val_table["auroc"].round(3).to_dict(),
             table[cols].round(3).to_string())
    assert (table.loc[PHANTOM_FINDINGS, "n_images"] >= 20).all()
    mean = table.loc["mean"]
    assert mean["iobb"] - mean["iobb_shuffled"] >= 0.05, table[cols]
    assert mean["pointing"] >= 3 * mean["pointing_random"], table[cols]
    assert mean["pointing"] - mean["pointing_random"] >= 0.05, table[cols]
    assert mean["ior"] >= 1.5 * mean["ior_random"], table[cols]
