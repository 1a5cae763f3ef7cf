"""Request handling of the explanation service, free of any web framework (``service.py`` is the thin
BentoML layer; this module may use mlflow but never imports bentoml).

What it does:

- **Model resolution** (:func:`resolve_model_uri`): ``CXR_MODEL_URI`` (default
  ``models:/cxr-classifier@champion``; when no version holds ``champion`` it falls back to
  ``@candidate`` with a warning) against the registry at ``MLFLOW_TRACKING_URI``; the name, version
  and alias are recorded and put in every response.
- **Loading** (:class:`LoadedModel`): a registered classifier (``artifacts/checkpoint.pt``,
  ``artifacts/model.onnx``, ``artifacts/meta.json``; docs/ARCHITECTURE.md) gives an ONNX Runtime
  session (``intra_op_num_threads = cores / workers``, full graph optimisation; one run gives
  ``logits`` and ``features``) and the torch model for gradient methods. A pyfunc whose ``predict``
  returns ``{"probabilities", "maps"}`` (a registered ``cxr-dwarf``; ``meta.json`` ``outputs``
  lists ``maps``) is served generically with ``method=dwarf``.
- **Concepts** (:func:`find_passing_audit`): the latest audit run with ``audit.status=passed`` for the
  served version (runs tagged ``model.name``/``model.version``, or the version's ``audit.run_id``
  tag); its ``audit/concepts.parquet`` names the units. None is fine.
- **Explanations**: ``cam`` from the ONNX features and the head weights (``M_c = sum_k w_ck f_k``, ReLU,
  bilinear upsampling, min-max: the same post-processing as :mod:`interpret.attention`), so it costs
  one prediction; ``gradcam``, ``gradcampp``, ``integrated_gradients``, ``smoothgrad`` through
  :func:`interpret.attention_maps` on the torch model; ``dwarf`` from the pyfunc's maps. Per target:
  an overlay PNG on the image, the raw map as a small 8-bit grey PNG with its value range, and the
  top units by contribution ``a_k * w_ck`` (``a_k`` the GAP of unit k on this image; exact for a
  GAP + linear head) with their audit concepts.
- **Adaptive batching** (:class:`MicroBatcher`): ``/predict`` and ``cam`` explanations put their
  preprocessed image on an asyncio queue; one consumer takes whatever is queued (up to
  ``CXR_MAX_BATCH``, waiting at most ``CXR_BATCH_WAIT_MS``, default 0) and runs it as one batch in a
  thread. An idle server answers at once; under load batches grow by themselves. We use this rather
  than BentoML's ``batchable=True`` because the latter batches the *API arguments* (multipart file
  paths), so one bad upload fails the whole batch and per-request validation errors cannot be 4xx
  for one caller only; here every request is decoded and validated on its own first.
- **Cache** (:class:`LRUCache`): per-target explanation entries keyed by ``(image sha256, model
  version, method, target)``, bounded (``CXR_CACHE_SIZE``, 0 disables).
- **Guard** (:class:`GuardMiddleware`, plain ASGI): Bearer keys from ``CXR_API_KEYS`` on every route but
  ``/livez`` and ``/readyz`` (401 otherwise), a request body limit (``CXR_MAX_BODY_BYTES``, 413),
  multipart-only uploads (415), JSON access logs (logger ``cxr.access``: method, path, status, bytes,
  duration; never bodies, file names or headers), and ``GET /concepts``.

Errors are :class:`ServingError` with an HTTP status and a message that says what to send instead;
image problems come from :func:`training.data.imageio.read_image`, whose messages never contain DICOM
header values.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)
access_log = logging.getLogger("cxr.access")

__all__ = ["ServeConfig", "ServingError", "ModelIdentity", "LoadedModel", "ExplanationService", "MicroBatcher",
           "LRUCache", "GuardMiddleware", "resolve_model_uri", "find_passing_audit", "decode_upload",
           "list_methods", "check_multipart_fields", "DEFAULT_MODEL_URI", "CLASSIFIER_METHODS"]

DEFAULT_MODEL_URI = "models:/cxr-classifier@champion"
FALLBACK_ALIAS = "candidate"
CLASSIFIER_METHODS = ("cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad")
MAPS_METHODS = ("dwarf",)
AUDIT_EXPERIMENT = "cxr-audit"
PROBES = ("/livez", "/readyz", "/healthz")
UPLOAD_ROUTES = ("/predict", "/explain", "/feedback")
# multipart fields each upload route accepts: (file fields, text fields)
ROUTE_FIELDS: dict[str, tuple[frozenset, frozenset]] = {
    "/predict": (frozenset({"image"}), frozenset()),
    "/explain": (frozenset({"image"}), frozenset({"method", "targets", "top_neurons"})),
    "/feedback": (frozenset({"image", "mask"}), frozenset({"finding", "image_sha256", "boxes", "mask_png", "author"})),
}
_DISPOSITION = re.compile(rb'content-disposition:[^\r\n]*?\bname="([^"]*)"([^\r\n]*)', re.IGNORECASE)


def check_multipart_fields(body: bytes, content_type: bytes, route: str) -> None:
    """Check the part names of a multipart body against :data:`ROUTE_FIELDS` (headers only).

    Raises:
        ServingError: (400) unknown field, a text value for a file field, or a malformed body.
    """
    files, texts = ROUTE_FIELDS[route]
    m = re.search(rb'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ServingError(400, "multipart/form-data request without a boundary")
    delimiter = b"--" + m.group(1)
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # closing delimiter
        head = part.split(b"\r\n\r\n", 1)[0]
        d = _DISPOSITION.search(head)
        if d is None:
            raise ServingError(400, "malformed multipart part (no Content-Disposition name)")
        name, rest = d.group(1).decode("utf-8", "replace"), d.group(2)
        is_file = b"filename=" in rest.lower()
        if name not in files | texts:
            raise ServingError(400, f"unknown form field {name[:40]!r} for {route}; valid: {sorted(files | texts)}",
                               valid=sorted(files | texts))
        if name in files and not is_file:
            raise ServingError(400, f"field {name!r} must be a file upload (multipart part with a filename), "
                                    "not a text value")


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ServeConfig:
    """Service settings (from the environment with :meth:`from_env`)."""

    model_uri: str = DEFAULT_MODEL_URI  # CXR_MODEL_URI
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI (None: mlflow_projects.common default)
    max_pixels: int = 50_000_000  # CXR_MAX_PIXELS: larger images get 413
    max_body_bytes: int = 128 * 1024 * 1024  # CXR_MAX_BODY_BYTES: larger requests get 413
    api_keys: tuple[str, ...] = ()  # CXR_API_KEYS (comma-separated); empty = no auth
    cache_size: int = 512  # CXR_CACHE_SIZE: explanation entries kept (0 disables)
    workers: int = 1  # CXR_WORKERS: BentoML worker processes
    threads: int = 0  # CXR_THREADS: ONNX Runtime / torch threads per worker (0 = cores / workers)
    max_batch: int = 16  # CXR_MAX_BATCH: micro-batch size bound
    batch_wait_ms: int = 0  # CXR_BATCH_WAIT_MS: extra wait for a batch to fill (0 = none)
    overlay_max_side: int = 1024  # CXR_OVERLAY_MAX_SIDE: overlay PNG side bound (aspect kept)
    top_neurons: int = 5  # default k of top units
    feedback_dir: str | None = None  # CXR_FEEDBACK_DIR
    cache_dir: str | None = None  # CXR_SERVE_CACHE: where registry artifacts are downloaded
    # A model already on disk (a Bento's model store entry, see build_bento): its folder holds the MLflow
    # model under ``mlflow_model/`` and optionally ``audit/concepts.parquet``; ``local_identity`` gives
    # its MLflow name/version/alias (the registry is not contacted).
    local_model_dir: str | None = None
    local_identity: dict[str, Any] | None = None

    @classmethod
    def from_env(cls) -> "ServeConfig":
        """Read the ``CXR_*`` variables (see the field comments); bad values raise ``ValueError``."""
        keys = tuple(k.strip() for k in os.environ.get("CXR_API_KEYS", "").split(",") if k.strip())
        return cls(model_uri=os.environ.get("CXR_MODEL_URI") or DEFAULT_MODEL_URI,
                   tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
                   max_pixels=_env_int("CXR_MAX_PIXELS", 50_000_000, 1),
                   max_body_bytes=_env_int("CXR_MAX_BODY_BYTES", 128 * 1024 * 1024, 1),
                   api_keys=keys, cache_size=_env_int("CXR_CACHE_SIZE", 512),
                   workers=_env_int("CXR_WORKERS", 1, 1), threads=_env_int("CXR_THREADS", 0),
                   max_batch=_env_int("CXR_MAX_BATCH", 16, 1), batch_wait_ms=_env_int("CXR_BATCH_WAIT_MS", 0),
                   overlay_max_side=_env_int("CXR_OVERLAY_MAX_SIDE", 1024, 8),
                   feedback_dir=os.environ.get("CXR_FEEDBACK_DIR") or None,
                   cache_dir=os.environ.get("CXR_SERVE_CACHE") or None)

    @property
    def intra_op_threads(self) -> int:
        return self.threads or max(1, available_cores() // max(1, self.workers))


class ServingError(Exception):
    """A request the service cannot answer; ``status`` is the HTTP status to return.

    Attributes:
        status: 400 bad request, 401, 413 too large, 415 unsupported type, 503 not ready.
        message: what was wrong and what to send instead.
        valid: the valid values, when the error is about a choice.
    """

    def __init__(self, status: int, message: str, valid: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.valid = list(valid) if valid is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "status": self.status}
        if self.valid is not None:
            out["valid"] = self.valid
        return out


# ---- registry ----------------------------------------------------------------------------------
@dataclass
class ModelIdentity:
    """Which registered model is served."""

    name: str | None
    version: str | None
    alias: str | None
    uri: str  # the resolved, pinned URI (models:/name/version when registered)
    requested_uri: str
    run_id: str | None = None
    fallback: bool = False  # True when @champion was missing and @candidate is served

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "alias": self.alias, "uri": self.uri}


_MODELS_URI = re.compile(r"^models:/([^/@]+)(?:/(\d+)|@([\w\-]+))/?$")


def resolve_model_uri(uri: str, client=None) -> ModelIdentity:
    """Resolve ``models:/name@alias``, ``models:/name/version`` or any other MLflow model URI.

    ``@champion`` without a champion version falls back to ``@candidate`` with a warning.

    Raises:
        ServingError: (503) the model or alias does not exist in the registry.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = _MODELS_URI.match(uri)
    if not m:
        return ModelIdentity(None, None, None, uri, uri)
    client = client or MlflowClient()
    name, version, alias = m.group(1), m.group(2), m.group(3)
    try:
        if version:
            mv = client.get_model_version(name, version)
            aliases = list(getattr(mv, "aliases", []) or [])
            return ModelIdentity(name, str(mv.version), aliases[0] if aliases else None,
                                 f"models:/{name}/{mv.version}", uri, mv.run_id)
        try:
            mv = client.get_model_version_by_alias(name, alias)
            fallback = False
        except MlflowException:
            if alias != "champion":
                raise
            mv = client.get_model_version_by_alias(name, FALLBACK_ALIAS)
            log.warning("no version of %s has alias 'champion'; serving @%s (version %s) instead", name,
                        FALLBACK_ALIAS, mv.version)
            alias, fallback = FALLBACK_ALIAS, True
        return ModelIdentity(name, str(mv.version), alias, f"models:/{name}/{mv.version}", uri, mv.run_id, fallback)
    except MlflowException as exc:
        raise ServingError(503, f"cannot resolve {uri} in the registry at "
                                f"{_tracking_uri()}: {str(exc).splitlines()[0][:300]}") from None


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def find_passing_audit(name: str | None, version: str | None, client=None) -> tuple[str, Any] | None:
    """The latest passing audit of ``name``/``version`` and its concept table.

    Looks for runs tagged ``model.name``, ``model.version`` and ``audit.status = 'passed'`` (the audit
    entry point's tags), newest first, then at the version's own ``audit.run_id`` tag.

    Returns:
        ``(run_id, DataFrame layer, unit, method, concepts, scores)`` or ``None`` when no passing audit
        (or no concept table) exists.
    """
    if not name or not version:
        return None
    from mlflow import MlflowClient

    client = client or MlflowClient()
    candidates: list[str] = []
    try:
        exps = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        if exps:
            runs = client.search_runs(exps, filter_string=(f"tags.`model.name` = '{name}' and tags.`model.version` = "
                                                           f"'{version}' and tags.`audit.status` = 'passed'"),
                                      order_by=["attributes.start_time DESC"], max_results=20)
            candidates += [r.info.run_id for r in runs]
    except Exception as exc:  # noqa: BLE001 - a search failure only means "no concepts"
        log.warning("audit search failed (%s); serving without concepts", exc)
    try:
        tags = client.get_model_version(name, version).tags or {}
        if tags.get("audit.status") == "passed" and tags.get("audit.run_id"):
            candidates.append(tags["audit.run_id"])
    except Exception:  # noqa: BLE001
        pass
    seen = set()
    for run_id in candidates:
        if run_id in seen:
            continue
        seen.add(run_id)
        try:
            import mlflow
            import pandas as pd

            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="audit/concepts.parquet",
                                                           dst_path=tmp)
                table = pd.read_parquet(path)
            return run_id, table
        except Exception as exc:  # noqa: BLE001 - try the next run
            log.warning("audit run %s has no readable audit/concepts.parquet (%s)", run_id, type(exc).__name__)
    return None


# ---- images --------------------------------------------------------------------------------------
@dataclass
class DecodedImage:
    """An uploaded image: pixels (H, W) float32 [0, 1], its size and the SHA-256 of the bytes."""

    pixels: np.ndarray
    width: int
    height: int
    sha256: str
    format: str


def decode_upload(data: bytes | None, max_pixels: int) -> DecodedImage:
    """Decode an uploaded PNG, JPEG or DICOM file.

    Raises:
        ServingError: 400 empty / corrupt / truncated, 415 unsupported type, 413 over ``max_pixels``.
    """
    from training.data.imageio import ImageReadError, detect_format, image_size, read_image

    if data is None:
        raise ServingError(400, "empty body: send the image as multipart/form-data field 'image' "
                                "(PNG, JPEG or DICOM)")
    if len(data) == 0:
        raise ServingError(400, "the 'image' file is empty (0 bytes)")
    fmt = detect_format(data[:132])
    if fmt is None:
        raise ServingError(415, "unsupported image type: send PNG, JPEG or DICOM (detected from the content, "
                                "not the file name)", valid=["png", "jpeg", "dicom"])
    try:
        w, h = image_size(data)
    except ImageReadError as exc:
        if "bomb" in exc.reason:
            raise ServingError(413, f"image too large: {exc.reason}") from None
        raise ServingError(400, f"cannot read the image: {exc.reason}") from None
    if w * h > max_pixels:
        raise ServingError(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels "
                                "(CXR_MAX_PIXELS)")
    try:
        pixels = read_image(data, max_pixels=max_pixels)
    except ImageReadError as exc:
        status = 413 if ("exceeds max_pixels" in exc.reason or "bomb" in exc.reason) else 400
        raise ServingError(status, f"cannot read the image: {exc.reason}") from None
    return DecodedImage(pixels, int(pixels.shape[1]), int(pixels.shape[0]), hashlib.sha256(data).hexdigest(), fmt)


def preprocess(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W) [0, 1] -> (1, S, S) float32, resized as the training data (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    h, w = pixels.shape
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=(h > size or w > size))
    return x[0].clamp_(0, 1).numpy()


# ---- rendering -------------------------------------------------------------------------------------
_JET: np.ndarray | None = None


def _jet() -> np.ndarray:
    global _JET
    if _JET is None:
        from matplotlib import colormaps

        _JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)  # (256, 3)
    return _JET


def png_b64(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def overlay_png(pixels: np.ndarray, heat: np.ndarray, max_side: int, alpha: float = 0.45) -> tuple[str, list[int]]:
    """Colour the normalised map (S, S in [0, 1]) over the image, at the image size bounded by ``max_side``.

    Returns:
        ``(base64 PNG, [width, height])``.
    """
    from PIL import Image

    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
    grey = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
    if (ow, oh) != (w, h):
        grey = grey.resize((ow, oh), Image.BILINEAR)
    hm = Image.fromarray(np.clip(heat, 0, 1).astype(np.float32)).resize((ow, oh), Image.BILINEAR)
    idx = (np.clip(np.asarray(hm), 0, 1) * 255 + 0.5).astype(np.uint8)  # (oh, ow)
    colour = _jet()[idx].astype(np.float32)  # (oh, ow, 3)
    base = np.asarray(grey, dtype=np.float32)[..., None]
    a = alpha * np.asarray(hm, dtype=np.float32)[..., None]  # stronger colour where attention is high
    out = (base * (1 - a) + colour * a + 0.5).astype(np.uint8)
    return png_b64(out), [ow, oh]


def grey_png(raw: np.ndarray) -> tuple[str, list[int], list[float]]:
    """Raw map (h, w) as an 8-bit grey PNG linearly spanning its value range.

    Returns:
        ``(base64 PNG, [width, height], [min, max])``: pixel ``p`` means ``min + p / 255 * (max - min)``.
    """
    raw = np.asarray(raw, dtype=np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    span = hi - lo
    q = np.zeros(raw.shape, np.uint8) if span <= 0 else ((raw - lo) / span * 255 + 0.5).astype(np.uint8)
    return png_b64(q), [int(raw.shape[1]), int(raw.shape[0])], [lo, hi]


# ---- cache and batching ------------------------------------------------------------------------------
class LRUCache:
    """A thread-safe bounded LRU mapping; ``capacity=0`` disables it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class MicroBatcher:
    """Adaptive micro-batching of single items into one call of ``fn(stacked) -> list of results``.

    A consumer task takes the first queued item, then everything else already queued (up to
    ``max_batch``, waiting at most ``wait_ms`` for more), runs ``fn`` on the stack in a worker thread
    and resolves each caller's future. No wait when idle; batches form under concurrency.

    Args:
        fn: ``(N, ...) array -> sequence of N results``.
        max_batch: largest batch.
        wait_ms: extra time to wait for a batch to fill (0: dispatch what is queued).
    """

    def __init__(self, fn: Callable[[np.ndarray], Sequence[Any]], max_batch: int = 16, wait_ms: float = 0.0) -> None:
        self.fn, self.max_batch, self.wait_s = fn, int(max_batch), float(wait_ms) / 1000
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.items = 0
        self.sizes: collections.Counter = collections.Counter()

    async def submit(self, item: np.ndarray) -> Any:
        """Queue one item (shape without the batch axis) and await its result."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _run(self) -> None:
        queue = self._queue
        while True:
            first = await queue.get()
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), left))
                    except asyncio.TimeoutError:
                        break
            batch = [(x, f) for x, f in batch if not f.cancelled()]
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            self.sizes[len(batch)] += 1
            try:
                results = await asyncio.to_thread(self.fn, np.stack([x for x, _ in batch]))
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)


# ---- the loaded model -------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """Everything needed to answer requests for one model version."""

    identity: ModelIdentity
    kind: str  # "classifier" | "maps" (a pyfunc returning probabilities and maps, e.g. cxr-dwarf)
    classes: list[str]
    thresholds: list[float]
    image_size: int
    meta: dict[str, Any]
    methods: tuple[str, ...]
    torch_model: Any = None
    session: Any = None
    head_weight: np.ndarray | None = None  # (C, K)
    head_bias: np.ndarray | None = None  # (C,)
    feature_layer: str | None = None
    pyfunc: Any = None
    concepts: Any = None  # DataFrame or None
    audit_run_id: str | None = None
    unit_concepts: dict[int, dict[str, Any]] = field(default_factory=dict)

    def run_batch(self, x: np.ndarray) -> list[dict[str, np.ndarray]]:
        """(N, 1, S, S) -> per image ``{"probabilities": (C,), "pooled": (K,), "features": (K, h, w)}``
        (classifier, one ONNX run) or ``{"probabilities", "maps": (C, S, S)}`` (maps pyfunc)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.kind == "maps":
            out = self.pyfunc.predict(x)
            probs, maps = np.asarray(out["probabilities"]), np.asarray(out["maps"])
            return [{"probabilities": probs[i], "maps": maps[i]} for i in range(len(x))]
        if self.session is not None:
            logits, feats = self.session.run(["logits", "features"], {"images": x})
        else:
            import torch

            with torch.no_grad():
                lg, ft = self.torch_model.forward_all(torch.from_numpy(x))
            logits, feats = lg.numpy(), ft.numpy()
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        pooled = feats.mean(axis=(2, 3))  # (N, K): GAP
        return [{"probabilities": probs[i].astype(np.float32), "pooled": pooled[i], "features": feats[i]}
                for i in range(len(x))]


def list_methods(kind: str) -> tuple[str, ...]:
    """Explanation methods of a model kind (``classifier`` or ``maps``)."""
    return CLASSIFIER_METHODS if kind == "classifier" else MAPS_METHODS


def _read_meta(folder: Path) -> dict[str, Any]:
    for path in (folder / "artifacts" / "meta.json", *sorted(folder.rglob("meta.json"))):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def load_model(identity: ModelIdentity, config: ServeConfig, source: str | os.PathLike | None = None) -> LoadedModel:
    """Download ``identity.uri`` (or use the local folder ``source``) and build the :class:`LoadedModel`
    (see the module docstring)."""
    import mlflow

    cache_root = Path(config.cache_dir or tempfile.gettempdir()) / "cxr-serve"
    key = hashlib.sha256(f"{source or _tracking_uri()}|{identity.uri}".encode()).hexdigest()[:16]
    dst = cache_root / key
    src = Path(source) if source else Path(identity.uri)
    if not src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        src = Path(mlflow.artifacts.download_artifacts(artifact_uri=identity.uri, dst_path=str(dst)))
    meta = _read_meta(src)
    threads = config.intra_op_threads
    outputs = meta.get("outputs") or []
    if meta.get("kind") == "dwarf" or "maps" in outputs:
        model = mlflow.pyfunc.load_model(str(src))
        classes = [str(c) for c in meta.get("classes", [])]
        if not classes:
            raise ServingError(503, f"{identity.uri}: meta.json lists no classes")
        return LoadedModel(identity, "maps", classes, [float(t) for t in meta.get("thresholds", [0.5] * len(classes))],
                           int(meta.get("input", {}).get("size", 224)), meta, MAPS_METHODS, pyfunc=model)
    ckpt = src / "artifacts" / "checkpoint.pt"
    if not ckpt.is_file():
        found = sorted(src.rglob("checkpoint.pt"))
        if not found:
            raise ServingError(503, f"{identity.uri} holds neither artifacts/checkpoint.pt nor a maps-returning "
                                    "pyfunc (meta.json outputs); cannot serve it")
        ckpt = found[0]
    import torch

    from training.models import load_checkpoint

    torch.set_num_threads(threads)
    net = load_checkpoint(ckpt).eval()
    classes = [str(c) for c in (meta.get("classes") or net.class_names)]
    thresholds = [float(t) for t in (meta.get("thresholds") or net.thresholds)]
    size = int((meta.get("input") or {}).get("size") or net.input_spec["size"])
    onnx_path = ckpt.parent / "model.onnx"
    if not onnx_path.is_file():
        from training.export import export_onnx

        onnx_path = dst / "model.onnx"
        log.warning("%s has no artifacts/model.onnx; exporting one to %s", identity.uri, onnx_path)
        export_onnx(net, onnx_path, image_size=size)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = {o.name for o in session.get_outputs()}
    if not {"logits", "features"} <= names:
        raise ServingError(503, f"{onnx_path.name} outputs {sorted(names)}; expected logits and features")
    return LoadedModel(identity, "classifier", classes, thresholds, size, meta, CLASSIFIER_METHODS, torch_model=net,
                       session=session, head_weight=net.head.weight.detach().numpy().astype(np.float32),
                       head_bias=net.head.bias.detach().numpy().astype(np.float32),
                       feature_layer=meta.get("feature_layer") or net.feature_layer)


def _unit_concepts(table, layer: str | None) -> dict[int, dict[str, Any]]:
    """``{unit: {concepts, scores, method}}`` of ``layer`` from an audit concept table (first method wins)."""
    if table is None or not len(table) or layer is None:
        return {}
    rows = table[table["layer"] == layer]
    out: dict[int, dict[str, Any]] = {}
    for rec in rows.to_dict("records"):
        unit = int(rec["unit"])
        if unit not in out:
            out[unit] = {"concepts": [str(c) for c in list(rec.get("concepts") if rec.get("concepts") is not None else [])],
                         "scores": [float(s) for s in list(rec.get("scores") if rec.get("scores") is not None else [])],
                         "method": str(rec.get("method"))}
    return out


# ---- the service core -------------------------------------------------------------------------------
class ExplanationService:
    """Framework-free core of the service: load once, then ``predict`` / ``explain`` / ``concepts`` /
    ``feedback``. Async variants (``apredict``, ``aexplain``) go through the micro-batcher.

    Args:
        config: settings; default :meth:`ServeConfig.from_env`.

    Construction is cheap; call :meth:`load` (or :meth:`start` for a background thread) before use.
    """

    def __init__(self, config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig.from_env()
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self.cache = LRUCache(self.config.cache_size)
        self.batcher = MicroBatcher(self._run_batch, self.config.max_batch, self.config.batch_wait_ms)
        self._torch_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counts: collections.Counter = collections.Counter()
        from mlflow_projects.feedback import FeedbackStore

        self.feedback_store = FeedbackStore(self.config.feedback_dir)

    # -- loading
    @property
    def ready(self) -> bool:
        return self.model is not None

    def start(self) -> None:
        """Load the model in a background thread (``ready`` turns true when done)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._load_quietly, name="cxr-model-loader", daemon=True)
            self._thread.start()

    def _load_quietly(self) -> None:
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and every route
            self.load_error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
            log.error("model loading failed: %s", self.load_error)

    def load(self) -> LoadedModel:
        """Resolve, download and load the model and its concept table (idempotent)."""
        with self._load_lock:
            if self.model is not None:
                return self.model
            import mlflow

            if self.config.tracking_uri:
                mlflow.set_tracking_uri(self.config.tracking_uri)
            else:
                from mlflow_projects.common import DEFAULT_TRACKING_URI

                mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
            t0 = time.perf_counter()
            if self.config.local_model_dir:
                identity, model, audit = self._load_local()
            else:
                identity = resolve_model_uri(self.config.model_uri)
                model = load_model(identity, self.config)
                audit = find_passing_audit(identity.name, identity.version)
            if audit is not None:
                model.audit_run_id, model.concepts = audit
                model.unit_concepts = _unit_concepts(model.concepts, model.feature_layer)
                log.info("concepts from passing audit run %s (%d rows)", model.audit_run_id, len(model.concepts))
            else:
                log.info("no passing audit with concepts for %s; serving without concepts", identity.uri)
            self.model = model
            log.info("serving %s (name=%s version=%s alias=%s, %s, %d classes) loaded in %.1f s; %d threads",
                     identity.uri, identity.name, identity.version, identity.alias, model.kind, len(model.classes),
                     time.perf_counter() - t0, self.config.intra_op_threads)
            return model

    def _load_local(self):
        folder = Path(self.config.local_model_dir)
        ids = dict(self.config.local_identity or {})
        name, version = ids.get("name") or None, ids.get("version") or None
        uri = f"models:/{name}/{version}" if name and version else str(folder)
        identity = ModelIdentity(name, version, ids.get("alias") or None, uri, str(folder), ids.get("run_id"))
        source = folder / "mlflow_model" if (folder / "mlflow_model").is_dir() else folder
        model = load_model(identity, self.config, source=source)
        audit = None
        table_path = folder / "audit" / "concepts.parquet"
        if table_path.is_file():
            import pandas as pd

            audit = (ids.get("audit_run_id") or None, pd.read_parquet(table_path))
        return identity, model, audit

    def _model(self) -> LoadedModel:
        if self.model is None:
            if self.load_error:
                raise ServingError(503, f"model failed to load: {self.load_error}")
            raise ServingError(503, "model is still loading; retry when /readyz answers 200")
        return self.model

    def model_info(self) -> dict[str, Any] | None:
        return self.model.identity.public() if self.model else None

    # -- shared steps
    def _run_batch(self, x: np.ndarray) -> list[dict[str, np.ndarray]]:
        return self._model().run_batch(x)

    def _findings(self, m: LoadedModel, probs: np.ndarray) -> list[dict[str, Any]]:
        return [{"name": c, "probability": float(p), "threshold": float(t), "positive": bool(p >= t)}
                for c, p, t in zip(m.classes, probs.tolist(), m.thresholds)]

    def _decode(self, data: bytes | None) -> tuple[DecodedImage, np.ndarray]:
        m = self._model()
        img = decode_upload(data, self.config.max_pixels)
        return img, preprocess(img.pixels, m.image_size)

    def _image_info(self, img: DecodedImage) -> dict[str, Any]:
        return {"width": img.width, "height": img.height, "sha256": img.sha256}

    # -- predict
    def predict(self, data: bytes | None) -> dict[str, Any]:
        """Findings for one uploaded image (synchronous; no batching)."""
        img, x = self._decode(data)
        out = self._run_batch(x[None])[0]
        return self._predict_response(img, out)

    async def apredict(self, data: bytes | None) -> dict[str, Any]:
        """:meth:`predict` through the micro-batcher (decoding in a worker thread)."""
        img, x = await asyncio.to_thread(self._decode, data)
        out = await self.batcher.submit(x)
        return self._predict_response(img, out)

    def _predict_response(self, img: DecodedImage, out: Mapping[str, np.ndarray]) -> dict[str, Any]:
        m = self._model()
        self.counts["predict"] += 1
        return {"model": m.identity.public(), "image": self._image_info(img),
                "findings": self._findings(m, out["probabilities"])}

    # -- explain
    def _parse_explain(self, m: LoadedModel, method: Any, targets: Any, top_neurons: Any) -> tuple[str, list[str] | None, int]:
        if method is None or (isinstance(method, str) and not method.strip()):
            method = m.methods[0]
        if not isinstance(method, str) or method.strip().lower() not in m.methods:
            raise ServingError(400, f"unknown method {method!r} for this {m.kind} model; valid: {list(m.methods)}",
                               valid=list(m.methods))
        method = method.strip().lower()
        names: list[str] | None = None
        if targets is not None and targets != "" and targets != []:
            if isinstance(targets, str):
                text = targets.strip()
                if text.startswith("["):
                    try:
                        targets = json.loads(text)
                    except json.JSONDecodeError:
                        raise ServingError(400, f"targets {text[:80]!r} is not a JSON list or comma-separated "
                                                "class names", valid=m.classes) from None
                else:
                    targets = text.split(",")
            if not isinstance(targets, (list, tuple)):
                targets = [targets]
            names = []
            for t in targets:
                name = str(t).strip()
                if name not in m.classes:
                    raise ServingError(400, f"unknown target {name!r}; valid: {m.classes}", valid=m.classes)
                if name not in names:
                    names.append(name)
        if top_neurons is None or top_neurons == "":
            k = self.config.top_neurons
        else:
            try:
                k = int(top_neurons)
                if isinstance(top_neurons, float) and k != top_neurons:
                    raise ValueError
            except (TypeError, ValueError):
                raise ServingError(400, f"top_neurons must be an integer >= 0, got {top_neurons!r}") from None
            limit = m.head_weight.shape[1] if m.head_weight is not None else 0
            if k < 0 or k > max(limit, 0) and m.kind == "classifier":
                raise ServingError(400, f"top_neurons must lie in [0, {limit}] (units of the feature layer), got {k}")
            if m.kind != "classifier":
                k = 0
        return method, names, k

    def explain(self, data: bytes | None, method: Any = None, targets: Any = None, top_neurons: Any = None) -> dict[str, Any]:
        """Findings plus, per target, heatmaps and top units (synchronous; no batching).

        Args:
            data: the uploaded file bytes.
            method: one of the model's methods (:func:`list_methods`); default ``cam`` (``dwarf`` for a
                maps model).
            targets: class names (list, JSON list or comma-separated string); default the positive
                findings, else the top class.
            top_neurons: k units per target (default 5).

        Raises:
            ServingError: bad image, method, target or k (4xx), model not loaded (503).
        """
        m = self._model()
        method, names, k = self._parse_explain(m, method, targets, top_neurons)
        img, x = self._decode(data)
        out = self._run_batch(x[None])[0]
        return self._explain_response(m, img, x, out, method, names, k)

    async def aexplain(self, data: bytes | None, method: Any = None, targets: Any = None,
                       top_neurons: Any = None) -> dict[str, Any]:
        """:meth:`explain` with the forward pass through the micro-batcher; gradient methods run in a
        worker thread (one at a time: they put hooks on the shared torch model)."""
        m = self._model()
        method, names, k = self._parse_explain(m, method, targets, top_neurons)
        img, x = await asyncio.to_thread(self._decode, data)
        out = await self.batcher.submit(x)
        if method == "cam" or m.kind != "classifier":
            return self._explain_response(m, img, x, out, method, names, k)
        return await asyncio.to_thread(self._explain_response, m, img, x, out, method, names, k)

    def _explain_response(self, m: LoadedModel, img: DecodedImage, x: np.ndarray, out: Mapping[str, np.ndarray],
                          method: str, names: list[str] | None, k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        probs = out["probabilities"]
        findings = self._findings(m, probs)
        if names is None:
            names = [f["name"] for f in findings if f["positive"]] or [m.classes[int(np.argmax(probs))]]
        idx = [m.classes.index(n) for n in names]
        entries: dict[int, dict[str, Any]] = {}
        missing = []
        for c in idx:
            hit = self.cache.get((img.sha256, m.identity.version, m.identity.uri, method, c))
            if hit is None:
                missing.append(c)
            else:
                entries[c] = hit
        if missing:
            maps, raws = self._maps(m, x, out, method, missing)  # (T, S, S), (T, h, w)
            for j, c in enumerate(missing):
                ov, ov_size = overlay_png(img.pixels, maps[j], self.config.overlay_max_side)
                raw_b64, raw_size, raw_range = grey_png(raws[j])
                entry = {"overlay_png": ov, "overlay_size": ov_size, "map_png": raw_b64, "map_size": raw_size,
                         "map_range": raw_range}
                self.cache.put((img.sha256, m.identity.version, m.identity.uri, method, c), entry)
                entries[c] = entry
        heatmaps = []
        for name, c in zip(names, idx):
            item = {"target": name, "class_index": c, "probability": float(probs[c]), **entries[c],
                    "top_units": self._top_units(m, out, c, k)}
            heatmaps.append(item)
        self.counts[f"explain_{method}"] += 1
        return {"model": m.identity.public(), "image": self._image_info(img), "method": method,
                "findings": findings, "targets": names, "heatmaps": heatmaps,
                "cached": not missing, "audit_run_id": m.audit_run_id,
                "explain_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def _maps(self, m: LoadedModel, x: np.ndarray, out: Mapping[str, np.ndarray], method: str,
              classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised maps (T, S, S) in [0, 1] and raw maps (T, h, w) for the classes."""
        import torch

        from interpret.attention.base import minmax_normalize, upsample

        S = x.shape[-1]
        if m.kind == "maps":
            raw = np.asarray(out["maps"])[classes].astype(np.float32)  # (T, S', S')
            t = torch.from_numpy(raw)[None]
            return minmax_normalize(upsample(t, (S, S)))[0].numpy(), raw
        if method == "cam":  # numpy: a (T, K) x (K, h*w) product; torch only for the bilinear upsampling
            feats = np.asarray(out["features"], dtype=np.float32)  # (K, h, w)
            K, h, w = feats.shape
            raw = (m.head_weight[classes] @ feats.reshape(K, h * w)).reshape(len(classes), h, w)  # (T, h, w), eq. 2
            up = upsample(torch.from_numpy(np.maximum(raw, 0))[None], (S, S))[0].numpy()  # (T, S, S)
            lo = up.min(axis=(1, 2), keepdims=True)
            span = up.max(axis=(1, 2), keepdims=True) - lo
            maps = np.where(span > 0, (up - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)
            return maps, raw
        from interpret import attention_maps

        with self._torch_lock:
            images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # (1, 1, S, S)
            maps, raw = attention_maps(m.torch_model, images, [classes], method=method, return_raw=True)
        return maps[0].detach().numpy(), raw[0].detach().float().numpy()

    def _top_units(self, m: LoadedModel, out: Mapping[str, np.ndarray], c: int, k: int) -> list[dict[str, Any]]:
        if k <= 0 or m.kind != "classifier":
            return []
        pooled = np.asarray(out["pooled"], dtype=np.float32)  # (K,)
        w = m.head_weight[c]  # (K,)
        contrib = pooled * w  # (K,) unit contributions to the logit
        order = np.argsort(-contrib, kind="stable")[:k]
        units = []
        for u in order.tolist():
            info = m.unit_concepts.get(int(u), {})
            units.append({"layer": m.feature_layer, "unit": int(u), "contribution": float(contrib[u]),
                          "activation": float(pooled[u]), "weight": float(w[u]),
                          "concepts": info.get("concepts", []), "concept_scores": info.get("scores", []),
                          "concept_method": info.get("method")})
        return units

    # -- concepts
    def concepts(self) -> dict[str, Any]:
        """The unit-to-concept table of the served version (empty when no passing audit has one)."""
        m = self._model()
        rows = []
        if m.concepts is not None and len(m.concepts):
            for rec in m.concepts.to_dict("records"):
                rows.append({"layer": str(rec["layer"]), "unit": int(rec["unit"]), "method": str(rec["method"]),
                             "concepts": [str(c) for c in list(rec["concepts"] if rec["concepts"] is not None else [])],
                             "scores": [float(s) for s in list(rec["scores"] if rec["scores"] is not None else [])]})
        return {"model": m.identity.public(), "audit_run_id": m.audit_run_id, "feature_layer": m.feature_layer,
                "n_units": len(rows), "units": rows}

    # -- feedback
    def feedback(self, *, finding: Any, image: bytes | None = None, image_sha256: Any = None, boxes: Any = None,
                 mask: bytes | None = None, mask_png: Any = None, author: Any = None) -> dict[str, Any]:
        """Store a clinician's boxes or mask for an image and a finding.

        Args:
            finding: a class of the served model (canonical NIH spelling; aliases are mapped).
            image: the image file (stored as a header-free PNG for DWARF training) or ``image_sha256``.
            boxes: ``[[x, y, w, h], ...]`` (list or JSON text) in original-image pixels.
            mask: a PNG file (non-zero = finding) or ``mask_png`` base64 text.
            author: free text (<= 128 characters).

        Returns:
            ``{"id", "image_sha256", "finding", "model"}``.

        Raises:
            ServingError: 400 naming the bad field.
        """
        from mlflow_projects.feedback import FeedbackError, validate_boxes, validate_mask_png
        from training.data.schema import canonical_label

        m = self._model()
        if not isinstance(finding, str) or not finding.strip():
            raise ServingError(400, f"'finding' is required: one of {m.classes}", valid=m.classes)
        try:
            name = canonical_label(finding)
        except ValueError:
            name = finding.strip()
        if name not in m.classes:
            raise ServingError(400, f"unknown finding {finding!r}; valid: {m.classes}", valid=m.classes)
        img = None
        if image is not None:
            img = decode_upload(image, self.config.max_pixels)
            sha = img.sha256
        elif image_sha256:
            sha = str(image_sha256)
        else:
            raise ServingError(400, "send the image (multipart field 'image') or its 'image_sha256'")
        try:
            box_list = validate_boxes(boxes, img.width if img else None, img.height if img else None) if boxes else None
            mask_b64 = validate_mask_png(mask) if mask else (validate_mask_png(mask_png) if mask_png else None)
            rec = self.feedback_store.append(image_sha256=sha, finding=name, boxes=box_list, mask_png=mask_b64,
                                             author=author if author else None,
                                             image=img.pixels if img else None, model=m.identity.public())
        except FeedbackError as exc:
            raise ServingError(400, str(exc)) from None
        self.counts["feedback"] += 1
        return {"id": rec["id"], "image_sha256": rec["image_sha256"], "finding": rec["finding"],
                "created": rec["created"], "model": m.identity.public()}

    # -- metrics
    def metrics_text(self) -> str:
        """Prometheus text lines of the service's own counters (appended to BentoML's /metrics)."""
        lines = ["# HELP cxr_model_info Served model (value 1).", "# TYPE cxr_model_info gauge"]
        if self.model is not None:
            i = self.model.identity
            lines.append(f'cxr_model_info{{name="{i.name}",version="{i.version}",alias="{i.alias}",'
                         f'kind="{self.model.kind}"}} 1')
        lines += ["# TYPE cxr_model_ready gauge", f"cxr_model_ready {int(self.ready)}",
                  "# TYPE cxr_requests_total counter"]
        lines += [f'cxr_requests_total{{route="{k}"}} {v}' for k, v in sorted(self.counts.items())]
        lines += ["# TYPE cxr_explain_cache_hits_total counter", f"cxr_explain_cache_hits_total {self.cache.hits}",
                  "# TYPE cxr_explain_cache_misses_total counter",
                  f"cxr_explain_cache_misses_total {self.cache.misses}",
                  "# TYPE cxr_batches_total counter", f"cxr_batches_total {self.batcher.batches}",
                  "# TYPE cxr_batched_items_total counter", f"cxr_batched_items_total {self.batcher.items}"]
        return "\n".join(lines) + "\n"


# ---- ASGI guard -----------------------------------------------------------------------------------------
class GuardMiddleware:
    """Plain ASGI middleware: API keys, body limit, upload type, access log, ``GET /concepts``.

    Args:
        app: the wrapped ASGI app.
        api_keys: accepted Bearer keys; empty disables authentication.
        max_body_bytes: larger request bodies get 413 (checked from ``Content-Length`` and while streaming).
        core: a callable returning the :class:`ExplanationService` (for ``GET /concepts``), or None.
    """

    def __init__(self, app, api_keys: Sequence[str] = (), max_body_bytes: int = 128 * 1024 * 1024,
                 core: Callable[[], ExplanationService | None] | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = int(max_body_bytes)
        self.core = core

    @staticmethod
    async def _send_json(send, status: int, body: Mapping[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": payload})
        return len(payload)

    def _authorised(self, headers: Mapping[bytes, bytes]) -> str:
        if not self.keys:
            return "disabled"
        auth = headers.get(b"authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            return "missing"
        token = auth[7:].strip()
        ok = False
        for key in self.keys:  # constant time per key, all keys compared
            ok |= hmac.compare_digest(token, key)
        return "ok" if ok else "invalid"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        state = {"status": 0, "out": 0, "in": 0}
        auth = "probe"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        try:
            if path in PROBES:
                await self.app(scope, receive, send_wrapper)
                return
            auth = self._authorised(headers)
            if auth in ("missing", "invalid"):
                state["status"] = 401
                state["out"] = await self._send_json(
                    send, 401, {"error": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                "status": 401}, [(b"www-authenticate", b'Bearer realm="cxr"')])
                return
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0:
                    state["status"] = 400
                    state["out"] = await self._send_json(send, 400, {"error": "invalid Content-Length", "status": 400})
                    return
                state["in"] = n
                if n > self.max_body:
                    state["status"] = 413
                    state["out"] = await self._send_json(
                        send, 413, {"error": f"request body of {n} bytes exceeds the limit of {self.max_body} bytes "
                                             "(CXR_MAX_BODY_BYTES)", "status": 413})
                    return
            if method == "GET" and path.rstrip("/") == "/concepts" and self.core is not None:
                core = self.core()
                try:
                    if core is None:
                        raise ServingError(503, "service is starting")
                    state["status"] = 200
                    state["out"] = await self._send_json(send, 200, core.concepts())
                except ServingError as exc:
                    state["status"] = exc.status
                    state["out"] = await self._send_json(send, exc.status, exc.to_dict())
                return
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if method == "POST" and path in UPLOAD_ROUTES:
                if length == b"0" or (not ctype and length is None and b"transfer-encoding" not in headers):
                    state["status"] = 400
                    state["out"] = await self._send_json(
                        send, 400, {"error": "empty body: send multipart/form-data with the image in field 'image'",
                                    "status": 400})
                    return
                allowed = (b"multipart/form-data", b"application/json") if path == "/feedback" else (b"multipart/form-data",)
                if ctype not in allowed:
                    state["status"] = 415
                    state["out"] = await self._send_json(
                        send, 415, {"error": f"unsupported request type {ctype.decode(errors='replace')!r}: send "
                                             "multipart/form-data with the image file in field 'image'",
                                    "status": 415, "valid": [a.decode() for a in allowed]})
                    return
            received = 0
            too_large = False
            if method == "POST" and path in ROUTE_FIELDS and ctype == b"multipart/form-data":
                chunks, more = [], True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # client went away
                    chunks.append(message.get("body", b""))
                    received += len(chunks[-1])
                    state["in"] = max(state["in"], received)
                    if received > self.max_body:
                        state["status"] = 413
                        state["out"] = await self._send_json(
                            send, 413, {"error": f"request body exceeds the limit of {self.max_body} bytes "
                                                 "(CXR_MAX_BODY_BYTES)", "status": 413})
                        return
                    more = message.get("more_body", False)
                body = b"".join(chunks)
                try:
                    check_multipart_fields(body, headers.get(b"content-type", b""), path)
                except ServingError as exc:
                    state["status"] = exc.status
                    state["out"] = await self._send_json(send, exc.status, exc.to_dict())
                    return
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_wrapper)
                return

            async def receive_wrapper():
                nonlocal received, too_large
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    state["in"] = max(state["in"], received)
                    if received > self.max_body:
                        too_large = True
                        return {"type": "http.disconnect"}
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
            if too_large and state["status"] == 0:
                state["status"] = 413
                state["out"] = await self._send_json(
                    send, 413, {"error": f"request body exceeds the limit of {self.max_body} bytes", "status": 413})
        finally:
            if path not in PROBES:
                access_log.info(json.dumps({
                    "event": "access", "method": method, "path": path, "status": state["status"],
                    "request_bytes": state["in"], "response_bytes": state["out"],
                    "duration_ms": round((time.perf_counter() - t0) * 1000, 2), "auth": auth,
                    "client": (scope.get("client") or [None])[0]}))
