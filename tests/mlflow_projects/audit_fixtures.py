"""Helpers shared by the audit / promote / compare tests: a real MLflow store in a temporary folder and a
tiny registered classifier in the layout of ``train_classifier`` (``artifacts/checkpoint.pt``,
``artifacts/meta.json``)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import yaml


class _Probabilities(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from training.models import load_checkpoint

        self.model = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: np.ndarray, params=None):
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).sigmoid().numpy()


@contextmanager
def tracking(tmp: Path, uri: str | None = None):
    """Point MLflow (and the environment, for code that reads it) at a SQLite store under ``tmp``."""
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CXR_ARTIFACT_ROOT")}
    os.environ["MLFLOW_TRACKING_URI"] = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["CXR_ARTIFACT_ROOT"] = str(tmp / "artifacts")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    try:
        yield os.environ["MLFLOW_TRACKING_URI"]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if old["MLFLOW_TRACKING_URI"]:
            mlflow.set_tracking_uri(old["MLFLOW_TRACKING_URI"])


def register_tiny_classifier(tmp: Path, seed: int = 0, name: str = "cxr-classifier") -> str:
    """Log and register an (untrained) ``test_resnet`` over the phantom classes; returns its version."""
    import torch

    from mlflow_projects.common import register_version, setup_tracking
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    model = create_model("test_resnet", classes=list(PHANTOM_CLASSES), image_size=64)
    folder = tmp / f"model-{seed}"
    ckpt = save_checkpoint(model, folder / "checkpoint.pt")
    meta = {"arch": model.arch, "classes": model.class_names, "thresholds": model.thresholds,
            "input": model.input_spec, "feature_layer": model.feature_layer, "head": "gap_linear"}
    (folder / "meta.json").write_text(json.dumps(meta))
    setup_tracking("cxr-classifier")
    with mlflow.start_run(run_name="tiny"):
        info = mlflow.pyfunc.log_model(name="model", python_model=_Probabilities(),
                                       artifacts={"checkpoint": str(ckpt), "meta": str(folder / "meta.json")})
    mv = register_version(info.model_uri, name, {"classes": model.class_names, "input": model.input_spec})
    return str(mv.version)


def write_gates(path: Path, **bounds) -> Path:
    """A gates file with one ``min`` gate per ``metric=value`` keyword."""
    path.write_text(yaml.safe_dump({"gates": [{"name": k, "metric": k, "min": v} for k, v in bounds.items()]}))
    return path
