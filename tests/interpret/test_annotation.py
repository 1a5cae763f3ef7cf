"""Annotation methods: hand-worked cases, vectorised vs per-unit reference loops, selection rules."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import interpret
from interpret.annotation import (ANNOTATION_COLUMNS, annotate, concept_scores, evidence_summary, list_methods,
                                  score_margin, select_concepts, served_unit_concepts)
from interpret.annotation.mammi import adaptive_representatives, floor_representatives


def _unit(x):
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def _random(n=60, u=7, m=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, u, generator=g)
    v = _unit(torch.randn(n, d, generator=g))
    t = _unit(torch.randn(m, d, generator=g))
    tem = _unit(torch.randn(d, generator=g))
    return acts, v, t, tem


def _reference_mammi(acts, v, t, tem, alpha=0.93):
    """Per-unit loop of DESIGN.md's formula, written independently of the library."""
    out = torch.empty(acts.shape[1], t.shape[0])
    for i in range(acts.shape[1]):
        a = acts[:, i]
        tau = a.max() - (1 - alpha) * (a.max() - a.min())
        sel = (a > tau) | (a == a.max())
        cos_t = v[sel] @ t.T  # (n_i, M)
        cos_tem = v[sel] @ tem if tem is not None else torch.zeros(int(sel.sum()))
        out[i] = (cos_t - cos_tem[:, None]).mean(0)
    return out


def test_registry_and_lazy_export():
    assert list_methods() == ["clip_dissect", "falcon", "falcon_simplified", "mammi", "mammi_floor", "tsi", "www"]
    assert interpret.concept_scores is concept_scores and interpret.select_concepts is select_concepts
    acts, v, t, tem = _random()
    with pytest.raises(ValueError, match="valid: clip_dissect, falcon, falcon_simplified, mammi, mammi_floor, tsi, www"):
        concept_scores("netdissect", acts, v, t, tem)
    with pytest.raises(ValueError, match="alpha"):
        concept_scores("mammi", acts, v, t, tem, alpha=1.5)
    with pytest.raises(TypeError):
        concept_scores("mammi", acts, v, t, tem, top_k=3)  # not a MAMMI parameter
    with pytest.raises(ValueError, match="same probing images"):
        concept_scores("mammi", acts[:10], v, t, tem)
    with pytest.raises(ValueError, match="dim"):
        concept_scores("mammi", acts, v, t[:, :5], tem)


def test_mammi_hand_worked():
    # unit 0: activations 0, 1, 9, 10 -> tau = 10 - 0.07 * 10 = 9.3 -> only image 3.
    # unit 1: alpha .93 on 0, 5, 9.5, 10 -> tau 9.3 -> images 2 and 3.
    acts = torch.tensor([[0.0, 0.0], [1.0, 5.0], [9.0, 9.5], [10.0, 10.0]])
    v = _unit([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    t = _unit([[1.0, 0.0], [0.0, 1.0]])
    tem = _unit([1.0, 1.0])
    s = concept_scores("mammi", acts, v, t, tem)
    r = 1 / math.sqrt(2)
    # unit 0: image 3 = (1, 0): cos(t0) = 1, cos(t1) = 0, cos(tem) = r
    # unit 1: images 2 (r, r) and 3 (1, 0): mean cos(t0) = (r + 1)/2, cos(t1) = r/2, cos(tem) = (1 + r)/2
    expected = torch.tensor([[1 - r, -r], [(r + 1) / 2 - (1 + r) / 2, r / 2 - (1 + r) / 2]])
    torch.testing.assert_close(s, expected, atol=1e-6, rtol=0)
    assert adaptive_representatives(acts).tolist() == [[False, False, False, True], [False, False, True, True]]
    # without a template: plain mean cosine
    torch.testing.assert_close(concept_scores("mammi", acts, v, t), torch.tensor([[1.0, 0.0], [(r + 1) / 2, r / 2]]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.5, 0.93, 1.0])
@pytest.mark.parametrize("with_template", [True, False])
def test_mammi_matches_per_unit_loop(alpha, with_template):
    acts, v, t, tem = _random(seed=int(alpha * 100))
    tem = tem if with_template else None
    fast = concept_scores("mammi", acts, v, t, tem, alpha=alpha, unit_chunk=3)
    torch.testing.assert_close(fast, _reference_mammi(acts, v, t, tem, alpha), atol=1e-5, rtol=1e-5)


def test_representatives_include_argmax_ties_and_constant_units():
    acts = torch.tensor([[1.0, 2.0, 3.0], [5.0, 2.0, 3.0], [5.0, 2.0, 1.0]])
    sel = adaptive_representatives(acts, alpha=1e-6)
    assert sel[0].tolist() == [False, True, True]  # both images at the maximum
    assert sel[2].tolist() == [True, True, False]  # 3, 3 tie at the max; 1 is not above tau
    v = _unit(torch.eye(3))
    t = _unit(torch.eye(3))
    s = concept_scores("mammi", acts, v, t)
    assert torch.isnan(s[1]).all()  # unit 1 is constant: it tells nothing
    assert select_concepts(s)[1] == []


def test_mammi_sparse_and_dense_paths_agree():
    acts, v, t, tem = _random(n=200, u=5)
    sparse = concept_scores("mammi", acts, v, t, tem, alpha=0.93)
    dense = concept_scores("mammi", acts, v, t, tem, alpha=0.99)  # large selections -> dense matmul
    torch.testing.assert_close(sparse, _reference_mammi(acts, v, t, tem, 0.93), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, _reference_mammi(acts, v, t, tem, 0.99), atol=1e-5, rtol=1e-5)


def test_www_top_k():
    acts, v, t, tem = _random(n=30)
    s = concept_scores("www", acts, v, t, tem, top_k=4)
    for i in range(acts.shape[1]):
        idx = torch.topk(acts[:, i], 4).indices
        ref = (v[idx] @ t.T - (v[idx] @ tem)[:, None]).mean(0)
        torch.testing.assert_close(s[i], ref, atol=1e-6, rtol=1e-6)
    # more images asked for than exist: all of them
    all_images = concept_scores("www", acts, v, t, tem, top_k=1000)
    torch.testing.assert_close(all_images[0], (v @ t.T - (v @ tem)[:, None]).mean(0), atol=1e-6, rtol=1e-6)


def _reference_soft_wpmi(acts, v, t, top_k=100, a=10, lam=1, min_prob=1e-7, p_start=0.998, p_end=0.97):
    """CLIP-Dissect's similarity.soft_wpmi, per-unit loop, as in the authors' code."""
    clip_feats = torch.softmax(a * (v @ t.T), dim=1)
    inds = torch.topk(acts, dim=0, k=top_k)[1]
    p_in = (p_start - (torch.arange(0, top_k) / top_k * (p_start - p_end))).unsqueeze(1)
    rows = []
    for u in range(acts.shape[1]):
        cur = clip_feats.gather(0, inds[:, u:u + 1].expand(-1, clip_feats.shape[1]))
        rows.append(torch.sum(torch.log(1 + p_in * (cur - 1) + min_prob), dim=0, keepdim=True))
    pde = torch.cat(rows)
    pd_ = torch.logsumexp(pde, dim=0, keepdim=True) - math.log(pde.shape[0])
    return pde - lam * pd_


def test_clip_dissect_matches_reference_loop():
    acts, v, t, tem = _random(n=40, u=6, m=5)
    s = concept_scores("clip_dissect", acts, v, t, tem, top_k=12, unit_chunk=4)
    torch.testing.assert_close(s, _reference_soft_wpmi(acts, v, t, top_k=12), atol=1e-4, rtol=1e-5)
    # fewer images than top_k: k = N
    s_all = concept_scores("clip_dissect", acts, v, t, top_k=100)
    torch.testing.assert_close(s_all, _reference_soft_wpmi(acts, v, t, top_k=40), atol=1e-4, rtol=1e-5)
    table = annotate("clip_dissect", acts, v, t)
    assert all(len(c) >= 1 for c in table["indices"])  # best concept kept even with a negative score


def test_falcon_simplified_hand_worked():
    # 4 images; reports 0 ("nodule") and 1 ("mass", "lung"); image embeddings equal to report embeddings.
    e = _unit([[1.0, 0.0], [0.0, 1.0]])
    v = _unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    t = _unit([[1.0, 1.0], [1.0, -1.0], [0.5, 1.0]])  # concept embeddings are not used by falcon_simplified's score
    acts = torch.tensor([[9.0], [8.0], [1.0], [0.0]])  # unit loves images 0, 1 (report 0)
    s = concept_scores("falcon_simplified", acts, v, t, report_embeddings=e, report_concepts=[[0], [1, 2]], top_k=2,
                       contrastive=False)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 0.0]]))
    s = concept_scores("falcon_simplified", acts, v, t, report_embeddings=e, report_concepts=[[0], [1, 2]], top_k=2)
    torch.testing.assert_close(s, torch.tensor([[1.0, -1.0, -1.0]]))
    inc = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    torch.testing.assert_close(concept_scores("falcon_simplified", acts, v, t, report_embeddings=e, report_concepts=inc,
                                              top_k=2), s)
    with pytest.raises(ValueError, match="report_embeddings"):
        concept_scores("falcon_simplified", acts, v, t)
    with pytest.raises(ValueError, match="outside"):
        concept_scores("falcon_simplified", acts, v, t, report_embeddings=e, report_concepts=[[0], [7]])


def test_tsi_from_iou_table():
    iou = torch.tensor([[0.10, 0.30, 0.05], [0.01, 0.02, 0.03], [0.2, 0.2, 0.0]])
    acts = torch.rand(5, 3)
    s = concept_scores("tsi", acts, None, None, iou=iou)
    torch.testing.assert_close(s, torch.tensor([[0.10, 0.30, 0.05], [0.0, 0.0, 0.0], [0.2, 0.2, 0.0]]))
    table = annotate("tsi", acts, None, None, iou=iou, concepts=["Mass", "Nodule", "Effusion"])
    assert table["concepts"].tolist() == [["Nodule"], [], ["Mass", "Nodule"]]
    with pytest.raises(ValueError, match="units"):
        concept_scores("tsi", torch.rand(5, 4), None, None, iou=iou)

    class Result:  # anything with an ``iou`` attribute (interpret.dissection.DissectionResult)
        pass

    r = Result()
    r.iou = iou.numpy()
    torch.testing.assert_close(concept_scores("tsi", acts, None, None, iou=r), s)


def test_select_concepts_rules():
    s = torch.tensor([[0.20, 0.195, 0.10, 0.20], [-0.1, -0.2, -0.3, -0.1], [0.0, 0.0, 0.0, 0.0],
                      [float("nan")] * 4, [float("nan"), 0.5, 0.49, 0.1]])
    assert select_concepts(s) == [[0, 3, 1], [], [], [], [1, 2]]
    assert select_concepts(s, beta=1.0) == [[0, 3], [], [], [], [1]]
    assert select_concepts(s, on_nonpositive="best") == [[0, 3, 1], [0, 3], [0, 1, 2, 3], [], [1, 2]]
    assert select_concepts(s, beta=0.0)[0] == [0, 3, 1, 2]
    with pytest.raises(ValueError, match="beta"):
        select_concepts(s, beta=1.5)
    with pytest.raises(ValueError, match="on_nonpositive"):
        select_concepts(s, on_nonpositive="all")
    assert select_concepts(torch.zeros(2, 0)) == [[], []]


def test_annotate_table_and_chunk_invariance():
    acts, v, t, tem = _random()
    names = [f"c{j}" for j in range(t.shape[0])]
    table = annotate("mammi", acts, v, t, tem, concepts=names, layer="features")
    scores = concept_scores("mammi", acts, v, t, tem)
    assert list(table.columns) == list(ANNOTATION_COLUMNS) == ["layer", "unit", "method", "concepts", "indices",
                                                               "scores", "evidence", "margin", "sufficient"]
    assert table["indices"].tolist() == select_concepts(scores)
    assert table["concepts"][0] == [names[j] for j in table["indices"][0]]
    torch.testing.assert_close(torch.tensor(table["scores"][0]), scores[0, table["indices"][0]])
    for method in ("mammi", "www"):
        torch.testing.assert_close(concept_scores(method, acts, v, t, tem, unit_chunk=1),
                                   concept_scores(method, acts, v, t, tem, unit_chunk=1000))


# --- evidence, margin, the evidence floor and what may be served -------------------------------------------

def _hand_case():
    """Unit 0: activations 0, 1, 9, 10 -> MAMMI keeps image 3 only (tau 9.3). Unit 1: 0, 5, 9.5, 10 -> images
    2 and 3. Unit 2: constant -> no representatives. Scores worked out in test_mammi_hand_worked."""
    acts = torch.tensor([[0.0, 0.0, 1.0], [1.0, 5.0, 1.0], [9.0, 9.5, 1.0], [10.0, 10.0, 1.0]])
    v = _unit([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    t = _unit([[1.0, 0.0], [0.0, 1.0]])
    tem = _unit([1.0, 1.0])
    return acts, v, t, tem


def test_evidence_and_margin_hand_worked():
    acts, v, t, tem = _hand_case()
    table = annotate("mammi", acts, v, t, tem, concepts=["a", "b"], layer="f", min_evidence=2)
    assert table["evidence"].tolist() == [1, 2, 0]
    assert table["sufficient"].tolist() == [False, True, False]
    # with r = 1/sqrt(2): unit 0 scores (1 - r, -r): margin 1; unit 1 scores (0, r/2 - (1 + r)/2 = -1/2): margin 1/2; unit 2 NaN
    np.testing.assert_allclose(table["margin"][:2], [1.0, 0.5], atol=1e-6)
    assert np.isnan(table["margin"][2])
    assert table["concepts"].tolist() == [["a"], [], []]
    # the default floor is 10 images: none of these units is sufficient
    assert not annotate("mammi", acts, v, t, tem)["sufficient"].any()
    with pytest.raises(ValueError, match="min_evidence"):
        annotate("mammi", acts, v, t, tem, min_evidence=0)


def test_score_margin_rules():
    nan = float("nan")
    s = torch.tensor([[0.5, 0.25, 0.125], [nan, 0.5, nan], [0.25, nan, 0.5], [0.5, 0.5, 0.0]])
    m = score_margin(s)
    assert m[0] == 0.25 and math.isnan(m[1]) and m[2] == 0.25 and m[3] == 0.0
    assert torch.isnan(score_margin(torch.ones(2, 1))).all()


@pytest.mark.parametrize("method,params,expected", [
    ("www", {"top_k": 7}, 7), ("www", {"top_k": 500}, 60), ("clip_dissect", {"top_k": 12}, 12),
    ("falcon_simplified", {"top_k": 5}, 5), ("tsi", {}, 60)])
def test_evidence_of_fixed_size_methods(method, params, expected):
    acts, v, t, tem = _random(n=60, u=4, m=3)
    acts[:, 3] = 2.0  # a constant unit rests on no images
    if method == "falcon_simplified":
        params = {**params, "report_embeddings": v[:10], "report_concepts": [[j % 3] for j in range(10)]}
    if method == "tsi":
        params = {"iou": torch.rand(4, 3)}
    table = annotate(method, acts, v, t, tem, **params)
    assert table["evidence"].tolist() == [expected] * 3 + [0]


def test_mammi_evidence_is_the_adaptive_set_size():
    acts, v, t, tem = _random(n=200, u=9)
    table = annotate("mammi", acts, v, t, tem, unit_chunk=4)
    assert table["evidence"].tolist() == adaptive_representatives(acts).sum(1).tolist()


def test_mammi_floor_gives_every_unit_at_least_k_images():
    acts, v, t, tem = _random(n=200, u=9)
    acts[:, 0] = 0.0
    acts[5, 0] = 1.0  # unit 0 fires on one image only: MAMMI rests it on that image
    paper = annotate("mammi", acts, v, t, tem)
    floor = annotate("mammi_floor", acts, v, t, tem, min_images=10)
    assert paper["evidence"][0] == 1 and not paper["sufficient"][0]
    assert (floor["evidence"] >= 10).all() and floor["sufficient"].all()
    adaptive, floored = adaptive_representatives(acts), floor_representatives(acts, min_images=10)
    assert (floored >= adaptive).all()  # a superset of the paper's set ...
    top10 = torch.topk(acts, 10, dim=0).indices.T  # (U, 10)
    assert torch.gather(floored, 1, top10).all()  # ... that holds the top 10
    assert floored.sum(1).tolist() == floor["evidence"].tolist()
    # a unit whose adaptive set is already wider keeps exactly that set (and its scores)
    wide = adaptive.sum(1) >= 10
    assert (floored[wide] == adaptive[wide]).all()
    s_paper, s_floor = concept_scores("mammi", acts, v, t, tem), concept_scores("mammi_floor", acts, v, t, tem)
    torch.testing.assert_close(s_paper[wide], s_floor[wide])
    # the floor is MAMMI's score over the united set: check unit 0 by hand
    sel = floored[0]
    ref = (v[sel] @ t.T - (v[sel] @ tem)[:, None]).mean(0)
    torch.testing.assert_close(s_floor[0], ref, atol=1e-6, rtol=1e-6)
    # fewer images than the floor: all of them
    assert annotate("mammi_floor", acts[:6], v[:6], t, tem, min_images=10)["evidence"].tolist()[1:] == [6] * 8
    with pytest.raises(ValueError, match="min_images"):
        concept_scores("mammi_floor", acts, v, t, tem, min_images=0)


def test_served_unit_concepts_keeps_only_sufficient_unflagged_first_method():
    acts, v, t, tem = _hand_case()
    one = annotate("mammi", acts, v, t, tem, concepts=["a", "b"], layer="f")
    assert one["evidence"][0] == 1 and not one["sufficient"][0]
    assert served_unit_concepts(one, "f") == {}  # one representative image: not served
    assert served_unit_concepts(one, "f", min_evidence=1) == {
        0: {"concepts": ["a"], "scores": [pytest.approx(1 - 1 / math.sqrt(2))], "evidence": 1, "method": "mammi"},
        1: {"concepts": [], "scores": [], "evidence": 2, "method": "mammi"}}
    table = pd.DataFrame({"layer": ["f", "f", "f", "g", "f"], "unit": [0, 1, 2, 0, 0],
                          "method": ["mammi", "mammi", "mammi", "mammi", "www"],
                          "concepts": [["heart"], ["rib"], ["fluid"], ["lung"], ["effusion"]],
                          "scores": [[0.3], [0.2], [0.1], [0.4], [0.5]], "evidence": [12, 3, 40, 50, 40],
                          "vlm_blind": [False, False, True, False, False]})
    served = served_unit_concepts(table, "f")
    assert served == {0: {"concepts": ["heart"], "scores": [0.3], "evidence": 12, "method": "mammi"}}
    assert set(served_unit_concepts(table, "f", min_evidence=2)) == {0, 1}
    assert served_unit_concepts(table.drop(columns="evidence"), "f") == {}  # no evidence recorded: nothing
    assert served_unit_concepts(None, "f") == {} and served_unit_concepts(table, None) == {}
    with pytest.raises(ValueError, match="min_evidence"):
        served_unit_concepts(table, "f", min_evidence=0)


def test_evidence_summary():
    acts, v, t, tem = _hand_case()
    table = annotate("mammi", acts, v, t, tem, layer="f", min_evidence=2)
    summary = evidence_summary(table, min_evidence=2)
    assert summary["n_units"] == 3 and summary["evidence_min"] == 0 and summary["evidence_median"] == 1.0
    assert summary["below_min_evidence"] == pytest.approx(2 / 3) and summary["n_sufficient"] == 1
    assert summary["n_annotated"] == 1 and summary["n_distinct_scores"] == 1
    # units resting on the same images share one description
    same = pd.DataFrame({"evidence": [1, 1, 5], "scores": [[0.39741], [0.39741], [0.2]], "margin": [0.1, 0.1, 0.0]})
    assert evidence_summary(same)["n_distinct_scores"] == 2
    assert evidence_summary(same.iloc[:0])["evidence_min"] is None


def test_simplified_falcon_goes_by_its_own_name():
    """Issue 14 defect 5: the whole-image, one-report variant is not the paper's FALCON, so it is called
    ``falcon_simplified`` and its docstring says what it leaves out; ``falcon`` is the crop-based version."""
    from interpret.annotation import falcon, falcon_simplified

    assert {"falcon", "falcon_simplified"} <= set(list_methods())
    assert "not** the paper's FALCON" in falcon_simplified.__doc__ and "0.25" in falcon_simplified.__doc__
    assert "cropped" in falcon.__doc__ and "caption-word scoring" in falcon.__doc__


def test_falcon_hand_worked():
    """FALCON: crops -> nearest captions (softmax 100 cos) -> caption-word scores, minus words frequent among the
    lowest-activating images' captions (>= 0.1), best 8 kept."""
    acts = torch.tensor([[0.0, 3.0], [1.0, 2.0], [2.0, 1.0], [3.0, 0.0]])  # unit 0 tops images 3, 2; unit 1: 0, 1
    e = torch.eye(2)  # caption 0 mentions concept 0, caption 1 concept 1
    v = torch.stack([e[1], e[1], e[0], e[0]])  # whole images (the low images' embeddings)
    crops = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[0], e[0]])])  # (U=2, k=2, d): every crop ~ caption 0
    t = _unit([[1.0, 0.0], [0.0, 1.0]])
    s = concept_scores("falcon", acts, v, t, crop_embeddings=crops, caption_embeddings=e, caption_concepts=[[0], [1]],
                       top_k=2, captions_per_image=1)
    p = float(torch.softmax(torch.tensor([100.0, 0.0]), 0)[0])
    # unit 0: crops retrieve caption 0 (prob p) -> concept 0 scores p; its low images (0, 1) retrieve caption 1, so
    # concept 1 (p >= 0.1 there) is removed. Unit 1: its low images (3, 2) retrieve caption 0: concept 0 removed.
    torch.testing.assert_close(s, torch.tensor([[p, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    table = annotate("falcon", acts, v, t, concepts=["a", "b"], crop_embeddings=crops, caption_embeddings=e,
                     caption_concepts=[[0], [1]], top_k=2, captions_per_image=1)
    assert table["concepts"].tolist() == [["a"], []]
    with pytest.raises(ValueError, match="crop_embeddings"):
        concept_scores("falcon", acts, v, t, caption_embeddings=e, caption_concepts=[[0], [1]])


def test_activation_crops_cut_the_largest_active_region():
    from interpret.annotation.falcon import activation_crops

    images = torch.zeros(2, 1, 8, 8)
    images[0, 0, 2:4, 4:8] = 1.0  # the region the unit fires on in image 0
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 2:4, 4:8] = 5.0
    crops, idx = activation_crops(images, maps, torch.tensor([[2.0], [1.0]]), top_k=1)
    assert idx.tolist() == [[0]] and crops.shape == (1, 1, 1, 8, 8)
    torch.testing.assert_close(crops[0, 0], torch.ones(1, 8, 8))  # the crop is the active region, resized
