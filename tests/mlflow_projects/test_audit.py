"""Audit entry point: shortcut estimates (analytic), summary figures, a full audit of a tiny registered
model in a temporary MLflow store (every artifact and tag), and resume after a tracking outage."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from mlflow_projects import audit
from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking, write_gates

ARTIFACTS = ["summary.json", "concepts.parquet", "neuron_importance.parquet", "localization.parquet",
             "dissection.json", "report.html"]


def test_chest_field_and_shares_are_exact():
    field = audit.chest_field(64)
    assert field[32, 32] and not field[0, 0] and not field[2, 61]
    maps = np.zeros((1, 2, 64, 64))
    maps[0, 0, 30:34, 30:34] = 1.0  # all inside the lung field
    maps[0, 1, 0:4, 60:64] = 1.0  # all in the top-right corner
    markers = np.zeros((1, 64, 64), bool)
    markers[0, 0:4, 60:64] = True
    outside, on_marker = audit.attention_shares(maps, field, markers)
    np.testing.assert_allclose(outside[0], [0.0, 1.0])
    np.testing.assert_allclose(on_marker[0], [0.0, 1.0])


def test_marker_mask_finds_saturated_border_text_only():
    img = np.full((2, 64, 64), 0.4, np.float32)
    img[0, 2:8, 2:6] = 1.0  # a burned-in letter in the corner
    img[1, 30:34, 30:34] = 1.0  # saturated but central: not a marker
    m = audit.marker_mask(img, grow=0)
    assert m[0, 2:8, 2:6].all() and m[0].sum() == 24
    assert not m[1].any()


def _probe(n=6, s=32, c=2):
    labels = np.zeros((n, c), np.float32)
    labels[:3, 0] = 1
    labels[3:, 1] = 1
    return audit.Probe(images=torch.rand(n, 1, s, s), labels=labels, boxes=[np.zeros((0, 4))] * n,
                       box_labels=[np.zeros(0, int)] * n, image_ids=[str(i) for i in range(n)],
                       reports=[""] * n, classes=["Effusion", "Nodule"])


def test_shortcut_section_flags_class_attending_markers():
    probe = _probe()
    n, s = probe.n, probe.size
    markers = np.zeros((n, s, s), bool)
    markers[:, 0:4, 0:4] = True
    outside = np.zeros((n, 2))
    on_marker = np.zeros((n, 2))
    outside[:, 0], on_marker[:, 0] = 0.9, 0.8  # Effusion looks at the marker
    outside[:, 1], on_marker[:, 1] = 0.1, 0.0
    ap = audit.AttentionPass(None, outside, on_marker, markers)
    feats = torch.zeros(n, 3, 4, 4)
    feats[:, 0, 0, 0] = 5.0  # unit 0 fires in the marker corner only
    feats[:, 1, 1:3, 1:3] = 1.0  # unit 1 fires centrally
    units = {"Effusion": [{"unit": 0}], "Nodule": [{"unit": 1}]}
    res = audit.shortcut_section(probe, np.zeros((n, 2)), ap, feats, units, 0.5, 0.2)
    flagged = {(w["kind"], w["target"].split()[0]) for w in res["warnings"]}
    assert ("class", "Effusion") in flagged and ("class", "Nodule") not in flagged
    assert ("unit", "0") in flagged and ("unit", "1") not in flagged
    assert res["class_fraction"] == pytest.approx(0.5)


def test_flat_metrics_and_related_terms():
    summary = {"performance": [{"class": "A", "auroc": 0.8, "ap": 0.5, "f1": None, "mcc": 0.1},
                               {"class": "B", "auroc": None, "ap": 0.3, "f1": 0.2, "mcc": 0.3}],
               "localization": {"per_class": [
                   {"class": "A", "iobb": 0.4, "ior": 0.2, "pointing": 1.0, "pointing_chance": 0.25},
                   {"class": "B", "iobb": 0.6, "ior": 0.1, "pointing": 0.0, "pointing_chance": 0.15},
                   {"class": "C", "iobb": None, "ior": None, "pointing": None, "pointing_chance": 0.1}]},
               "importance": {"concept_coverage": 0.5}, "shortcuts": {"per_class": [], "warnings": [],
                                                                      "class_fraction": 0.0}}
    m = audit.flat_metrics(summary)
    assert m["auroc_mean"] == pytest.approx(0.8) and m["ap_mean"] == pytest.approx(0.4)
    assert m["iobb_mean"] == pytest.approx(0.5) and m["concept_coverage"] == 0.5
    # pointing lift: per class hit rate minus chance, then the mean (classes without a score left out)
    assert m["pointing_mean"] == pytest.approx(0.5) and m["pointing_lift_mean"] == pytest.approx((0.75 - 0.15) / 2)
    assert "auroc.B" not in m and m["shortcut_class_fraction"] == 0.0
    assert audit.related("pleural effusion", "Effusion") and not audit.related("rib", "Effusion")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_audit_logs_every_artifact_and_tag_then_resume_after_outage(tmp_path, tiny_phantom, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.0)
    with tracking(tmp_path) as uri:
        version = register_tiny_classifier(tmp_path)
        argv = ["--model-uri", "models:/cxr-classifier@candidate", "--data", str(tiny_phantom), "--split", "all",
                "--clip", "scratch", "--gates", str(gates), "--max-images", "24", "--gallery-n", "1"]
        assert audit.main(argv + ["--out", str(tmp_path / "a1")]) == 0
        client = MlflowClient()
        mv = client.get_model_version("cxr-classifier", version)
        run_id = mv.tags["audit.run_id"]
        assert mv.tags["audit.status"] == "passed" and "Audit passed" in mv.tags["audit.summary"]
        run = client.get_run(run_id)
        assert run.data.tags["model.name"] == "cxr-classifier" and run.data.tags["model.version"] == version
        assert "auroc_mean" in run.data.metrics
        logged = {f.path for f in client.list_artifacts(run_id, "audit")}
        assert {f"audit/{a}" for a in ARTIFACTS} <= logged and "audit/heatmaps" in logged
        assert client.list_artifacts(run_id, "audit/heatmaps")
        summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/audit/summary.json")
        assert set(summary["sections"]) == {"performance", "localization", "dissection", "concepts", "importance",
                                            "shortcuts"}
        assert summary["model"]["version"] == version and summary["data"]["n_images"] == 24
        # pointing game within Zhang et al.'s tolerance scaled to the probe, reported with its chance level
        loc = summary["localization"]
        assert loc["pointing_tolerance_px"] == pytest.approx(15 * summary["data"]["image_size"] / 224)
        assert all(0 < r["pointing_chance"] <= 1 for r in loc["per_class"])
        assert "pointing_chance_mean" in summary["metrics"]
        html = (tmp_path / "a1" / "audit" / "report.html").read_text()
        assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
        # an untrained VLM is checked on the probing set, and the report says whether it sees the findings
        assert summary["concepts"]["vlm_check"]["n_classes"] > 0 and "VLM check" in html

        # outage: everything is computed, logging fails, the folder stays; resume logs the same results
        folder = audit.compute_audit(audit.parse_args(argv + ["--out", str(tmp_path / "a2")])[0])
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
        assert audit.main(["--resume", str(folder)]) == audit.EX_TEMPFAIL
        state = json.loads((folder / audit.STATE_FILE).read_text())
        assert not state["logged"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert audit.main(["--resume", str(folder)]) == 0
        mv = MlflowClient().get_model_version("cxr-classifier", version)
        new_run = mv.tags["audit.run_id"]
        assert new_run != run_id
        logged = mlflow.artifacts.load_dict(f"runs:/{new_run}/audit/summary.json")
        assert logged == json.loads((folder / "audit" / "summary.json").read_text())
        assert logged["metrics"] == summary["metrics"]  # same model, same data: same figures
        assert audit.main(["--resume", str(folder)]) == 0  # idempotent


class _PlantedTexts:
    """Text side of a VLM whose class prompts are known unit vectors (image side given directly)."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.vectors = vectors

    def encode_texts(self, texts):
        return torch.stack([self.vectors[t] for t in texts])


def test_vlm_validity_separates_a_seeing_vlm_from_a_blind_one():
    from interpret.concepts import concept_prompts
    from training.clip.train import prompt_name

    rng = np.random.default_rng(0)
    classes = ["Effusion", "Pleural_Thickening", "Hernia"]
    labels = (rng.random((60, 3)) < 0.3).astype(np.float32)
    labels[:, 2] = 0                                             # no positive: left out of the mean
    probe = audit.Probe(images=torch.zeros(60, 1, 8, 8), labels=labels, boxes=[], box_labels=[],
                        image_ids=[str(i) for i in range(60)], reports=[""] * 60, classes=classes)
    basis = torch.eye(4)
    prompts = concept_prompts([prompt_name(c) for c in classes])
    vlm = _PlantedTexts({p: basis[i] for i, p in enumerate(prompts)})
    seeing = torch.nn.functional.normalize(torch.from_numpy(labels) @ basis[:3] + 0.1 * basis[3], dim=-1)
    check = audit.vlm_validity(vlm, seeing, probe)
    assert check["per_class"] == {"Effusion": 1.0, "Pleural_Thickening": 1.0} and check["auroc_mean"] == 1.0
    assert "pleural thickening" in concept_prompts([prompt_name("Pleural_Thickening")])[0]
    blind = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(60, 4))).float(), dim=-1)
    blind_check = audit.vlm_validity(vlm, blind, probe)
    assert abs(blind_check["auroc_mean"] - 0.5) < 0.15
    assert check["supported"] and not blind_check["supported"]
    m = audit.flat_metrics({"concepts": {"vlm_check": check}})
    assert m["concept_vlm_auroc_mean"] == 1.0
