"""BentoML service of cxr-interpret: predictions, heatmaps and concept explanations of the registered
chest X-ray model. Routes only: every decision lives in :mod:`mlflow_projects.serving`.

    bentoml serve service:CXRExplainer --port 3000        # binds 127.0.0.1 unless --host / BENTOML_HOST

Settings come from the environment (``CXR_MODEL_URI``, ``MLFLOW_TRACKING_URI``, ``CXR_API_KEYS``,
``CXR_ALLOW_ANONYMOUS``, ``CXR_MAX_PIXELS``, ``CXR_MIN_IMAGE_SIDE``, ``CXR_MAX_BODY_BYTES``, ``CXR_WORKERS``,
``CXR_CACHE_SIZE``, ``CXR_FEEDBACK_DIR``, ``CXR_RECORDS_DIR``, ``CXR_RECORDS_RETENTION_DAYS``; see :class:`mlflow_projects.serving.settings.ServeConfig`). Importing this module
refuses a non-loopback bind without API keys (:func:`mlflow_projects.serving.settings.check_bind_address`)
and, inside a Bento, finds the model packaged with it (:mod:`mlflow_projects.serving.startup`).

Routes: ``POST /predict``, ``POST /explain``, ``GET|POST /concepts``, ``POST /feedback``, the review page
``GET /ui/`` (:mod:`mlflow_projects.serving.review`) and BentoML's
``/livez``, ``/readyz`` (503 until the model is loaded), ``/metrics``. Every ``/predict``, ``/explain`` and
``/feedback`` leaves one record (:mod:`mlflow_projects.serving.records`) and answers its ``X-Request-ID``. Middlewares:
:func:`mlflow_projects.serving.middleware.middleware_stack`.
"""
import sys
import typing as t
from pathlib import Path

import bentoml
from fastapi import FastAPI
from starlette.responses import JSONResponse

from mlflow_projects.serving import (DEFAULT_HOST, ExplanationService, ServingError, middleware_stack,
                                     startup_config)
from mlflow_projects.serving.review import review_app
from mlflow_projects.serving.records import note_request, note_response, served_identity, set_identity_source

try:
    CONFIG = startup_config(Path(__file__).resolve().parent)
except ValueError as exc:  # a refused bind (UnsafeBindError) or a bad CXR_* value: a message, not a traceback
    sys.stderr.write(f"cxr-explainer: {exc}\n")
    raise SystemExit(2) from None

get_routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # GET routes (bentoml.api is POST only)


def _error(exc: ServingError, core: ExplanationService) -> JSONResponse:
    body = exc.to_dict()
    body["model"] = core.model_info()
    note_response(body)
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _ok(body: dict) -> JSONResponse:
    """Serialise with json (the bodies carry large base64 strings; BentoML's pydantic pass is skipped);
    the served facts go into the request's record."""
    note_response(body)
    return JSONResponse(body)


def _concepts(core: ExplanationService) -> JSONResponse:
    try:
        return _ok(core.concepts())
    except ServingError as exc:
        return _error(exc, core)


def _read(path: Path | None, is_input: bool = True) -> bytes | None:
    data = None if path is None else Path(path).read_bytes()
    if is_input:
        note_request(data)  # the image's size and SHA-256 go into the request's record, never its name
    return data


@bentoml.service(name="cxr-explainer", workers=CONFIG.workers, traffic={"timeout": 300},
                 http={"host": DEFAULT_HOST, "port": 3000})
@bentoml.asgi_app(get_routes, path="/")
@bentoml.asgi_app(review_app(), path="/ui")
class CXRExplainer:
    """Chest X-ray findings with attention maps and unit concepts of the registered model."""

    def __init__(self) -> None:
        self.core = ExplanationService(CONFIG)
        self.core.start()  # loads in the background; /readyz answers 503 until done
        set_identity_source(lambda: served_identity(self.core))  # for records of requests refused before a route

    def __is_ready__(self) -> bool:
        return self.core.ready

    def __metrics__(self, content: str) -> str:
        return content + self.core.metrics_text()

    @bentoml.api(route="/predict")
    async def predict(self, image: Path = None) -> dict:
        """Findings (name, probability, threshold, positive) for a PNG, JPEG or DICOM image; a class without a
        threshold (too few validation positives) has ``threshold`` and ``positive`` null and a ``threshold_reason``.
        ``ood``: the image's out-of-distribution score against the audit's detector (null with ``ood_reason``
        when the version's audit has none)."""
        try:
            return _ok(await self.core.apredict(_read(image)))  # type: ignore[return-value]
        except ServingError as exc:
            return _error(exc, self.core)  # type: ignore[return-value]

    @bentoml.api(route="/explain")
    async def explain(self, image: Path = None, method: t.Any = None, targets: t.Any = None,
                      top_neurons: t.Any = None) -> dict:
        """Findings plus per-target heatmaps (overlay PNG, raw map PNG + range), the audit's verdict and top
        units with their served concepts and evidence; ``warnings`` (one per unfit target, also drawn on its
        overlay) and ``ood``.

        ``method``: cam (default), gradcam, gradcampp, integrated_gradients, smoothgrad (dwarf for a DWARF
        model); ``targets``: class names (JSON list or comma-separated), default the positive findings or
        the top class; ``top_neurons``: k units per target (default 5).
        """
        try:
            return _ok(await self.core.aexplain(_read(image), method, targets, top_neurons))  # type: ignore[return-value]
        except ServingError as exc:
            return _error(exc, self.core)  # type: ignore[return-value]

    @bentoml.api(route="/concepts")
    def concepts(self) -> dict:
        """The served unit-to-concept table of the served version: annotations with enough evidence, not
        VLM-blind (``POST``; ``GET /concepts`` answers the same)."""
        return _concepts(self.core)  # type: ignore[return-value]

    @get_routes.get("/concepts")
    def get_concepts(self) -> JSONResponse:
        """``GET /concepts``: the unit-to-concept table of the served version."""
        return _concepts(self.core)

    @bentoml.api(route="/feedback")
    def feedback(self, finding: t.Any = None, image: Path = None, image_sha256: t.Any = None,
                 boxes: t.Any = None, mask: Path = None, mask_png: t.Any = None,
                 author: t.Any = None, judgement: t.Any = None, method: t.Any = None) -> dict:
        """Store a clinician's boxes ``[[x, y, w, h], ...]`` or mask PNG for an image and a finding, or their
        ``judgement`` (on / off the finding) of the ``method``'s map; returns its id."""
        try:
            return _ok(self.core.feedback(finding=finding, image=_read(image), image_sha256=image_sha256,  # type: ignore[return-value]
                                          boxes=boxes, mask=_read(mask, is_input=False), mask_png=mask_png, author=author,
                                          judgement=judgement, method=method))
        except ServingError as exc:
            return _error(exc, self.core)  # type: ignore[return-value]


for _cls, _options in middleware_stack(CONFIG.api_keys, CONFIG.max_body_bytes, CONFIG.records_dir,
                                          CONFIG.records_retention_days):
    CXRExplainer.add_asgi_middleware(_cls, **_options)
