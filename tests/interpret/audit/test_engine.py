"""The audit engine as a library: shortcut estimates (analytic), summary figures, the VLM check, and a
whole audit of a constructed model on the phantom (no MLflow)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interpret.audit import AuditConfig, Probe, flat_metrics, run_audit
from interpret.audit import shortcuts
from interpret.audit.concepts import vlm_validity
from interpret.audit.sections import AttentionPass, related

def test_chest_field_and_shares_are_exact():
    field = shortcuts.chest_field(64)
    assert field[32, 32] and not field[0, 0] and not field[2, 61]
    maps = np.zeros((1, 2, 64, 64))
    maps[0, 0, 30:34, 30:34] = 1.0  # all inside the lung field
    maps[0, 1, 0:4, 60:64] = 1.0  # all in the top-right corner
    markers = np.zeros((1, 64, 64), bool)
    markers[0, 0:4, 60:64] = True
    outside, on_marker = shortcuts.attention_shares(maps, field, markers)
    np.testing.assert_allclose(outside[0], [0.0, 1.0])
    np.testing.assert_allclose(on_marker[0], [0.0, 1.0])


def test_marker_mask_finds_saturated_border_text_only():
    img = np.full((2, 64, 64), 0.4, np.float32)
    img[0, 2:8, 2:6] = 1.0  # a burned-in letter in the corner
    img[1, 30:34, 30:34] = 1.0  # saturated but central: not a marker
    m = shortcuts.marker_mask(img, grow=0)
    assert m[0, 2:8, 2:6].all() and m[0].sum() == 24
    assert not m[1].any()


def _probe(n=6, s=32, c=2):
    labels = np.zeros((n, c), np.float32)
    labels[:3, 0] = 1
    labels[3:, 1] = 1
    return Probe(images=torch.rand(n, 1, s, s), labels=labels, boxes=[np.zeros((0, 4))] * n,
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
    ap = AttentionPass(None, outside, on_marker, markers)
    feats = torch.zeros(n, 3, 4, 4)
    feats[:, 0, 0, 0] = 5.0  # unit 0 fires in the marker corner only
    feats[:, 1, 1:3, 1:3] = 1.0  # unit 1 fires centrally
    units = {"Effusion": [{"unit": 0}], "Nodule": [{"unit": 1}]}
    res = shortcuts.shortcut_section(probe, np.zeros((n, 2)), ap, feats, units, 0.5, 0.2)
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
    m = flat_metrics(summary)
    assert m["auroc_mean"] == pytest.approx(0.8) and m["ap_mean"] == pytest.approx(0.4)
    assert m["iobb_mean"] == pytest.approx(0.5) and m["concept_coverage"] == 0.5
    # pointing lift: per class hit rate minus chance, then the mean (classes without a score left out)
    assert m["pointing_mean"] == pytest.approx(0.5) and m["pointing_lift_mean"] == pytest.approx((0.75 - 0.15) / 2)
    assert "auroc.B" not in m and m["shortcut_class_fraction"] == 0.0
    assert related("pleural effusion", "Effusion") and not related("rib", "Effusion")


class _PlantedTexts:
    """Text side of a VLM whose class prompts are known unit vectors (image side given directly)."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.vectors = vectors

    def encode_texts(self, texts):
        return torch.stack([self.vectors[t] for t in texts])


def test_vlm_validity_separates_a_seeing_vlm_from_a_blind_one():
    from training.prompts import concept_prompts, prompt_name

    rng = np.random.default_rng(0)
    classes = ["Effusion", "Pleural_Thickening", "Hernia"]
    labels = (rng.random((60, 3)) < 0.3).astype(np.float32)
    labels[:, 2] = 0                                             # no positive: left out of the mean
    probe = Probe(images=torch.zeros(60, 1, 8, 8), labels=labels, boxes=[], box_labels=[],
                        image_ids=[str(i) for i in range(60)], reports=[""] * 60, classes=classes)
    basis = torch.eye(4)
    prompts = concept_prompts([prompt_name(c) for c in classes])
    vlm = _PlantedTexts({p: basis[i] for i, p in enumerate(prompts)})
    seeing = torch.nn.functional.normalize(torch.from_numpy(labels) @ basis[:3] + 0.1 * basis[3], dim=-1)
    check = vlm_validity(vlm, seeing, probe)
    assert check["per_class"] == {"Effusion": 1.0, "Pleural_Thickening": 1.0} and check["auroc_mean"] == 1.0
    assert "pleural thickening" in concept_prompts([prompt_name("Pleural_Thickening")])[0]
    blind = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(60, 4))).float(), dim=-1)
    blind_check = vlm_validity(vlm, blind, probe)
    assert abs(blind_check["auroc_mean"] - 0.5) < 0.15
    assert check["supported"] and not blind_check["supported"]
    m = flat_metrics({"concepts": {"vlm_check": check}})
    assert m["concept_vlm_auroc_mean"] == 1.0


def test_run_audit_writes_every_artifact_and_scores_the_served_maps(tmp_path, tiny_phantom):
    """The engine alone (no MLflow): every artifact, the gates, and the explanations it stores are the maps
    and units of the library calls the service uses (ReLU applied: ``finalize_maps``)."""
    import io

    import pandas as pd
    from PIL import Image

    from interpret import attention_maps
    from interpret.audit.gates import Gate
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", classes=list(PHANTOM_CLASSES), image_size=64).eval()
    cfg = AuditConfig(split="all", max_images=24, gallery_n=1, data=str(tiny_phantom))
    out = tmp_path / "audit"
    summary = run_audit(cfg, model, tiny_phantom, out, model_info={"uri": "constructed"}, clip=None,
                        gates=[Gate("auroc", "auroc_mean", min=0.0)])
    for name in ("summary.json", "concepts.parquet", "neuron_importance.parquet", "localization.parquet",
                 "explanations.parquet", "dissection.json", "report.html"):
        assert (out / name).is_file(), name
    assert summary["status"] == "passed" and summary["sections"]["concepts"]["status"] == "skipped"
    assert json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]
    ex = pd.read_parquet(out / "explanations.parquet")
    assert len(ex) > 0 and set(ex["method"]) == {"cam"}
    from interpret.audit.probe import load_probe

    probe = load_probe(tiny_phantom, model.class_names, 64, "all", 24, 0)
    row = ex.iloc[0]
    i = probe.image_ids.index(row["image_id"])
    stored = np.asarray(Image.open(io.BytesIO(row["map_png"])), dtype=np.float32) / 255.0
    served = attention_maps(model, probe.images[i:i + 1], [[int(row["class_index"])]], method="cam")[0, 0].numpy()
    np.testing.assert_allclose(stored, served, atol=0.5 / 255 + 1e-6)
    assert len(row["top_units"]) == cfg.top_units
