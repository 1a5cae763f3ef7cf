"""DWARF's protocol against the paper (issue 14, defect 6): GAIN's plain soft Dice, classification from
(I, M'_c) (Algorithm 1 line 15), the two ablations (random vs identity experts, Fig. 2; attention vs
expert heads, Table 4) and unknown (NaN) labels masked out of the loss."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.training.dwarf_helpers import CLASSES, SquaresDataset, tiny_bundle
from training.dwarf.losses import DwarfLoss, fp_soft_dice
from training.dwarf.model import ExpertHeads, build_dwarf, load_dwarf
from training.dwarf.train import TrainConfig, collate, train

KW = dict(d_model=32, heads=2, expert_size=0)


def _model(**kw):
    torch.manual_seed(0)
    return build_dwarf(tiny_bundle(), CLASSES, **{**KW, **kw})


def _cfg(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 64, "lr": 1e-3, "device": "cpu", "progress": False, **kw})


def test_gain_trains_with_the_plain_soft_dice_and_dwarf_with_the_fp_weighted_one():
    """One full batch: the recorded seg term is the loss before the step, so it must equal
    1 - Dice(w_FP = 1) on the raw maps for GAIN (the paper's GAIN), not DWARF's w_FP = 2."""
    ds = SquaresDataset(n=16)
    model = _model().eval()
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        raw = model(batch["image"]).raw_maps
    w = batch["labels"]
    plain = ((1 - fp_soft_dice(raw, batch["mask"], w_fp=1.0)) * w).sum() / w.sum()
    weighted = ((1 - fp_soft_dice(raw, batch["mask"], w_fp=2.0)) * w).sum() / w.sum()
    assert abs(float(plain - weighted)) > 1e-3  # the maps have false positives: w_FP matters here
    history = train(model, ds, "gain", _cfg(w_fp=2.0))
    assert history[0]["seg"] == pytest.approx(float(plain), rel=1e-4)
    assert history[0]["w_fp"] == 1.0
    assert train(_model(), ds, "dwarf", _cfg(w_fp=2.0))[0]["w_fp"] == 2.0


def test_the_refined_map_feeds_classification():
    """Algorithm 1 line 15: logits from (I, M'_c). Changing the expert heads changes the logits, and the
    classification loss alone reaches the experts; the "query" design is blind to them."""
    x = torch.rand(2, 1, 32, 32)
    for classify_from, feeds in (("map", True), ("query", False)):
        model = _model(classify_from=classify_from).eval()
        before = model(x).logits.detach()
        torch.nn.init.normal_(model.experts.conv2.weight, std=0.5)
        after = model(x)
        assert (not torch.allclose(before, after.logits)) == feeds, classify_from
        after.logits.sum().backward()
        grad = model.experts.conv2.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == feeds, classify_from
    assert _model().config.classify_from == "map"  # the paper's design is the default


def test_checkpoints_written_before_the_option_load_as_query_classifiers(tmp_path):
    model = _model(classify_from="query").eval()
    ckpt = model.checkpoint()
    for key in ("classify_from", "expert_init"):  # an older checkpoint has neither field
        ckpt["config"].pop(key)
    loaded = load_dwarf(ckpt)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert loaded.config.classify_from == "query"
    current = load_dwarf(_model().checkpoint())  # and a new one round-trips with its (I, M'_c) head
    assert current.map_cls_weight is not None


def test_random_expert_init_is_not_the_identity_and_is_reproducible():
    maps = torch.rand(2, 3, 8, 8)
    assert torch.equal(ExpertHeads(3, 2, 3, init="identity")(maps), maps)
    a, b = ExpertHeads(3, 2, 3), ExpertHeads(3, 2, 3)
    a.reset("random", generator=torch.Generator().manual_seed(5))
    b.reset("random", generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a(maps), maps)
    torch.testing.assert_close(a(maps), b(maps))
    with pytest.raises(ValueError, match="valid: identity, random"):
        ExpertHeads(3, 2, 3, init="zeros")


def test_only_dwarf_on_expert_heads_trains_the_experts():
    """Table 4's ``direct`` arm (dwarf_target="attention") and the baselines leave the experts at identity,
    so M'_c == M_c; DWARF proper moves them."""
    ds = SquaresDataset(n=16)
    x = ds.images[:4]
    for method, target, moved in (("vlm", "experts", False), ("gain", "experts", False),
                                  ("dwarf", "attention", False), ("dwarf", "experts", True)):
        model = _model()
        start = copy.deepcopy(model.experts.state_dict())
        train(model, ds, method, _cfg(epochs=2, batch_size=8, dwarf_target=target))
        changed = any(not torch.equal(v, model.experts.state_dict()[k]) for k, v in start.items())
        assert changed == moved, (method, target)
        out = model.eval()(x)
        assert torch.equal(out.refined_maps, out.raw_maps) == (not moved), (method, target)
    with pytest.raises(ValueError, match="valid: experts, attention"):
        TrainConfig(dwarf_target="maps")


def test_finetune_resets_experts_for_the_random_init_ablation():
    from training.dwarf.pipeline import finetune

    ds = SquaresDataset(n=12)
    base = _model()
    cfg = _cfg(epochs=1, batch_size=8, seed=3)
    a = finetune(base, "dwarf", ds, cfg, cycles=0, expert_init="random")  # 0 cycles: the draw only
    b = finetune(base, "dwarf", ds, cfg, cycles=0, expert_init="random")
    x = ds.images[:2]
    out = a.eval()(x)
    assert not torch.equal(out.refined_maps, out.raw_maps) and a.config.expert_init == "random"
    torch.testing.assert_close(out.refined_maps, b.eval()(x).refined_maps)
    assert torch.equal(base.experts.conv2.weight, torch.zeros_like(base.experts.conv2.weight))  # base untouched


def test_a_nan_label_is_masked_out_not_propagated():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, generator=g)
    labels = torch.tensor([[1.0, 0, float("nan")], [0, 1, 0], [float("nan"), 1, 1]])
    maps = torch.rand(3, 3, 4, 4, generator=g)
    masks = (torch.rand(3, 3, 4, 4, generator=g) > 0.5).float()
    known = torch.isfinite(labels).float()
    clean = labels.nan_to_num(0.0)
    loss = DwarfLoss(lam=0.4)
    got = loss(logits, labels, maps, masks, seg_weight=torch.ones(3, 3) * labels)  # NaN * 1 as train does
    want = loss(logits, clean, maps, masks, cls_weight=known, seg_weight=clean * known)
    assert all(math.isfinite(float(v)) for v in got.values())
    for k in ("loss", "cls", "seg"):
        torch.testing.assert_close(got[k], want[k])
    got_w = loss(logits, labels, cls_weight=torch.ones(3, 3))  # an explicit weight is masked too
    torch.testing.assert_close(got_w["cls"], want["cls"])


def test_training_on_data_with_unknown_labels_stays_finite():
    ds = SquaresDataset(n=16)
    ds.labels[0, 1] = float("nan")
    ds.labels[5, 0] = float("nan")
    for method in ("gain", "dwarf"):
        history = train(_model(), ds, method, _cfg(epochs=2, batch_size=8))
        assert all(math.isfinite(r["loss"]) for r in history), method
