"""Masks from boxes, polygons and mask files, pseudo-labels, clinician feedback records; Max Dice."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from training.dwarf.metrics import choose_thresholds, classification_table, dice_at_thresholds, max_dice
from training.dwarf.supervision import (FeedbackDataset, FeedbackRecord, PseudoLabeler, SupervisedDataset,
                                        decode_mask_png, encode_mask_png, index_images_by_sha256,
                                        item_supervision, load_feedback, manifest_for_masks)


def _tiny_manifest(tmp_path):
    """Two 16-px images: a Nodule with a box and a smaller mask file (masks.parquet), an Effusion with a
    box only, a Mass with a box and a triangle polygon."""
    from PIL import Image

    from training.data.schema import write_manifest

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).save(tmp_path / "images" / f"i{i}.png")
    nodule = np.zeros((16, 16), dtype=np.uint8)
    nodule[4:6, 4:6] = 255  # 4 px inside the 8x8 box
    Image.fromarray(nodule).save(tmp_path / "masks" / "i0__Nodule.png")
    pd.DataFrame([{"image_id": "i0", "label": "Nodule", "path": "masks/i0__Nodule.png"}]).to_parquet(
        tmp_path / "masks.parquet")
    box = lambda lab, x, y, w, h: {"label": lab, "x": x, "y": y, "w": w, "h": h}  # noqa: E731
    rows = [
        {"image_id": "i0", "path": "images/i0.png", "patient_id": "p0", "split": "train", "view": "PA",
         "labels": ["Nodule", "Effusion"], "boxes": [box("Nodule", 2, 2, 8, 8), box("Effusion", 10, 10, 4, 4)],
         "width": 16, "height": 16, "report": None, "source": "demo",
         "polygons": []},
        {"image_id": "i1", "path": "images/i1.png", "patient_id": "p1", "split": "train", "view": "PA",
         "labels": ["Mass"], "boxes": [box("Mass", 0, 0, 8, 8)], "width": 16, "height": 16, "report": None,
         "source": "demo", "polygons": [{"label": "Mass", "points": [[0, 0], [8, 0], [0, 8]]}]},
    ]
    return write_manifest(pd.DataFrame(rows), tmp_path / "manifest.parquet")


def test_manifest_for_masks_prefers_shapes_over_boxes(tmp_path):
    from training.data.dataset import ManifestDataset

    manifest = _tiny_manifest(tmp_path)
    classes = ["Nodule", "Effusion", "Mass"]
    frame = manifest_for_masks(manifest)
    assert frame.loc[0, "mask_paths"][0]["path"].endswith("masks/i0__Nodule.png")
    precise = ManifestDataset(frame, classes=classes, image_size=16, masks=True)
    union = ManifestDataset(manifest_for_masks(manifest, prefer_shapes=False), classes=classes, image_size=16,
                            masks=True)
    m0, u0 = precise[0]["mask"], union[0]["mask"]
    assert m0[0].sum() == 4 and m0[0, 4:6, 4:6].all()  # the mask file, not its 8x8 box
    assert u0[0].sum() == 64  # the data layer's union: the box
    assert m0[1].sum() == u0[1].sum() == 16  # box-only finding keeps its box
    m1 = precise[1]["mask"][2]
    assert 0 < m1.sum() < 64 and m1[0, 0] == 1 and m1[7, 7] == 0  # the triangle, not the box
    mask, valid = item_supervision(precise[0], 3)
    assert torch.equal(mask, m0) and valid.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        manifest_for_masks(tmp_path / "nope.parquet")


def test_item_supervision_from_boxes_marks_unboxed_positives_unknown():
    item = {"image": torch.zeros(1, 8, 8), "labels": torch.tensor([1.0, 1.0, 0.0]),
            "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "box_labels": torch.tensor([0])}
    mask, valid = item_supervision(item, 3)
    assert mask[0].sum() == 16 and mask[1:].sum() == 0
    assert valid.tolist() == [1.0, 0.0, 1.0]
    item["mask"] = torch.ones(3, 8, 8)
    assert item_supervision(item, 3)[1].tolist() == [1.0, 1.0, 1.0]
    item["mask"][1] = 0  # a positive finding with an empty mask is unknown, not "absent"
    assert item_supervision(item, 3)[1].tolist() == [1.0, 0.0, 1.0]
    item["seg_valid"] = torch.ones(3)  # explicit validity wins
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
    from PIL import Image

    Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "fb").mkdir()
    for i, (finding, box) in enumerate([("Nodule", [0, 0, 20, 20]), ("Mass", [20, 20, 20, 20])]):
        (tmp_path / "fb" / f"{i}.json").write_text(json.dumps(
            _record(id=f"r{i}", finding=finding, boxes=[box], image_path="../img.png")))
    ds = FeedbackDataset(load_feedback(tmp_path / "fb"), ["Nodule", "Effusion", "Mass"], image_size=8)
    assert len(ds) == 1
    item = ds[0]
    assert item["image"].shape == (1, 8, 8)
    assert item["labels"].tolist() == [1.0, 0.0, 1.0] and item["seg_valid"].tolist() == [1.0, 0.0, 1.0]
    assert item["mask"][0, :4, :4].all() and item["mask"][2, 4:, 4:].all() and item["mask"][1].sum() == 0


def test_feedback_without_image_path_is_found_by_sha256(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 20), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    lookup = index_images_by_sha256([tmp_path / "a.png"])
    (sha,) = lookup
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb" / "r.json").write_text(json.dumps(_record(image_sha256=sha, boxes=[[10, 0, 10, 10]])))
    records = load_feedback(tmp_path / "fb")
    with pytest.raises(ValueError, match="not in image_lookup"):
        FeedbackDataset(records, ["Nodule"], image_size=4)
    item = FeedbackDataset(records, ["Nodule"], image_size=4, image_lookup=lookup)[0]
    torch.testing.assert_close(item["image"], torch.full((1, 4, 4), 200 / 255))
    assert item["mask"][0, :2, 2:].all() and item["mask"].sum() == 4


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
    unfit = choose_thresholds(y, p)  # 2 positives per class < 5 (the default): no thresholds, no F1 / MCC
    assert np.isnan(unfit).all() and classification_table(y, p, unfit, ["A", "B"])[["f1", "mcc"]].isna().all().all()
    thr = choose_thresholds(y, p, min_positives=2)
    table = classification_table(y, p, thr, ["A", "B"])
    assert list(table.columns) == ["auc", "f1", "mcc"]
    assert table.loc["A", "auc"] == 1.0 and table.loc["A", "f1"] == 1.0 and table.loc["A", "mcc"] == 1.0
