"""interpret.vlm: normalised, batch-invariant embeddings and a content-keyed on-disk cache."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from interpret.vlm import VLMAdapter, model_fingerprint
from tests.training.test_clip import TINY_CFG, hf_clip_dir  # noqa: F401  (fixture)
from training.clip import ImagePreprocess, load_clip


@pytest.fixture()
def bundle(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    return load_clip(path)


class Counter:
    """Wraps a bound encode method and counts the rows it embeds."""

    def __init__(self, fn):
        self.fn, self.rows = fn, 0

    def __call__(self, x):
        self.rows += len(x["input_ids"]) if isinstance(x, dict) else len(x)
        return self.fn(x)


def _write_png(path, arr):
    Image.fromarray((arr * 255).round().astype(np.uint8)).save(path)


def test_embeddings_normalised_batch_invariant_and_equal_to_the_model(bundle):
    images = torch.rand(7, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    texts = ["A chest x-ray image of a Nodule", "no effusion", "a", "large mass in the left lung", "x"]
    one, many = VLMAdapter(bundle, batch_size=1, progress=False), VLMAdapter(bundle, batch_size=3, progress=False)
    z1, z3 = one.encode_images(images), many.encode_images(images)
    assert z1.shape == (7, 16) and z1.dtype == torch.float32
    torch.testing.assert_close(z1.norm(dim=1), torch.ones(7), rtol=0, atol=1e-5)
    torch.testing.assert_close(z1, z3, rtol=0, atol=1e-5)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(bundle.model.encode_image(bundle.preprocess(images)), dim=-1)
    torch.testing.assert_close(z3, ref, rtol=0, atol=1e-5)
    # grey is repeated to 3 channels
    torch.testing.assert_close(many.encode_images(images.repeat(1, 3, 1, 1)), z3, rtol=0, atol=1e-5)
    t1, t3 = one.encode_texts(texts), many.encode_texts(texts)
    assert t1.shape == (5, 16)
    torch.testing.assert_close(t1, t3, rtol=0, atol=1e-5)
    torch.testing.assert_close(t3.norm(dim=1), torch.ones(5), rtol=0, atol=1e-5)
    assert many.encode_texts([]).shape == (0, 16)


def test_bad_inputs_are_named(bundle):
    vlm = VLMAdapter(bundle, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\].*range \[0, 255\]"):
        vlm.encode_images(torch.full((1, 1, 8, 8), 255.0).index_fill_(2, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match="shape"):
        vlm.encode_images(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="single string"):
        vlm.encode_texts("no effusion")
    with pytest.raises(ValueError, match="not found"):
        vlm.encode_images(["/nonexistent/a.png"])
    with pytest.raises(ValueError, match="batch_size"):
        VLMAdapter(bundle, batch_size=0)


def test_cache_is_keyed_by_content_not_names(bundle, tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.png")
        _write_png(files[-1], rng.random((36, 36)))
    cache = tmp_path / "cache"
    vlm = VLMAdapter(bundle, batch_size=2, cache_dir=cache, progress=False)
    counter = Counter(bundle.model.encode_image)
    bundle.model.encode_image = counter
    z = vlm.encode_images(files)
    assert counter.rows == 3 and z.shape == (3, 16) and len(list(cache.glob("*.pt"))) == 1
    # same pixels as a tensor: what the files decode to
    from training.data.imageio import read_image
    stack = torch.stack([torch.from_numpy(read_image(f))[None] for f in files])
    torch.testing.assert_close(VLMAdapter(bundle, progress=False).encode_images(stack), z, rtol=0, atol=1e-5)
    counter.rows = 0

    renamed = [tmp_path / f"renamed{i}.png" for i in range(3)]
    for a, b in zip(files, renamed):
        shutil.copy(a, b)
    torch.testing.assert_close(vlm.encode_images(renamed), z, rtol=0, atol=0)  # same bytes: cache hit
    assert counter.rows == 0
    _write_png(files[1], rng.random((36, 36)))  # same name, new content: miss
    z2 = vlm.encode_images(files)
    assert counter.rows == 3 and not torch.allclose(z2[1], z[1]) and torch.allclose(z2[0], z[0], atol=1e-6)

    texts = ["no effusion", "small nodule"]
    t = vlm.encode_texts(texts)
    counter_t = Counter(bundle.model.encode_text)
    bundle.model.encode_text = counter_t
    torch.testing.assert_close(vlm.encode_texts(texts), t, rtol=0, atol=0)
    assert counter_t.rows == 0
    vlm.encode_texts(texts[::-1])
    assert counter_t.rows == 2

    # another preprocessing (same model) or other weights: other keys
    assert vlm.cache_key("images", "x") != VLMAdapter(
        type(bundle)(**{**bundle.__dict__, "preprocess": ImagePreprocess(32, interpolation="bilinear")}),
        progress=False).cache_key("images", "x")
    before = model_fingerprint(bundle.model)
    with torch.no_grad():
        bundle.model.logit_scale.add_(1.0)
    assert model_fingerprint(bundle.model) != before
    fresh = VLMAdapter(bundle, cache_dir=cache, progress=False)
    assert fresh.cache_key("texts", "x") != vlm.cache_key("texts", "x")


def test_hf_clip_bundle_through_the_adapter(hf_clip_dir):  # noqa: F811
    b = load_clip(hf_clip_dir)
    vlm = VLMAdapter(b, batch_size=2, progress=False)
    z = vlm.encode_images(torch.rand(3, 1, 48, 48))
    t = vlm.encode_texts(["a chest x-ray", "no effusion", "mass"])
    assert z.shape == (3, 16) and t.shape == (3, 16)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(vlm.encode_texts(["no effusion"])[0], t[1], rtol=0, atol=1e-5)
