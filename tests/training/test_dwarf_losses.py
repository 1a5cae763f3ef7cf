"""FP-suppressing soft Dice against its closed forms; DWARF's combined loss."""
from __future__ import annotations

import pytest
import torch

from training.dwarf.losses import DwarfLoss, FPSoftDiceLoss, fp_soft_dice, tversky_index


def test_by_hand():
    # pred covers 2 mask pixels fully and 2 background pixels at 0.5; mask has 4 pixels
    pred = torch.tensor([[1.0, 1.0, 0.5, 0.5], [0, 0, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1, 1, 0, 0]])
    # TP = 2, FP = 1, |P| = 3, |Y| = 4; adjusted |Y| = 4 + (3 - 1) * 1 = 6
    expected = (2 * 2 + 1.0) / (3 + 6 + 1.0)
    torch.testing.assert_close(fp_soft_dice(pred, mask, w_fp=3.0, smooth=1.0), torch.tensor(expected))


@pytest.mark.parametrize("w_fp", [0.5, 1.0, 2.0, 5.0])
def test_equals_tversky_with_alpha_wfp_over_2_and_beta_half(w_fp):
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(4, 3, 8, 8, generator=g)
    mask = (torch.rand(4, 3, 8, 8, generator=g) > 0.6).float()
    torch.testing.assert_close(fp_soft_dice(pred, mask, w_fp=w_fp, smooth=0.0),
                               tversky_index(pred, mask, alpha=w_fp / 2, beta=0.5), rtol=1e-5, atol=1e-6)


def test_w_fp_one_is_plain_soft_dice():
    g = torch.Generator().manual_seed(2)
    pred, mask = torch.rand(5, 6, 6, generator=g), (torch.rand(5, 6, 6, generator=g) > 0.5).float()
    plain = 2 * (pred * mask).sum((-1, -2)) / (pred.sum((-1, -2)) + mask.sum((-1, -2)))
    torch.testing.assert_close(fp_soft_dice(pred, mask, w_fp=1.0, smooth=0.0), plain, rtol=1e-5, atol=1e-6)


def test_more_false_positive_weight_lowers_dice_only_when_there_are_false_positives():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    inside = mask.clone() * 0.8
    outside = inside.clone()
    outside[0, 3] = 0.5
    assert torch.isclose(fp_soft_dice(inside, mask, 1.0), fp_soft_dice(inside, mask, 4.0))
    assert fp_soft_dice(outside, mask, 4.0) < fp_soft_dice(outside, mask, 1.0)


def test_empty_mask():
    empty = torch.zeros(2, 4, 4)
    pred = torch.zeros(2, 4, 4)
    pred[1, 0, :2] = 0.5  # FP = 1
    loss = 1 - fp_soft_dice(pred, empty, w_fp=3.0, smooth=1.0)
    # empty map -> 0; otherwise w FP / (w FP + s) = 3 / 4
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.75]))


def test_loss_module_weights_and_combination():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    maps = torch.rand(2, 3, 4, 4, generator=g)
    masks = (torch.rand(2, 3, 4, 4, generator=g) > 0.5).float()
    seg_w = labels.clone()
    terms = DwarfLoss(lam=0.3, w_fp=2.0, smooth=1.0)(logits, labels, maps, masks, seg_weight=seg_w)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    dice = 1 - fp_soft_dice(maps, masks, 2.0, 1.0)
    seg = (dice * seg_w).sum() / seg_w.sum()
    torch.testing.assert_close(terms["cls"], bce)
    torch.testing.assert_close(terms["seg"], seg)
    torch.testing.assert_close(terms["loss"], 0.3 * seg + 0.7 * bce)
    torch.testing.assert_close(FPSoftDiceLoss(2.0, 1.0)(maps, masks, seg_w), seg)
    # no supervised map -> classification only
    none = DwarfLoss(lam=0.3)(logits, labels, maps, masks, seg_weight=torch.zeros(2, 3))
    torch.testing.assert_close(none["loss"], 0.7 * bce)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="lam"):
        DwarfLoss(lam=1.5)
    with pytest.raises(ValueError, match="w_fp"):
        FPSoftDiceLoss(w_fp=-1)
    with pytest.raises(ValueError, match="same shape"):
        fp_soft_dice(torch.rand(2, 4, 4), torch.rand(2, 4, 5))
