"""Fixtures of the service tests: a temporary MLflow store with a tiny registered classifier (alias
``candidate`` only, so the default ``@champion`` falls back) and a real, published audit of it
(verdicts, OOD detector, concepts with evidence), plus ``cxr-classifier-old`` version 1 (the same weights)
whose only audit is in the format written before verdicts, OOD and evidence existed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service.helpers import log_passing_audit, log_real_audit, register_tiny_classifier


@dataclass
class Registry:
    root: Path
    tracking_uri: str
    version: str
    audit_run_id: str
    audit_folder: Path  # the real audit's local audit/ folder (summary.json, ood.npz, concepts.parquet, ...)
    manifest: Path  # its phantom probing set
    old_name: str  # a model whose passing audit has no summary.json / ood.npz / evidence
    old_audit_run_id: str

    @property
    def summary(self) -> dict:
        import json

        return json.loads((self.audit_folder / "summary.json").read_text())


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CXR_ARTIFACT_ROOT")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["CXR_ARTIFACT_ROOT"] = str(root / "artifacts")
    mlflow.set_tracking_uri(uri)
    try:
        version = register_tiny_classifier(root)
        run_id, folder, manifest = log_real_audit(root, "cxr-classifier", version)
        old_version = register_tiny_classifier(root, name="cxr-classifier-old")
        old_run = log_passing_audit("cxr-classifier-old", old_version)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Registry(root, uri, version, run_id, folder, manifest, "cxr-classifier-old", old_run)


@pytest.fixture(scope="session")
def core(registry, tmp_path_factory):
    """A loaded in-process :class:`ExplanationService` on the default URI (falls back to @candidate)."""
    import mlflow

    from mlflow_projects.serving import ExplanationService, ServeConfig

    cfg = ServeConfig(tracking_uri=registry.tracking_uri, cache_size=8, threads=1,
                      feedback_dir=str(tmp_path_factory.mktemp("feedback")),
                      cache_dir=str(tmp_path_factory.mktemp("serve-cache")))
    svc = ExplanationService(cfg)
    svc.load()
    yield svc
    mlflow.set_tracking_uri(registry.tracking_uri)


@pytest.fixture(scope="session")
def old_core(registry, tmp_path_factory):
    """A loaded in-process service of ``cxr-classifier-old``, whose audit predates verdicts and OOD."""
    import mlflow

    from mlflow_projects.serving import ExplanationService, ServeConfig

    cfg = ServeConfig(model_uri=f"models:/{registry.old_name}@candidate", tracking_uri=registry.tracking_uri,
                      cache_size=8, threads=1, feedback_dir=str(tmp_path_factory.mktemp("feedback-old")),
                      cache_dir=str(tmp_path_factory.mktemp("serve-cache-old")))
    svc = ExplanationService(cfg)
    svc.load()
    yield svc
    mlflow.set_tracking_uri(registry.tracking_uri)
