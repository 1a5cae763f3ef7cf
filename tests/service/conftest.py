"""Fixtures of the service tests: a temporary MLflow store with a tiny registered classifier (alias
``candidate`` only, so the default ``@champion`` falls back) and a passing audit with concepts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service.helpers import log_passing_audit, register_tiny_classifier


@dataclass
class Registry:
    root: Path
    tracking_uri: str
    version: str
    audit_run_id: str


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
        run_id = log_passing_audit("cxr-classifier", version)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Registry(root, uri, version, run_id)


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
