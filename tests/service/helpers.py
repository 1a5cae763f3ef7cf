"""Test helpers for the service: a tiny registered classifier in the contract layout
(docs/ARCHITECTURE.md "Registered classifier": ``artifacts/checkpoint.pt``, ``artifacts/model.onnx``,
``artifacts/meta.json``), a real audit of it (:func:`log_real_audit`: ``interpret.audit.run_audit`` on a
phantom probing set, published as the audit entry point does: ``summary.json`` verdicts, ``ood.npz``,
``concepts.parquet`` with evidence) and an audit in the format written before verdicts, the OOD detector
and concept evidence existed (:func:`log_passing_audit`: a concept table only), in a temporary MLflow store.

The tiny classifier's ``Nodule`` has no threshold (it rests on 1 validation positive, fewer than 5): the
service must make no call for it. Uploads default to 72x64 px, above the service's minimum side (64 px,
``CXR_MIN_IMAGE_SIDE``)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule"]
SIZE = 32
THRESHOLDS = [0.5, 0.5, 0.4, float("nan")]  # Nodule: no threshold
THRESHOLD_POSITIVES = [12, 9, 10, 1]  # validation positives behind each threshold
MIN_VAL_POSITIVES = 5
NO_THRESHOLD_REASON = "no reliable threshold: 1 validation positive (< 5)"  # what /predict says for Nodule


class TinyProbabilities(mlflow.pyfunc.PythonModel):
    """Probabilities of the checkpoint (what train_classifier's pyfunc returns)."""

    def load_context(self, context):
        from training.models import load_checkpoint

        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input, params=None):
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).sigmoid().numpy()


def register_tiny_classifier(tmp: Path, seed: int = 0, name: str = "cxr-classifier",
                             alias: str = "candidate") -> str:
    """Build, export and register a ``test_resnet``; returns the version (string)."""
    import torch

    from mlflow_projects.common import register_version, setup_tracking
    from training.export import export_onnx
    from training.metrics import thresholds_to_json
    from training.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    model = create_model("test_resnet", classes=CLASSES, image_size=SIZE).eval()
    with torch.no_grad():  # spread the biases so that some findings are positive, some not
        model.head.bias.copy_(torch.tensor([2.0, -2.0, 0.5, -3.0]))
    model.thresholds = list(THRESHOLDS)
    model.threshold_positives, model.min_val_positives = list(THRESHOLD_POSITIVES), MIN_VAL_POSITIVES
    folder = tmp / f"model-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(model, folder / "checkpoint.pt")
    onnx = export_onnx(model, folder / "model.onnx", image_size=SIZE)
    meta = {"arch": model.arch, "classes": model.class_names, "thresholds": thresholds_to_json(model.thresholds),
            "threshold_positives": model.threshold_positives, "min_val_positives": model.min_val_positives,
            "input": model.input_spec, "feature_layer": model.feature_layer, "head": "gap_linear"}
    (folder / "meta.json").write_text(json.dumps(meta, allow_nan=False))
    setup_tracking("cxr-classifier")
    with mlflow.start_run(run_name=f"tiny-{seed}"):
        info = mlflow.pyfunc.log_model(name="model", python_model=TinyProbabilities(),
                                       artifacts={"checkpoint": str(ckpt), "model_onnx": str(onnx),
                                                  "meta": str(folder / "meta.json")})
    mv = register_version(info.model_uri, name, {"classes": CLASSES, "thresholds": model.thresholds,  # NaN -> null
                                                 "threshold_positives": model.threshold_positives,
                                                 "input": model.input_spec}, alias=alias)
    return str(mv.version)


def log_real_audit(tmp: Path, name: str, version: str, n_images: int = 40) -> tuple[str, Path, Path]:
    """Audit ``name``/``version`` on a 64 px phantom probing set (scratch CLIP, a gate every model passes)
    and publish it as the audit entry point does (run tags, ``audit/`` artifacts, version tags
    ``audit.run_id``, ``audit.status``, ``audit.unfit_classes``).

    Returns:
        ``(run id, the audit's local ``audit/`` folder, the phantom manifest)``.
    """
    from interpret.audit import AuditConfig
    from mlflow_projects import audit
    from training.data.phantom import generate_phantom

    manifest = generate_phantom(tmp / "phantom", n=n_images, size=64, seed=1)
    gates = tmp / "gates.yaml"
    gates.write_text("gates:\n- {name: auroc, metric: auroc_mean, min: 0.0}\n")
    cfg = AuditConfig(model_uri=f"models:/{name}/{version}", data=str(manifest), clip="scratch", gates=str(gates),
                      split="all", max_images=n_images, gallery_n=2, out=str(tmp / "audit"))
    folder = audit.compute_audit(cfg)
    run_id = audit.publish_audit(folder)
    return run_id, Path(folder) / "audit", Path(manifest)


def log_passing_audit(name: str, version: str, layer: str = "features.layer4", units: int = 32) -> str:
    """A passing audit run in the format written before verdicts, the OOD detector and concept evidence
    existed: tags + ``audit/concepts.parquet`` (no ``evidence`` column), no ``summary.json``, no
    ``ood.npz``; returns its id."""
    import pandas as pd
    from mlflow import MlflowClient

    from mlflow_projects.common import setup_tracking

    table = pd.DataFrame({"layer": [layer] * units, "unit": list(range(units)), "method": ["mammi"] * units,
                          "concepts": [[f"concept{u}", "opacity"] for u in range(units)],
                          "scores": [[0.9, 0.5] for _ in range(units)]})
    setup_tracking("cxr-audit")
    with mlflow.start_run(run_name="audit") as run:
        mlflow.set_tags({"audit.status": "passed", "model.name": name, "model.version": version})
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            table.to_parquet(Path(d) / "concepts.parquet", index=False)
            mlflow.log_artifact(str(Path(d) / "concepts.parquet"), "audit")
    client = MlflowClient()
    client.set_model_version_tag(name, version, "audit.run_id", run.info.run_id)
    client.set_model_version_tag(name, version, "audit.status", "passed")
    return run.info.run_id


def png_bytes(width: int = 72, height: int = 64, seed: int = 0, bits: int = 8) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    if bits == 16:
        arr = rng.integers(0, 65535, (height, width), dtype=np.uint16)
    else:
        arr = rng.integers(0, 255, (height, width), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 64, height: int = 64, seed: int = 1) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (height, width), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def mask_png_bytes(width: int = 16, height: int = 16) -> bytes:
    from PIL import Image

    arr = np.zeros((height, width), np.uint8)
    arr[4:9, 5:12] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session: SIGTERM to its group, SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def bentoml_serve(args: list[str], cwd: Path, env: dict, log_path: Path, timeout: float = 240,
                  procs: list | None = None) -> Iterator[str]:
    """``bentoml serve *args`` on a free loopback port; yields the base URL once ``/readyz`` answers 200
    (``procs``, when given, receives the server's process: the leader of its own process group).

    Fails the test with the server log's tail when the server exits or is not ready within ``timeout`` s;
    the server is stopped on exit.
    """
    import httpx
    import pytest

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bentoml = Path(sys.executable).with_name("bentoml")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(bentoml), "serve", *args, "--port", str(port)], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    if procs is not None:
        procs.append(proc)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"service not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        stop(proc)
