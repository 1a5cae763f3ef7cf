"""Cyclic DWARF training, GAIN / VLM baselines, resuming, evaluation on tiny synthetic data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.dwarf_helpers import CLASSES, SquaresDataset, tiny_bundle
from training.dwarf.model import build_dwarf
from training.dwarf.train import (InMemoryDataset, TrainConfig, decompose, evaluate, label_matrix, list_methods,
                                  matched_epochs, train)


@pytest.fixture(scope="module")
def data():
    return SquaresDataset(n=16, size=32, seed=0)


def _model(bundle, **kw):
    return build_dwarf(bundle, CLASSES, d_model=32, heads=2, decoder_layers=1, expert_hidden=2, expert_kernel=3, **kw)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=3e-3, progress=False, device="cpu")  # one step per epoch
    base.update(kw)
    return TrainConfig(**base)


def test_decompose_single_label_sets():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0], [0, 0]])
    rng = np.random.default_rng(0)
    idx = decompose(labels, 0, rng, negatives_per_positive=1.0)
    assert {0, 1} <= set(idx) and len(idx) == 4 and (labels[idx, 0] == 0).sum() == 2
    assert len(decompose(labels, 1, rng, negatives_per_positive=10.0)) == 6  # capped at available negatives
    assert matched_epochs(labels, dwarf_epochs=2) == 2  # 4 + 4 samples ~ 8 / 6 -> 2 multi-label epochs


def test_cyclic_schedule_trains_one_disease_per_epoch(data):
    bundle = tiny_bundle()
    model = _model(bundle)
    hist = train(model, data, "dwarf", _cfg(epochs=4, disease_order=["Mass", "Nodule", "Effusion"]))
    assert [h["disease"] for h in hist] == ["Mass", "Nodule", "Effusion", "Mass"]
    labels = label_matrix(data)
    assert hist[0]["n"] == len(decompose(labels, 2, np.random.default_rng([0, 0])))
    assert all(np.isfinite(h["loss"]) and h["seg"] > 0 for h in hist)


def test_one_dwarf_epoch_moves_only_that_disease_expert(data):
    model = _model(tiny_bundle())
    train(model, data, "dwarf", _cfg(epochs=1, disease_order=["Effusion", "Nodule", "Mass"]))
    w = model.experts.conv2.weight.detach().view(3, -1)
    assert w[1].abs().sum() > 0  # Effusion's expert learned
    assert w[0].abs().sum() == 0 and w[2].abs().sum() == 0  # others still exactly identity


def test_gain_and_vlm_leave_experts_at_identity(data):
    for method in ("vlm", "gain"):
        model = _model(tiny_bundle())
        hist = train(model, data, method, _cfg(epochs=1))
        assert hist[0]["n"] == len(data) and hist[0]["disease"] is None
        assert (hist[0]["seg"] == 0) == (method == "vlm")
        out = model(data.images[:2])
        assert torch.equal(out.refined_maps, out.raw_maps)


def test_resume_continues_exactly(tmp_path, data):
    torch.manual_seed(0)
    full = _model(tiny_bundle())
    train(full, data, "dwarf", _cfg(epochs=2))
    torch.manual_seed(0)
    part = _model(tiny_bundle())
    train(part, data, "dwarf", _cfg(epochs=1, checkpoint_dir=str(tmp_path)))
    torch.manual_seed(0)
    resumed = _model(tiny_bundle())
    hist = train(resumed, data, "dwarf", _cfg(epochs=2, checkpoint_dir=str(tmp_path)))
    assert [h["epoch"] for h in hist] == [0, 1]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_evaluate_and_in_memory_dataset(data):
    cached = InMemoryDataset(data)
    assert cached.masks.dtype == torch.bool
    np.testing.assert_array_equal(label_matrix(cached), data.labels.numpy())
    model = _model(tiny_bundle())
    ev = evaluate(model, cached, batch_size=8, device="cpu", progress=False)
    assert ev.probabilities.shape == (16, 3) and ev.labels.shape == (16, 3)
    assert ev.max_dice.shape == (3,) and np.all((ev.max_dice >= 0) & (ev.max_dice <= 1))
    np.testing.assert_allclose(ev.max_dice, ev.max_dice_raw)  # identity experts


def test_unknown_method_and_order(data):
    model = _model(tiny_bundle())
    with pytest.raises(ValueError, match="valid: vlm, gain, dwarf"):
        train(model, data, "cam", _cfg())
    with pytest.raises(ValueError, match="unknown diseases"):
        train(model, data, "dwarf", _cfg(disease_order=["Hernia"]))
    assert list_methods() == ["vlm", "gain", "dwarf"]


@pytest.mark.slow
def test_dwarf_learns_localisation_on_squares(deterministic):
    data = InMemoryDataset(SquaresDataset(n=48, size=32, seed=1))
    model = _model(tiny_bundle())
    train(model, data, "vlm", _cfg(epochs=3))
    before = evaluate(model, data, device="cpu", progress=False).max_dice.mean()
    train(model, data, "dwarf", _cfg(epochs=9, lam=0.7))
    after = evaluate(model, data, device="cpu", progress=False).max_dice.mean()
    assert after > before
