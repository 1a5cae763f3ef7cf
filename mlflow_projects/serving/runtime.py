"""Model runtimes of the service: a registered classifier on ONNX Runtime (plus its torch model for
gradient methods) or a maps-returning pyfunc (a registered ``cxr-dwarf``), wrapped in :class:`LoadedModel`.

- **Classifier** (docs/ARCHITECTURE.md "Registered classifier": ``artifacts/checkpoint.pt``,
  ``artifacts/model.onnx``, ``artifacts/meta.json``): an ONNX Runtime session
  (``intra_op_num_threads = cores / workers``, full graph optimisation; one run gives ``logits`` and
  ``features``) and the torch model for the gradient methods. A model without ``model.onnx`` gets one
  exported at load time (with a warning).
- **Maps model**: a pyfunc whose ``predict`` returns ``{"probabilities", "maps"}`` (``meta.json``
  ``outputs`` lists ``maps``, or ``kind`` is ``dwarf``), served generically with ``method=dwarf``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_projects.common import ModelIdentity
from mlflow_projects.serving.errors import ServingError
from mlflow_projects.serving.settings import ServeConfig

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "list_methods", "CLASSIFIER_METHODS", "MAPS_METHODS"]

CLASSIFIER_METHODS = ("cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad")
MAPS_METHODS = ("dwarf",)


def list_methods(kind: str) -> tuple[str, ...]:
    """Explanation methods of a model kind (``classifier`` or ``maps``); the first is the default."""
    return CLASSIFIER_METHODS if kind == "classifier" else MAPS_METHODS


@dataclass
class LoadedModel:
    """Everything needed to answer requests for one model version."""

    identity: ModelIdentity
    kind: str  # "classifier" | "maps" (a pyfunc returning probabilities and maps, e.g. cxr-dwarf)
    classes: list[str]
    thresholds: list[float]  # NaN: no threshold (too few validation positives); no call is made
    image_size: int
    meta: dict[str, Any]
    methods: tuple[str, ...]
    torch_model: Any = None
    session: Any = None
    head_weight: np.ndarray | None = None  # (C, K)
    head_bias: np.ndarray | None = None  # (C,)
    feature_layer: str | None = None
    pyfunc: Any = None
    # from the latest passing audit (mlflow_projects.serving.verdicts.attach_audit)
    concepts: Any = None  # DataFrame (the audit's concepts.parquet) or None
    audit_run_id: str | None = None
    audit_status: str | None = None  # "passed", or "failed" when the version has no passing audit
    unit_concepts: dict[int, dict[str, Any]] = field(default_factory=dict)  # served only: unit -> concepts, evidence
    min_evidence: int | None = None  # the audit's floor for a served annotation
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)  # class -> summary.json verdict
    verdict_reason: str | None = None  # why there are no verdicts (None when there are)
    audited_method: str | None = None  # the attention method the verdicts were reached for
    ood: Any = None  # interpret.ood.FeatureOOD of the feature layer, or None
    ood_reason: str | None = None  # why there is no OOD detector (None when there is)
    threshold_positives: list[int] | None = None  # validation positives per class behind the thresholds
    min_val_positives: int | None = None  # the minimum a threshold needed (None: not recorded)
    # gradient methods put hooks on the shared torch model: one at a time
    torch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    torch_device: Any = None  # where torch_model runs (gradient methods, the no-ONNX path): CUDA when present

    def run_batch(self, x: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One forward pass over a batch.

        Args:
            x: (N, 1, S, S) float32 in [0, 1].

        Returns:
            Per image ``{"probabilities": (C,), "pooled": (K,), "features": (K, h, w)}`` (classifier, one
            ONNX run; ``pooled`` is the global average of ``features``) or ``{"probabilities", "maps":
            (C, S, S)}`` (maps pyfunc).
        """
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
                lg, ft = self.torch_model.forward_all(torch.from_numpy(x).to(self.torch_device or "cpu"))
            logits, feats = lg.float().cpu().numpy(), ft.float().cpu().numpy()
        from training.models import probabilities

        probs = probabilities(logits)
        pooled = feats.mean(axis=(2, 3))  # (N, K): GAP
        return [{"probabilities": probs[i].astype(np.float32), "pooled": pooled[i], "features": feats[i]}
                for i in range(len(x))]


def _read_meta(folder: Path) -> dict[str, Any]:
    for path in (folder / "artifacts" / "meta.json", *sorted(folder.rglob("meta.json"))):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def load_model(identity: ModelIdentity, config: ServeConfig, source: str | os.PathLike | None = None) -> LoadedModel:
    """Build the :class:`LoadedModel` of ``identity.uri`` (downloaded) or of the local folder ``source``.

    Args:
        identity: the resolved model (its ``uri`` is downloaded when ``source`` is None).
        config: threads and the download cache folder (``CXR_SERVE_CACHE``).
        source: a local MLflow model folder; then nothing is downloaded and the tracking store is never
            contacted.

    Raises:
        ServingError: (503) the folder holds neither a classifier checkpoint nor a maps pyfunc, or its
            ONNX graph lacks ``logits`` / ``features``.
    """
    import mlflow

    from training.metrics import thresholds_from_json  # JSON null (no threshold) -> NaN

    src = Path(source) if source else Path(identity.uri)
    where = str(source) if source else mlflow.get_tracking_uri()
    key = hashlib.sha256(f"{where}|{identity.uri}".encode()).hexdigest()[:16]
    dst = Path(config.cache_dir or tempfile.gettempdir()) / "cxr-serve" / key
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
        thresholds = thresholds_from_json(meta.get("thresholds") or [0.5] * len(classes))
        return LoadedModel(identity, "maps", classes, thresholds, int(meta.get("input", {}).get("size", 224)), meta,
                           MAPS_METHODS, pyfunc=model, **_threshold_support(meta, None, len(classes)))
    ckpt = src / "artifacts" / "checkpoint.pt"
    if not ckpt.is_file():
        found = sorted(src.rglob("checkpoint.pt"))
        if not found:
            raise ServingError(503, f"{identity.uri} holds neither artifacts/checkpoint.pt nor a maps-returning "
                                    "pyfunc (meta.json outputs); cannot serve it")
        ckpt = found[0]
    import torch

    from training.models import load_checkpoint

    from interpret.devices import resolve_torch_device

    torch.set_num_threads(threads)
    net = load_checkpoint(ckpt).eval()
    # the gradient methods (Grad-CAM, Grad-CAM++, IG, SmoothGrad) run the torch model: on CUDA when there is one
    # (CXR_TORCH_DEVICE overrides, e.g. "cpu"); the head weights below are read before the move
    device = resolve_torch_device("auto")  # CXR_TORCH_DEVICE overrides (validated: a bad value names the valid ones)
    classes = [str(c) for c in (meta.get("classes") or net.class_names)]
    thresholds = thresholds_from_json(meta.get("thresholds") or net.thresholds)
    size = int((meta.get("input") or {}).get("size") or net.input_spec["size"])
    onnx_path = ckpt.parent / "model.onnx"
    if not onnx_path.is_file():
        from training.export import export_onnx

        dst.mkdir(parents=True, exist_ok=True)
        onnx_path = dst / "model.onnx"
        log.warning("%s has no artifacts/model.onnx; exporting one to %s", identity.uri, onnx_path)
        try:
            export_onnx(net, onnx_path, image_size=size)
        except Exception as exc:  # noqa: BLE001 - an imported model that does not export: the torch path
            log.warning("%s does not export to ONNX (%s: %s); serving it with torch", identity.uri,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            onnx_path = None
    # CAM and unit contributions need a GAP + linear head (an imported ViT has none: Grad-CAM is its default)
    linear = getattr(net, "head", None) is not None
    methods = CLASSIFIER_METHODS if linear else tuple(m for m in CLASSIFIER_METHODS if m != "cam")
    common = dict(torch_model=net, feature_layer=meta.get("feature_layer") or net.feature_layer,
                  head_weight=net.head.weight.detach().numpy().astype(np.float32) if linear else None,
                  head_bias=(net.head.bias.detach().numpy().astype(np.float32)
                             if linear and net.head.bias is not None else None),
                  **_threshold_support(meta, net, len(classes)), torch_device=device)
    net.to(device)
    log.info("torch runs the gradient methods of %s on %s", identity.uri, device)
    if onnx_path is None:
        return LoadedModel(identity, "classifier", classes, thresholds, size, meta, methods, **common)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting of ORT's threads after a run: on a few cores they starved the decoding, the CAM map and
    # the PNG encoding of the same request (2 cores: ORT 16 -> 8 ms, CAM map 24 -> 3 ms; benchmarks/serve_bench.py)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from training.runtime import onnx_providers

    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=onnx_providers())
    log.info("ONNX Runtime runs %s on %s (%d threads)", identity.uri, session.get_providers()[0], threads)
    names = {o.name for o in session.get_outputs()}
    if not {"logits", "features"} <= names:
        raise ServingError(503, f"{onnx_path.name} outputs {sorted(names)}; expected logits and features")
    return LoadedModel(identity, "classifier", classes, thresholds, size, meta, methods, session=session, **common)


def _threshold_support(meta: dict[str, Any], net: Any, n_classes: int) -> dict[str, Any]:
    """``threshold_positives`` and ``min_val_positives`` from ``meta.json``, else the checkpoint; None where
    neither records them (models trained before they existed)."""
    positives = meta.get("threshold_positives")
    if positives is None and net is not None:
        positives = getattr(net, "threshold_positives", None)
    minimum = meta.get("min_val_positives")
    if minimum is None and net is not None:
        minimum = getattr(net, "min_val_positives", None)
    if positives is not None and len(positives) != n_classes:
        log.warning("threshold_positives lists %d values for %d classes; ignored", len(positives), n_classes)
        positives = None
    return {"threshold_positives": None if positives is None else [int(n) for n in positives],
            "min_val_positives": None if minimum is None else int(minimum)}
