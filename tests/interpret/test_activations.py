"""Streaming pooled activations: equal to the full computation, top-k and subset maps, cache."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from interpret.activations import collect_activations, model_fingerprint


class Images(Dataset):
    def __init__(self, n: int = 13, size: int = 12, seed: int = 0):
        self.x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "image_id": f"img{i}"}


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 5, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
    m.feature_layer = "0"
    return m


def test_pooled_values_topk_and_subset_equal_full_computation():
    model, ds = _model(), Images()
    res = collect_activations(model, DataLoader(ds, batch_size=4), top_k=3, map_indices=[1, 7, 99],
                              progress=False)
    with torch.no_grad():
        full = model[0](ds.x)                                            # (N, 5, 6, 6)
    torch.testing.assert_close(res.mean, full.mean((2, 3)))
    torch.testing.assert_close(res.max, full.amax((2, 3)))
    torch.testing.assert_close(res.min, full.amin((2, 3)))
    assert res.image_ids == [f"img{i}" for i in range(13)]
    assert res.map_indices.tolist() == [1, 7]                            # 99 is beyond the data
    torch.testing.assert_close(res.maps, full[[1, 7]])
    order = full.amax((2, 3)).argsort(0, descending=True)[:3].t()        # (C, 3)
    assert torch.equal(res.top_indices, order)
    torch.testing.assert_close(res.top_maps, full[order, torch.arange(5)[:, None]])
    # a plain (images, labels) loader and the mean criterion
    res2 = collect_activations(model, DataLoader(torch.utils.data.TensorDataset(ds.x), 5),
                               top_k=2, top_by="mean", progress=False)
    assert res2.image_ids[0] == "0"
    assert torch.equal(res2.top_indices, full.mean((2, 3)).argsort(0, descending=True)[:2].t())


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="unknown layer"):
        collect_activations(model, Images(), "9", progress=False)
    with pytest.raises(ValueError, match="top_by"):
        collect_activations(model, Images(), top_by="median", progress=False)
    with pytest.raises(ValueError, match="DataLoader"):
        collect_activations(model, 42, progress=False)


def test_cache_keyed_by_model_and_data_content(tmp_path):
    model, ds = _model(), Images()
    cache = tmp_path / "cache"
    a = collect_activations(model, ds, batch_size=6, cache_dir=cache, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1
    b = collect_activations(model, ds, batch_size=6, cache_dir=cache, progress=False)
    assert b.key == a.key and len(list(cache.iterdir())) == 1
    torch.testing.assert_close(b.max, a.max)
    fp = model_fingerprint(model)
    with torch.no_grad():
        model[0].bias[0] += 1.0                                          # new weights: miss
    assert model_fingerprint(model) != fp
    c = collect_activations(model, ds, batch_size=6, cache_dir=cache, progress=False)
    assert c.key != a.key and len(list(cache.iterdir())) == 2
    ds.x[3, 0, 0, 0] += 0.5                                              # new data content: miss
    d = collect_activations(model, ds, batch_size=6, cache_dir=cache, progress=False)
    assert d.key not in (a.key, c.key)
    e = collect_activations(model, ds, batch_size=6, cache_dir=cache, top_k=2, progress=False)
    assert e.key != d.key                                                # parameters in the key


def test_manifest_cache_uses_file_metadata(tiny_phantom, tmp_path):
    model, cache = _model(), tmp_path / "cache"
    a = collect_activations(model, tiny_phantom, image_size=32, batch_size=16, cache_dir=cache,
                            progress=False)
    assert a.mean.shape == (48, 5) and len(a.image_ids) == 48
    # the same content in another folder (renamed path) still hits the cache
    copy = tmp_path / "copy"
    shutil.copytree(tiny_phantom.parent, copy, copy_function=shutil.copy2)
    b = collect_activations(model, copy / tiny_phantom.name, image_size=32, batch_size=16,
                            cache_dir=cache, progress=False)
    assert b.key == a.key and len(list(cache.iterdir())) == 1
    c = collect_activations(model, copy / tiny_phantom.name, image_size=48, batch_size=16,
                            cache_dir=cache, progress=False)
    assert c.key != a.key and np.isfinite(c.mean.numpy()).all()
