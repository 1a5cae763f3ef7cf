"""BentoML service of cxr-interpret: predictions, heatmaps and concept explanations of the registered
chest X-ray model. Thin: every decision lives in :mod:`mlflow_projects.serving`.

    bentoml serve service:CXRExplainer --port 3000

Settings come from the environment (``CXR_MODEL_URI``, ``MLFLOW_TRACKING_URI``, ``CXR_API_KEYS``,
``CXR_MAX_PIXELS``, ``CXR_MAX_BODY_BYTES``, ``CXR_WORKERS``, ``CXR_CACHE_SIZE``, ``CXR_FEEDBACK_DIR``; see
:class:`mlflow_projects.serving.ServeConfig`). In a Bento, ``CXR_BENTO_MODEL`` names the BentoML model
(imported by ``mlflow_projects/build_bento.py``, labelled with its MLflow name/version/alias) served instead
of the registry's. Routes: ``POST /predict``, ``POST /explain``,
``GET|POST /concepts``, ``POST /feedback`` and BentoML's ``/livez``, ``/readyz`` (503 until the model
is loaded), ``/metrics``.

Adaptive batching is done by the service core's micro-batcher, not by ``batchable=True`` (see
:class:`mlflow_projects.serving.MicroBatcher` for why).
"""
import logging
import os
import typing as t
from pathlib import Path

import bentoml
from starlette.responses import JSONResponse

from mlflow_projects.serving import ExplanationService, GuardMiddleware, ServeConfig, ServingError

log = logging.getLogger("cxr.service")

CONFIG = ServeConfig.from_env()
# In a Bento (mlflow_projects/build_bento.py) the model comes from the BentoML model store, not the registry.
BENTO_MODEL = os.environ.get("CXR_BENTO_MODEL")
if BENTO_MODEL:
    _bento_model = bentoml.models.get(BENTO_MODEL)
    CONFIG.local_model_dir = _bento_model.path
    CONFIG.local_identity = {k: _bento_model.info.labels.get(f"mlflow.{k}") for k in ("name", "version", "alias")}
    CONFIG.local_identity["audit_run_id"] = _bento_model.info.labels.get("audit.run_id")
_CORE: dict[str, ExplanationService] = {}


def _core() -> ExplanationService | None:
    return _CORE.get("core")


def _error(exc: ServingError, core: ExplanationService) -> JSONResponse:
    body = exc.to_dict()
    body["model"] = core.model_info()
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _ok(body: dict) -> JSONResponse:
    """Serialise with json (the bodies carry large base64 strings; BentoML's pydantic pass is skipped)."""
    return JSONResponse(body)


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@bentoml.service(name="cxr-explainer", workers=CONFIG.workers, traffic={"timeout": 300},
                 http={"port": 3000})
class CXRExplainer:
    """Chest X-ray findings with attention maps and unit concepts of the registered model."""

    def __init__(self) -> None:
        self.core = ExplanationService(CONFIG)
        _CORE["core"] = self.core
        self.core.start()  # loads in the background; /readyz answers 503 until done

    def __is_ready__(self) -> bool:
        return self.core.ready

    def __metrics__(self, content: str) -> str:
        return content + self.core.metrics_text()

    @bentoml.api(route="/predict")
    async def predict(self, image: Path = None) -> dict:
        """Findings (name, probability, threshold, positive) for a PNG, JPEG or DICOM image."""
        try:
            return _ok(await self.core.apredict(_read(image)))  # type: ignore[return-value]
        except ServingError as exc:
            return _error(exc, self.core)  # type: ignore[return-value]

    @bentoml.api(route="/explain")
    async def explain(self, image: Path = None, method: t.Any = None, targets: t.Any = None,
                      top_neurons: t.Any = None) -> dict:
        """Findings plus per-target heatmaps (overlay PNG, raw map PNG + range) and top units with concepts.

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
        """The unit-to-concept table of the served version (also served as ``GET /concepts``)."""
        try:
            return _ok(self.core.concepts())  # type: ignore[return-value]
        except ServingError as exc:
            return _error(exc, self.core)  # type: ignore[return-value]

    @bentoml.api(route="/feedback")
    def feedback(self, finding: t.Any = None, image: Path = None, image_sha256: t.Any = None,
                 boxes: t.Any = None, mask: Path = None, mask_png: t.Any = None,
                 author: t.Any = None) -> dict:
        """Store a clinician's boxes ``[[x, y, w, h], ...]`` or mask PNG for an image and a finding; returns its id."""
        try:
            return _ok(self.core.feedback(finding=finding, image=_read(image), image_sha256=image_sha256,  # type: ignore[return-value]
                                          boxes=boxes, mask=_read(mask), mask_png=mask_png, author=author))
        except ServingError as exc:
            return _error(exc, self.core)  # type: ignore[return-value]


CXRExplainer.add_asgi_middleware(GuardMiddleware, api_keys=CONFIG.api_keys, max_body_bytes=CONFIG.max_body_bytes,
                                 core=_core)
