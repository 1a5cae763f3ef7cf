"""training.runtime: the one schedule, seeding, label matrices and collation every loop uses."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from training.runtime import (collate, deterministic, label_matrix, multi_hot, resolve_device, seed_everything,
                              warmup_cosine)


def test_warmup_cosine_ramps_to_the_base_rate_once_then_decays_to_the_floor():
    assert warmup_cosine(0, 100, 10) == pytest.approx(1 / 11)
    assert warmup_cosine(9, 100, 10) == pytest.approx(10 / 11)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)          # the only step at the base rate
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(150, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 100, 0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, floor=0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, floor=0.1) == pytest.approx(0.1)
    steps = [warmup_cosine(s, 100, 10) for s in range(101)]
    assert all(a < b for a, b in zip(steps[:10], steps[1:11]))       # strictly rising to the peak
    assert all(a >= b for a, b in zip(steps[10:], steps[11:]))       # never rising after it
    with pytest.raises(ValueError, match="floor"):
        warmup_cosine(0, 10, 1, floor=1.5)


def test_the_loops_share_the_schedule_and_the_helpers():
    import importlib

    # training.dwarf re-exports its function ``train``, which hides the submodule as an attribute
    clip_train, dwarf_train, classifier_train = (importlib.import_module(m) for m in (
        "training.clip.train", "training.dwarf.train", "training.train"))

    assert classifier_train.warmup_cosine is clip_train.warmup_cosine is warmup_cosine
    assert classifier_train.resolve_device is dwarf_train.resolve_device is resolve_device
    assert classifier_train.label_matrix is dwarf_train.label_matrix is label_matrix
    assert not hasattr(clip_train, "_lr_at")


def test_seeding_and_the_deterministic_block_restore_threads_and_generators():
    threads = torch.get_num_threads()
    seed_everything(3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    before = torch.get_rng_state()
    with deterministic(5, threads=1):
        assert torch.get_num_threads() == 1
        inside = torch.rand(3)
    with deterministic(5, threads=1):
        torch.testing.assert_close(torch.rand(3), inside, rtol=0, atol=0)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match="threads"):
        seed_everything(0, threads=0)


def test_multi_hot_and_label_matrix():
    y = multi_hot([["Effusion"], None, [], ["Nodule", "Effusion", "Hernia"]], ["Nodule", "Effusion"])
    np.testing.assert_array_equal(y, [[0, 1], [0, 0], [0, 0], [1, 1]])
    assert y.dtype == np.float32
    with pytest.raises(ValueError, match="unique"):
        multi_hot([[]], ["a", "a"])

    class Items:
        labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"labels": self.labels[i]}

    np.testing.assert_array_equal(label_matrix(Items()), Items.labels.numpy())      # the attribute
    np.testing.assert_array_equal(label_matrix(Subset(Items(), [1])), Items.labels[1:].numpy())  # item by item


def test_collate_stacks_tensors_keeps_ragged_fields_as_lists_and_fills_defaults():
    items = [{"image": torch.zeros(1, 4, 4), "labels": torch.tensor([1.0, 0.0]), "boxes": torch.zeros(k, 4),
              "box_labels": torch.zeros(k, dtype=torch.long), "image_id": f"i{k}", "index": 7 + k} for k in (1, 1)]
    out = collate(items)
    assert out["image"].shape == (2, 1, 4, 4) and out["labels"].dtype == torch.float32
    assert isinstance(out["boxes"], list) and out["image_id"] == ["i1", "i1"]  # lists even at equal lengths
    assert out["index"].tolist() == [8, 8] and out["index"].dtype == torch.long
    assert "mask" not in out
    partial = [dict(items[0], mask=torch.ones(2, 4, 4)), items[1]]
    assert "mask" not in collate(partial)                     # a field only when every item has it
    filled = collate([{"image": np.zeros((1, 2, 2)), "labels": [0, 1]}], defaults={"cls_valid": torch.ones(2)})
    assert filled["cls_valid"].tolist() == [[1.0, 1.0]] and filled["index"].tolist() == [0]
    assert filled["image"].dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_onnx_providers_choose_cuda_only_when_onnxruntime_has_it(monkeypatch):
    import onnxruntime as ort

    from training.runtime import onnx_providers

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers() == ["CPUExecutionProvider"]

