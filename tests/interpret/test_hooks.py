"""capture(): clones before in-place ops, tensor-hook gradients, hooks removed, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interpret.hooks import capture, layer_names, resolve_layer


class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        f = F.relu(self.features(x), inplace=True)       # DenseNet's in-place ReLU
        return self.head(f.mean((2, 3)))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_activation_is_cloned_before_inplace_relu_and_gradient_is_pre_relu():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    expected = model.features(x).detach()
    with capture(model, "features", gradients=True) as cap:
        model(x)[:, 1].sum().backward()
    act, grad = cap.activations["features"], cap.gradients["features"]
    assert (act < 0).any()                                  # the in-place ReLU did not touch it
    torch.testing.assert_close(act, expected)
    # d y1 / d features = w_1k / (h w) where features > 0, else 0 (ReLU)
    w = model.head.weight[1].detach() / 36
    torch.testing.assert_close(grad, w[None, :, None, None] * (expected > 0), rtol=0, atol=1e-7)
    assert _hooks(model) == 0


def test_several_layers_and_hooks_removed_on_error():
    model = InplaceNet()
    with capture(model, ["features.0", "head"]) as cap:
        model(torch.rand(1, 1, 4, 4))
    assert cap.activations["features.0"].shape == (1, 3, 4, 4)
    assert cap.activations["head"].shape == (1, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, "features"):
            raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_unknown_layer_lists_valid_names():
    model = InplaceNet()
    with pytest.raises(ValueError, match=r"unknown layer 'featurez'.*features, features\.0"):
        with capture(model, "featurez"):
            pass
    assert _hooks(model) == 0
    assert layer_names(model) == ["features", "features.0", "features.1", "head"]
    assert resolve_layer(model, "features.1") is model.features[1]
    with pytest.raises(ValueError, match="at least one"):
        with capture(model, []):
            pass


def test_cut_stops_backward_at_the_layer_with_the_same_gradient():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    with capture(model, "features", gradients=True) as full:
        model(x)[:, 1].sum().backward()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with capture(model, "features", cut=True) as cap:
        logits = model(x.detach())                           # nothing upstream requires grad
        assert logits.requires_grad and not cap.leaves["features"].grad_fn
        grad, = torch.autograd.grad(logits[:, 1].sum(), cap.leaves["features"])
    torch.testing.assert_close(cap.activations["features"], full.activations["features"])  # pre-ReLU
    torch.testing.assert_close(grad, full.gradients["features"])
    assert all(p.grad is None for p in model.parameters()) and _hooks(model) == 0
