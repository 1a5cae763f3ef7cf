"""Classifier registry: shapes, metadata, grey input, exact CAM layout, strict pretrained loading."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import densenet as tv_densenet
from torchvision.models import resnet as tv_resnet

from training.models import create_model, list_models, load_checkpoint, load_pretrained, save_checkpoint

CLASSES = ["Effusion", "Nodule", "Mass"]


def test_registry_lists_all_and_unknown_name_lists_valid():
    assert {"densenet121", "resnet50", "resnet18", "t_densenet", "test_densenet", "test_resnet"} <= set(list_models())
    with pytest.raises(ValueError, match="valid: .*test_resnet"):
        create_model("densenet_121", classes=CLASSES)
    with pytest.raises(ValueError, match="classes"):
        create_model("test_resnet")


@pytest.mark.parametrize("name,side", [("test_resnet", 64), ("test_densenet", 64)])
def test_tiny_models_shapes_metadata_and_exact_cam(name, side):
    torch.manual_seed(0)
    model = create_model(name, classes=CLASSES).eval()
    x = torch.rand(2, 1, side, side)
    feats = model.forward_features(x)
    assert feats.shape[0] == 2 and feats.shape[1] == model.head.in_features and feats.min() >= 0  # post-ReLU
    assert model.get_submodule(model.feature_layer) is not None
    logits = model(x)
    assert logits.shape == (2, 3)
    # CAM is exact: the logit equals the spatial mean of the class activation map plus the bias
    cam = torch.einsum("ck,bkhw->bchw", model.head.weight, feats)
    torch.testing.assert_close(cam.mean((2, 3)) + model.head.bias, logits, atol=1e-5, rtol=1e-5)
    assert model.class_names == CLASSES and model.thresholds == [0.5] * 3
    spec = model.input_spec
    assert spec["channels"] == 1 and spec["size"] == 64 and len(spec["mean"]) == 1 and spec["range"] == [0.0, 1.0]


def test_hooked_feature_layer_equals_forward_features_after_full_forward():
    """The captured feature maps are not modified in place by the rest of the forward pass."""
    model = create_model("test_densenet", classes=CLASSES).eval()
    x = torch.rand(2, 1, 32, 32)
    saved = {}
    handle = model.get_submodule(model.feature_layer).register_forward_hook(lambda m, i, o: saved.update(out=o))
    try:
        model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(saved["out"], model.forward_features(x), atol=0, rtol=0)


def test_t_densenet_has_28x28_maps_at_224():
    model = create_model("t_densenet", num_classes=2).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.rand(1, 1, 224, 224))
    assert feats.shape == (1, 512, 28, 28)
    assert model.feature_layer == "features.relu"


def test_input_checks():
    model = create_model("test_resnet", classes=CLASSES)
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.warns(UserWarning, match="outside \\[0, 1\\]"):
        model(torch.rand(2, 1, 32, 32) * 255)


def test_checkpoint_round_trip(tmp_path):
    model = create_model("test_resnet", classes=CLASSES, image_size=48).eval()
    model.thresholds = [0.2, 0.4, 0.6]
    path = save_checkpoint(model, tmp_path / "c.pt", epoch=3)
    back = load_checkpoint(path)
    x = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(back(x), model(x))
    assert back.thresholds == [0.2, 0.4, 0.6] and back.class_names == CLASSES
    assert back.input_spec == model.input_spec and back.checkpoint_metadata == {"epoch": 3}


def test_checkpoint_keeps_missing_thresholds_and_their_positives(tmp_path):
    """A class without a threshold (NaN) stays without one, with the validation positives behind each; a
    checkpoint written before these fields existed still loads (positives unknown: None)."""
    import math

    model = create_model("test_resnet", classes=CLASSES, image_size=32).eval()
    model.thresholds, model.threshold_positives, model.min_val_positives = [0.3, float("nan"), 0.7], [9, 1, 6], 5
    back = load_checkpoint(save_checkpoint(model, tmp_path / "c.pt"))
    assert back.thresholds[0] == 0.3 and math.isnan(back.thresholds[1]) and back.thresholds[2] == 0.7
    assert back.threshold_positives == [9, 1, 6] and back.min_val_positives == 5
    old = torch.load(tmp_path / "c.pt", weights_only=True)
    for key in ("threshold_positives", "min_val_positives"):
        del old[key]
    old["thresholds"] = [0.3, 0.5, 0.7]
    torch.save(old, tmp_path / "old.pt")
    back = load_checkpoint(tmp_path / "old.pt")
    assert back.thresholds == [0.3, 0.5, 0.7] and back.threshold_positives is None and back.min_val_positives is None
    fresh = create_model("test_resnet", classes=CLASSES)
    assert fresh.threshold_positives is None and fresh.min_val_positives is None


def test_pretrained_rgb_resnet_weights_summed_over_channels(tmp_path):
    """A torchvision-style (3-channel, 1000-class) state dict loads; the grey conv is the channel sum."""
    net = tv_resnet.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(net.state_dict(), path)
    model = create_model("resnet18", classes=CLASSES, pretrained=path)
    torch.testing.assert_close(model.features.conv1.weight, net.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.features.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert model.head.weight.shape == (3, 512)  # 1000-class head skipped, re-initialised


def test_pretrained_densenet_old_key_names_and_t_densenet_cut(tmp_path):
    net = tv_densenet.densenet121(weights=None)
    state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in net.state_dict().items()}
    path = tmp_path / "densenet121.pth"
    torch.save({"state_dict": {"module.densenet121." + k: v for k, v in state.items()}}, path)
    model = create_model("t_densenet", classes=CLASSES, pretrained=path)
    torch.testing.assert_close(model.features.denseblock2.denselayer12.conv2.weight,
                               net.features.denseblock2.denselayer12.conv2.weight)


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    net = tv_resnet.resnet18(weights=None)
    state = net.state_dict()
    state.pop("layer3.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys.*layer3\.0\.conv1\.weight.*unexpected keys.*extra\.weight"):
        create_model("resnet18", classes=CLASSES, pretrained=path)
    model = create_model("resnet18", classes=CLASSES)
    report = load_pretrained(model, path, strict=False)
    assert report["missing"] == ["features.layer3.0.conv1.weight"] and report["unexpected"] == ["features.extra.weight"]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet18", classes=CLASSES, pretrained=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="shape mismatches"):  # resnet18 weights into a resnet50
        create_model("resnet50", classes=CLASSES, pretrained=path, strict=False)


def test_probabilities_one_sigmoid_for_numpy_and_torch():
    """The one logits -> probabilities mapping (served, audited, thresholded): numpy and torch agree, and
    extreme logits neither overflow nor leave (0, 1)'s closure."""
    import warnings

    import numpy as np
    import torch

    from training.models import probabilities

    z = np.array([[-1000.0, -3.0, 0.0, 2.5, 1000.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from exp
        p = probabilities(z)
    assert p.dtype == np.float32 and p.shape == z.shape
    np.testing.assert_allclose(p, torch.sigmoid(torch.from_numpy(z)).numpy(), atol=1e-7)
    assert p[0, 0] == 0.0 and p[0, 2] == 0.5 and p[0, 4] == 1.0
    torch.testing.assert_close(probabilities(torch.from_numpy(z).float()), torch.sigmoid(torch.from_numpy(z).float()))
