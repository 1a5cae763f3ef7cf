"""The audit's on-disk arrays: every index the sections use reads back exactly what was written, and the
sections give the same answers on a store as on the in-memory tensor (so the audit still scores what is served)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interpret.audit.store import SpillArray, gap, iter_batches


def _filled(n=11, shape=(3, 4, 5), **kw):
    ref = np.random.default_rng(0).standard_normal((n,) + shape).astype(np.float32)
    store = SpillArray(shape, **kw)
    for s in range(0, n, 4):  # appended in uneven batches
        store.append(torch.from_numpy(ref[s:s + 4]))
    return ref, store


@pytest.mark.parametrize("key", [0, -1, 7, slice(None), slice(2, 9), slice(1, 10, 3), slice(None, None, -2),
                                 [5, 1, 1, 10], np.array([3, 4, 5]), torch.tensor([9, 0]),
                                 np.arange(11) % 3 == 0, (2, 0), (slice(1, 4), 1, slice(0, 2)),
                                 ([4, 2], slice(1, 2)), (torch.tensor([6, 3]), 2), []])
def test_indexing_reads_back_what_numpy_would(key):
    ref, store = _filled()
    got = store[key]
    assert isinstance(got, torch.Tensor)
    want = ref[tuple(np.asarray(k) if isinstance(k, (list, torch.Tensor)) else k for k in key)
               if isinstance(key, tuple) else (np.asarray(key, dtype=np.int64) if isinstance(key, list)
                                               else (key.numpy() if isinstance(key, torch.Tensor) else key))]
    np.testing.assert_array_equal(got.numpy(), want)


def test_shape_len_bytes_iteration_and_errors():
    ref, store = _filled()
    assert store.shape == ref.shape and len(store) == 11 and store.dim() == 4 and store.ndim == 4
    assert store.nbytes == ref.nbytes
    np.testing.assert_array_equal(store.numpy(), ref)
    np.testing.assert_array_equal(torch.stack(list(store)).numpy(), ref)
    np.testing.assert_array_equal(torch.cat([b for _, b in iter_batches(store, 4)]).numpy(), ref)
    with pytest.raises(IndexError, match="out of range"):
        store[11]
    with pytest.raises(IndexError, match="out of range"):
        store[[0, 12]]
    with pytest.raises(IndexError, match="boolean index"):
        store[np.ones(3, bool)]
    with pytest.raises(ValueError, match=r"rows must be \(B, 3, 4, 5\)"):
        store.append(np.zeros((2, 3, 4, 4)))


def test_bool_store_reads_numpy_and_the_pooled_rows_match_torch():
    masks = SpillArray((6, 6), dtype=bool, as_tensor=False)
    ref = np.random.default_rng(1).random((5, 6, 6)) > 0.5
    masks.append(ref)
    assert isinstance(masks[1:3], np.ndarray) and masks[1:3].dtype == bool
    np.testing.assert_array_equal(masks[[4, 0]], ref[[4, 0]])
    ref_f, feats = _filled(pool=True)
    # the same float32 torch mean the sections computed on the in-memory maps
    np.testing.assert_array_equal(gap(feats).numpy(), torch.from_numpy(ref_f).mean(dim=(2, 3)).numpy())
    np.testing.assert_array_equal(gap(torch.from_numpy(ref_f)).numpy(), gap(feats).numpy())
    _, plain = _filled()
    np.testing.assert_allclose(gap(plain).numpy(), gap(feats).numpy(), rtol=1e-6)
    with pytest.raises(AttributeError, match="pool=True"):
        plain.pooled


def test_the_file_is_anonymous_and_goes_on_close(tmp_path):
    store = SpillArray((2,), folder=str(tmp_path))
    store.append(np.ones((3, 2)))
    assert list(tmp_path.iterdir()) == []  # unlinked at creation: nothing is left behind, even on a kill
    store.close()
    store.close()  # idempotent


def test_dissection_on_a_store_equals_the_tensor_and_streams_past_the_budget():
    from interpret.dissection import dissect_activations

    rng = np.random.default_rng(2)
    n, k, h = 12, 5, 8
    acts = torch.from_numpy(rng.random((n, k, h, h)).astype(np.float32))
    store = SpillArray((k, h, h))
    store.append(acts)
    boxes = [np.array([[4.0, 4.0, 20.0, 28.0]]) for _ in range(n)]
    labels = [np.array([i % 2]) for i in range(n)]
    kw = dict(classes=["Effusion", "Nodule"], image_size=32, q=0.05)
    ref = dissect_activations(acts, boxes, labels, **kw).to_json()
    on_disk = dissect_activations(store, boxes, labels, quantile="auto", **kw).to_json()
    assert on_disk["per_class"] == ref["per_class"] and on_disk["overall"] == ref["overall"]
    # past the budget: the streaming histogram over the store (threshold never below the exact one, bounded error)
    streamed = dissect_activations(store, boxes, labels, quantile="auto", exact_budget_bytes=1024, **kw)
    assert streamed.params["quantile"] == "histogram"
    exact = dissect_activations(acts, boxes, labels, **kw)
    assert np.all(streamed.thresholds >= exact.thresholds - 1e-7)
    assert np.all(streamed.thresholds - exact.thresholds <= streamed.threshold_error + 1e-7)


def test_the_audit_sections_answer_the_same_on_disk_as_in_memory(tiny_phantom):
    from interpret.audit.probe import load_probe
    from interpret.audit.sections import attention_pass, importance_section, infer
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", classes=list(PHANTOM_CLASSES), image_size=64).eval()
    mem = load_probe(tiny_phantom, model.class_names, 64, "all", 16, 0)
    disk = load_probe(tiny_phantom, model.class_names, 64, "all", 16, 0, on_disk=True)
    assert isinstance(mem.images, torch.Tensor) and isinstance(disk.images, SpillArray)
    np.testing.assert_array_equal(disk.images.numpy(), mem.images.numpy())
    assert disk.image_ids == mem.image_ids and np.array_equal(disk.labels, mem.labels)
    np.testing.assert_array_equal(disk.artefacts[:], mem.artefacts)
    probs_d, feats_d = infer(model, disk.images, 8)
    with torch.no_grad():
        logits, feats_m = model.forward_all(mem.images)
    np.testing.assert_allclose(feats_d.numpy(), feats_m.numpy(), atol=1e-5)
    ap_d = attention_pass(model, disk, "gradcam", 8)
    ap_m = attention_pass(model, mem, "gradcam", 8)
    np.testing.assert_allclose(ap_d.outside, ap_m.outside, atol=1e-6)
    np.testing.assert_allclose(ap_d.localization[["iobb", "ior"]].to_numpy(),
                               ap_m.localization[["iobb", "ior"]].to_numpy(), atol=1e-6)
    t_d, _ = importance_section(model, disk, feats_d, {}, 3)
    t_m, _ = importance_section(model, mem, feats_m, {}, 3)
    np.testing.assert_allclose(t_d["importance"].to_numpy(), t_m["importance"].to_numpy(), rtol=1e-4, atol=1e-6)


def test_bound_heap_applies_on_glibc():
    import platform

    from interpret.audit.store import bound_heap

    applied = bound_heap()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied in (True, False)


def test_pooled_rows_are_joined_once_and_shared_between_reads():
    ref, feats = _filled(pool=True)
    first, second = gap(feats), gap(feats)
    assert first.data_ptr() == second.data_ptr()  # no (N, K) copy per read: the sections read it five times
    more = np.random.default_rng(2).standard_normal((3, 3, 4, 5)).astype(np.float32)
    feats.append(more)  # rows appended after a read are joined on the next read
    want = torch.from_numpy(np.concatenate([ref, more])).mean(dim=(2, 3)).numpy()
    np.testing.assert_array_equal(gap(feats).numpy(), want)
    empty = SpillArray((3, 2, 2), pool=True)
    assert tuple(empty.pooled.shape) == (0, 3)
