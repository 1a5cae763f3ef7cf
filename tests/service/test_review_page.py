"""The review page in a real browser: ``bentoml serve service:CXRExplainer`` (with API keys) and Debian's headless
Chromium driven by Playwright (``executable_path`` = the OS's browser; nothing is downloaded).

One walk through the page as a clinician uses it: an upload without the key shows the service's 401 on the
page; with the key, the NIH PNG's findings (thresholds, "no reliable threshold" for Nodule, calls), its overlay,
the audit's verdict and the top units render; the method is switched and the opacity changed; a box is drawn
with the mouse, another added and moved with the keyboard then deleted; the box is sent and its record read
back from the feedback folder; the map is judged "off the finding"; a DICOM is opened; a broken file shows the
service's 400; the page fits a tablet's width. Screenshots of every step go to
``outputs/test-artifacts/review_page/`` (printed)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import require_folder
from tests.service.helpers import CLASSES, NO_THRESHOLD_REASON, bentoml_serve

ROOT = Path(__file__).resolve().parents[2]
KEY = "review-key-42"
ARTIFACTS = ROOT / "outputs" / "test-artifacts" / "review_page"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.slow


def _unavailable(reason: str):
    """Skip, or fail under ``CI=true`` (where the browser test must run)."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason}; CI=true, so the browser test fails instead of skipping")
    pytest.skip(reason)


def chromium_path() -> str:
    """The OS's Chromium: ``CXR_CHROMIUM``, else ``chromium`` on PATH, else ``/usr/bin/chromium``."""
    for candidate in (os.environ.get("CXR_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _unavailable("no Chromium (install Debian's 'chromium' package; `make test` does as root)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry.tracking_uri, BENTOML_HOME=str(tmp / "bentoml"),
               CXR_API_KEYS=KEY, CXR_FEEDBACK_DIR=str(tmp / "feedback"), CXR_SERVE_CACHE=str(tmp / "cache"),
               CXR_RECORDS_DIR=str(tmp / "records"), CXR_THREADS="1", BENTOML_DO_NOT_TRACK="True",
               PYTHONPATH=str(ROOT))
    with bentoml_serve(["service:CXRExplainer", "--host", "127.0.0.1"], ROOT, env, tmp / "server.log") as base:
        yield base, tmp / "feedback"


def test_the_page_is_served_without_a_key_with_a_strict_policy(server):
    import httpx

    base, _ = server
    page = httpx.get(f"{base}/ui/")
    assert page.status_code == 200 and "<title>cxr-interpret: review explanations</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body>")[0].replace('http-equiv', '')  # no CDN: only its own files
    for name in ("review.js", "review.css"):
        assert httpx.get(f"{base}/ui/{name}").status_code == 200
    assert httpx.get(f"{base}/ui/missing.js").status_code == 404
    assert httpx.post(f"{base}/ui/").status_code == 401  # only GET/HEAD of the files are public
    assert httpx.post(f"{base}/predict", files={"image": ("a.png", b"x")}).status_code == 401


def test_review_walkthrough_in_chromium(server, browser, real_fixtures):
    base, feedback = server
    nih = real_fixtures / "images" / "00000001_000.png"
    dicom = sorted(require_folder(real_fixtures / "dicom", "real DICOM fixtures").glob("*.dcm"))[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"review page screenshots: {ARTIFACTS}")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def until(expression: str, timeout_s: float = 120) -> None:
        """Poll a JS expression from the test (page.evaluate runs outside the page's CSP, which forbids the
        string evaluation Playwright's wait_for_function uses)."""
        deadline = time.time() + timeout_s
        while not page.evaluate(expression):
            if time.time() > deadline:
                raise AssertionError(f"not true after {timeout_s} s: {expression}; error shown: "
                                     f"{page.inner_text('#error')!r}")
            page.wait_for_timeout(100)

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    page.goto(f"{base}/ui/")
    assert page.title() == "cxr-interpret: review explanations"
    # 1. without the key the service's 401 is shown on the page
    page.set_input_files("#file", str(nih))
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.inner_text("#error") and "API key" in page.inner_text("#error")
    shot("01_missing_key")
    # 2. with the key (typed into the page) the upload is analysed again
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#findings tbody tr")
    until("document.querySelector('#overlay').complete && document.querySelector('#overlay').naturalWidth > 0"
                           " && !document.querySelector('#stage').hidden")
    assert page.is_hidden("#error")
    rows = page.locator("#findings tbody tr")
    assert rows.count() == len(CLASSES)
    nodule = rows.filter(has_text="Nodule").inner_text()
    assert NO_THRESHOLD_REASON in nodule and "no call" in nodule
    assert "cxr-classifier version 1 @candidate" in page.inner_text("#model-line")
    assert "audit run" in page.inner_text("#model-line")
    assert page.inner_text("#verdict").split()[0] in ("Fit", "Unfit")
    assert page.locator("#units li").count() >= 1 and "unit " in page.inner_text("#units")
    assert page.eval_on_selector("#method", "s => [...s.options].map(o => o.value)") == [
        "cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad"]
    target = page.eval_on_selector("input[name=finding]:checked", "r => r.value")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # nothing wider than the screen
    shot("02_findings_and_cam_overlay")
    # 3. another method, another opacity
    cam_overlay = page.get_attribute("#overlay", "src")
    page.select_option("#method", "gradcam")
    until("document.querySelector('#status').textContent.startsWith('gradcam map')")
    assert page.get_attribute("#overlay", "src") != cam_overlay
    page.fill("#opacity", "60")
    assert page.eval_on_selector("#overlay", "o => o.style.opacity") == "0.6"
    assert page.inner_text("#opacity-value") == "60%"
    shot("03_gradcam_opacity_60")
    # 4. a box drawn with the mouse
    rect = page.locator("#boxes").bounding_box()
    x0, y0 = rect["x"] + 0.25 * rect["width"], rect["y"] + 0.30 * rect["height"]
    x1, y1 = rect["x"] + 0.55 * rect["width"], rect["y"] + 0.70 * rect["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()
    assert page.locator("#box-list li").count() == 1
    # a second box added and moved with the keyboard, then deleted with the keyboard
    page.focus("#add-box")
    page.keyboard.press("Enter")
    assert page.locator("#box-list li").count() == 2
    before = page.locator("#box-list li").nth(1).inner_text()
    page.keyboard.press("ArrowRight")  # the drawing area has the focus now
    assert page.locator("#box-list li").nth(1).inner_text() != before
    shot("04_boxes_drawn")
    page.keyboard.press("Delete")
    assert page.locator("#box-list li").count() == 1
    # 5. send it; the record is in the feedback folder
    page.click("#send-boxes")
    page.wait_for_selector("#sent li")
    record_id = page.inner_text("#sent li code")
    shot("05_boxes_sent")
    stored = json.loads((feedback / f"{record_id}.json").read_text())
    assert stored["finding"] == target and (feedback / stored["image_path"]).is_file()
    assert stored["model"]["name"] == "cxr-classifier"
    (x, y, w, h), = stored["boxes"]
    side = 512  # the NIH image's pixels: the box is in original-image coordinates
    for got, want in ((x, 0.25 * side), (y, 0.30 * side), (w, 0.30 * side), (h, 0.40 * side)):
        assert abs(got - want) <= 0.02 * side, (stored["boxes"], (0.25, 0.30, 0.30, 0.40))
    # 6. the map judged off the finding
    page.click("#map-off")
    until("document.querySelectorAll('#sent li').length === 2")
    judged_id = page.locator("#sent li code").nth(1).inner_text()
    judged = json.loads((feedback / f"{judged_id}.json").read_text())
    assert judged["judgement"] == "off" and judged["method"] == "gradcam" and "boxes" not in judged
    # 7. a DICOM
    page.set_input_files("#file", str(dicom))
    until("document.querySelector('#caption').textContent.includes('1024 x 1024')")
    until("document.querySelector('#overlay').complete && document.querySelector('#overlay').naturalWidth > 0")
    assert page.is_hidden("#error")
    shot("06_dicom")
    # 8. a broken file: the service's message on the page
    broken = ARTIFACTS / "broken.png"
    broken.write_bytes(b"not an image at all")
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#error:not([hidden])")
    assert "/predict answered 4" in page.inner_text("#error")
    assert page.is_hidden("#stage") and page.is_hidden("#findings")  # nothing of the previous image stays
    assert page.inner_text("#units") == "" and page.inner_text("#verdict").startswith("Waiting")
    shot("07_bad_file_error")
    # 9. a tablet: one column, nothing wider than the screen
    page.set_viewport_size({"width": 768, "height": 1024})
    page.set_input_files("#file", str(nih))
    page.wait_for_selector("#error", state="hidden")
    until("!document.querySelector('#stage').hidden && document.querySelector('#overlay').complete"
          " && document.querySelector('#caption').textContent.includes('512 x 512')"
          " && document.querySelector('#status').textContent.startsWith('gradcam map')")
    assert page.evaluate("document.documentElement.scrollWidth") <= 768
    shot("08_tablet")
    assert errors == []
    page.close()
