"""build_bento: the registered model lands in a temporary BentoML store with its MLflow labels, a Bento is
built offline, and the service core serves the store copy with the registry's identity."""
from __future__ import annotations

import os

import pytest

from tests.service.helpers import png_bytes

pytestmark = pytest.mark.slow


def test_import_build_and_serve_from_store(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.bentoml_home.set(str(tmp_path / "bentoml"))
    from mlflow_projects.build_bento import build_bento, import_model
    from mlflow_projects.serving import ExplanationService, ServeConfig

    model = import_model("models:/cxr-classifier@champion")  # falls back to @candidate
    labels = bentoml.models.get(model.tag).info.labels
    assert labels["mlflow.name"] == "cxr-classifier" and labels["mlflow.version"] == registry.version
    assert labels["mlflow.alias"] == "candidate" and labels["audit.run_id"] == registry.audit_run_id
    assert str(model.path).startswith(str(tmp_path)) and (tmp_path / 'bentoml' / 'models').is_dir()

    bento = build_bento(str(model.tag))
    assert str(model.tag) in {str(m.tag) for m in bento.info.models}
    envs = [e if isinstance(e, dict) else {"name": e.name, "value": e.value} for e in bento.info.envs]
    assert {"name": "CXR_BENTO_MODEL", "value": str(model.tag)} in envs

    cfg = ServeConfig(local_model_dir=model.path, threads=1, feedback_dir=str(tmp_path / "fb"),
                      cache_dir=str(tmp_path / "cache"),
                      local_identity={"name": labels["mlflow.name"], "version": labels["mlflow.version"],
                                      "alias": labels["mlflow.alias"], "audit_run_id": labels["audit.run_id"]})
    svc = ExplanationService(cfg)
    svc.load()
    r = svc.predict(png_bytes())
    assert r["model"] == {"name": "cxr-classifier", "version": registry.version, "alias": "candidate",
                          "uri": f"models:/cxr-classifier/{registry.version}"}
    assert svc.concepts()["n_units"] == 32
