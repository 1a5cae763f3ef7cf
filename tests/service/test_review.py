"""The review page's server side, in process: its files and headers, the public /ui behind the auth middleware,
what it ships with (package data, Bento), /explain's base image and methods, and /feedback's judgements (kept,
never trained on). The page itself runs in a browser in ``test_review_page.py`` (slow)."""
from __future__ import annotations

import base64
import io
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mlflow_projects.serving.feedback import FeedbackError, FeedbackStore
from mlflow_projects.serving.middleware import middleware_stack, wrap
from mlflow_projects.serving.review import SECURITY_HEADERS, UI_DIR, UI_FILES, review_app
from tests.service.helpers import png_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_files_are_served_with_the_security_headers():
    from starlette.testclient import TestClient

    client = TestClient(review_app())
    index = client.get("/")
    assert index.status_code == 200 and 'src="review.js"' in index.text and 'href="review.css"' in index.text
    for key, value in SECURITY_HEADERS.items():
        assert index.headers[key] == value
    assert client.get("/review.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert client.get("/nope.html").status_code == 404
    # everything the page loads is its own: no URL to another host in the files
    for name in UI_FILES:
        text = (UI_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_a_broken_install_without_the_files_is_refused(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    with pytest.raises(FileNotFoundError, match=r"review.css.*review.js|package data"):
        review_app(tmp_path)


def test_the_page_ships_as_package_data_and_in_the_bento():
    import fnmatch

    import yaml

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["mlflow_projects.serving"]
    assert all(any(fnmatch.fnmatch(f"ui/{name}", p) for p in patterns) for name in UI_FILES)
    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    assert all(any(fnmatch.fnmatch(f"mlflow_projects/serving/ui/{name}", p) for p in include) for name in UI_FILES)
    assert "playwright==1.65.2" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    assert "playwright==1.65.2" in (ROOT / "requirements.lock").read_text().splitlines()


def test_ui_files_need_no_key_but_every_data_route_still_does():
    from starlette.testclient import TestClient

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    client = TestClient(wrap(inner, middleware_stack(api_keys=["k1"])), raise_server_exceptions=True)
    assert client.get("/ui/").status_code == 200 and client.get("/ui/review.js").status_code == 200
    assert client.head("/ui").status_code == 200
    assert client.post("/ui/").status_code == 401  # only reading the files is public
    assert client.get("/uix").status_code == 401 and client.get("/concepts").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/concepts", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_feedback_store_keeps_judgements_and_dwarf_skips_them(tmp_path):
    import torch

    from training.dwarf.supervision import FeedbackDataset, load_feedback

    store = FeedbackStore(tmp_path)
    sha = "cd" * 32
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    boxed = store.append(image_sha256=sha, finding="Nodule", boxes=[[8, 8, 16, 16]], image=image)
    judged = store.append(image_sha256=sha, finding="Nodule", judgement="off", method="gradcam", image=image)
    assert judged["judgement"] == "off" and judged["method"] == "gradcam" and "boxes" not in judged
    with pytest.raises(FeedbackError, match="judgement must be one of"):
        store.append(image_sha256=sha, finding="Nodule", judgement="maybe", method="cam")
    with pytest.raises(FeedbackError, match="needs the 'method'"):
        store.append(image_sha256=sha, finding="Nodule", judgement="on")
    records = load_feedback(tmp_path)
    assert [r.has_region for r in records] == [True, False] and records[1].judgement == "off"
    ds = FeedbackDataset(records, ["Mass", "Nodule"], 32)
    assert len(ds) == 1  # one image; its region is the box only
    item = ds[0]
    torch.testing.assert_close(item["mask"][1].sum(), torch.tensor(64.0))  # 16x16 px of 64 -> 8x8 of 32
    assert item["labels"].tolist() == [0.0, 1.0] and boxed["id"] in {r.id for r in records}


def test_explain_sends_the_base_image_and_methods_and_feedback_takes_judgements(core):
    from PIL import Image

    from mlflow_projects.serving import ServingError

    upload = png_bytes(80, 72)
    out = core.explain(upload, method="cam")
    assert out["methods"] == ["cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad"]
    with Image.open(io.BytesIO(base64.b64decode(out["image_png"]))) as base:
        assert list(base.size) == out["heatmaps"][0]["overlay_size"] and base.mode == "L"
    r = core.feedback(finding="Effusion", image=upload, judgement="ON", method="GradCAM")
    assert r["judgement"] == "on" and r["method"] == "gradcam"
    stored = json.loads((core.feedback_store.folder / f"{r['id']}.json").read_text())
    assert stored["judgement"] == "on" and stored["method"] == "gradcam" and "image_path" in stored
    with pytest.raises(ServingError, match="unknown method 'dwarf'.*valid"):
        core.feedback(finding="Effusion", image=upload, judgement="on", method="dwarf")
    with pytest.raises(ServingError, match="judgement must be one of"):
        core.feedback(finding="Effusion", image=upload, judgement="sideways", method="cam")
