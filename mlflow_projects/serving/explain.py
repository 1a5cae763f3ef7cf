"""The explanation core of the service, free of any web framework: :class:`ExplanationService` loads the
model once, then answers ``predict`` / ``explain`` / ``concepts`` / ``feedback``; :func:`explanation_maps`
is the one function that computes what ``/explain`` serves.

Maps and unit contributions come from the same library calls the audit uses, so what is audited is what
is served:

- ``cam``: the ONNX run's feature maps and the head weights through
  :func:`interpret.attention.cam_from_features` (``M_c = sum_k w_ck f_k``, Zhou et al. 2016, eq. 2), then
  :func:`interpret.attention.finalize_maps` (ReLU, bilinear upsampling, min-max); it costs one prediction.
- ``gradcam``, ``gradcampp``, ``integrated_gradients``, ``smoothgrad``: :func:`interpret.attention_maps`
  on the torch model (one request at a time: the methods put hooks on the shared model).
- ``dwarf``: the maps of a maps-returning pyfunc through :func:`interpret.attention.finalize_maps`.
  DWARF's refined maps are clamped to [0, 1] by the expert heads (``training.dwarf.model``), so the ReLU
  is the identity on them and the served maps are those min-max normalised, as before.
- top units: contributions ``a_k * w_ck`` from :func:`interpret.importance.linear_contributions`
  (``a_k`` the global average of unit k on this image; exact for a GAP + linear head), named with the
  concepts the latest passing audit serves (:func:`interpret.annotation.served_unit_concepts`: enough
  evidence, not VLM-blind) and the number of images each rests on (``evidence``).
- per target, the audit's ``verdict`` (fit / unfit, reasons, key figures with CIs); an unfit target keeps
  its maps, gets a ``warnings`` entry and a banner on its overlay (:mod:`mlflow_projects.serving.verdicts`).
- ``ood`` on ``/predict`` and ``/explain``: the audit's detector on the same forward pass's pooled features.

Async variants (:meth:`ExplanationService.apredict`, :meth:`ExplanationService.aexplain`) put the
forward pass through the micro-batcher (:mod:`mlflow_projects.serving.batching`). Explanation entries
are cached per ``(image sha256, model version, model uri, method, target)``.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlflow_projects.common import ModelIdentity, find_passing_audit, resolve_model_uri
from mlflow_projects.common.registry import CONCEPTS_ARTIFACT, OOD_ARTIFACT, SUMMARY_ARTIFACT
from mlflow_projects.serving.batching import LRUCache, MicroBatcher
from mlflow_projects.serving.errors import ServingError
from mlflow_projects.serving.feedback import FeedbackError, FeedbackStore, validate_boxes, validate_mask_png
from mlflow_projects.serving.images import DecodedImage, decode_upload, display_png, grey_png, overlay_png, preprocess
from mlflow_projects.serving.metrics import metrics_text
from mlflow_projects.serving.runtime import LoadedModel, load_model
from mlflow_projects.serving.settings import ServeConfig
from mlflow_projects.serving.verdicts import (attach_audit, banner_text, ood_entry, ood_scores, unfit_warning,
                                              verdict_entry)

log = logging.getLogger(__name__)

__all__ = ["ExplanationService", "explanation_maps", "top_units", "findings"]


def findings(model: LoadedModel, probs: np.ndarray) -> list[dict[str, Any]]:
    """The ``findings`` of ``/predict`` and ``/explain``: one entry per class, in the model's class order.

    Args:
        model: the loaded model (its classes, thresholds and the validation positives behind them).
        probs: (C,) probabilities of one image.

    Returns:
        ``[{name, probability, threshold, positive}]`` with ``positive = probability >= threshold``. A class
        without a threshold (too few validation positives to fit one, :func:`training.metrics.choose_thresholds`)
        gets no call: ``threshold`` and ``positive`` are ``None`` and ``threshold_reason`` says why, e.g.
        ``"no reliable threshold: 1 validation positive (< 5)"``.
    """
    from training.metrics import threshold_reason

    out = []
    positives = model.threshold_positives
    for i, (name, p, t) in enumerate(zip(model.classes, np.asarray(probs, dtype=np.float64).tolist(), model.thresholds)):
        if t is not None and np.isfinite(t):
            out.append({"name": name, "probability": float(p), "threshold": float(t), "positive": bool(p >= t)})
        else:
            n = positives[i] if positives is not None and i < len(positives) else None
            out.append({"name": name, "probability": float(p), "threshold": None, "positive": None,
                        "threshold_reason": threshold_reason(n, model.min_val_positives)})
    return out


def explanation_maps(model: LoadedModel, x: np.ndarray, classes: Sequence[int], method: str | None = None,
                     out: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The maps ``/explain`` serves for one preprocessed image (see the module docstring per method).

    Args:
        model: the loaded model.
        x: (1, 1, S, S) float32 in [0, 1]: :func:`~mlflow_projects.serving.images.decode_upload` then
            :func:`~mlflow_projects.serving.images.preprocess`, with a batch axis.
        classes: T class indices.
        method: one of ``model.methods`` (default the first: ``cam``, or ``dwarf`` for a maps model).
        out: the forward pass of ``x`` (``model.run_batch(x)[0]``) when already computed.

    Returns:
        ``(maps, raw)``: maps (T, S, S) float32 min-max normalised to [0, 1] (what the overlay shows) and
        raw maps (T, h, w) float32 at the layer's resolution, before ReLU and normalisation (what
        ``map_png`` / ``map_range`` encode).

    Raises:
        ValueError: ``x`` is not (1, 1, S, S).
        ServingError: (400) ``method`` is not one of ``model.methods``.

    Example:
        >>> x = preprocess(decode_upload(png, 50_000_000).pixels, m.image_size)[None]  # doctest: +SKIP
        >>> maps, raw = explanation_maps(m, x, [2], "cam")                              # doctest: +SKIP
    """
    import torch

    from interpret.attention import cam_from_features, finalize_maps

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[:2] != (1, 1) or x.shape[2] != x.shape[3]:
        raise ValueError(f"x must be one preprocessed image (1, 1, S, S), got shape {x.shape}")
    method = method or model.methods[0]
    if method not in model.methods:
        raise ServingError(400, f"unknown method {method!r} for this {model.kind} model; valid: {list(model.methods)}",
                           valid=list(model.methods))
    S = x.shape[-1]
    idx = [int(c) for c in classes]
    if model.kind == "maps" or method == "cam":
        out = out if out is not None else model.run_batch(x)[0]
    if model.kind == "maps":
        raw = torch.from_numpy(np.asarray(out["maps"])[idx].astype(np.float32))  # (T, S', S')
        return finalize_maps(raw[None], (S, S))[0].numpy(), raw.numpy()
    if method == "cam":
        feats = torch.from_numpy(np.asarray(out["features"], dtype=np.float32))[None]  # (1, K, h, w)
        raw = cam_from_features(feats, torch.from_numpy(model.head_weight), torch.tensor([idx]))  # (1, T, h, w)
        return finalize_maps(raw, (S, S))[0].numpy(), raw[0].numpy()
    from interpret import attention_maps

    with model.torch_lock:
        x_t = torch.from_numpy(x).to(model.torch_device or "cpu")
        maps, raw = attention_maps(model.torch_model, x_t, [idx], method=method, return_raw=True)
    return maps[0].detach().float().cpu().numpy(), raw[0].detach().float().cpu().numpy()


def top_units(model: LoadedModel, pooled: np.ndarray, classes: Sequence[int], k: int) -> list[list[dict[str, Any]]]:
    """The ``k`` units with the largest contribution ``a_k * w_ck`` to each class's logit, with their concepts.

    Args:
        model: a classifier (a maps model has no units: empty lists).
        pooled: (K,) the image's pooled feature activations (``run_batch``'s ``pooled``).
        classes: T class indices.
        k: units per class (0: none).

    Returns:
        Per class, a list of ``{layer, unit, contribution, activation, weight, concepts, concept_scores,
        concept_method, evidence}``, largest contribution first; ``concepts`` only where the audit serves
        them (``model.unit_concepts``), ``evidence`` the images they rest on (None: no served concept).
    """
    if k <= 0 or model.kind != "classifier" or model.head_weight is None:  # no GAP + linear head: no exact units
        return [[] for _ in classes]
    import torch

    from interpret.importance import linear_contributions

    a = np.asarray(pooled, dtype=np.float32)  # (K,)
    contrib = linear_contributions(torch.from_numpy(a)[None], torch.from_numpy(model.head_weight))[0].numpy()  # (C, K)
    result = []
    for c in classes:
        order = np.argsort(-contrib[c], kind="stable")[:k]
        units = []
        for u in order.tolist():
            info = model.unit_concepts.get(int(u), {})
            units.append({"layer": model.feature_layer, "unit": int(u), "contribution": float(contrib[c, u]),
                          "activation": float(a[u]), "weight": float(model.head_weight[c, u]),
                          "concepts": info.get("concepts", []), "concept_scores": info.get("scores", []),
                          "concept_method": info.get("method"), "evidence": info.get("evidence")})
        result.append(units)
    return result


def read_packaged_audit(folder: str | Path, run_id: str | None) -> tuple | None:
    """The audit packed with a model (``build_bento``): ``(run_id, concepts, summary, ood_path)`` from
    ``folder/audit/{concepts.parquet, summary.json, ood.npz}`` (missing files: None), or None without any."""
    import pandas as pd

    folder = Path(folder)
    table_path, summary_path, ood_path = (folder / a for a in (CONCEPTS_ARTIFACT, SUMMARY_ARTIFACT, OOD_ARTIFACT))
    if not any(p.is_file() for p in (table_path, summary_path, ood_path)):
        return None
    table = pd.read_parquet(table_path) if table_path.is_file() else None
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError as exc:
            log.warning("%s is unreadable (%s); no verdicts", summary_path, exc)
    return run_id, table, summary, ood_path if ood_path.is_file() else None


def _valid_method(m: LoadedModel, method: Any) -> str:
    """``method`` lower-cased when it is one of the model's methods; else a 400 listing them."""
    if isinstance(method, str) and method.strip().lower() == "cam" and m.kind == "classifier" and m.head_weight is None:
        raise ServingError(400, "cam is exact only for a global-average-pool + linear head; this model has another "
                                f"head (e.g. a ViT's class token): use gradcam; valid: {list(m.methods)}",
                           valid=list(m.methods))
    if not isinstance(method, str) or method.strip().lower() not in m.methods:
        raise ServingError(400, f"unknown method {method!r} for this {m.kind} model; valid: {list(m.methods)}",
                           valid=list(m.methods))
    return method.strip().lower()


class ExplanationService:
    """Framework-free core of the service: load once, then ``predict`` / ``explain`` / ``concepts`` /
    ``feedback``.

    Args:
        config: settings; default :meth:`ServeConfig.from_env`.

    Construction is cheap; call :meth:`load` (or :meth:`start` for a background thread) before use.
    Requests before that get :class:`ServingError` 503.
    """

    def __init__(self, config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig.from_env()
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self.cache = LRUCache(self.config.cache_size)
        self.batcher = MicroBatcher(self._run_batch, self.config.max_batch, self.config.batch_wait_ms,
                                    self.config.batch_inflight)
        self._load_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counts: collections.Counter = collections.Counter()
        self.ood_flagged = 0  # responses whose image the audit's OOD detector flagged
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
        """Load the model and its audit: served concepts, verdicts, OOD detector (idempotent).

        A packaged model (``config.local_model_dir``) is read from its folder (with the audit files packed
        under ``audit/``) and the tracking store is never touched; otherwise ``config.model_uri`` is resolved
        in the registry at ``config.tracking_uri`` (default: the project's), downloaded, and its latest
        passing audit looked up (:func:`mlflow_projects.common.find_passing_audit`). Whatever the audit
        lacks (an older audit: no ``summary.json`` verdicts, no ``ood.npz``) is served as null with the
        reason and said once in the log (:func:`mlflow_projects.serving.verdicts.attach_audit`).

        Raises:
            mlflow_projects.common.RegistryError: the URI does not resolve.
            ServingError: (503) the model cannot be served.
        """
        with self._load_lock:
            if self.model is not None:
                return self.model
            t0 = time.perf_counter()
            if self.config.local_model_dir:
                identity, model, audit = self._load_local()
            else:
                import mlflow

                from mlflow_projects.common import DEFAULT_TRACKING_URI

                mlflow.set_tracking_uri(self.config.tracking_uri or DEFAULT_TRACKING_URI)
                identity = resolve_model_uri(self.config.model_uri)
                model = load_model(identity, self.config)
                found = find_passing_audit(identity.name, identity.version, dst=self._audit_cache())
                if found is None:  # no passing audit: the latest failed one's verdicts and OOD detector still
                    # travel with every explanation (its concepts are not served: only a passing audit's are)
                    found = find_passing_audit(identity.name, identity.version, dst=self._audit_cache(),
                                               status="failed")
                    if found is not None:
                        log.warning("%s has no passing audit: serving the verdicts and OOD detector of its failed "
                                    "audit run %s, without concepts", identity.uri, found.run_id)
                        found.concepts = None
                audit = None if found is None else (found.run_id, found.concepts, found.summary, found.ood_path)
            attach_audit(model, *(audit or (None,)))
            self.model = model
            log.info("serving %s (name=%s version=%s alias=%s, %s, %d classes) loaded in %.1f s; %d threads",
                     identity.uri, identity.name, identity.version, identity.alias, model.kind, len(model.classes),
                     time.perf_counter() - t0, self.config.intra_op_threads)
            return model

    def _audit_cache(self) -> Path:
        """Where the registry path keeps the audit files (``<cache>/cxr-serve/audits/<run id>/audit/``)."""
        return Path(self.config.cache_dir or tempfile.gettempdir()) / "cxr-serve" / "audits"

    def _load_local(self):
        folder = Path(self.config.local_model_dir)
        ids = dict(self.config.local_identity or {})
        name, version = ids.get("name") or None, ids.get("version") or None
        uri = f"models:/{name}/{version}" if name and version else str(folder)
        identity = ModelIdentity(name, version, ids.get("alias") or None, uri, str(folder), ids.get("run_id"))
        source = folder / "mlflow_model" if (folder / "mlflow_model").is_dir() else folder
        model = load_model(identity, self.config, source=source)
        return identity, model, read_packaged_audit(folder, ids.get("audit_run_id") or None)

    def _model(self) -> LoadedModel:
        if self.model is None:
            if self.load_error:
                raise ServingError(503, f"model failed to load: {self.load_error}")
            raise ServingError(503, "model is still loading; retry when /readyz answers 200")
        return self.model

    def model_info(self) -> dict[str, Any] | None:
        """``{name, version, alias, uri}`` of the served model, or None before it is loaded."""
        return self.model.identity.public() if self.model else None

    # -- shared steps
    def _run_batch(self, x: np.ndarray) -> list[dict[str, np.ndarray]]:
        m = self._model()
        outs = m.run_batch(x)
        ood_scores(m, outs)  # the same forward pass's pooled features: one (N, K) x (K, K) product
        return outs

    def _findings(self, m: LoadedModel, probs: np.ndarray) -> list[dict[str, Any]]:
        return findings(m, probs)

    def _decode(self, data: bytes | None) -> tuple[DecodedImage, np.ndarray]:
        m = self._model()
        img = decode_upload(data, self.config.max_pixels, self.config.min_image_side)
        return img, preprocess(img.pixels, m.image_size)  # (1, S, S)

    def _image_info(self, img: DecodedImage) -> dict[str, Any]:
        return {"width": img.width, "height": img.height, "sha256": img.sha256}

    # -- predict
    def predict(self, data: bytes | None) -> dict[str, Any]:
        """Findings for one uploaded image (synchronous; no batching).

        Args:
            data: the uploaded file bytes (PNG, JPEG or DICOM).

        Returns:
            ``{"model", "image": {width, height, sha256}, "findings": [{name, probability, threshold,
            positive}], "ood", "audit_run_id"}`` (:func:`findings`: ``threshold`` and ``positive`` null, plus
            ``threshold_reason``, for a class without a threshold; ``ood``: ``{score, threshold, flagged,
            warning, layer, calibrated}`` or null with ``ood_reason``).

        Raises:
            ServingError: bad image (4xx), model not loaded (503).
        """
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
                "findings": self._findings(m, out["probabilities"]), **self._ood(m, out),
                "audit_run_id": m.audit_run_id}

    def _ood(self, m: LoadedModel, out: Mapping[str, Any]) -> dict[str, Any]:
        entry, reason = ood_entry(m, out)
        if entry is not None and entry["flagged"]:
            self.ood_flagged += 1
        return {"ood": entry} if entry is not None else {"ood": None, "ood_reason": reason}

    # -- explain
    def _parse_explain(self, m: LoadedModel, method: Any, targets: Any, top_neurons: Any) -> tuple[str, list[str] | None, int]:
        if method is None or (isinstance(method, str) and not method.strip()):
            method = m.methods[0]
        method = _valid_method(m, method)
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
            method: one of the model's methods (:func:`~mlflow_projects.serving.runtime.list_methods`);
                default ``cam`` (``dwarf`` for a maps model).
            targets: class names (list, JSON list or comma-separated string); default the positive
                findings, else the top class.
            top_neurons: k units per target (default 5).

        Returns:
            ``{"model", "image", "method", "layer", "findings", "targets", "heatmaps": [{target, class_index,
            probability, verdict, overlay_png, overlay_size, map_png, map_size, map_range, top_units}],
            "image_png", "methods", "warnings", "ood", "cached", "audit_run_id", "explain_ms"}``; ``image_png``
            is the image alone at the overlays' size (the review page fades the overlay over it), ``methods``
            the model's valid methods. ``verdict`` is the audit's
            (:func:`~mlflow_projects.serving.verdicts.verdict_entry`) or null with ``verdict_reason``;
            ``warnings`` has one sentence per unfit target (its overlay carries an ``UNFIT: <reason>``
            banner); ``ood`` as in :meth:`predict`.

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
        verdicts = {c: verdict_entry(m, m.classes[c]) for c in idx}  # c -> (verdict, reason)
        if missing:
            maps, raws = explanation_maps(m, x[None], missing, method, out)  # (T, S, S), (T, h, w)
            for j, c in enumerate(missing):
                verdict = verdicts[c][0]
                banner = banner_text(verdict) if verdict is not None and verdict["status"] == "unfit" else None
                ov, ov_size = overlay_png(img.pixels, maps[j], self.config.overlay_max_side, banner=banner)
                raw_b64, raw_size, raw_range = grey_png(raws[j])
                entry = {"overlay_png": ov, "overlay_size": ov_size, "map_png": raw_b64, "map_size": raw_size,
                         "map_range": raw_range}
                self.cache.put((img.sha256, m.identity.version, m.identity.uri, method, c), entry)
                entries[c] = entry
        units = top_units(m, out.get("pooled"), idx, k)
        heatmaps, warnings = [], []
        for name, c, u in zip(names, idx, units):
            verdict, reason = verdicts[c]
            item = {"target": name, "class_index": c, "probability": float(probs[c]), "verdict": verdict}
            if verdict is None:
                item["verdict_reason"] = reason
            elif verdict["status"] == "unfit":
                warnings.append(unfit_warning(name, verdict))
            heatmaps.append({**item, **entries[c], "top_units": u})
        self.counts[f"explain_{method}"] += 1
        from interpret.attention import method_layer

        return {"model": m.identity.public(), "image": self._image_info(img), "method": method,
                "layer": method_layer(method, m.feature_layer),
                "methods": list(m.methods), "findings": findings, "targets": names, "heatmaps": heatmaps,
                "image_png": display_png(img.pixels, self.config.overlay_max_side)[0], "warnings": warnings,
                **self._ood(m, out), "cached": not missing, "audit_run_id": m.audit_run_id,
                "explain_ms": round((time.perf_counter() - t0) * 1000, 2)}

    # -- concepts
    def concepts(self) -> dict[str, Any]:
        """The served unit-to-concept table of the served version: only the annotations the audit serves
        (:func:`interpret.annotation.served_unit_concepts`: evidence >= the audit's ``min_evidence``, not
        VLM-blind); empty when no passing audit has one.

        Returns:
            ``{"model", "audit_run_id", "feature_layer", "min_evidence", "n_units", "n_withheld", "units":
            [{layer, unit, method, concepts, scores, evidence}]}`` (``n_withheld``: annotated units of the
            layer not served).

        Raises:
            ServingError: (503) model not loaded.
        """
        m = self._model()
        rows = [{"layer": m.feature_layer, "unit": int(u), "method": info["method"], "concepts": info["concepts"],
                 "scores": info["scores"], "evidence": info["evidence"]} for u, info in sorted(m.unit_concepts.items())]
        annotated = 0
        if m.concepts is not None and len(m.concepts) and m.feature_layer is not None:
            annotated = int(m.concepts.loc[m.concepts["layer"] == m.feature_layer, "unit"].nunique())
        return {"model": m.identity.public(), "audit_run_id": m.audit_run_id, "feature_layer": m.feature_layer,
                "min_evidence": m.min_evidence, "n_units": len(rows), "n_withheld": max(annotated - len(rows), 0),
                "units": rows}

    # -- feedback
    def feedback(self, *, finding: Any, image: bytes | None = None, image_sha256: Any = None, boxes: Any = None,
                 mask: bytes | None = None, mask_png: Any = None, author: Any = None, judgement: Any = None,
                 method: Any = None) -> dict[str, Any]:
        """Store a clinician's boxes or mask for an image and a finding, or their judgement of a served map.

        Args:
            finding: a class of the served model (canonical NIH spelling; aliases are mapped).
            image: the image file (stored as a header-free PNG for DWARF training) or ``image_sha256``.
            image_sha256: the SHA-256 of an image sent before, instead of ``image``.
            boxes: ``[[x, y, w, h], ...]`` (list or JSON text) in original-image pixels.
            mask: a PNG file (non-zero = finding) or ``mask_png`` base64 text.
            mask_png: base64 PNG text, instead of ``mask``.
            author: free text (<= 128 characters).
            judgement: ``on`` / ``off``: the served map of ``method`` lies on the finding / misses it.
            method: one of the model's methods, the map judged (required with ``judgement``).

        Returns:
            ``{"id", "image_sha256", "finding", "created", "model"}`` (plus ``judgement`` and ``method`` when given).

        Raises:
            ServingError: 400 naming the bad field.
        """
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
            img = decode_upload(image, self.config.max_pixels, self.config.min_image_side)
            sha = img.sha256
        elif image_sha256:
            sha = str(image_sha256)
        else:
            raise ServingError(400, "send the image (multipart field 'image') or its 'image_sha256'")
        judged = str(judgement).strip().lower() if judgement not in (None, "") else None
        how = _valid_method(m, method) if method not in (None, "") else None
        try:
            box_list = validate_boxes(boxes, img.width if img else None, img.height if img else None) if boxes else None
            mask_b64 = validate_mask_png(mask) if mask else (validate_mask_png(mask_png) if mask_png else None)
            rec = self.feedback_store.append(image_sha256=sha, finding=name, boxes=box_list, mask_png=mask_b64,
                                             author=author if author else None,
                                             image=img.pixels if img else None, model=m.identity.public(),
                                             judgement=judged, method=how)
        except FeedbackError as exc:
            raise ServingError(400, str(exc)) from None
        self.counts["feedback"] += 1
        return {"id": rec["id"], "image_sha256": rec["image_sha256"], "finding": rec["finding"],
                "created": rec["created"], "model": m.identity.public(),
                **{k: rec[k] for k in ("judgement", "method") if k in rec}}

    # -- metrics
    def metrics_text(self) -> str:
        """Prometheus lines of the service's counters (:func:`mlflow_projects.serving.metrics.metrics_text`)."""
        return metrics_text(self)
