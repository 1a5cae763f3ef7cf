"""Masks from boxes and polygons, pseudo-labels, clinician feedback records; Max Dice."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.dwarf.metrics import choose_thresholds, classification_table, dice_at_thresholds, max_dice
from training.dwarf.supervision import (FeedbackRecord, PseudoLabeler, SupervisedDataset, boxes_to_masks,
                                        decode_mask_png, encode_mask_png, item_supervision, load_feedback,
                                        polygons_to_mask)


def test_boxes_to_masks_union_per_class():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0], [3.0, 0.0, 4.0, 1.0]])
    masks = boxes_to_masks(boxes, torch.tensor([0, 0, 2]), num_classes=3, size=4)
    expected0 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.float32)
    assert torch.equal(masks[0], expected0)
    assert masks[1].sum() == 0
    assert masks[2].sum() == 1 and masks[2, 0, 3] == 1
    with pytest.raises(ValueError, match="out of range"):
        boxes_to_masks(boxes, torch.tensor([0, 0, 5]), 3, 4)


def test_polygon_square_and_scale():
    mask = polygons_to_mask([[[1, 1], [5, 1], [5, 5], [1, 5]]], size=8)
    assert mask[1:5, 1:5].all() and mask.sum() >= 16 and mask[7, 7] == 0
    half = polygons_to_mask([[2, 2, 10, 2, 10, 10, 2, 10]], size=8, scale=0.5)
    assert torch.equal(half, mask)
    with pytest.raises(ValueError, match="3 points"):
        polygons_to_mask([[[0, 0], [1, 1]]], 4)


def test_item_supervision_from_boxes_marks_unboxed_positives_unknown():
    item = {"image": torch.zeros(1, 8, 8), "labels": torch.tensor([1.0, 1.0, 0.0]),
            "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "box_labels": torch.tensor([0])}
    mask, valid = item_supervision(item, 3)
    assert mask[0].sum() == 16 and mask[1:].sum() == 0
    assert valid.tolist() == [1.0, 0.0, 1.0]
    item["mask"] = torch.ones(3, 8, 8)
    assert item_supervision(item, 3)[1].tolist() == [1.0, 1.0, 1.0]


def test_pseudo_labels_threshold_and_positives():
    def seg_model(x):  # logits: +5 on the left half, -5 on the right, for 2 classes at 4x4
        out = torch.full((x.shape[0], 2, 4, 4), -5.0)
        out[..., :2] = 5.0
        return out

    labeler = PseudoLabeler(seg_model, threshold=0.5)
    masks = labeler(torch.zeros(1, 1, 8, 8), torch.tensor([[1.0, 0.0]]))
    assert masks.shape == (1, 2, 8, 8)
    assert masks[0, 0, :, :4].all() and masks[0, 0, :, 4:].sum() == 0 and masks[0, 1].sum() == 0
    base = [{"image": torch.zeros(1, 8, 8), "labels": torch.tensor([1.0, 1.0])}]
    item = SupervisedDataset(base, 2, labeler)[0]
    assert item["mask"].sum() == 64 and item["seg_valid"].tolist() == [1.0, 1.0]


def _record(**kw):
    data = {"id": "r1", "image_sha256": "AB" * 32, "finding": "Nodule", "created": "2025-01-01T00:00:00Z",
            "boxes": [[0, 0, 50, 50]]}
    data.update(kw)
    return data


def test_feedback_records_load_validate_and_rasterise(tmp_path):
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[10:, 10:] = 1
    (tmp_path / "b.json").write_text(json.dumps(_record(id="r2", created="2025-02-01", boxes=None,
                                                        mask_png=encode_mask_png(mask))))
    (tmp_path / "a.json").write_text(json.dumps(_record()))
    (tmp_path / "notes.txt").write_text("ignored")
    recs = load_feedback(tmp_path)
    assert [r.id for r in recs] == ["r1", "r2"]
    assert recs[0].image_sha256 == "ab" * 32
    box_region = recs[0].region(width=100, height=100, size=8)  # box covers the top-left quarter
    assert box_region[:4, :4].all() and box_region.sum() == 16
    png_region = recs[1].region(width=100, height=100, size=8)
    assert png_region[4:, 4:].all() and png_region.sum() == 16
    assert FeedbackRecord.from_dict(recs[0].to_dict()).boxes == recs[0].boxes


@pytest.mark.parametrize("bad, match", [({"finding": ""}, "lacks"), ({"boxes": [[0, 0, -1, 3]]}, "w, h > 0"),
                                        ({"boxes": None}, "neither")])
def test_malformed_feedback(tmp_path, bad, match):
    (tmp_path / "x.json").write_text(json.dumps(_record(**bad)))
    with pytest.raises(ValueError, match=match):
        load_feedback(tmp_path)


def test_decode_mask_png_rejects_garbage():
    with pytest.raises(ValueError, match="base64"):
        decode_mask_png("not a png", 4)


def test_feedback_dataset_merges_records(tmp_path):
    pytest.importorskip("training.data.imageio")
    from PIL import Image

    Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "fb").mkdir()
    for i, (finding, box) in enumerate([("Nodule", [0, 0, 20, 20]), ("Mass", [20, 20, 20, 20])]):
        (tmp_path / "fb" / f"{i}.json").write_text(json.dumps(
            _record(id=f"r{i}", finding=finding, boxes=[box], image_path="../img.png")))
    from training.dwarf.supervision import FeedbackDataset

    ds = FeedbackDataset(load_feedback(tmp_path / "fb"), ["Nodule", "Effusion", "Mass"], image_size=8)
    assert len(ds) == 1
    item = ds[0]
    assert item["image"].shape == (1, 8, 8)
    assert item["labels"].tolist() == [1.0, 0.0, 1.0] and item["seg_valid"].tolist() == [1.0, 0.0, 1.0]
    assert item["mask"][0, :4, :4].all() and item["mask"][2, 4:, 4:].all() and item["mask"][1].sum() == 0


def test_dice_and_max_dice():
    masks = torch.zeros(2, 2, 4, 4)
    masks[0, 0, :2, :2] = 1
    masks[1, 0, 2:, 2:] = 1
    maps = masks * 0.9 + 0.05  # a perfect map up to scale
    torch.testing.assert_close(torch.as_tensor(max_dice(maps, masks)[0]), torch.tensor(1.0, dtype=torch.float64))
    assert np.isnan(max_dice(maps, masks)[1])  # class 1 never present
    # half-overlapping map: Dice at t=0.5 is 2*2/(4+4) = 0.5
    shifted = torch.zeros(1, 1, 4, 4)
    shifted[0, 0, :2, 1:3] = 1
    d = dice_at_thresholds(shifted, masks[:1, :1], [0.5])
    torch.testing.assert_close(d, torch.tensor([[[0.5]]]))


def test_classification_table_and_thresholds():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.array([[0.9, 0.2], [0.2, 0.7], [0.8, 0.6], [0.1, 0.4]])
    thr = choose_thresholds(y, p)
    table = classification_table(y, p, thr, ["A", "B"])
    assert list(table.columns) == ["auc", "f1", "mcc"]
    assert table.loc["A", "auc"] == 1.0 and table.loc["A", "f1"] == 1.0 and table.loc["A", "mcc"] == 1.0
