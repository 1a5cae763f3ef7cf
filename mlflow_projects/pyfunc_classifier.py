"""MLflow pyfunc wrapper of a trained classifier (docs/ARCHITECTURE.md, "Registered classifier").

Model directory: ``artifacts/checkpoint.pt`` (:func:`training.models.load_checkpoint`),
``artifacts/model.onnx`` (input ``images``; outputs ``logits``, ``features``) and ``artifacts/meta.json``
``{arch, classes, thresholds, threshold_positives, min_val_positives, input: {size, channels, range, mean,
std}, feature_layer, head: "gap_linear"}``: ``thresholds`` holds ``null`` for a class with too few validation
positives for one (:func:`training.metrics.choose_thresholds`); ``threshold_positives`` (validation positives
per class) and ``min_val_positives`` are ``null`` for models trained before they were recorded.

``predict(images (B, 1, S, S) float32 in [0, 1]) -> probabilities (B, C)``. Params:
``return_features`` (bool) returns ``{"probabilities": (B, C), "features": (B, K, h, w)}`` instead;
``backend`` ``"torch"`` (default) or ``"onnx"`` (ONNX Runtime on the exported graph); ``batch_size``.
The pyfunc returns probabilities only and makes no calls: calls (and ``positive: null`` where a class has no
threshold) are the service's.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from training.models import probabilities

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """Probabilities (and on request feature maps) of a :class:`training.models.CXRClassifier`."""

    def load_context(self, context) -> None:
        from training.models import load_checkpoint

        self.model = load_checkpoint(context.artifacts["checkpoint"], map_location="cpu").eval()
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.onnx_path = context.artifacts.get("onnx")
        self._session = None
        self._warned = False

    def _onnx(self):
        if self._session is None:
            from training.export import onnx_session

            if not self.onnx_path:
                raise ValueError("this model was logged without an ONNX file; use backend='torch'")
            self._session = onnx_session(self.onnx_path)
        return self._session

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        """See the module docstring. Accepts an array/tensor, or a mapping with key ``images``.

        The ``np.ndarray`` hint is the one MLflow takes without inferring a schema or warning; the input is
        validated here (and by the signature logged with the model)."""
        params = dict(params or {})
        backend = params.get("backend", "torch") or "torch"
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        images = model_input["images"] if isinstance(model_input, dict) else model_input
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, S, S) float32 in [0, 1], got shape {tuple(x.shape)}")
        if not self._warned and x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            log.warning("classifier input range [%.3g, %.3g] is outside [0, 1]; images are expected scaled to [0, 1]",
                        float(x.min()), float(x.max()))
            self._warned = True
        want_features = bool(params.get("return_features", False))
        batch = max(1, int(params.get("batch_size", 32)))
        probs, feats = [], []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            if backend == "onnx":
                logits, f = self._onnx().run(["logits", "features"], {"images": np.ascontiguousarray(chunk)})
            else:
                with torch.no_grad():
                    lg, f_t = self.model.forward_all(torch.from_numpy(chunk))
                    logits, f = lg.numpy(), f_t.numpy()
            probs.append(probabilities(logits))
            if want_features:
                feats.append(f)
        p = np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, len(self.meta["classes"])), np.float32)
        if want_features:
            return {"probabilities": p, "features": np.concatenate(feats).astype(np.float32)}
        return p


def model_meta(model) -> dict[str, Any]:
    """The ``meta.json`` of a classifier (also the source of the registry version tags); JSON-safe: a class
    without a threshold has ``null``."""
    from training.metrics import thresholds_to_json

    positives = getattr(model, "threshold_positives", None)
    minimum = getattr(model, "min_val_positives", None)
    return {"arch": model.arch, "classes": list(model.class_names), "thresholds": thresholds_to_json(model.thresholds),
            "threshold_positives": None if positives is None else [int(n) for n in positives],
            "min_val_positives": None if minimum is None else int(minimum),
            "input": model.input_spec, "feature_layer": model.feature_layer,
            "head": getattr(model, "head_kind", "gap_linear"), **_imported_meta(model)}


def _imported_meta(model) -> dict[str, Any]:
    """``imported``: where an imported model came from (:mod:`training.imported`); nothing for a trained one."""
    spec = getattr(model, "spec", None)
    if not spec or getattr(model, "checkpoint_format", None) is None:
        return {}
    return {"imported": {"source": spec["source"], "name": spec["name"], "kwargs": spec.get("kwargs", {}),
                         "outputs": model.outputs, "token_grid": model.token_grid}}


def log_classifier_model(model, name: str = "model", onnx: bool = True):
    """Log ``model`` as a pyfunc (checkpoint, ONNX checked against eager, meta) under the active run.

    Returns:
        mlflow's ``ModelInfo`` (``model_uri`` is ``models:/m-<id>``).
    """
    from mlflow.models import infer_signature

    from training.export import export_onnx
    from training.models import save_checkpoint

    model = model.cpu().eval()
    size = int(model.input_spec["size"])
    example = np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(example))).numpy()
    signature = infer_signature(example, probs, params={"return_features": False, "backend": "torch",
                                                        "batch_size": 32})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, meta = Path(tmp) / "checkpoint.pt", Path(tmp) / "meta.json"
        save_checkpoint(model, ckpt)
        meta.write_text(json.dumps(model_meta(model), indent=2, allow_nan=False))
        artifacts = {"checkpoint": str(ckpt), "meta": str(meta)}
        if onnx:
            artifacts["onnx"] = str(export_onnx(model, Path(tmp) / "model.onnx", image_size=size))
        return mlflow.pyfunc.log_model(name=name, python_model=ClassifierPyfunc(), artifacts=artifacts,
                                       signature=signature, input_example=example)
