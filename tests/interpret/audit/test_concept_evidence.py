"""What a concept annotation may claim in the audit: evidence floors, the VLM's per-class blindness (bootstrap
CIs), flagged annotations, the final-layer comparison of ``mammi`` and ``mammi_floor``, and dissection's
resolution guard. Known answers, constructed by hand; no network, no spaCy, no sentence encoder."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from interpret.annotation import served_unit_concepts
from interpret.audit import Probe
from interpret.audit.concepts import flag_blind_units, final_layer_comparison, vlm_validity
from interpret.audit.sections import dissection_section


def _boxed_probe(n=4, s=32):
    labels = np.zeros((n, 2), np.float32)
    labels[:, 0] = 1
    boxes = [np.array([[4.0, 4.0, 20.0, 20.0]]) for _ in range(n)]
    return Probe(images=torch.rand(n, 1, s, s), labels=labels, boxes=boxes,
                 box_labels=[np.array([0]) for _ in range(n)], image_ids=[str(i) for i in range(n)],
                 reports=[""] * n, classes=["Nodule", "Mass"])


def test_dissection_not_applicable_on_4x4_maps():
    probe = _boxed_probe()
    feats = torch.rand(probe.n, 3, 4, 4)
    dis = dissection_section(feats, probe, 0.04)
    assert dis["per_class"] == [] and dis["feature_map"] == [4, 4] and dis["min_cells_side"] == 7
    assert dis["reason"].startswith("not applicable at this resolution: feature maps are 4x4 (< 7x7): ")
    assert "connected components" in dis["reason"]
    # a lower floor, or maps of 7x7, run the dissection
    assert dissection_section(feats, probe, 0.04, min_cells_side=4)["per_class"]
    ran = dissection_section(torch.rand(probe.n, 3, 7, 7), probe, 0.04)
    assert ran["per_class"] and "reason" not in ran
    assert "not applicable" in dissection_section(torch.rand(probe.n, 3, 7, 4), probe, 0.04)["reason"]
    with pytest.raises(ValueError, match="min_cells_side"):
        dissection_section(feats, probe, 0.04, min_cells_side=0)


class _PlantedTexts:
    def __init__(self, vectors):
        self.vectors = vectors

    def encode_texts(self, texts):
        return torch.stack([self.vectors[t] for t in texts])


def _vlm_problem(n=80, seed=0):
    """Effusion is seen (image embeddings carry the label), Cardiomegaly is not (noise), Hernia has no
    positives (cannot be checked)."""
    from training.prompts import concept_prompts, prompt_name

    rng = np.random.default_rng(seed)
    classes = ["Effusion", "Cardiomegaly", "Hernia"]
    labels = (rng.random((n, 3)) < 0.4).astype(np.float32)
    labels[:, 2] = 0
    probe = Probe(images=torch.zeros(n, 1, 8, 8), labels=labels, boxes=[], box_labels=[],
                  image_ids=[str(i) for i in range(n)], reports=[""] * n, classes=classes)
    basis = torch.eye(5)
    vlm = _PlantedTexts({p: basis[i] for i, p in enumerate(concept_prompts([prompt_name(c) for c in classes]))})
    noise = torch.from_numpy(rng.normal(size=(n, 5))).float()
    emb = F.normalize(torch.from_numpy(labels[:, :1]) @ basis[:1] * 3 + 0.3 * noise, dim=-1)
    return vlm, emb, probe


def test_vlm_validity_marks_classes_whose_ci_touches_chance_blind():
    vlm, emb, probe = _vlm_problem()
    check = vlm_validity(vlm, emb, probe, n_resamples=500)
    assert set(check["per_class"]) == {"Effusion", "Cardiomegaly"}
    eff, card = check["per_class_ci"]["Effusion"], check["per_class_ci"]["Cardiomegaly"]
    assert eff["low"] > 0.5 and eff["low"] <= eff["estimate"] <= eff["high"]
    assert card["low"] <= 0.5  # touches or lies below chance: blind
    assert eff["estimate"] == pytest.approx(check["per_class"]["Effusion"])
    assert check["blind_classes"] == ["Cardiomegaly"] and check["unchecked_classes"] == ["Hernia"]
    assert "0.5" in check["blind_rule"]
    # same seed, same interval
    assert vlm_validity(vlm, emb, probe, n_resamples=500)["per_class_ci"] == check["per_class_ci"]


def test_blind_class_concepts_are_flagged_and_not_served():
    table = pd.DataFrame({
        "layer": ["f"] * 5 + ["final"],
        "unit": [0, 1, 2, 3, 4, 1],
        "method": ["mammi"] * 6,
        "concepts": [["enlarged cardiac silhouette"], ["rib"], ["pleural effusion"], ["rib"], [], ["heart"]],
        "scores": [[0.4], [0.3], [0.2], [0.3], [], [0.5]],
        "evidence": [40, 40, 40, 40, 40, 40]})
    # rule (a): a concept related to the blind class (Cardiomegaly: heart, cardiac, silhouette, ...)
    flagged = flag_blind_units(table, ["Cardiomegaly"])
    assert flagged["vlm_blind"].tolist() == [True, False, False, False, False, True]
    assert flagged["blind_classes"][0] == ["Cardiomegaly"] and flagged["blind_classes"][1] == []
    assert "vlm_blind" not in table  # the input is not modified
    # rule (b): units among a blind class's top units by importance, on that layer only
    both = flag_blind_units(flagged, ["Cardiomegaly"], {"Cardiomegaly": [3, 1], "Effusion": [2]}, layer="f")
    assert both["vlm_blind"].tolist() == [True, True, False, True, False, True]
    assert served_unit_concepts(both, "f") == {
        2: {"concepts": ["pleural effusion"], "scores": [0.2], "evidence": 40, "method": "mammi"},
        4: {"concepts": [], "scores": [], "evidence": 40, "method": "mammi"}}
    # no blind class: nothing flagged; an unseen class's top units are not flagged either
    assert not flag_blind_units(table, [], {"Cardiomegaly": [0]}, layer="f")["vlm_blind"].any()
    with pytest.raises(ValueError, match="layer"):
        flag_blind_units(table, ["Cardiomegaly"], {"Cardiomegaly": [0]})


def test_final_layer_comparison_has_cis_and_the_floor():
    """Two classes, two concepts named like them; each class logit fires on the images of its class.
    Unit 0 fires strongly on one image only (MAMMI rests it on that image, whose embedding points at the
    wrong concept); the floor adds its other positives and names it right."""
    n = 40
    y = np.zeros(n, int)
    y[:20] = 1  # images 0-19: Effusion; 20-39: Nodule
    t = F.normalize(torch.eye(4)[:2], dim=1)  # concepts "effusion", "nodule"
    v = torch.zeros(n, 4)
    v[:20, 0], v[20:, 1] = 1.0, 1.0
    v[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # the single strongest image of unit 0 looks like a nodule
    v = F.normalize(v + 0.01 * torch.arange(n)[:, None] * torch.eye(4)[3], dim=1)
    tem = torch.eye(4)[2]
    logits = torch.zeros(n, 2)
    logits[:20, 0] = 1.0 + 0.01 * torch.arange(20)
    logits[0, 0] = 10.0
    logits[20:, 1] = 1.0 + 0.01 * torch.arange(20)
    enc = {"toy": lambda texts: torch.stack([torch.tensor([1.0, float("effusion" in s)]) for s in texts])}
    out = final_layer_comparison(logits, v, t, tem, ["effusion", "nodule"], ["Effusion", "Nodule"], encoders=enc,
                                 beta=0.95, alpha=0.93, min_images=10, min_evidence=10, n_resamples=200)
    paper, floor = out["methods"]["mammi"], out["methods"]["mammi_floor"]
    assert paper["evidence"]["evidence_min"] == 1 and floor["evidence"]["evidence_min"] >= 10
    assert paper["figures"]["hit_rate"]["estimate"] == 0.5 and floor["figures"]["hit_rate"]["estimate"] == 1.0
    for method in (paper, floor):
        for key in ("hit_rate", "precision", "recall", "f1", "cos_toy"):
            ci = method["figures"][key]
            assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["n"] == 2
    assert out["difference"]["hit_rate"]["estimate"] == 0.5 and out["difference_of"] == "mammi_floor - mammi per class"
    assert out["n_classes"] == 2


def test_concept_section_records_evidence_flags_and_comparison(monkeypatch, tiny_phantom):
    """The whole section with a stand-in VLM (a fixed random projection of the image; texts hashed to
    vectors): every new column and summary figure is there and consistent."""
    import zlib

    import interpret.audit.concepts as concepts_mod
    import interpret.evaluation as evaluation
    import interpret.vlm
    from interpret.audit import AuditConfig, load_probe, penultimate_layer
    from interpret.audit._util import Sections
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    class FakeVLM:
        def __init__(self, bundle, batch_size=32):
            self.proj = torch.randn(64 * 64, 16, generator=torch.Generator().manual_seed(0))

        def encode_images(self, images):
            return F.normalize(images.flatten(1) @ self.proj, dim=-1)

        def encode_texts(self, texts):
            rows = [torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(s.encode()))) for s in texts]
            return F.normalize(torch.stack(rows), dim=-1)

    monkeypatch.setattr(interpret.vlm, "VLMAdapter", FakeVLM)
    monkeypatch.setattr(evaluation, "load_sentence_encoder", lambda name: None)
    monkeypatch.setattr(concepts_mod, "_mine_concepts",
                        lambda reports, k: ["enlarged cardiac silhouette", "pleural effusion", "rib", "nodule",
                                            "mass", "clavicle"])
    torch.manual_seed(0)
    model = create_model("test_resnet", classes=list(PHANTOM_CLASSES), image_size=64).eval()
    probe = load_probe(tiny_phantom, model.class_names, 64, "all", 24, 0)
    with torch.no_grad():
        feats = model.forward_features(probe.images)
    cfg = AuditConfig(split="all", max_images=24)
    sections = Sections()
    res = concepts_mod.concept_section(cfg, model, probe, feats, penultimate_layer(model), sections, (object(), "fake"))
    assert sections.status["concepts"]["status"] == "ok"
    t = res.table
    assert {"evidence", "margin", "sufficient", "vlm_blind", "blind_classes"} <= set(t.columns)
    assert (t["sufficient"] == (t["evidence"] >= 10)).all()
    info = res.summary["layers"][model.feature_layer]
    for key in ("evidence_min", "evidence_median", "below_min_evidence", "n_distinct_scores", "n_sufficient"):
        assert key in info
    feat_rows = t[t["layer"] == model.feature_layer]
    assert info["evidence_min"] == feat_rows["evidence"].min()
    assert info["below_min_evidence"] == pytest.approx(float((feat_rows["evidence"] < 10).mean()))
    comp = res.summary["final_layer_comparison"]
    assert set(comp["methods"]) == {"mammi", "mammi_floor"}
    assert comp["methods"]["mammi_floor"]["evidence"]["evidence_min"] >= 10
    assert {"hit_rate", "f1", "cos_vlm"} <= set(comp["methods"]["mammi"]["figures"]) and "cos_clip" not in res.evaluation
    served = res.served[model.feature_layer]
    assert served == served_unit_concepts(t, model.feature_layer)
    ok = feat_rows[feat_rows["sufficient"] & ~feat_rows["vlm_blind"]]
    assert sorted(served) == sorted(int(u) for u in ok["unit"])
    blind = set(res.summary["vlm_check"]["blind_classes"])
    assert res.summary["n_flagged"] == int(t["vlm_blind"].sum())
    assert all(set(b) <= blind for b in t["blind_classes"])
