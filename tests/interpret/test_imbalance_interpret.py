"""The imbalance study's interpret columns (issue 14, defects 2 and 7): its maps are the library's served
Grad-CAM maps (ReLU, then min-max), a binary classifier is explained against all boxes, and T-DenseNet is
dissected at the paper's resolution (28 x 28 maps at 224 px)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from interpret import attention_maps
from interpret.experiments import IMBALANCE_METHOD, interpret_table
from interpret.localization import masks_from_boxes, soft_scores
from training.models import create_model

CLASSES = ["A", "B"]


class Boxed(Dataset):
    """Constructed images with boxes: image i has a box of class i % 2 (and image 0 one of each class)."""

    def __init__(self, n: int = 6, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, size, size, generator=g)
        s = size
        self.boxes = [np.array([[s * 0.1, s * 0.2, s * 0.5, s * 0.6]] + ([[s * 0.5, s * 0.4, s * 0.9, s * 0.9]]
                                                                      if i == 0 else []), np.float32)
                      for i in range(n)]
        self.labels = [np.array([i % 2] + ([1] if i == 0 else []), np.int64) for i in range(n)]
        self.classes = list(CLASSES)
        self.box_label_arrays = self.labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "boxes": torch.from_numpy(self.boxes[i]),
                "box_labels": torch.from_numpy(self.labels[i]), "labels": torch.zeros(len(CLASSES)),
                "image_id": str(i), "index": i}


def _served_iobb(model, ds: Boxed, relu: bool = True) -> dict[str, tuple[float, float]]:
    """Per class the mean soft IoBB / IoR of the library's attention maps (what /explain serves)."""
    out = {}
    for k, name in enumerate(CLASSES):
        idx = [i for i in range(len(ds)) if k in ds.labels[i]]
        images = ds.images[idx]
        targets = torch.full((len(idx), 1), k)
        maps = attention_maps(model, images, targets, IMBALANCE_METHOD, relu=relu)[:, 0].numpy()
        masks = masks_from_boxes([ds.boxes[i] for i in idx], [ds.labels[i] for i in idx], targets.numpy(),
                                 images.shape[-1])[:, 0]
        s = soft_scores(maps, masks)
        out[name] = (float(s["iobb"].mean()), float(s["ior"].mean()))
    return out


def test_study_maps_are_the_served_maps_with_relu():
    """Defect 2: the study scored raw CAMs (relu=False); the authors (and the service) use Grad-CAM with
    ReLU, then min-max. On a seeded tiny ResNet whose maps have negative parts the two differ; the study's
    IoBB / IoR must equal those of the served maps."""
    torch.manual_seed(0)
    model = create_model("test_resnet", classes=CLASSES).eval()
    ds = Boxed()
    table, overall = interpret_table(model, ds, list(range(len(ds))), q=0.04, batch_size=4, progress=False)
    served, raw = _served_iobb(model, ds), _served_iobb(model, ds, relu=False)
    for name in CLASSES:
        assert table.loc[name, "iobb"] == pytest.approx(served[name][0], abs=1e-6)
        assert table.loc[name, "ior"] == pytest.approx(served[name][1], abs=1e-6)
    assert any(abs(served[c][0] - raw[c][0]) > 1e-3 for c in CLASSES)     # the ReLU matters on this model
    assert overall["method"] == "gradcam" and overall["protocol"] == "paper"
    assert table.loc["A", "n_boxed"] == 3 and table.loc["B", "n_boxed"] == 4


def test_binary_classifier_is_explained_against_all_boxes():
    torch.manual_seed(0)
    model = create_model("test_resnet", classes=["Abnormal"]).eval()
    ds = Boxed()
    table, overall = interpret_table(model, ds, list(range(len(ds))), q=0.04, batch_size=4, progress=False)
    assert list(table.index) == ["Abnormal"] and table.loc["Abnormal", "n_boxed"] == len(ds)
    maps = attention_maps(model, ds.images, torch.zeros(len(ds), 1, dtype=torch.long), IMBALANCE_METHOD)[:, 0]
    masks = np.stack([masks_from_boxes([b], [np.zeros(len(b), int)], np.zeros((1, 1), int), 32)[0, 0]
                      for b in ds.boxes])
    assert table.loc["Abnormal", "iobb"] == pytest.approx(float(soft_scores(maps.numpy(), masks)["iobb"].mean()),
                                                          abs=1e-6)
    assert table.loc["Abnormal", "disjoint"] == pytest.approx(overall["disjoint"])


@pytest.mark.parametrize("protocol", ["paper", "authors_code"])
def test_t_densenet_is_dissected_at_28x28_at_224_px(protocol):
    """Defect 7: T-DenseNet (DenseNet121 cut after denseblock2) dissected with q = .01 on 28 x 28 maps at
    224 px, under both protocols."""
    from mlflow_projects.imbalance_study import dissection_q

    torch.manual_seed(0)
    model = create_model("t_densenet", classes=CLASSES, image_size=224).eval()
    ds = Boxed(n=2, size=224)
    q = dissection_q("t_densenet")
    table, overall = interpret_table(model, ds, [0, 1], q=q, batch_size=2, progress=False, protocol=protocol)
    assert q == 0.01 and overall["map_size"] == "28x28" and overall["image_size"] == "224x224"
    assert overall["protocol"] == protocol and overall["q"] == 0.01
    assert overall["disjoint"] >= overall["unique"] > 0
