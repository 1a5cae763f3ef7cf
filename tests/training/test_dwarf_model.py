"""DWARF model: shapes, identity-initialised experts, attention maps, checkpoint round trip."""
from __future__ import annotations

import pytest
import torch

from tests.training.dwarf_helpers import CLASSES, tiny_bundle
from training.dwarf.model import (DwarfConfig, ExpertHeads, build_dwarf, load_dwarf, minmax_normalize,
                                  vision_config)


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def test_refined_equals_raw_at_initialisation(bundle):
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2)
    out = model(torch.rand(3, 1, 32, 32))
    assert out.logits.shape == (3, 3)
    assert out.raw_maps.shape == out.refined_maps.shape == (3, 3, 32, 32)
    assert torch.equal(out.refined_maps, out.raw_maps)  # exactly: Identity Enhanced Initialization


def test_expert_identity_holds_for_any_map_in_unit_range():
    experts = ExpertHeads(4, hidden=3, kernel=3, work_size=4)
    maps = torch.rand(2, 4, 9, 9)
    assert torch.equal(experts(maps), maps)
    torch.nn.init.normal_(experts.conv2.weight)
    assert not torch.equal(experts(maps), maps)
    experts.reset_identity()
    assert torch.equal(experts(maps), maps)


def test_experts_are_independent_per_disease():
    experts = ExpertHeads(3, hidden=2, kernel=3)
    maps = torch.rand(1, 3, 8, 8, requires_grad=True)
    experts(maps)[:, 1].sum().backward()
    grad = experts.conv2.weight.grad.view(3, -1)  # conv2 groups: one row block per disease
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0 and grad[1].abs().sum() > 0


def test_attention_is_a_distribution_and_maps_are_minmax(bundle):
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2, decoder_layers=3, map_layers=2)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.attention.shape == (2, 3, 4, 4)  # 32 px / patch 8
    torch.testing.assert_close(out.attention.sum((-1, -2)), torch.ones(2, 3), rtol=0, atol=1e-5)
    flat = out.raw_maps.flatten(-2)
    torch.testing.assert_close(flat.min(-1).values, torch.zeros(2, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat.max(-1).values, torch.ones(2, 3), rtol=0, atol=1e-6)


def test_map_layers_averages_last_layers(bundle):
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2, decoder_layers=2, map_layers=2).eval()
    x = torch.rand(1, 1, 32, 32)
    attns = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, i, o: attns.append(o[1])) for layer in model.decoder.layers]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    expected = ((attns[0] + attns[1]) / 2).view(1, 3, 4, 4)
    torch.testing.assert_close(out.attention, expected, rtol=0, atol=1e-6)


def test_other_input_size_is_resized(bundle):
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2)
    out = model(torch.rand(1, 1, 48, 48))
    assert out.refined_maps.shape == (1, 3, 48, 48)


def test_checkpoint_round_trip(bundle, tmp_path):
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2).eval()
    torch.nn.init.normal_(model.experts.conv2.weight, std=0.1)
    model.thresholds = [0.1, 0.2, 0.3]
    torch.save(model.checkpoint(), tmp_path / "dwarf.pt")
    again = load_dwarf(tmp_path / "dwarf.pt")
    x = torch.rand(2, 1, 32, 32)
    a, b = model(x), again(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.refined_maps, b.refined_maps, rtol=0, atol=0)
    assert again.class_names == CLASSES and again.thresholds == [0.1, 0.2, 0.3]


def test_bad_inputs_raise(bundle):
    with pytest.raises(ValueError, match="divisible"):
        DwarfConfig(classes=CLASSES, d_model=30, heads=4)
    with pytest.raises(ValueError, match="map_layers"):
        DwarfConfig(classes=CLASSES, decoder_layers=1, map_layers=2)
    with pytest.raises(ValueError, match="VisionTransformer"):
        vision_config(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="cxr-dwarf/1"):
        load_dwarf({"format": "other"})
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2)
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        model(torch.rand(1, 32, 32))


def test_minmax_normalize_constant_map_is_zero():
    out = minmax_normalize(torch.full((1, 1, 4, 4), 3.0))
    assert torch.equal(out, torch.zeros(1, 1, 4, 4))


def test_conv_stem_tower_round_trip(tmp_path):
    """A ViT with a conv stem (as in ``cxr-minilm-convvit``) is described, rebuilt and loaded strictly."""
    import copy

    from training.clip.loading import ConvStem, apply_conv_stem

    bundle = copy.deepcopy(tiny_bundle())
    torch.manual_seed(1)
    apply_conv_stem(bundle.model.visual, channels=8)
    cfg = vision_config(bundle.model.visual)
    assert cfg["vision_cfg"]["conv_stem"] == 8 and cfg["vision_cfg"]["width"] == 32
    model = build_dwarf(bundle, CLASSES, d_model=32, heads=2).eval()
    assert isinstance(model.encoder.visual.conv1, ConvStem)
    torch.save(model.checkpoint(), tmp_path / "dwarf.pt")
    again = load_dwarf(tmp_path / "dwarf.pt")
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model(x).logits, again(x).logits, rtol=0, atol=0)
