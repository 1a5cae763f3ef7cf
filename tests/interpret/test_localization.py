"""Localisation metrics on maps and boxes whose scores are computed by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interpret.localization import (boxes_to_mask, class_summary, dilate_masks, hard_scores,
                                    localization_table, masks_from_boxes, max_dice, pointing_game,
                                    pointing_tolerance, random_map_baseline, soft_scores)


def test_boxes_rasterised_end_exclusive():
    m = boxes_to_mask([[1, 2, 3, 5]], 6)                  # columns 1..2, rows 2..4
    expected = np.zeros((6, 6), bool)
    expected[2:5, 1:3] = True
    np.testing.assert_array_equal(m, expected)
    # fractional: a pixel counts when its centre is inside; union of two boxes; no boxes -> empty
    m = boxes_to_mask([[0.4, 0, 1.6, 1], [4, 4, 10, 10]], (6, 6))
    assert m[0, 0] and m[0, 1] and not m[0, 2] and m[5, 5] and m.sum() == 2 + 4
    assert not boxes_to_mask(np.zeros((0, 4)), 4).any()
    # same rule as the dataset's rasteriser
    from training.data.transforms import boxes_to_mask as data_rasterise

    b = torch.tensor([[0.4, 1.2, 3.7, 4.5], [2.0, 0.0, 5.5, 2.49]])
    ref = data_rasterise(b, torch.tensor([0, 0]), 1, 6)[0].numpy() > 0
    np.testing.assert_array_equal(boxes_to_mask(b, 6), ref)


def _example():
    # 4x4 map: values 1 on the top-left 2x2, 0.5 on the top-right 2x2, 0 elsewhere
    A = np.zeros((4, 4), np.float32)
    A[:2, :2], A[:2, 2:] = 1.0, 0.5
    M = np.zeros((4, 4), np.float32)
    M[:, :2] = 1                                           # box = left half (8 px)
    return A, M


def test_soft_and_hard_scores_by_hand():
    A, M = _example()
    s = soft_scores(A[None], M[None])
    # sum(A M) = 4, sum(M) = 8, sum(A) = 6, sum(A + M - AM) = 6 + 8 - 4 = 10
    np.testing.assert_allclose([s["iobb"][0], s["ior"][0], s["iou"][0], s["dice"][0]],
                               [4 / 8, 4 / 6, 4 / 10, 8 / 14], rtol=1e-6)
    h = hard_scores(A[None], M[None], threshold=0.5)       # B = top half (8 px), inter 4
    np.testing.assert_allclose([h["iobb"][0], h["ior"][0], h["iou"][0], h["dice"][0]],
                               [4 / 8, 4 / 8, 4 / 12, 8 / 16], rtol=1e-6)
    h = hard_scores(A[None], M[None], threshold=0.75)      # B = top-left 2x2
    np.testing.assert_allclose([h["iobb"][0], h["ior"][0], h["iou"][0], h["dice"][0]],
                               [4 / 8, 1.0, 4 / 8, 8 / 12], rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        soft_scores(A, M[:2])
    with pytest.raises(ValueError, match="threshold"):
        hard_scores(A, M, 1.5)


def test_empty_cases_and_pointing_game():
    A, M = _example()
    s = soft_scores(np.stack([A, np.zeros_like(A)]), np.stack([np.zeros_like(M), M]))
    assert np.isnan(s["iobb"][0]) and s["ior"][0] == 0       # no box: IoBB undefined
    assert s["iobb"][1] == 0 and s["ior"][1] == 0            # zero map: hits nothing
    B = A.copy()
    B[3, 3] = 2.0                                           # maximum moves outside the box
    np.testing.assert_array_equal(pointing_game(np.stack([A, B, A]),
                                                np.stack([M, M, np.zeros_like(M)])),
                                  [1.0, 0.0, np.nan])


def test_pointing_game_scores_plateaus_by_their_share_of_hits():
    """A coarse map upsampled bilinearly (what CAM of a 3x3 feature map becomes) has flat corners and
    edges; its maximum is a set of pixels, scored by the fraction inside the box."""
    raw = torch.zeros(1, 1, 3, 3)
    raw[0, 0, 2, 2] = 1.0                                   # evidence in the bottom-right cell
    A = torch.nn.functional.interpolate(raw, size=(96, 96), mode="bilinear", align_corners=False)[0, 0].numpy()
    tied = A >= A.max()
    assert tied.sum() == 16 * 16 and tied[80:, 80:].all()  # the clamped corner: a 16 x 16 plateau
    # a box over the bottom-right cell holds the whole plateau; one over its left half, half of it
    assert pointing_game(A, boxes_to_mask([[64, 64, 96, 96]], 96)) == 1.0
    assert pointing_game(A, boxes_to_mask([[64, 64, 88, 96]], 96)) == 0.5
    # the first tied pixel in raster order (80, 80) would hit this box; the plateau mostly misses it
    assert pointing_game(A, boxes_to_mask([[70, 70, 82, 82]], 96)) == pytest.approx(4 / 256)
    # a constant map points anywhere: its score is the box's area share (the chance level)
    M = boxes_to_mask([[0, 0, 48, 24]], 96)
    assert pointing_game(np.full((96, 96), 0.3), M) == pytest.approx(M.mean())
    # no raster-order bias: flipping map and mask together changes nothing
    rng = np.random.default_rng(0)
    for _ in range(20):
        small = torch.from_numpy(rng.integers(0, 3, (1, 1, 3, 3)).astype(np.float32))
        B = torch.nn.functional.interpolate(small, size=(24, 24), mode="nearest")[0, 0].numpy()
        K = rng.random((24, 24)) < 0.2
        for axes in ((0,), (1,), (0, 1)):
            assert pointing_game(np.flip(B, axes), np.flip(K, axes)) == pytest.approx(pointing_game(B, K))


def test_pointing_game_tolerance_is_a_euclidean_distance_to_the_mask():
    A = np.zeros((20, 20))
    A[10, 14] = 1.0                                          # maximum at row 10, column 14
    M = boxes_to_mask([[2, 5, 11, 12]], 20)                 # columns 2..10: 4 px left of the maximum
    assert [float(pointing_game(A, M, t)) for t in (0, 3.9, 4.0, 15)] == [0.0, 0.0, 1.0, 1.0]
    A2 = np.zeros((20, 20))
    A2[15, 14] = 1.0                                         # 4 right, 4 down from the corner (10, 11)
    assert float(pointing_game(A2, M, 5.6)) == 0.0 and float(pointing_game(A2, M, 5.7)) == 1.0
    # dilation == brute-force distance to the nearest mask pixel, batch items independent
    rng = np.random.default_rng(1)
    masks = rng.random((3, 2, 12, 12)) < 0.05
    yy, xx = np.mgrid[:12, :12]
    for r in (1.0, 2.5, 4.0):
        got = dilate_masks(masks, r)
        for idx in np.ndindex(3, 2):
            pts = np.argwhere(masks[idx])
            d = np.sqrt((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2).min(-1) \
                if len(pts) else np.full((12, 12), np.inf)
            np.testing.assert_array_equal(got[idx], d <= r)
    assert pointing_tolerance(224) == 15.0 and pointing_tolerance(96) == pytest.approx(15 * 96 / 224)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(A, M, -1)
    # the chance column of the table is the dilated box's share of the image
    t = localization_table(A[None, None], M[None, None], [[0]], pointing_tolerance=4.0)
    assert t["pointing"][0] == 1.0 and t["pointing_chance"][0] == pytest.approx(dilate_masks(M, 4.0).mean())


def test_max_dice_sweep_by_hand():
    A, M = _example()
    # thresholds: 0.25 and 0.5 -> B = top half: Dice 8/16; 0.75 -> top-left: Dice 8/12 (best)
    best, th, curve = max_dice(np.stack([A, A * 0.3, A]), np.stack([M, M, np.zeros_like(M)]),
                               thresholds=[0.25, 0.5, 0.75, 1.0])
    # second map is renormalised to the same shape as A; third has no mask and is left out
    np.testing.assert_allclose(curve, [0.5, 0.5, 8 / 12, 8 / 12])
    assert best == pytest.approx(8 / 12) and th == 0.75      # ties -> lowest threshold
    nan_best, nan_th, _ = max_dice(A[None], np.zeros_like(M)[None])
    assert np.isnan(nan_best) and np.isnan(nan_th)


def test_tables_per_image_and_per_class():
    A, M = _example()
    maps = np.stack([np.stack([A, A]), np.stack([np.zeros_like(A), A.T])])   # (2, 2, 4, 4)
    boxes = [np.array([[0, 0, 2, 4], [2, 2, 4, 4]]), np.array([[0, 0, 4, 2]])]
    labels = [np.array([1, 0]), np.array([0])]
    targets = np.array([[1, 0], [1, 0]])
    masks = masks_from_boxes(boxes, labels, targets, 4)
    np.testing.assert_array_equal(masks[0, 0], M)
    assert masks[1, 0].sum() == 0 and masks[1, 1].sum() == 8
    table = localization_table(maps, masks, targets, ["Effusion", "Nodule"], ["a", "b"])
    assert list(table["image_id"]) == ["a", "a", "b", "b"]
    assert list(table["class"]) == ["Nodule", "Effusion", "Nodule", "Effusion"]
    assert list(table["has_mask"]) == [True, True, False, True]
    np.testing.assert_allclose(table["iobb"], [0.5, 0.0, np.nan, 0.5])   # A vs bottom-right: 0
    summary = class_summary(maps, masks, targets, ["Effusion", "Nodule"])
    assert summary.loc["Nodule", "n_images"] == 1 and summary.loc["Effusion", "n_images"] == 2
    assert summary.loc["Nodule", "iobb"] == pytest.approx(0.5)
    assert summary.loc["Effusion", "iobb"] == pytest.approx(0.25)
    assert summary.loc["all", "n_images"] == 3
    assert summary.loc["all", "iobb"] == pytest.approx(1 / 3)
    assert summary.loc["Nodule", "max_dice"] == pytest.approx(8 / 12)


def test_random_baseline_is_chance_level():
    M = np.zeros((2, 16, 16), np.float32)
    M[:, 4:12, 4:12] = 1
    base = random_map_baseline(M, n_draws=4)
    assert 0.4 < base["iobb"] < 0.6                        # uniform noise covers ~half the box
    assert 0.15 < base["ior"] < 0.35                       # box is a quarter of the image
