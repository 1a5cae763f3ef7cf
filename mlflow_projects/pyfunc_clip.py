"""MLflow pyfunc wrapper of a CLIP bundle, and the loader that turns a registered one back into a bundle.

Model directory: ``artifacts/clip/`` (an open_clip ``local-dir:`` folder written by
:func:`training.clip.save_clip`: ``open_clip_config.json`` + ``open_clip_model.safetensors``) and
``artifacts/meta.json`` ``{kind: "clip", open_clip_config, classes, embed_dim, input: {size, channels,
range, mean, std}, prompt_template, outputs}``.

``predict``:
* images: float32 array (B, 1 or 3, H, W) in [0, 1] -> (B, d) L2-normalised image embeddings;
* texts: a list of strings, a pandas Series, or a DataFrame with a ``text`` column -> (M, d)
  L2-normalised text embeddings.

:func:`load_registered_clip` (``models:/cxr-clip@candidate`` -> :class:`training.clip.ClipBundle`) is what
other entry points (``train_dwarf``, ``audit``) use; the library itself never imports mlflow.
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

log = logging.getLogger(__name__)

META_FILE = "meta.json"


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    """Image or text embeddings of a CLIP saved as an open_clip ``local-dir:`` folder."""

    def load_context(self, context) -> None:
        from interpret.vlm import VLMAdapter
        from training.clip import load_clip

        self.bundle = load_clip(f"local-dir:{context.artifacts['clip']}")
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.vlm = VLMAdapter(self.bundle, batch_size=64, progress=False)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """See the module docstring: image arrays, or texts (a list, Series or DataFrame with ``text``).

        The ``np.ndarray`` hint is the one MLflow takes without inferring a schema or warning (texts pass
        through unchanged); the input is validated here."""
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"a DataFrame input needs a 'text' column, got {list(model_input.columns)}")
            model_input = model_input["text"]
        if isinstance(model_input, pd.Series):
            model_input = model_input.tolist()
        if isinstance(model_input, (list, tuple)) and all(isinstance(t, str) for t in model_input):
            return self.vlm.encode_texts(list(model_input)).numpy()
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 3:
            x = x[:, None]
        return self.vlm.encode_images(x).numpy()


def clip_meta(bundle, classes: list[str], model_name: str, prompt_template: str) -> dict[str, Any]:
    """The ``meta.json`` / version-tag metadata of a trained CLIP bundle."""
    pp = bundle.preprocess
    return {"kind": "clip", "open_clip_config": model_name, "classes": list(classes),
            "embed_dim": int(bundle.embed_dim), "prompt_template": prompt_template,
            "input": {"size": int(bundle.image_size), "channels": 1, "range": [0.0, 1.0],
                      "mean": [float(m) for m in pp.mean], "std": [float(s) for s in pp.std]},
            "outputs": ["image_embeddings (B, d) for image arrays", "text_embeddings (M, d) for lists of strings"]}


def log_clip_model(bundle, meta: dict[str, Any], name: str = "model"):
    """Log ``bundle`` as a pyfunc under the active run; returns mlflow's ``ModelInfo``."""
    from training.clip import save_clip

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_clip(bundle, Path(tmp) / "clip")
        meta_path = Path(tmp) / META_FILE
        meta_path.write_text(json.dumps(meta, indent=2))
        # no signature: the model takes either image arrays or lists of strings
        return mlflow.pyfunc.log_model(name=name, python_model=ClipPyfunc(),
                                       artifacts={"clip": str(folder), "meta": str(meta_path)})


def load_registered_clip(model_uri: str, device: str = "cpu"):
    """Download a registered CLIP pyfunc's artifacts and load them with :func:`training.clip.load_clip`.

    Args:
        model_uri: e.g. ``models:/cxr-clip@candidate``, ``models:/cxr-clip/3`` or ``runs:/<id>/model``.
        device: where the model goes.

    Returns:
        :class:`training.clip.ClipBundle` whose ``spec`` is ``model_uri``.

    Raises:
        mlflow.exceptions.MlflowException: unknown model, version or alias.
        FileNotFoundError: the model holds no open_clip ``local-dir:`` folder (not a CLIP pyfunc).
    """
    from training.clip import load_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        configs = sorted(root.rglob("open_clip_config.json"))
        if not configs:
            raise FileNotFoundError(f"{model_uri} holds no open_clip_config.json: not a CLIP pyfunc of "
                                    "mlflow_projects.pyfunc_clip")
        bundle = load_clip(f"local-dir:{configs[0].parent}", device=device)  # weights are read into memory
    bundle.spec = model_uri
    return bundle
