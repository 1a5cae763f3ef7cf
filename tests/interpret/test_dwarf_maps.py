"""A DWARF model seen as a classifier (interpret.models) and its maps (method ``dwarf``)."""
from __future__ import annotations

import copy

import pytest
import torch

from interpret import attention_maps
from interpret.attention import finalize_maps, list_methods
from interpret.models import DwarfClassifierView
from interpret.sanity import randomise_block_
from tests.training.dwarf_helpers import CLASSES, tiny_bundle


@pytest.fixture(scope="module")
def view() -> DwarfClassifierView:
    """A tiny DWARF (2 ViT blocks, 2 decoder layers) whose experts are not the identity (refined != raw)."""
    from training.dwarf.model import build_dwarf

    torch.manual_seed(0)
    model = build_dwarf(tiny_bundle(), CLASSES, d_model=32, heads=2).eval()
    torch.nn.init.normal_(model.experts.conv2.weight, std=0.05)
    return DwarfClassifierView(model).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def test_view_is_a_classifier_over_the_wrapped_model(view, images):
    with torch.no_grad():
        out = view.dwarf(images)
        logits, maps = view(images), view.maps(images)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(maps, out.refined_maps, rtol=0, atol=0)
    assert logits.shape == (3, 3) and maps.shape == (3, 3, 32, 32)
    assert not torch.allclose(out.refined_maps, out.raw_maps)  # the experts do something
    assert view.class_names == CLASSES and view.thresholds == view.dwarf.thresholds
    assert view.input_spec == view.dwarf.input_spec and view.kind == view.arch == "dwarf"
    assert view.feature_layer is None and view.attention_methods == ("dwarf",)
    # the head is a named module sharing the model's parameters, not a copy
    assert view.cls_head.weight is view.dwarf.cls_weight and view.cls_head.bias is view.dwarf.cls_bias
    torch.testing.assert_close(view.cls_head(torch.ones(1, 3, 32)),
                               view.dwarf.cls_weight.sum(-1)[None] + view.dwarf.cls_bias)
    assert {id(p) for p in view.parameters()} == {id(p) for p in view.dwarf.parameters()}
    for name in view.randomisation_layers:
        view.get_submodule(name)  # every block name resolves
    assert view.randomisation_layers[:3] == ["dwarf.experts", "cls_head", "dwarf.decoder.norm"]
    assert view.randomisation_layers[-1] == "dwarf.encoder.visual.conv1"
    assert view.map_randomisation_layers == [n for n in view.randomisation_layers
                                             if n not in ("cls_head", "dwarf.decoder.norm")]
    with pytest.raises(ValueError, match="DwarfModel"):
        DwarfClassifierView(torch.nn.Linear(2, 2))


def test_dwarf_method_gives_the_refined_maps_through_the_served_pipeline(view, images):
    targets = [[0, 2], [1, 1], [2, 0]]
    view.train()  # attention_maps runs in eval mode and restores the flags
    try:
        maps, raw = attention_maps(view, images, targets, method="dwarf", return_raw=True)
        assert all(m.training for m in view.modules())
    finally:
        view.eval()
    with torch.no_grad():
        refined = view.dwarf(images).refined_maps  # (B, C, S, S)
    idx = torch.tensor(targets)
    expected_raw = torch.stack([refined[b, idx[b]] for b in range(3)])  # (B, T, S, S)
    torch.testing.assert_close(raw, expected_raw, rtol=0, atol=0)
    torch.testing.assert_close(maps, finalize_maps(expected_raw, (32, 32)), rtol=0, atol=0)
    assert maps.shape == (3, 2, 32, 32) and maps.amin() == 0 and maps.amax() == 1
    # a bare DwarfModel is wrapped; one target per image works as for every method
    diagonal = torch.stack([refined[b, b] for b in range(3)])[:, None]  # (B, 1, S, S): image b, class b
    torch.testing.assert_close(attention_maps(view.dwarf, images, [0, 1, 2], method="dwarf"),
                               finalize_maps(diagonal, (32, 32)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        attention_maps(view, images, 3, method="dwarf")


def test_classifier_methods_refuse_dwarf_and_dwarf_refuses_classifiers(view, images):
    from training.models import create_model

    assert list_methods() == ["cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad"]
    assert list_methods(view) == list_methods(view.dwarf) == ["dwarf"]
    for method in list_methods():
        with pytest.raises(ValueError, match=rf"method '{method}' explains classifiers.*use method='dwarf'"):
            attention_maps(view, images, 0, method=method)
        with pytest.raises(ValueError, match="use method='dwarf'"):
            attention_maps(view.dwarf, images, 0, method=method)
    classifier = create_model("test_resnet", classes=["Effusion", "Nodule"])
    assert list_methods(classifier) == list_methods()
    with pytest.raises(ValueError, match=r"method 'dwarf' explains DWARF models.*got CXRClassifier.*'gradcam'"):
        attention_maps(classifier, images, 0, method="dwarf")
    with pytest.raises(ValueError, match="unknown attention method 'dwarff'.*'dwarf'"):
        attention_maps(view, images, 0, method="dwarff")


def test_randomising_each_block_of_a_deep_copy_changes_its_maps_not_the_original(view, images):
    before = {k: v.clone() for k, v in view.state_dict().items()}
    with torch.no_grad():
        ref_logits, ref_maps = view(images), attention_maps(view, images, [0, 1, 2], method="dwarf")
    for name in view.randomisation_layers:
        rand = copy.deepcopy(view)
        assert rand.cls_head.weight is rand.dwarf.cls_weight  # deepcopy keeps the head shared
        randomise_block_(rand.get_submodule(name), seed=7)  # (seed 0 redraws conv1 exactly: tiny_bundle seeds 0)
        with torch.no_grad():
            logits, maps = rand(images), attention_maps(rand, images, [0, 1, 2], method="dwarf")
        if name in view.logit_only_layers:  # computed after the maps: the maps cannot change
            torch.testing.assert_close(maps, ref_maps, rtol=0, atol=0)
        else:
            assert (maps - ref_maps).abs().max() > 1e-2, name
        if name == "cls_head":
            assert (logits - ref_logits).abs().max() > 1e-3
    for k, v in view.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(attention_maps(view, images, [0, 1, 2], method="dwarf"), ref_maps, rtol=0, atol=0)


def test_randomising_the_head_reaches_the_wrapped_models_parameters(view):
    rand = copy.deepcopy(view)
    randomise_block_(rand.get_submodule("cls_head"), seed=3)
    assert rand.cls_head.weight is rand.dwarf.cls_weight
    assert not torch.equal(rand.dwarf.cls_weight, view.dwarf.cls_weight)  # the model's own head changed
    # the whole head: the map-pooled term's weights too (classify_from="map", the default design)
    assert view.dwarf.config.classify_from == "map" and rand.cls_head.map_weight is rand.dwarf.map_cls_weight
    assert not torch.equal(rand.dwarf.map_cls_weight, view.dwarf.map_cls_weight)
    assert torch.equal(rand.dwarf.decoder.layers[1].cross_attn.in_proj_weight,
                       view.dwarf.decoder.layers[1].cross_attn.in_proj_weight)  # nothing else did
