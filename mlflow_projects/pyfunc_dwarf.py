"""MLflow pyfunc wrapper of a trained DWARF model (what the service loads for ``method=dwarf``).

Model directory: ``artifacts/checkpoint.pt`` (:func:`training.dwarf.load_dwarf`) and
``artifacts/meta.json`` ``{kind: "dwarf", classes, thresholds, threshold_positives, min_val_positives,
input: {size, channels, range, mean, std}, outputs: ["probabilities", "maps"]}``; ``thresholds`` holds
``null`` for a disease with too few validation positives for one (the service then makes no call for it).

``predict(images (B, 1, S, S) float32 in [0, 1]) -> {"probabilities": (B, C), "maps": (B, C, S, S)}``
where ``maps`` are the expert-refined maps in [0, 1]. ``params={"return_raw": True}`` adds
``"raw_maps"`` (the cross-attention maps before refinement); ``params={"batch_size": n}`` bounds memory.
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


class DwarfPyfunc(mlflow.pyfunc.PythonModel):
    """Probabilities and refined attention maps of a DWARF model."""

    def load_context(self, context) -> None:
        from training.dwarf.model import load_dwarf

        self.model = load_dwarf(context.artifacts["checkpoint"], map_location="cpu").eval()
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self._warned = False

    def predict(self, context, model_input: np.ndarray, params=None):
        """See the module docstring. Accepts an array/tensor, or a mapping with key ``images``.

        The ``np.ndarray`` hint is the one MLflow takes without inferring a schema or warning; the input is
        validated here."""
        params = dict(params or {})
        images = model_input["images"] if isinstance(model_input, dict) else model_input
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, S, S) float32 in [0, 1], got shape {tuple(x.shape)}")
        if not self._warned and x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            log.warning("DWARF input range [%.3g, %.3g] is outside [0, 1]; images are expected scaled to [0, 1]",
                        float(x.min()), float(x.max()))
            self._warned = True
        batch = int(params.get("batch_size", 32))
        probs, maps, raws = [], [], []
        with torch.no_grad():
            for start in range(0, len(x), batch):
                out = self.model(x[start:start + batch])
                probs.append(probabilities(out.logits.float()).numpy())  # the one logits -> probabilities
                maps.append(out.refined_maps.float().numpy())
                if params.get("return_raw"):
                    raws.append(out.raw_maps.float().numpy())
        result = {"probabilities": np.concatenate(probs).astype(np.float32),
                  "maps": np.concatenate(maps).astype(np.float32)}
        if raws:
            result["raw_maps"] = np.concatenate(raws).astype(np.float32)
        return result


def model_meta(model) -> dict[str, Any]:
    """The ``meta.json`` / version-tag metadata of a :class:`training.dwarf.DwarfModel` (JSON-safe: a disease
    without a threshold has ``null``; ``threshold_positives`` / ``min_val_positives`` are set by
    ``train_dwarf`` on the model, ``null`` when absent)."""
    from training.metrics import thresholds_to_json

    positives = getattr(model, "threshold_positives", None)
    minimum = getattr(model, "min_val_positives", None)
    return {"kind": "dwarf", "classes": list(model.class_names), "thresholds": thresholds_to_json(model.thresholds),
            "threshold_positives": None if positives is None else [int(n) for n in positives],
            "min_val_positives": None if minimum is None else int(minimum),
            "input": model.input_spec, "outputs": ["probabilities", "maps"]}


def log_dwarf_model(model, name: str = "model", example_size: int | None = None):
    """Log ``model`` as a pyfunc under the active run; returns mlflow's ``ModelInfo``."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    model = model.cpu().eval()
    size = example_size or model.input_spec["size"]
    example = np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(example))
    outputs = {"probabilities": probabilities(out.logits).numpy(), "maps": out.refined_maps.numpy()}
    inferred = infer_signature(example, outputs, params={"return_raw": False, "batch_size": 32})
    # the model resizes internally and returns maps at the input size: any S x S is accepted
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
                               outputs=inferred.outputs, params=inferred.params)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, meta = Path(tmp) / "checkpoint.pt", Path(tmp) / "meta.json"
        torch.save(model.checkpoint(), ckpt)
        meta.write_text(json.dumps(model_meta(model), indent=2, allow_nan=False))
        return mlflow.pyfunc.log_model(name=name, python_model=DwarfPyfunc(),
                                       artifacts={"checkpoint": str(ckpt), "meta": str(meta)},
                                       signature=signature, input_example=example)
