"""Dissection on a constructed model whose units are known detectors of the boxed squares."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from interpret.dissection import dissect, dissect_activations, unit_thresholds

SLOTS = [(4, 4), (4, 20), (20, 4), (20, 20)]            # top-left corners of 4x4 squares
MARKER = (12, 12)                                          # unboxed 0.3-intensity marker
LAYOUT = [  # (A slots, B slots) per image; A squares have intensity 1.0, B squares 0.5
    ([0], [3]), ([0, 1], []), ([], [2]), ([], []), ([0, 1, 2], [3]), ([], [0, 1])]


class Squares(Dataset):
    def __len__(self):
        return len(LAYOUT)

    def __getitem__(self, i):
        img = torch.zeros(1, 32, 32)
        img[0, MARKER[1]:MARKER[1] + 4, MARKER[0]:MARKER[0] + 4] = 0.3
        boxes, labels = [], []
        for cls, slots, value in ((0, LAYOUT[i][0], 1.0), (1, LAYOUT[i][1], 0.5)):
            for s in slots:
                x, y = SLOTS[s]
                img[0, y:y + 4, x:x + 4] = value
                boxes.append([x, y, x + 4, y + 4])                    # tight, end-exclusive
                labels.append(cls)
        return {"image": img, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "box_labels": torch.tensor(labels, dtype=torch.long), "image_id": f"sq{i}"}


def collate(batch):
    return {"image": torch.stack([b["image"] for b in batch]),
            "boxes": [b["boxes"] for b in batch], "box_labels": [b["box_labels"] for b in batch],
            "image_id": [b["image_id"] for b in batch]}


class Detectors(nn.Module):
    """unit 0: A squares; unit 1: A and B squares; unit 2: the marker; unit 3: never positive."""

    def forward(self, x):
        return torch.cat([F.relu(x - 0.75), F.relu(x - 0.4),
                          ((x - 0.3).abs() < 0.01).float(), -x], 1)


class Net(nn.Module):
    feature_layer = "features"

    def __init__(self, pool: int = 1):
        super().__init__()
        self.features = nn.Sequential(Detectors(), nn.AvgPool2d(pool) if pool > 1 else nn.Identity())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _loader():
    return DataLoader(Squares(), batch_size=4, collate_fn=collate)


# A images: 0, 1, 4 with 1 + 2 + 3 squares; B images: 0, 2, 4, 5 with 1 + 1 + 1 + 2 squares
@pytest.mark.parametrize("quantile", ["exact", "histogram"])
def test_counts_and_concepts_of_known_detectors(quantile):
    res = dissect(Net(), _loader(), classes=["A", "B"], q=0.5, quantile=quantile, bins=64,
                  unit_chunk=3, progress=False)
    pc = res.per_class
    assert pc.loc["A", "n_images"] == 3 and pc.loc["B", "n_images"] == 4
    assert pc.loc["A", "components"] == 12 and pc.loc["A", "disjoint"] == pytest.approx(4.0)
    assert pc.loc["A", "unit_hits"] == 6 and pc.loc["A", "unique"] == pytest.approx(2.0)
    assert pc.loc["B", "components"] == 5 and pc.loc["B", "disjoint"] == pytest.approx(5 / 4)
    assert pc.loc["B", "unique"] == pytest.approx(1.0)
    assert pc.loc["A", "units_detecting"] == 2 and pc.loc["B", "units_detecting"] == 1
    assert res.overall["n_images"] == 5
    assert res.overall["disjoint"] == pytest.approx(17 / 5)
    assert res.overall["unique"] == pytest.approx(8 / 5)
    # IoU: unit 0 == A squares exactly; unit 1 covers 6 A + 5 B squares of 16 px
    np.testing.assert_allclose(res.iou[0], [1.0, 0.0])
    np.testing.assert_allclose(res.iou[1], [96 / 176, 80 / 176])
    np.testing.assert_allclose(res.iou[2:], 0.0)
    assert list(res.unit_concepts["concept"]) == ["A", "A", None, None]
    row = res.per_image[(res.per_image["image_id"] == "sq4") & (res.per_image["class"] == "A")]
    assert row[["components", "units"]].values.tolist() == [[6, 2]]
    if quantile == "exact":
        np.testing.assert_array_equal(res.thresholds, 0.0)
        assert res.threshold_error.max() == 0
    else:
        assert (res.thresholds >= 0).all() and (res.thresholds <= res.threshold_error).all()
    js = res.to_json()
    assert js["per_class"][0]["class"] == "A" and js["overall"]["n_images"] == 5


def test_low_resolution_maps_are_upsampled_before_labelling():
    # 2x average pooling: each square becomes a 2x2 block; bilinear upsampling spreads it by a
    # pixel, but every square is still exactly one component on its own box
    res = dissect(Net(pool=2), _loader(), classes=["A", "B"], q=0.5, quantile="exact",
                  progress=False)
    assert res.per_class.loc["A", "components"] == 12
    assert res.per_class.loc["B", "components"] == 5
    assert list(res.unit_concepts["concept"][:2]) == ["A", "A"]


def test_precomputed_activations_give_the_same_result():
    ds = Squares()
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        acts = Net().features(torch.stack([it["image"] for it in items]))
    res = dissect_activations(acts, [it["boxes"] for it in items],
                              [it["box_labels"] for it in items], ["A", "B"], 32, q=0.5,
                              batch_size=5, unit_chunk=1)
    assert res.overall["disjoint"] == pytest.approx(17 / 5)
    np.testing.assert_allclose(res.iou[1], [96 / 176, 80 / 176])


def test_histogram_threshold_within_stated_bound_of_exact():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(8, 6, 5, 5, generator=g) * torch.arange(1, 7).view(1, 6, 1, 1)
            for _ in range(4)]
    for q in (0.01, 0.04, 0.3):
        exact, zero = unit_thresholds(lambda: iter(acts), q, "exact")
        ref = torch.cat([a.transpose(0, 1).reshape(6, -1) for a in acts], 1)
        n = ref.shape[1]
        np.testing.assert_allclose(exact, np.quantile(ref.numpy(), 1 - q, axis=1, method="lower"))
        assert (zero == 0).all()
        approx, err = unit_thresholds(lambda: iter(acts), q, "histogram", bins=256)
        assert (approx >= exact - 1e-6).all() and (approx <= exact + err + 1e-6).all()
        span = ref.amax(1) - ref.amin(1)
        torch.testing.assert_close(err, span / 256)
        assert n == 800


def test_bad_arguments():
    with pytest.raises(ValueError, match="q must lie"):
        dissect(Net(), _loader(), classes=["A", "B"], q=1.5, progress=False)
    with pytest.raises(ValueError, match="quantile must be one of"):
        dissect(Net(), _loader(), classes=["A", "B"], quantile="approx", progress=False)
    with pytest.raises(ValueError, match="unknown layer"):
        dissect(Net(), _loader(), layer="featurez", classes=["A", "B"], progress=False)
    with pytest.raises(ValueError, match="classes="):
        dissect(Net(), _loader(), progress=False)


def _reference_rows(acts, boxes, labels, thr, size, connectivity):
    """The definition, one unit at a time: per (image, class | any) components on a box, units hit."""
    from scipy import ndimage

    from interpret.localization import boxes_to_mask

    s = ndimage.generate_binary_structure(2, connectivity)
    rows = []
    for i in range(acts.shape[0]):
        b, lab = np.asarray(boxes[i], np.float32).reshape(-1, 4), np.asarray(labels[i]).reshape(-1)
        present = sorted(set(lab.tolist()))
        masks = {k: boxes_to_mask(b[lab == k], size) for k in present}
        if present:
            masks[-1] = np.logical_or.reduce([masks[k] for k in present])
        comps = {k: 0 for k in masks}
        units = {k: 0 for k in masks}
        for u in range(acts.shape[1]):
            up = F.interpolate(acts[i:i + 1, u:u + 1], size=size, mode="bilinear",
                               align_corners=False)[0, 0]
            lab_u, _ = ndimage.label((up > thr[u]).numpy(), structure=s)
            for k, m in masks.items():
                n = len(set(np.unique(lab_u[m]).tolist()) - {0})
                comps[k] += n
                units[k] += n > 0
        rows += [(str(i), k, comps[k], units[k]) for k in present] + (
            [(str(i), -1, comps[-1], units[-1])] if present else [])
    return rows


def _rows(res):
    names = {n: k for k, n in enumerate(res.classes)} | {"any": -1}
    return [(r.image_id, names[r[1]], int(r.components), int(r.units))
            for r in res.per_image.itertuples(index=False)]


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("case", ["random", "planted"])
def test_batched_labelling_counts_equal_the_per_unit_reference(case, connectivity):
    g = torch.Generator().manual_seed(connectivity)
    N, C, h, S = 6, 7, 5, 40
    if case == "random":      # smooth random maps: many small components, some touching unit borders
        acts = torch.randn(N, C, h, h, generator=g)
    else:                     # planted blobs: unit u fires at its own places, touching neighbours' blobs
        acts = torch.zeros(N, C, h, h)
        for i in range(N):
            for u in range(C):
                ys, xs = torch.randint(0, h, (2, 1 + u % 3), generator=g)
                acts[i, u, ys, xs] = 1.0 + u
        acts[:, 3] = acts[:, 2]                      # identical maps on adjacent units stay apart
    boxes, labels = [], []
    for i in range(N):
        k = i % 3                                     # 0, 1 or 2 boxes (images 0 and 3: none)
        xy = torch.rand(k, 2, generator=g) * S * 0.6
        boxes.append(torch.cat([xy, xy + S * 0.4], 1))
        labels.append(torch.randint(0, 2, (k,), generator=g))
    for chunk in (1, 3, 64):
        res = dissect_activations(acts, boxes, labels, ["A", "B"], S, q=0.2, unit_chunk=chunk,
                                  connectivity=connectivity, batch_size=4)
        thr = torch.as_tensor(res.thresholds, dtype=torch.float32)
        ref = _reference_rows(acts, boxes, labels, thr, (S, S), connectivity)
        assert _rows(res) == ref
        assert sum(r[2] for r in ref) > 0
