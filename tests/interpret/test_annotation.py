"""Annotation methods: hand-worked cases, vectorised vs per-unit reference loops, selection rules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import interpret
from interpret.annotation import annotate, concept_scores, list_methods, select_concepts
from interpret.annotation.mammi import adaptive_representatives


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
    assert list_methods() == ["clip_dissect", "falcon", "mammi", "tsi", "www"]
    assert interpret.concept_scores is concept_scores and interpret.select_concepts is select_concepts
    acts, v, t, tem = _random()
    with pytest.raises(ValueError, match="valid: clip_dissect, falcon, mammi, tsi, www"):
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


def test_falcon_hand_worked():
    # 4 images; reports 0 ("nodule") and 1 ("mass", "lung"); image embeddings equal to report embeddings.
    e = _unit([[1.0, 0.0], [0.0, 1.0]])
    v = _unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    t = _unit([[1.0, 1.0], [1.0, -1.0], [0.5, 1.0]])  # concept embeddings are not used by falcon's score
    acts = torch.tensor([[9.0], [8.0], [1.0], [0.0]])  # unit loves images 0, 1 (report 0)
    s = concept_scores("falcon", acts, v, t, report_embeddings=e, report_concepts=[[0], [1, 2]], top_k=2,
                       contrastive=False)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 0.0]]))
    s = concept_scores("falcon", acts, v, t, report_embeddings=e, report_concepts=[[0], [1, 2]], top_k=2)
    torch.testing.assert_close(s, torch.tensor([[1.0, -1.0, -1.0]]))
    inc = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    torch.testing.assert_close(concept_scores("falcon", acts, v, t, report_embeddings=e, report_concepts=inc,
                                              top_k=2), s)
    with pytest.raises(ValueError, match="report_embeddings"):
        concept_scores("falcon", acts, v, t)
    with pytest.raises(ValueError, match="outside"):
        concept_scores("falcon", acts, v, t, report_embeddings=e, report_concepts=[[0], [7]])


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
    assert list(table.columns) == ["layer", "unit", "method", "concepts", "indices", "scores"]
    assert table["indices"].tolist() == select_concepts(scores)
    assert table["concepts"][0] == [names[j] for j in table["indices"][0]]
    torch.testing.assert_close(torch.tensor(table["scores"][0]), scores[0, table["indices"][0]])
    for method in ("mammi", "www"):
        torch.testing.assert_close(concept_scores(method, acts, v, t, tem, unit_chunk=1),
                                   concept_scores(method, acts, v, t, tem, unit_chunk=1000))
