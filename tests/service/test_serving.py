"""In-process tests of the service core (mlflow_projects.serving) and the feedback store."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math

import numpy as np
import pytest
import torch

from mlflow_projects.serving import (CLASSIFIER_METHODS, LRUCache, MicroBatcher, ServingError, decode_upload,
                                     grey_png, middleware_stack, overlay_png)
from mlflow_projects.serving.feedback import FeedbackError, FeedbackStore, validate_boxes
from mlflow_projects.serving.middleware import wrap
from tests.service.helpers import (CLASSES, NO_THRESHOLD_REASON, THRESHOLD_POSITIVES, THRESHOLDS, jpeg_bytes,
                                   mask_png_bytes, png_bytes)


def _png_size(b64: str) -> tuple[int, int]:
    from PIL import Image

    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(raw)) as img:
        return img.size


# ---- pure pieces (fast) -----------------------------------------------------------------------
def test_decode_upload_statuses():
    img = decode_upload(png_bytes(72, 64), 50_000_000)
    assert (img.width, img.height, img.format) == (72, 64, "png") and img.pixels.dtype == np.float32
    cases = [(None, 400, "empty body"), (b"", 400, "empty"), (b"GIF89a" + b"\0" * 200, 415, "unsupported"),
             (png_bytes()[:60], 400, "cannot read"), (png_bytes(100, 100), 413, "exceeds the limit")]
    for data, status, words in cases:
        with pytest.raises(ServingError) as err:
            decode_upload(data, 5000)
        assert err.value.status == status and words in err.value.message, (status, err.value.message)


def test_decode_upload_refuses_images_below_the_minimum_side():
    """A 1x1 PNG is not diagnosed: 400 naming its size and the minimum (64 px by default), from the header."""
    for (w, h), words in [((1, 1), "image is 1x1 px"), ((63, 200), "image is 63x200 px"),
                          ((200, 63), "image is 200x63 px")]:
        with pytest.raises(ServingError) as err:
            decode_upload(png_bytes(w, h), 50_000_000)
        assert err.value.status == 400 and words in err.value.message, err.value.message
        assert "the model was audited on images of at least 64 px a side" in err.value.message
        assert "CXR_MIN_IMAGE_SIDE" in err.value.message
    with pytest.raises(ServingError) as err:
        decode_upload(jpeg_bytes(40, 40), 50_000_000)
    assert err.value.status == 400 and "image is 40x40 px" in err.value.message
    assert decode_upload(png_bytes(64, 64), 50_000_000).width == 64  # the boundary is accepted
    assert decode_upload(png_bytes(1, 1), 50_000_000, min_side=1).width == 1  # the setting moves it
    with pytest.raises(ServingError) as err:
        decode_upload(png_bytes(72, 64), 50_000_000, min_side=65)
    assert "at least 65 px a side" in err.value.message


def test_min_image_side_setting_is_validated():
    from mlflow_projects.serving import ServeConfig

    assert ServeConfig.from_env({}).min_image_side == 64
    assert ServeConfig.from_env({"CXR_MIN_IMAGE_SIDE": "16"}).min_image_side == 16
    for bad, words in [("abc", "CXR_MIN_IMAGE_SIDE must be an integer, got 'abc'"),
                       ("0", "CXR_MIN_IMAGE_SIDE must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=words):
            ServeConfig.from_env({"CXR_MIN_IMAGE_SIDE": bad})


def test_findings_without_threshold_make_no_call():
    """Known answer on constructed metadata: a class whose threshold rests on 1 validation positive has no
    threshold, so no call (``positive: null``) and the reason, even though its probability (0.029) is above
    the max-F1 threshold (0.016) that one positive would have given; the other classes are called as before."""
    from mlflow_projects.common import ModelIdentity
    from mlflow_projects.serving import LoadedModel
    from mlflow_projects.serving.explain import findings

    lm = LoadedModel(ModelIdentity("m", "1", None, "x", "x"), "classifier", ["Effusion", "Hernia", "Nodule"],
                     [0.4, float("nan"), 0.5], 32, {}, CLASSIFIER_METHODS, threshold_positives=[12, 1, 7],
                     min_val_positives=5)
    out = findings(lm, np.array([0.45, 0.029, 0.2], np.float32))
    assert out[0] == {"name": "Effusion", "probability": pytest.approx(0.45), "threshold": 0.4, "positive": True}
    assert out[1] == {"name": "Hernia", "probability": pytest.approx(0.029), "threshold": None, "positive": None,
                      "threshold_reason": "no reliable threshold: 1 validation positive (< 5)"}
    assert out[2]["positive"] is False and "threshold_reason" not in out[2]
    json.dumps(out, allow_nan=False)  # valid JSON: no NaN anywhere
    older = LoadedModel(ModelIdentity("m", "1", None, "x", "x"), "classifier", ["A"], [float("nan")], 32, {},
                        CLASSIFIER_METHODS)  # a model that did not record its validation positives
    assert findings(older, np.array([0.9]))[0]["threshold_reason"] == \
        "no reliable threshold: too few validation positives"


def test_lru_cache_bounded_and_disabled():
    c = LRUCache(2)
    c.put("a", 1), c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)  # evicts b, the least recently used
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3 and len(c) == 2
    off = LRUCache(0)
    off.put("a", 1)
    assert off.get("a") is None


def test_microbatcher_batches_concurrent_items_and_keeps_order():
    calls = []

    def fn(x):
        calls.append(len(x))
        return [float(v.sum()) for v in x]

    mb = MicroBatcher(fn, max_batch=8, wait_ms=20)

    async def main():
        return await asyncio.gather(*(mb.submit(np.full((2,), i, np.float32)) for i in range(10)))

    out = asyncio.run(main())
    assert out == [2.0 * i for i in range(10)]
    assert sum(calls) == 10 and max(calls) == 8 and len(calls) == 2


@pytest.mark.parametrize("inflight", [1, 2])
def test_microbatcher_runs_up_to_inflight_batches_at_once(inflight):
    """With ``inflight`` 2 the next batch starts while the first still runs (never more than 2 at once);
    with 1 the batches run one after the other. Every caller gets its own result either way."""
    import threading
    import time as _time

    lock, now, peak = threading.Lock(), [0], [0]

    def fn(x):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        _time.sleep(0.05)
        with lock:
            now[0] -= 1
        return [float(v.sum()) for v in x]

    mb = MicroBatcher(fn, max_batch=1, inflight=inflight)

    async def main():
        return await asyncio.gather(*(mb.submit(np.full((1,), i, np.float32)) for i in range(6)))

    assert asyncio.run(main()) == [float(i) for i in range(6)]
    assert peak[0] == inflight and mb.batches == 6
    with pytest.raises(ValueError, match="inflight must be >= 1"):
        MicroBatcher(fn, inflight=0)


def test_microbatcher_error_reaches_every_caller():
    mb = MicroBatcher(lambda x: (_ for _ in ()).throw(RuntimeError("boom")), max_batch=4)

    async def main():
        return await asyncio.gather(*(mb.submit(np.zeros(1)) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_overlay_and_raw_png():
    pixels = np.random.default_rng(0).random((30, 50), dtype=np.float32)
    heat = np.zeros((16, 16), np.float32)
    heat[4:8, 4:8] = 1
    b64, size = overlay_png(pixels, heat, max_side=1024)
    assert size == [50, 30] and _png_size(b64) == (50, 30)
    b64, size = overlay_png(pixels, heat, max_side=25)  # bounded, aspect kept
    assert size == [25, 15] and _png_size(b64) == (25, 15)
    raw = np.arange(12, dtype=np.float32).reshape(3, 4) - 3
    b64, size, rng = grey_png(raw)
    from PIL import Image

    q = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    assert size == [4, 3] and rng == [-3.0, 8.0]
    np.testing.assert_allclose(rng[0] + q / 255 * (rng[1] - rng[0]), raw, atol=(rng[1] - rng[0]) / 255)


def test_overlay_pixels_are_the_alpha_blend_of_grey_and_jet():
    """The overlay's table lookup equals ``grey (1 - a) + jet(map) a`` with ``a = 0.45 map`` to one grey level,
    and exactly where the map is 0 (the image) or 1 (the full-opacity colour)."""
    from matplotlib import colormaps
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.random((40, 40), dtype=np.float32)
    heat = np.zeros((40, 40), np.float32)
    heat[:, 20:] = np.linspace(0, 1, 20, dtype=np.float32)
    b64, _ = overlay_png(pixels, heat, max_side=1024)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(float)
    grey = np.floor(np.clip(pixels, 0, 1) * 255 + 0.5)[..., None]
    level = np.floor(heat * 255 + 0.5).astype(int)
    jet = np.floor(colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255)[level]
    a = 0.45 * heat[..., None]
    want = np.floor(grey * (1 - a) + jet * a + 0.5)
    assert np.abs(got - want).max() <= 1
    np.testing.assert_array_equal(got[:, :20], np.repeat(grey[:, :20], 3, -1))  # map 0: the image itself


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (30, 50), (257, 131), (1, 1, 3), (5, 4, 3), (64, 72, 3),
                                   (300, 301), (301, 300, 3)])  # the last two: deflated in two halves at once
def test_png_bytes_round_trips_through_pillow(shape):
    """The service's own PNG encoder (Up filter, deflate level 1) decodes to the exact pixels, in the PNG
    mode of the array (L or RGB), with no ancillary chunks; the uint8 wrap of the filter is exercised by
    full-range noise."""
    from PIL import Image

    from mlflow_projects.serving.images import png_bytes

    arr = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(arr)
    img = Image.open(io.BytesIO(data))
    img.load()  # CRC and zlib stream checked by the decoder
    assert img.mode == ("L" if len(shape) == 2 else "RGB") and img.info == {}
    np.testing.assert_array_equal(np.asarray(img), arr)
    smooth = np.tile(np.arange(shape[1], dtype=np.uint8), (shape[0], 1))
    smooth = np.repeat(smooth[..., None], 3, -1) if len(shape) == 3 else smooth
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(smooth)))), smooth)


def test_png_bytes_is_the_same_image_when_the_helper_thread_is_busy():
    """A large PNG is deflated in two halves by two threads, or in one piece when the helper thread is taken by
    another request: both decode to the same pixels."""
    from PIL import Image

    from mlflow_projects.serving import images

    rng = np.random.default_rng(3)  # compressible (random bytes would be stored blocks either way)
    arr = (np.add.outer(np.arange(200), np.arange(200))[..., None] // 3 + rng.integers(0, 4, (200, 200, 3)))
    arr = arr.astype(np.uint8)
    split = images.png_bytes(arr)
    assert images._HELPER_FREE.acquire(blocking=False)
    try:
        whole = images.png_bytes(arr)
    finally:
        images._HELPER_FREE.release()
    assert split != whole  # two different deflate streams ...
    for data in (split, whole):  # ... of the same pixels
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 3), np.uint8),
                                 np.zeros(5, np.uint8)])
def test_png_bytes_refuses_what_it_cannot_encode(bad):
    from mlflow_projects.serving.images import png_bytes

    with pytest.raises(ValueError, match="uint8 \\(H, W\\) or \\(H, W, 3\\)"):
        png_bytes(bad)


def test_feedback_store_atomic_append_only(tmp_path):
    from training.dwarf.supervision import load_feedback

    store = FeedbackStore(tmp_path)
    sha = "ab" * 32
    a = store.append(image_sha256=sha, finding="Nodule", boxes=[[1, 2, 3, 4]], author="dr-x")
    b = store.append(image_sha256=sha, finding="Mass", mask_png=base64.b64encode(mask_png_bytes()).decode(),
                     image=np.full((8, 8), 0.5, np.float32))
    assert a["id"] != b["id"] and len(store.list()) == 2
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    assert (tmp_path / b["image_path"]).is_file()
    recs = load_feedback(tmp_path)  # the DWARF engineer's reader accepts the format
    assert {r.id for r in recs} == {a["id"], b["id"]} and recs[0].boxes == [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(FeedbackError, match="64 hex"):
        store.append(image_sha256="xyz", finding="Nodule", boxes=[[1, 2, 3, 4]])
    with pytest.raises(FeedbackError, match="boxes"):
        store.append(image_sha256=sha, finding="Nodule")
    for bad in ("[[1, 2, 0, 4]]", "[[1, 2]]", "nope", [[-1, 0, 2, 2]]):
        with pytest.raises(FeedbackError):
            validate_boxes(bad)
    with pytest.raises(FeedbackError, match="beyond"):
        validate_boxes([[40, 0, 20, 5]], width=48, height=40)


def _asgi_call(app, path="/predict", method="POST", headers=(), body=b""):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": path, "method": method, "headers": list(headers), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def test_middlewares_auth_limits_and_access_log(caplog):
    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = wrap(inner, middleware_stack(api_keys=["k1", "k2"], max_body_bytes=100))
    mp = (b"content-type", b"multipart/form-data; boundary=x")
    assert _asgi_call(app, "/livez", "GET")[0] == 200  # probes need no key
    assert _asgi_call(app, "/readyz", "GET")[0] == 200
    assert _asgi_call(app, headers=[mp, (b"content-length", b"3")], body=b"abc")[0] == 401
    assert _asgi_call(app, "/metrics", "GET", headers=[(b"authorization", b"Bearer nope")])[0] == 401
    auth = (b"authorization", b"Bearer k2")
    assert _asgi_call(app, headers=[auth, mp, (b"content-length", b"3")], body=b"abc") == (200, b"ok")
    status, body = _asgi_call(app, headers=[auth, mp, (b"content-length", b"500")], body=b"x" * 500)
    assert status == 413 and b"exceeds" in body
    status, body = _asgi_call(app, headers=[auth, (b"content-type", b"image/png"), (b"content-length", b"3")],
                              body=b"abc")
    assert status == 415 and b"multipart/form-data" in body
    with caplog.at_level(logging.INFO, logger="cxr.access"):
        assert _asgi_call(app, headers=[auth, (b"content-length", b"0")])[0] == 400
    rec = json.loads(caplog.records[-1].getMessage())
    assert rec["status"] == 400 and rec["path"] == "/predict" and "authorization" not in caplog.text.lower()
    assert "k2" not in caplog.text
    assert rec["auth"] == "ok"  # the auth middleware's outcome reaches the access log


def test_middlewares_streamed_body_limit_and_form_fields(caplog):
    """Without Content-Length the limit applies while reading (413); unknown form fields get 400."""
    seen = []

    async def inner(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = wrap(inner, middleware_stack(max_body_bytes=100))
    ctype = (b"content-type", b"multipart/form-data; boundary=x")

    def call(chunks, path="/predict"):
        sent, queue = [], list(chunks)

        async def receive():
            body = queue.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(queue)}

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "path": path, "method": "POST", "client": ("127.0.0.1", 1),
                 "headers": [ctype, (b"transfer-encoding", b"chunked")]}
        asyncio.run(app(scope, receive, send))
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return next(m["status"] for m in sent if m["type"] == "http.response.start"), body

    status, body = call([b"x" * 60, b"x" * 60])
    assert status == 413 and b"CXR_MAX_BODY_BYTES" in body and not seen
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc\r\n--x--\r\n'
    assert call([part[:20], part[20:]]) == (200, b"ok") and seen == [part]  # replayed whole to the app
    status, body = call([part.replace(b'name="image"', b'name="other"')])
    assert status == 400 and json.loads(body)["valid"] == ["image"]
    status, body = call([b'--x\r\nContent-Disposition: form-data; name="image"\r\n\r\nhttp://x/\r\n--x--\r\n'])
    assert status == 400 and b"must be a file upload" in body


def test_middlewares_json_feedback_fields_and_bad_content_length():
    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = wrap(inner, middleware_stack(max_body_bytes=1000))
    js = (b"content-type", b"application/json")
    ok = json.dumps({"finding": "Nodule", "image_sha256": "ab" * 32, "boxes": [[1, 2, 3, 4]]}).encode()
    assert _asgi_call(app, "/feedback", headers=[js, (b"content-length", str(len(ok)).encode())], body=ok) == (200, b"ok")
    for body, words in [(b"{not json", b"cannot be parsed"), (b"[1, 2]", b"must be an object"),
                        (json.dumps({"finding": "Nodule", "image": "/etc/passwd"}).encode(), b"must be a file upload"),
                        (json.dumps({"finding": "Nodule", "mask": "http://169.254.169.254/"}).encode(), b"file upload"),
                        (json.dumps({"finding": "Nodule", "url": "x"}).encode(), b"unknown field")]:
        status, out = _asgi_call(app, "/feedback", headers=[js, (b"content-length", str(len(body)).encode())],
                                 body=body)
        assert status == 400 and words in out, (body, out)
    status, out = _asgi_call(app, "/predict", headers=[js, (b"content-length", b"2")], body=b"{}")
    assert status == 415  # JSON only for /feedback
    status, out = _asgi_call(app, "/explain", headers=[(b"content-length", b"abc")], body=b"")
    assert status == 400 and b"Content-Length" in out


def _tiny_loaded_model(tmp_path):
    from mlflow_projects.common import ModelIdentity
    from mlflow_projects.serving import LoadedModel
    from training.export import export_onnx, onnx_session
    from training.models import create_model

    torch.manual_seed(0)
    net = create_model("test_resnet", classes=CLASSES, image_size=32).eval()
    sess = onnx_session(export_onnx(net, tmp_path / "m.onnx", image_size=32))
    lm = LoadedModel(ModelIdentity("m", "1", None, "x", "x"), "classifier", CLASSES, [0.5] * 4, 32, {},
                     CLASSIFIER_METHODS, torch_model=net, session=sess, head_weight=net.head.weight.detach().numpy(),
                     head_bias=net.head.bias.detach().numpy(), feature_layer=net.feature_layer)
    return net, lm


def test_explanation_maps_are_interpret_maps(tmp_path):
    """CAM from ONNX features x head weights, and Grad-CAM on the torch model, == interpret's maps."""
    from interpret import attention_maps
    from mlflow_projects.serving import explanation_maps

    net, lm = _tiny_loaded_model(tmp_path)
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = lm.run_batch(x.numpy())[0]
    for method in ("cam", "gradcam"):
        maps, raw = explanation_maps(lm, x.numpy(), [0, 2], method)
        assert maps.shape == (2, 32, 32) and raw.shape[0] == 2
        ref_maps, ref_raw = attention_maps(net, x, [[0, 2]], method=method, return_raw=True)
        torch.testing.assert_close(torch.from_numpy(raw), ref_raw[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(maps), ref_maps[0], atol=1e-4, rtol=1e-4)
    again, _ = explanation_maps(lm, x.numpy(), [0, 2], "cam", out=out)  # the forward pass handed in
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(explanation_maps(lm, x.numpy(), [0, 2])[0]))
    with torch.no_grad():
        probs = net(x).sigmoid()[0].numpy()
    np.testing.assert_allclose(out["probabilities"], probs, atol=1e-5)
    with pytest.raises(ValueError, match="1, 1, S, S"):
        explanation_maps(lm, x[0].numpy(), [0])
    with pytest.raises(ServingError) as err:
        explanation_maps(lm, x.numpy(), [0], "lime")
    assert err.value.status == 400 and err.value.valid == list(CLASSIFIER_METHODS)


def test_top_units_are_linear_contributions(tmp_path):
    from mlflow_projects.serving import top_units

    _, lm = _tiny_loaded_model(tmp_path)
    lm.unit_concepts = {3: {"concepts": ["opacity"], "scores": [0.9], "evidence": 12, "method": "mammi"}}
    pooled = np.random.default_rng(0).random(lm.head_weight.shape[1], dtype=np.float32)  # (K,)
    units = top_units(lm, pooled, [1, 2], 4)
    for c, rows in zip([1, 2], units):
        by_hand = pooled * lm.head_weight[c]  # a_k * w_ck
        assert [u["unit"] for u in rows] == np.argsort(-by_hand, kind="stable")[:4].tolist()
        np.testing.assert_allclose([u["contribution"] for u in rows], np.sort(by_hand)[::-1][:4], rtol=1e-6)
        for u in rows:
            assert u["concepts"] == (["opacity"] if u["unit"] == 3 else [])
            assert u["evidence"] == (12 if u["unit"] == 3 else None)
    assert top_units(lm, pooled, [1], 0) == [[]]


def test_maps_model_maps_are_normalised_upsampled_pyfunc_maps():
    """A maps pyfunc (DWARF): its [0, 1] maps, bilinearly upsampled and min-max normalised, as before."""
    from interpret.attention.base import minmax_normalize, upsample
    from mlflow_projects.common import ModelIdentity
    from mlflow_projects.serving import LoadedModel, explanation_maps

    rng = np.random.default_rng(0)
    maps_out = rng.random((1, 3, 8, 8)).astype(np.float32)

    class Pyfunc:
        def predict(self, x):
            return {"probabilities": np.full((len(x), 3), 0.5, np.float32), "maps": maps_out}

    lm = LoadedModel(ModelIdentity("d", "1", None, "x", "x"), "maps", ["A", "B", "C"], [0.5] * 3, 16, {},
                     ("dwarf",), pyfunc=Pyfunc())
    maps, raw = explanation_maps(lm, np.zeros((1, 1, 16, 16), np.float32), [2, 0])
    np.testing.assert_array_equal(raw, maps_out[0, [2, 0]])
    ref = minmax_normalize(upsample(torch.from_numpy(maps_out[:, [2, 0]]), (16, 16)))[0]
    torch.testing.assert_close(torch.from_numpy(maps), ref)


# ---- with a registered model (slow: a real MLflow store) -------------------------------------------
@pytest.mark.slow
def test_resolves_champion_fallback_and_audit(core, registry):
    """The served version's real audit: its served concepts (the library's rule, the audit's floor), its
    verdicts and its OOD detector are loaded."""
    import pandas as pd

    from interpret.annotation import served_unit_concepts

    info = core.model_info()
    assert info["name"] == "cxr-classifier" and info["version"] == registry.version and info["alias"] == "candidate"
    assert core.model.identity.fallback and core.model.audit_run_id == registry.audit_run_id
    summary = registry.summary
    table = pd.read_parquet(registry.audit_folder / "concepts.parquet")
    served = served_unit_concepts(table, "features.layer4", summary["config"]["min_evidence"])
    c = core.concepts()
    assert c["min_evidence"] == summary["config"]["min_evidence"] == 10
    assert {u["unit"]: u["evidence"] for u in c["units"]} == {u: v["evidence"] for u, v in served.items()}
    assert c["n_units"] == len(served) and c["n_units"] + c["n_withheld"] == 32
    assert set(core.model.verdicts) == set(CLASSES) and core.model.verdict_reason is None
    assert core.model.ood is not None and core.model.ood.layer == "features.layer4"
    assert core.model.ood.threshold == pytest.approx(summary["ood"]["threshold"])


@pytest.mark.slow
def test_registered_model_without_a_threshold_makes_no_call(core, registry):
    """The registered tiny classifier's Nodule rests on 1 validation positive: the version tag holds null,
    the loaded model NaN, and /predict and /explain answer ``positive: null`` with the reason."""
    from mlflow import MlflowClient

    tags = MlflowClient(registry.tracking_uri).get_model_version("cxr-classifier", registry.version).tags
    assert json.loads(tags["thresholds"]) == [None if math.isnan(t) else t for t in THRESHOLDS]
    assert json.loads(tags["threshold_positives"]) == THRESHOLD_POSITIVES
    assert core.model.threshold_positives == THRESHOLD_POSITIVES and core.model.min_val_positives == 5
    for r in (core.predict(png_bytes()), core.explain(png_bytes(), method="cam", targets="Nodule")):
        nodule = next(f for f in r["findings"] if f["name"] == "Nodule")
        assert nodule["threshold"] is None and nodule["positive"] is None
        assert nodule["threshold_reason"] == NO_THRESHOLD_REASON and 0 <= nodule["probability"] <= 1
        assert all(isinstance(f["positive"], bool) for f in r["findings"] if f["name"] != "Nodule")
        json.dumps(r, allow_nan=False)


@pytest.mark.slow
def test_predict_and_explain_every_method(core):
    r = core.predict(png_bytes(72, 64))
    assert [f["name"] for f in r["findings"]] == CLASSES and r["model"]["version"] == core.model.identity.version
    for f in r["findings"]:
        assert 0 <= f["probability"] <= 1
        if f["threshold"] is None:  # no call without a threshold
            assert f["positive"] is None and f["threshold_reason"]
        else:
            assert f["positive"] == (f["probability"] >= f["threshold"])
    positives = [f["name"] for f in r["findings"] if f["positive"]]
    for method in CLASSIFIER_METHODS:
        e = core.explain(png_bytes(72, 64), method=method, top_neurons=3)
        assert e["method"] == method and e["targets"] == (positives or e["targets"])
        for h in e["heatmaps"]:
            assert _png_size(h["overlay_png"]) == (72, 64) == tuple(h["overlay_size"])
            assert _png_size(h["map_png"]) == tuple(h["map_size"]) and h["map_range"][0] <= h["map_range"][1]
            assert len(h["top_units"]) == 3
            for u in h["top_units"]:  # concepts only where the audit serves them, with their evidence
                served = core.model.unit_concepts.get(u["unit"])
                assert u["concepts"] == (served["concepts"] if served else [])
                assert u["evidence"] == (served["evidence"] if served else None)
            assert h["verdict"]["status"] in ("fit", "unfit")
            contrib = [u["contribution"] for u in h["top_units"]]
            assert contrib == sorted(contrib, reverse=True)
        assert e["ood"]["threshold"] == core.model.ood.threshold
    e = core.explain(jpeg_bytes(), method="gradcam", targets="Nodule,Cardiomegaly", top_neurons=0)
    assert e["targets"] == ["Nodule", "Cardiomegaly"] and e["heatmaps"][0]["top_units"] == []


@pytest.mark.slow
def test_explain_cache_hits(core):
    data = png_bytes(64, 64, seed=7)
    first = core.explain(data, method="cam", targets=["Effusion"])
    hits = core.cache.hits
    again = core.explain(data, method="cam", targets='["Effusion"]')
    assert not first["cached"] and again["cached"] and core.cache.hits == hits + 1
    assert again["heatmaps"][0]["overlay_png"] == first["heatmaps"][0]["overlay_png"]


@pytest.mark.slow
def test_explain_bad_arguments(core):
    for kwargs, words in [({"method": "lime"}, "unknown method"), ({"targets": "Pneumonia"}, "unknown target"),
                          ({"top_neurons": "many"}, "top_neurons"), ({"top_neurons": 10_000}, "top_neurons")]:
        with pytest.raises(ServingError) as err:
            core.explain(png_bytes(), **kwargs)
        assert err.value.status == 400 and words in err.value.message
    with pytest.raises(ServingError) as err:
        core.explain(png_bytes(), method="nope")
    assert err.value.valid == list(CLASSIFIER_METHODS)


@pytest.mark.slow
def test_dicom_header_never_echoed_or_logged(core, real_fixtures, caplog):
    import pydicom

    path = next((real_fixtures / "dicom").glob("*.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    secrets = [str(ds.get(k)) for k in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID")
               if ds.get(k) not in (None, "")]
    assert secrets
    with caplog.at_level(logging.DEBUG):
        text = json.dumps([core.predict(path.read_bytes()), core.explain(path.read_bytes(), method="cam")])
    for s in secrets:
        assert s not in text and s not in caplog.text


@pytest.mark.slow
def test_async_paths_batch(core):
    async def main():
        return await asyncio.gather(*(core.apredict(png_bytes(seed=i)) for i in range(6)),
                                    core.aexplain(png_bytes(seed=9), method="cam"))

    before = core.batcher.items
    out = asyncio.run(main())
    assert len(out) == 7 and core.batcher.items == before + 7
    sync = core.predict(png_bytes(seed=0))["findings"]
    np.testing.assert_allclose([f["probability"] for f in out[0]["findings"]], [f["probability"] for f in sync],
                               atol=1e-6)


@pytest.mark.slow
def test_feedback_routes_into_store(core):
    from training.dwarf.supervision import load_feedback

    r = core.feedback(finding="nodule", image=png_bytes(80, 72), boxes="[[2, 3, 10, 8]]", author="dr-y")
    assert r["finding"] == "Nodule" and len(r["id"]) == 32
    r2 = core.feedback(finding="Effusion", image_sha256=r["image_sha256"], mask=mask_png_bytes())
    ids = {rec.id for rec in load_feedback(core.feedback_store.folder)}
    assert {r["id"], r2["id"]} <= ids
    for kwargs, words in [({"finding": "Pneumonia", "image_sha256": "ab" * 32, "boxes": "[[1,1,2,2]]"}, "unknown finding"),
                          ({"finding": "Nodule", "boxes": "[[1,1,2,2]]"}, "image"),
                          ({"finding": "Nodule", "image": png_bytes(80, 72), "boxes": "[[70,1,20,2]]"}, "beyond"),
                          ({"finding": "Nodule", "image": png_bytes(1, 1), "boxes": "[[0,0,1,1]]"}, "image is 1x1 px"),
                          ({"finding": "Nodule", "image_sha256": "ab" * 32}, "boxes")]:
        with pytest.raises(ServingError) as err:
            core.feedback(**kwargs)
        assert err.value.status == 400 and words in err.value.message, err.value.message


# ---- the audit as served: concepts, verdicts, OOD (constructed, known answers) --------------------
def _ci(estimate, low, high, n=6):
    return {"estimate": estimate, "low": low, "high": high, "n": n, "n_resamples": 1000, "confidence": 0.95,
            "n_valid": 1000, "method": "percentile"}


def _summary(min_evidence=10):
    """A summary.json in the audit's format: Effusion fit, Nodule unfit with two reasons."""
    def row(cls, verdict, reasons, lift, gain):
        return {"class": cls, "verdict": verdict, "reasons": reasons, "n_positives": 6,
                "criteria": {"localisation": {"status": "passed" if lift[1] > 0 else "failed", "lift": _ci(*lift),
                                              "pointing": 0.5, "chance": 0.1},
                             "faithfulness": {"status": "passed" if gain[1] > 0 else "failed",
                                              "metrics": {"deletion": {"gain": _ci(*gain)},
                                                          "insertion": {"gain": _ci(*gain)},
                                                          "road_morf": {"gain": _ci(0.0, -1.0, 1.0)}}},
                             "sanity": {"status": "passed", "final_spearman": {"cam": _ci(0.1, -0.1, 0.2, 16)}},
                             "concepts": {"status": "failed"}}}

    return {"config": {"min_evidence": min_evidence, "attention": "cam"},
            "verdicts": [row("Effusion", "fit", [], (0.4, 0.2, 0.6), (0.05, 0.01, 0.09)),
                         row("Nodule", "unfit", ["pointing game does not beat chance", "map no more faithful"],
                             (-0.1, -0.2, 0.0), (-0.01, -0.02, 0.0))],
            "unfit_classes": ["Nodule"]}


def _table():
    import pandas as pd

    return pd.DataFrame({"layer": ["features.layer4"] * 4, "unit": [0, 1, 2, 3], "method": ["mammi"] * 4,
                         "concepts": [["effusion"], ["heart"], ["rib"], ["opacity"]],
                         "scores": [[0.3], [0.2], [0.1], [0.4]], "evidence": [12, 3, 15, 10],
                         "vlm_blind": [False, False, True, False]})


def test_attach_audit_serves_only_sufficient_unblinded_concepts(tmp_path):
    """evidence 12, 3, 15 (VLM-blind), 10 at the audit's floor 10: units 0 and 3 are served, with their
    evidence; the audit's own min_evidence (2) serves unit 1 too; an old table (no evidence) serves none."""
    from mlflow_projects.serving import top_units
    from mlflow_projects.serving.explain import ExplanationService
    from mlflow_projects.serving.verdicts import attach_audit

    _, lm = _tiny_loaded_model(tmp_path)
    attach_audit(lm, "run1", _table(), _summary())
    assert lm.min_evidence == 10 and sorted(lm.unit_concepts) == [0, 3]
    assert lm.unit_concepts[0] == {"concepts": ["effusion"], "scores": [0.3], "evidence": 12, "method": "mammi"}
    pooled = np.zeros(lm.head_weight.shape[1], np.float32)
    pooled[[0, 1, 2, 3]] = 10.0
    units = {u["unit"]: u for u in top_units(lm, pooled, [0], lm.head_weight.shape[1])[0]}
    assert [units[u]["evidence"] for u in range(4)] == [12, None, None, 10]
    assert [units[u]["concepts"] for u in range(4)] == [["effusion"], [], [], ["opacity"]]
    svc = ExplanationService.__new__(ExplanationService)
    svc.model = lm
    c = svc.concepts()
    assert [(u["unit"], u["evidence"]) for u in c["units"]] == [(0, 12), (3, 10)]
    assert c["min_evidence"] == 10 and c["n_withheld"] == 2 and c["audit_run_id"] == "run1"
    attach_audit(lm, "run1", _table(), _summary(min_evidence=2))
    assert sorted(lm.unit_concepts) == [0, 1, 3]
    attach_audit(lm, "old", _table().drop(columns=["evidence", "vlm_blind"]), None)
    assert lm.unit_concepts == {} and lm.min_evidence == 10


def test_verdict_entries_warnings_and_key_figures(tmp_path, caplog):
    from mlflow_projects.serving.verdicts import (NO_VERDICT, attach_audit, banner_text, unfit_warning,
                                                  verdict_entry)

    _, lm = _tiny_loaded_model(tmp_path)
    attach_audit(lm, "run1", _table(), _summary())
    fit, reason = verdict_entry(lm, "Effusion")
    assert reason is None and fit["status"] == "fit" and fit["reasons"] == [] and fit["audit_run_id"] == "run1"
    assert fit["audited_method"] == "cam"
    assert fit["criteria"] == {"localisation": "passed", "faithfulness": "passed", "sanity": "passed",
                               "concepts": "failed"}
    f = fit["figures"]
    assert f["pointing_lift"] == {"estimate": 0.4, "low": 0.2, "high": 0.6, "n": 6, "confidence": 0.95}
    assert f["deletion_gain"]["low"] == 0.01 and f["insertion_gain"]["estimate"] == 0.05
    assert f["sanity_final_spearman"]["estimate"] == 0.1 and f["n_positives"] == 6
    assert f["pointing"] == 0.5 and f["pointing_chance"] == 0.1
    unfit, _ = verdict_entry(lm, "Nodule")
    assert unfit["status"] == "unfit" and unfit["reasons"][0] == "pointing game does not beat chance"
    assert unfit_warning("Nodule", unfit) == ("Nodule: the audit found this explanation unfit: pointing game does "
                                              "not beat chance (+1 more)")
    assert banner_text(unfit) == "UNFIT: pointing game does not beat chance"
    assert verdict_entry(lm, "Atelectasis") == (None, "no audit verdict for this class")
    with caplog.at_level(logging.WARNING, logger="mlflow_projects.serving.verdicts"):
        attach_audit(lm, "old", _table(), None)  # an audit without summary.json
    assert verdict_entry(lm, "Effusion") == (None, NO_VERDICT) == (None, "no audit verdict for this version")
    assert "has no verdicts" in caplog.text and "has no ood.npz" in caplog.text
    attach_audit(lm, None)  # no passing audit at all
    assert verdict_entry(lm, "Effusion") == (None, NO_VERDICT) and lm.ood is None
    json.dumps(fit, allow_nan=False)
    # a version with only a failed audit: its verdicts travel with the explanations, said to come from a failed
    # audit, and none of its concepts is served
    attach_audit(lm, "failed-run", None, {**_summary(), "status": "failed"})
    unfit, _ = verdict_entry(lm, "Nodule")
    assert unfit["status"] == "unfit" and unfit["audit_status"] == "failed" and unfit["audit_run_id"] == "failed-run"
    assert lm.unit_concepts == {}


def _detector(k, layer="features.layer4", threshold=10.0):
    from interpret.ood import FeatureOOD

    return FeatureOOD(layer=layer, mean=np.full(k, 0.5), whitening=np.eye(k) * 2.0, threshold=threshold,
                      target_false_alarm=0.05, n_fit=20, n_calibration=20, calibration_false_alarm=0.0)


def test_ood_entry_with_known_statistics(tmp_path, caplog):
    """A detector with mean 0.5 and whitening 2 I: score = 4 ||f - 0.5||^2, known by hand; the service
    scores the pooled features of the same forward pass; another layer, another K or a maps model: no score,
    the reason instead."""
    from mlflow_projects.common import ModelIdentity
    from mlflow_projects.serving import LoadedModel
    from mlflow_projects.serving.verdicts import attach_audit, ood_entry, ood_scores

    _, lm = _tiny_loaded_model(tmp_path)
    k = lm.head_weight.shape[1]
    path = _detector(k).save(tmp_path / "ood.npz")
    attach_audit(lm, "run1", _table(), _summary(), path)
    assert lm.ood is not None and lm.ood_reason is None
    near, far = np.full(k, 0.5), np.full(k, 0.5)
    near[0], far[0] = 1.0, 3.0  # scores 4 * 0.25 = 1 and 4 * 6.25 = 25
    outs = [{"pooled": near}, {"pooled": far}]
    ood_scores(lm, outs)
    assert outs[0]["ood_score"] == pytest.approx(1.0) and outs[1]["ood_score"] == pytest.approx(25.0)
    ok, reason = ood_entry(lm, outs[0])
    assert reason is None and ok == {"score": pytest.approx(1.0), "threshold": 10.0, "flagged": False,
                                     "warning": None, "layer": "features.layer4", "calibrated": True}
    flagged, _ = ood_entry(lm, outs[1])
    assert flagged["flagged"] and "unlike the images the model was audited on" in flagged["warning"]
    bad = [{"pooled": np.full(k, np.nan)}]
    ood_scores(lm, bad)
    assert ood_entry(lm, bad[0])[0] is None and "non-finite" in ood_entry(lm, bad[0])[1]
    # on the real forward pass: the runtime's pooled features are the GAP of its feature maps
    out = lm.run_batch(np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32))
    np.testing.assert_allclose(out[0]["pooled"], out[0]["features"].mean(axis=(1, 2)), rtol=1e-6)
    ood_scores(lm, out)
    assert out[0]["ood_score"] == pytest.approx(4 * float(((out[0]["pooled"] - 0.5) ** 2).sum()), rel=1e-6)
    with caplog.at_level(logging.WARNING):
        attach_audit(lm, "run1", _table(), _summary(), _detector(k, layer="features.layer3").save(tmp_path / "l3.npz"))
    assert lm.ood is None and "models layer 'features.layer3'" in lm.ood_reason and "layer3" in caplog.text
    attach_audit(lm, "run1", _table(), _summary(), _detector(k + 1).save(tmp_path / "k.npz"))
    assert lm.ood is None and f"{k + 1} features" in lm.ood_reason
    maps = LoadedModel(ModelIdentity("d", "1", None, "x", "x"), "maps", ["A"], [0.5], 16, {}, ("dwarf",))
    attach_audit(maps, "run1", None, _summary(), path)
    assert maps.ood is None and ood_entry(maps, {}) == (None, "no detector for this model kind")


def test_unfit_overlay_carries_a_banner():
    from PIL import Image

    from mlflow_projects.serving.images import BANNER_RGB

    pixels = np.full((64, 72), 0.5, np.float32)
    heat = np.zeros((16, 16), np.float32)
    plain, _ = overlay_png(pixels, heat, 1024)
    warned, size = overlay_png(pixels, heat, 1024, banner="UNFIT: pointing game does not beat chance")
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(plain))).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(warned))).convert("RGB"))
    assert size == [72, 64] and b.shape == a.shape
    assert tuple(b[0, 0]) == BANNER_RGB and tuple(b[0, -1]) == BANNER_RGB  # the band spans the top
    assert (b[1:12].min(axis=-1) > 200).any()  # white (antialiased) text in it
    np.testing.assert_array_equal(a[-20:], b[-20:])  # the map below is untouched


# ---- an audit written before verdicts, OOD and evidence existed (slow: a real MLflow store) ----------------
@pytest.mark.slow
def test_old_audit_serves_null_verdicts_and_no_ood(old_core, registry):
    assert old_core.model.audit_run_id == registry.old_audit_run_id
    r = old_core.predict(png_bytes())
    assert r["ood"] is None and r["ood_reason"] == "no OOD detector in the audit of this version"
    e = old_core.explain(png_bytes(), method="cam", targets="Effusion,Nodule", top_neurons=3)
    for h in e["heatmaps"]:
        assert h["verdict"] is None and h["verdict_reason"] == "no audit verdict for this version"
        assert all(u["concepts"] == [] and u["evidence"] is None for u in h["top_units"])  # no evidence: none served
    assert e["warnings"] == [] and e["ood"] is None and e["audit_run_id"] == registry.old_audit_run_id
    c = old_core.concepts()
    assert c["n_units"] == 0 and c["n_withheld"] == 32
    json.dumps([r, e, c], allow_nan=False)


@pytest.mark.slow
def test_explain_verdicts_are_the_audits(core, registry):
    summary = registry.summary
    by_class = {v["class"]: v for v in summary["verdicts"]}
    e = core.explain(png_bytes(seed=5), method="gradcam", targets=CLASSES, top_neurons=2)
    assert [h["target"] for h in e["heatmaps"]] == CLASSES
    for h in e["heatmaps"]:
        v, ref = h["verdict"], by_class[h["target"]]
        assert v["status"] == ref["verdict"] and v["reasons"] == ref["reasons"]
        assert v["audit_run_id"] == registry.audit_run_id and v["audited_method"] == "cam"
        lift = ref["criteria"]["localisation"].get("lift")
        assert (v["figures"]["pointing_lift"] or {}).get("estimate") == (lift or {}).get("estimate")
        gain = ref["criteria"]["faithfulness"]["metrics"]["deletion"]["gain"]
        assert v["figures"]["deletion_gain"]["low"] == gain["low"]
    unfit = [c for c in CLASSES if by_class[c]["verdict"] == "unfit"]
    assert unfit == summary["unfit_classes"]
    assert e["warnings"] == [f"{c}: the audit found this explanation unfit: {by_class[c]['reasons'][0]}"
                             + (f" (+{len(by_class[c]['reasons']) - 1} more)" if len(by_class[c]["reasons"]) > 1 else "")
                             for c in unfit]


def test_a_class_the_audit_did_not_check_is_served_unfit_with_the_reason(tmp_path):
    """A class listed under summary.json's ``model.not_audited`` (no case of it in the probing set) gets an
    unfit verdict, its warning and UNFIT band, never a silent null."""
    from mlflow_projects.serving.verdicts import attach_audit, unfit_warning, verdict_entry

    _, lm = _tiny_loaded_model(tmp_path)
    summary = {**_summary(), "model": {"not_audited": {"Hernia": "the probing manifest has no positive label or "
                                                                 "box of it"}}}
    attach_audit(lm, "run1", _table(), summary)
    verdict, reason = verdict_entry(lm, "Hernia")
    assert reason is None and verdict["status"] == "unfit"
    assert verdict["reasons"] == ["not audited: the probing manifest has no positive label or box of it"]
    assert "not audited" in unfit_warning("Hernia", verdict)
    assert verdict_entry(lm, "Effusion")[0]["status"] == "fit"  # audited classes keep their own verdicts
