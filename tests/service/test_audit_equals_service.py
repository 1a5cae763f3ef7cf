"""The audit audits what is served: for every case of the audit's gallery, the map the audit stored
(``audit/explanations.parquet``) equals the map ``/explain`` serves for the same image file (up to 8-bit
PNG quantisation), the top units and their contributions are the same, and so are the concepts and the
evidence each unit's concepts rest on (the audit's ``served_unit_concepts``, the service's too); the
target's verdict is the audit's.

The audit computes with the torch model (``interpret.attention_maps``); the service's ``cam`` runs the
ONNX export through ONNX Runtime and ``interpret.attention.cam_from_features``. Both finish the maps with
``interpret.attention.finalize_maps``, so the only differences left are float rounding between the two
runtimes and the PNG's 8-bit quantisation.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.service import helpers


@pytest.mark.slow
@pytest.mark.parametrize("model_size", [64, 32], ids=["same-size", "resized"])
def test_audit_stores_the_maps_and_units_that_explain_serves(tmp_path, monkeypatch, model_size):
    """64 px phantom images; a 64 px model (no resizing) and a 32 px one (the audit's data loader and the
    service's preprocessing both resize: they must give the same pixels)."""
    import mlflow

    from interpret.audit import AuditConfig
    from mlflow_projects import audit
    from mlflow_projects.serving import ExplanationService, ServeConfig
    from mlflow_projects.serving.explain import explanation_maps
    from training.data.phantom import generate_phantom
    from training.data.schema import read_manifest

    monkeypatch.setattr(helpers, "SIZE", model_size)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    mlflow.set_tracking_uri(uri)
    version = helpers.register_tiny_classifier(tmp_path)
    manifest = generate_phantom(tmp_path / "phantom", n=40, size=64, seed=1)
    gates = tmp_path / "gates.yaml"
    gates.write_text("gates:\n- {name: auroc, metric: auroc_mean, min: 0.0}\n")
    cfg = AuditConfig(model_uri=f"models:/cxr-classifier/{version}", data=str(manifest), clip="scratch",
                      gates=str(gates), split="all", max_images=40, gallery_n=2, out=str(tmp_path / "audit"))
    folder = audit.compute_audit(cfg)
    run_id = audit.publish_audit(folder)  # the service serves the version's latest passing audit
    stored = pd.read_parquet(folder / "audit" / "explanations.parquet")
    summary = json.loads((folder / "audit" / "summary.json").read_text())
    verdicts = {v["class"]: v for v in summary["verdicts"]}
    assert len(stored) >= 4 and set(stored["method"]) == {"cam"}

    svc = ExplanationService(ServeConfig(model_uri=f"models:/cxr-classifier/{version}", tracking_uri=uri,
                                         cache_size=0, threads=1, cache_dir=str(tmp_path / "serve-cache"),
                                         feedback_dir=str(tmp_path / "feedback")))
    svc.load()
    assert svc.model.audit_run_id == run_id
    paths = dict(zip(read_manifest(manifest)["image_id"], read_manifest(manifest)["path"]))
    for row in stored.itertuples():
        data = open(paths[row.image_id], "rb").read()
        served = svc.explain(data, method="cam", targets=row._2, top_neurons=len(row.top_units))
        item = served["heatmaps"][0]
        assert item["target"] == row._2
        # the raw map: served as an 8-bit PNG over map_range, stored exactly by the audit
        lo, hi = item["map_range"]
        served_raw = lo + np.asarray(Image.open(io.BytesIO(base64.b64decode(item["map_png"]))), dtype=np.float64) / 255.0 * (hi - lo)
        audit_raw = np.asarray(row.raw, dtype=np.float64).reshape(row.raw_shape)
        np.testing.assert_allclose(served_raw, audit_raw, atol=(hi - lo) / 255.0 * 0.5 + 1e-5)
        # the normalised map the overlay shows (computed by the service's core), against the audit's PNG
        x = svc._decode(data)[1][None]
        maps, _ = explanation_maps(svc._model(), x, [int(row.class_index)], "cam")
        audit_map = np.asarray(Image.open(io.BytesIO(row.map_png)), dtype=np.float32) / 255.0
        np.testing.assert_allclose(maps[0], audit_map, atol=0.5 / 255.0 + 2e-4)
        # the top units and their contributions a_k W_ck
        assert [u["unit"] for u in item["top_units"]] == list(row.top_units)
        np.testing.assert_allclose([u["contribution"] for u in item["top_units"]], list(row.contributions),
                                   rtol=1e-4, atol=1e-5)
        # the concepts and the evidence they rest on: what the audit stored is what is served
        assert [u["concepts"] for u in item["top_units"]] == [list(c) for c in row.concepts]
        assert [u["evidence"] for u in item["top_units"]] == [_int_or_none(e) for e in row.evidence]
        assert item["verdict"]["status"] == verdicts[row._2]["verdict"]
        assert item["verdict"]["reasons"] == verdicts[row._2]["reasons"] and item["verdict"]["audit_run_id"] == run_id


def _int_or_none(value):
    """explanations.parquet's evidence: an int, or None / NaN for a unit served without concepts."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)
