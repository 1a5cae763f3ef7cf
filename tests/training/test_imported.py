"""Bring your own model (training.imported): wrapping, checks, checkpoints, ViT token Grad-CAM.

Offline: every architecture is built with no pretrained weights; state dicts are written to tmp files.
"""
from __future__ import annotations

import json

import pytest
import torch

from training.imported import ImportError_, import_model

XRV_KW = {"growth_rate": 8, "block_config": [1, 1], "num_init_features": 8}  # a tiny TorchXRayVision DenseNet
SIZE = 64


@pytest.fixture(scope="module")
def xrv_file(tmp_path_factory):
    import torchxrayvision as xrv

    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None, **{**XRV_KW, "block_config": tuple(XRV_KW["block_config"])})
    path = tmp_path_factory.mktemp("w") / "xrv.pt"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_xrv_densenet_same_logits_as_the_library_on_its_own_scale(xrv_file):
    path, net = xrv_file
    model = import_model("xrv:DenseNet", weights=path, image_size=SIZE, model_kwargs=XRV_KW)
    assert len(model.class_names) == 18 and model.class_names[:3] == ["Atelectasis", "Consolidation", "Infiltration"]
    assert "Lung Lesion" in model.class_names  # no NIH counterpart: kept under its own name
    assert model.head_kind == "gap_linear" and model.feature_layer == "net.relu"
    assert model.input_spec["scale"] == [-1024.0, 1024.0] and model.input_spec["channels"] == 1
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
        theirs = net(x * 2048 - 1024)  # TorchXRayVision's own [-1024, 1024] input
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert all(t != t for t in model.thresholds)  # NaN: no thresholds until given or calibrated


def test_torchvision_resnet50_state_dict_three_channels_imagenet_stats(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=2).eval()
    torch.save(net.state_dict(), tmp_path / "r50.pt")
    model = import_model("torchvision:resnet50", weights=tmp_path / "r50.pt", classes=["Effusion", "Nodule"],
                         image_size=SIZE)
    assert model.head_kind == "gap_linear" and model.feature_layer == "net.layer4" and model.head_name == "net.fc"
    x = torch.rand(2, 1, SIZE, SIZE)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x.expand(-1, 3, -1, -1) - mean) / std), atol=1e-4, rtol=1e-4)
        logits, feats = model.forward_all(x)
        torch.testing.assert_close(model.forward_head(feats), logits, atol=1e-4, rtol=1e-4)  # CAM is exact


def test_vit_gradcam_equals_hand_written_token_gradcam():
    from interpret import attention_maps

    torch.manual_seed(0)
    vit = import_model("timm:vit_tiny_patch16_224", classes=["Effusion", "Nodule", "Mass"], image_size=SIZE,
                       channels=1)
    assert vit.head_kind == "other" and vit.head is None
    assert vit.feature_layer == "net.blocks.11" and vit.token_grid == (1, 4, 4)
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    targets = [[0, 2], [1, 2]]
    maps, raw = attention_maps(vit, x, targets, method="gradcam", return_raw=True)
    # by hand: gradients of the class score at the last block's tokens, class token dropped, 4x4 patch grid
    store = {}
    handle = vit.net.blocks[-1].register_forward_hook(lambda m, i, o: store.__setitem__("tokens", o))
    try:
        logits = vit(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    tokens = store["tokens"]                                                     # (B, 1 + 16, D)
    expected = []
    for t in range(2):
        tgt = torch.tensor(targets)[:, t]
        (grad,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), tokens, retain_graph=True)
        a = tokens[:, 1:].reshape(2, 4, 4, -1)                                   # (B, h, w, D)
        g = grad[:, 1:].reshape(2, 4, 4, -1)
        expected.append(torch.einsum("bd,bhwd->bhw", g.mean(dim=(1, 2)), a))
    torch.testing.assert_close(raw, torch.stack(expected, 1).detach(), atol=1e-4, rtol=1e-4)
    assert maps.shape == (2, 2, SIZE, SIZE) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert attention_maps(vit, x, [0, 1], method="gradcampp").shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="gradcam"):
        attention_maps(vit, x, [0, 1], method="cam")  # not GAP + linear: CAM is refused with the reason


def test_checkpoint_round_trip_and_class_subset(xrv_file, tmp_path):
    from training.models import load_checkpoint, save_checkpoint

    path, _ = xrv_file
    model = import_model("xrv:DenseNet", weights=path, image_size=SIZE, model_kwargs=XRV_KW)
    model.thresholds[7] = 0.3
    save_checkpoint(model, tmp_path / "ckpt.pt")
    back = load_checkpoint(tmp_path / "ckpt.pt")
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert back.class_names == model.class_names and back.thresholds[7] == 0.3 and back.feature_layer == "net.relu"
    sub = model.select_classes(["Effusion", "Atelectasis"])
    with torch.no_grad():
        torch.testing.assert_close(sub(x), model(x)[:, [7, 0]])
    assert sub.class_names == ["Effusion", "Atelectasis"] and sub.head.weight.shape[0] == 2 and sub.thresholds[0] == 0.3


def test_mismatched_state_dict_names_the_first_mismatches(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None, num_classes=5).state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ImportError_) as err:
        import_model("torchvision:resnet18", weights=tmp_path / "bad.pt", classes=["Effusion", "Nodule"],
                     image_size=SIZE)
    msg = str(err.value)
    assert "missing keys (1): ['layer1.0.conv1.weight']" in msg and "unexpected keys (1): ['extra.weight']" in msg
    assert "fc.weight: file (5, 512) vs model (2, 512)" in msg


def test_output_width_differs_from_the_class_list():
    with pytest.raises(ImportError_, match=r"outputs of shape \(2, 4\) but 2 classes"):
        import_model("factory:tests.training.byom_factory:build", classes=["Effusion", "Nodule"], image_size=32,
                     channels=1, model_kwargs={"outputs": 4})


def test_bad_input_spec_and_factory_and_feature_layer():
    with pytest.raises(ImportError_, match="channels must be 1 or 3"):
        import_model("timm:resnet18", classes=["Effusion"], channels=4)
    with pytest.raises(ImportError_, match="lo < hi"):
        import_model("timm:resnet18", classes=["Effusion"], scale=[1, 0])
    with pytest.raises(ImportError_, match=r"needs 1 or 3 values"):
        import_model("timm:resnet18", classes=["Effusion"], mean=[0.1, 0.2])
    with pytest.raises(ImportError_, match="image_size must be >= 16"):
        import_model("timm:resnet18", classes=["Effusion"], image_size=8)
    with pytest.raises(ImportError_, match="cannot import factory module 'no_such_pkg.models'"):
        import_model("factory:no_such_pkg.models:build", classes=["Effusion"])
    with pytest.raises(ImportError_, match="bad model source"):
        import_model("onnx:model.onnx", classes=["Effusion"])
    with pytest.raises(ImportError_, match=r"unknown feature layer 'layer9'; candidates .*net\.layer4"):
        import_model("timm:resnet18", classes=["Effusion"], image_size=SIZE, feature_layer="layer9")
    model = import_model("timm:resnet18", classes=["Effusion"], image_size=SIZE, channels=1, feature_layer="layer3")
    assert model.feature_layer == "net.layer3" and model.head_kind == "other"  # layer3 is not what the head pools


def test_torchscript_and_factory_sources(tmp_path):
    from tests.training.byom_factory import build

    net = build(outputs=2).eval()
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 32, 32)), tmp_path / "net.ts")
    ts = import_model(f"torchscript:{tmp_path / 'net.ts'}", classes=["Effusion", "Nodule"], image_size=32, channels=1,
                      mean=0.0, std=1.0)
    fac = import_model("factory:tests.training.byom_factory:build", classes=["Effusion", "Nodule"], image_size=32,
                       channels=1, mean=0.0, std=1.0, model_kwargs={"outputs": 2})
    fac.net.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fac(x), net(x), atol=1e-5, rtol=1e-5)
    assert fac.head_kind == "gap_linear" and fac.feature_layer == "net.3"
    # a TorchScript head is no nn.Linear module (CAM needs one): Grad-CAM on the trunk, the hookable feature layer
    assert ts.head_kind == "other" and ts.feature_layer == "net.trunk_run"
    from interpret import attention_maps

    assert attention_maps(ts, x, [0, 1], method="gradcam").shape == (2, 1, 32, 32)
    from training.models import load_checkpoint, save_checkpoint

    save_checkpoint(ts, tmp_path / "ts.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "ts.ckpt")(x), net(x), atol=1e-5, rtol=1e-5)
    assert json.loads(json.dumps(ts.input_spec))["model_channels"] == 1


def test_probabilities_become_logits():
    model = import_model("factory:tests.training.byom_factory:build", classes=["Effusion", "Nodule"], image_size=32,
                         channels=1, outputs="probabilities", model_kwargs={"outputs": 2, "sigmoid": True})
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x)), model.net(model.normalize(x)), atol=1e-5, rtol=1e-4)
