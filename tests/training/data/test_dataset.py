"""ManifestDataset and transforms: boxes move with the content (analytic fixtures), masks, loaders."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.data import transforms as T
from training.data.dataset import ManifestDataset, collate
from training.data.phantom import generate_phantom, render_case
from training.data.schema import PHANTOM_CLASSES, write_manifest


def _row(image_id, path, labels, boxes, width, height, split="train", patient=None):
    return {"image_id": image_id, "path": str(path), "patient_id": patient or image_id, "split": split,
            "view": "PA", "labels": labels, "boxes": boxes, "width": width, "height": height,
            "report": None, "source": "test"}


@pytest.fixture
def square_manifest(tmp_path):
    """A 40 x 20 (W x H) image with a bright rectangle at columns 10..19, rows 5..9, and its box."""
    img = np.zeros((20, 40), np.uint8)
    img[5:10, 10:20] = 255
    Image.fromarray(img).save(tmp_path / "sq.png")
    rows = [_row("sq", "sq.png", ["Mass"], [{"label": "Mass", "x": 10.0, "y": 5.0, "w": 10.0, "h": 5.0}],
                 40, 20),
            _row("empty", "sq.png", [], [], 40, 20, split="val")]
    path = tmp_path / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path)
    return path


def _bright_bbox(img: torch.Tensor, level: float = 0.5):
    ys, xs = torch.nonzero(img[0] > level, as_tuple=True)
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


def test_resize_moves_boxes_analytically(square_manifest):
    ds = ManifestDataset(square_manifest, classes=["Mass", "Nodule"], image_size=16)
    item = ds[0]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    # x scales by 16/40, y by 16/20
    torch.testing.assert_close(item["boxes"], torch.tensor([[4.0, 4.0, 8.0, 8.0]]))
    assert item["box_labels"].tolist() == [0]
    assert item["labels"].tolist() == [1.0, 0.0]
    assert item["image_id"] == "sq" and item["index"] == 0
    # the content sits where the box says (pixels fully inside are bright)
    assert item["image"][0, 5:7, 5:7].min() > 0.9 and item["image"][0, :, 10:].max() < 0.1


def test_boxes_in_original_pixels_scale_by_manifest_width(tmp_path):
    """NIH-style: boxes refer to the 1024-px original although the stored image is smaller."""
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.png")
    rows = [_row("a", "a.png", ["Nodule"], [{"label": "Nodule", "x": 512.0, "y": 256.0, "w": 128.0,
                                             "h": 64.0}], 1024, 1024)]
    write_manifest(pd.DataFrame(rows), tmp_path / "m.parquet")
    item = ManifestDataset(tmp_path / "m.parquet", classes=["Nodule"], image_size=32)[0]
    torch.testing.assert_close(item["boxes"], torch.tensor([[16.0, 8.0, 20.0, 10.0]]))


def test_split_classes_and_counts(square_manifest):
    ds = ManifestDataset(square_manifest, image_size=16)
    assert ds.classes == ["Mass"]          # classes present, canonical order
    pos, neg = ds.class_counts()
    assert pos.tolist() == [1] and neg.tolist() == [1]
    assert len(ManifestDataset(square_manifest, split="val", image_size=16)) == 1
    assert len(ManifestDataset(square_manifest, split=["train", "val"], image_size=16)) == 2
    with pytest.raises(ValueError, match="unknown split"):
        ManifestDataset(square_manifest, split="training")
    with pytest.raises(ValueError, match="image_size"):
        ManifestDataset(square_manifest, image_size=0)
    with pytest.raises(ValueError, match="unique"):
        ManifestDataset(square_manifest, classes=["Mass", "Mass"])


def test_hflip_moves_box_with_content():
    img = torch.zeros(1, 32, 32)
    img[:, 4:10, 3:8] = 1
    out, boxes, _ = T.hflip(img, torch.tensor([[3.0, 4.0, 8.0, 10.0]]))
    assert boxes.tolist() == [[24.0, 4.0, 29.0, 10.0]]
    assert _bright_bbox(out) == (24, 4, 29, 10)


@pytest.mark.parametrize("angle,scale,shift", [(0, 1.0, (0.1, -0.05)), (90, 1.0, (0, 0)),
                                               (7, 1.1, (0.05, 0.03)), (-6, 0.9, (-0.06, 0.0))])
def test_affine_moves_box_with_content(angle, scale, shift):
    img = torch.zeros(1, 64, 64)
    img[:, 12:24, 36:50] = 1
    box = torch.tensor([[36.0, 12.0, 50.0, 24.0]])
    out, boxes, _, keep = T.affine(img, box, angle, scale, shift)
    assert keep.tolist() == [0]
    x0, y0, x1, y1 = boxes[0].tolist()
    bx0, by0, bx1, by1 = _bright_bbox(out)
    # the box covers the bright content (1 px for interpolation) ...
    assert x0 <= bx0 + 1 and y0 <= by0 + 1 and x1 >= bx1 - 1 and y1 >= by1 - 1
    # ... and is not much larger than it (enclosing box of a rotated rectangle)
    assert (x1 - x0) * (y1 - y0) <= 1.45 * (bx1 - bx0) * (by1 - by0) + 4


def test_affine_90_degrees_is_exact():
    img = torch.zeros(1, 8, 8)
    img[:, 0:2, 0:4] = 1   # rows 0-1, cols 0-3
    out, boxes, _, _ = T.affine(img, torch.tensor([[0.0, 0.0, 4.0, 2.0]]), 90.0)
    torch.testing.assert_close(boxes, torch.tensor([[6.0, 0.0, 8.0, 4.0]]), atol=1e-5, rtol=0)
    assert _bright_bbox(out) == (6, 0, 8, 4)


def test_affine_drops_boxes_that_leave_the_image():
    img = torch.zeros(1, 32, 32)
    boxes = torch.tensor([[1.0, 1.0, 4.0, 4.0], [14.0, 14.0, 18.0, 18.0]])
    _, out, _, keep = T.affine(img, boxes, 0.0, 1.0, (-0.5, 0.0))   # 16 px to the left
    assert keep.tolist() == [1] and out.shape == (1, 4)
    torch.testing.assert_close(out, torch.tensor([[0.0, 14.0, 2.0, 18.0]]))  # clipped at the border


def test_dataset_augmentation_keeps_boxes_on_the_bright_square(tmp_path):
    img = np.zeros((64, 64), np.uint8)
    img[20:34, 8:24] = 255
    Image.fromarray(img).save(tmp_path / "b.png")
    rows = [_row("b", "b.png", ["Mass"], [{"label": "Mass", "x": 8.0, "y": 20.0, "w": 16.0, "h": 14.0}],
                 64, 64)]
    write_manifest(pd.DataFrame(rows), tmp_path / "m.parquet")
    cfg = T.AugmentConfig(brightness=0.0, contrast=(1.0, 1.0))
    ds = ManifestDataset(tmp_path / "m.parquet", image_size=32, augment=cfg, masks=True)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(25):
        item = ds[0]
        (x0, y0, x1, y1), = item["boxes"].tolist()
        bx0, by0, bx1, by1 = _bright_bbox(item["image"])
        assert x0 <= bx0 + 1 and y0 <= by0 + 1 and x1 >= bx1 - 1 and y1 >= by1 - 1
        assert (x1 - x0) * (y1 - y0) <= 1.5 * (bx1 - bx0) * (by1 - by0) + 4
        # the mask moves with the image: bright pixels are masked
        bright = item["image"][0] > 0.9
        assert item["mask"][0][bright].min() == 1.0
        flipped += bx0 > 16
    assert 3 <= flipped <= 22  # flips happen, not always


def test_brightness_contrast_stays_in_range():
    x = torch.linspace(0, 1, 11).reshape(1, 1, 11)
    y = T.brightness_contrast(x, 0.2, 1.5)
    assert y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y[0, 0, 5], torch.tensor(0.7))


def test_masks_from_boxes_and_polygons(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "p.png")
    row = _row("p", "p.png", ["Mass", "Nodule"],
               [{"label": "Mass", "x": 2.0, "y": 3.0, "w": 5.0, "h": 4.0}], 32, 32)
    df = pd.DataFrame([row])
    ds = ManifestDataset(df.assign(path=str(tmp_path / "p.png")), classes=["Mass", "Nodule"],
                         image_size=32, masks=True)
    m = ds[0]["mask"]
    assert m.shape == (2, 32, 32)
    assert m[0].sum().item() == 20 and m[0, 3:7, 2:7].min() == 1 and m[1].sum() == 0
    # a triangle polygon for Nodule (no box): rasterised into the Nodule channel
    df["polygons"] = [[{"label": "Nodule", "points": [[20.0, 20.0], [30.0, 20.0], [20.0, 30.0]]}]]
    ds = ManifestDataset(df.assign(path=str(tmp_path / "p.png")), classes=["Mass", "Nodule"],
                         image_size=16, masks=True)
    m = ds[0]["mask"]
    assert 10 <= m[1].sum().item() <= 22 and m[1, 10:15, 10].min() == 1 and m[1, :9].sum() == 0


def test_phantom_masks_come_from_mask_files(tmp_path):
    mpath = generate_phantom(tmp_path, n=16, size=64, seed=1, masks=True, workers=1)
    ds = ManifestDataset(mpath, image_size=64, masks=True)
    assert ds.classes == list(PHANTOM_CLASSES)
    for i in range(16):
        case = render_case(1, i, 64)
        item = ds[i]
        assert item["image_id"] == case.image_id
        np.testing.assert_allclose(item["image"][0].numpy(), case.image, atol=0.6 / 255)
        for label, m in case.masks.items():
            c = ds.classes.index(label)
            assert bool((item["mask"][c].numpy() > 0)[m].all())   # drawn pixels are masked
            boxes = [b for b in case.boxes if b["label"] == label]
            for b, xyxy in zip(boxes, item["boxes"][item["box_labels"] == c].tolist()):
                assert xyxy == [b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]]


def test_collate_and_pickle(tiny_phantom):
    ds = ManifestDataset(tiny_phantom, image_size=32, masks=True, split="train")
    batch = collate([ds[i] for i in range(5)])
    assert batch["image"].shape == (5, 1, 32, 32) and batch["labels"].shape == (5, len(ds.classes))
    assert batch["mask"].shape == (5, len(ds.classes), 32, 32)
    assert batch["index"].tolist() == list(range(5)) and len(batch["boxes"]) == 5
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[3]["image"], ds[3]["image"])
    with pytest.raises(ValueError, match="empty"):
        collate([])


@pytest.mark.slow
def test_dataloader_with_workers(tiny_phantom):
    ds = ManifestDataset(tiny_phantom, image_size=32, augment=True)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate, shuffle=True)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (1, 32, 32)
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))
