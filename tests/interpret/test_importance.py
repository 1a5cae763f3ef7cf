"""Neuron importance: exact GAP + linear decomposition, Taylor agreement, class means, top units."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from interpret.importance import (class_importance, concept_lookup, explain_prediction, linear_contributions,
                                  top_units, unit_contributions)
from training.models import create_model

CLASSES = ["Effusion", "Nodule", "Mass"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("test_resnet", classes=CLASSES).eval()
    with torch.no_grad():
        m.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    return m


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def test_linear_contributions_sum_to_logit_minus_bias(model, images):
    res = unit_contributions(model, images)
    assert res.method == "linear" and res.contributions.shape == (4, 3, model.head.in_features)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(res.contributions.sum(-1) + model.head.bias, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.logits, logits)
    one = unit_contributions(model, images, targets=[2, 0, 1, 1])
    assert one.contributions.shape == (4, 1, model.head.in_features)
    torch.testing.assert_close(one.contributions[:, 0], res.contributions[torch.arange(4), torch.tensor([2, 0, 1, 1])])


def test_linear_contributions_function():
    pooled = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    w = torch.tensor([[3.0, 4.0], [-1.0, 0.5]])
    c = linear_contributions(pooled, w)
    assert c.tolist() == [[[3.0, 8.0], [-1.0, 1.0]], [[0.0, -4.0], [0.0, -0.5]]]
    with pytest.raises(ValueError, match="agree in K"):
        linear_contributions(pooled, torch.zeros(2, 3))


def test_taylor_equals_exact_for_gap_linear(model, images):
    exact = unit_contributions(model, images, method="linear")
    taylor = unit_contributions(model, images, method="taylor")
    assert taylor.method == "taylor"
    torch.testing.assert_close(taylor.contributions, exact.contributions, atol=1e-5, rtol=1e-4)


def test_taylor_for_a_nonlinear_head():
    class Net(nn.Module):  # conv -> GAP -> MLP head: no exact decomposition
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
            self.feature_layer = "features"

        def forward(self, x):
            return self.mlp(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(3, 1, 8, 8)
    res = unit_contributions(net, x, targets=[0, 1, 1])
    assert res.method == "taylor" and res.contributions.shape == (3, 1, 4)
    # by hand: d y / d a_k via autograd on the pooled vector, times a_k
    feats = net.features(x)
    pooled = feats.mean((2, 3)).detach().requires_grad_(True)
    y = net.mlp(pooled)
    grad = torch.autograd.grad(y.gather(1, torch.tensor([[0], [1], [1]])).sum(), pooled)[0]
    torch.testing.assert_close(res.contributions[:, 0], (pooled * grad).detach(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="linear"):
        unit_contributions(net, x, method="linear")
    with pytest.raises(ValueError, match="valid: auto, linear, taylor"):
        unit_contributions(net, x, method="shap")
    with pytest.raises(ValueError, match="class indices"):
        unit_contributions(net, x, targets=[0, 5, 1])


def test_class_importance_means_over_positive_images():
    contrib = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)
    labels = [[1, 0], [1, 0], [0, 0], [1, 0]]
    imp = class_importance(contrib, labels)
    torch.testing.assert_close(imp[0], contrib[[0, 1, 3], 0].mean(0))
    assert torch.isnan(imp[1]).all()
    with pytest.raises(ValueError, match="labels shape"):
        class_importance(contrib, [[1, 0]])


def test_top_units_and_explain(model, images):
    c = torch.tensor([0.1, -2.0, 3.0, float("nan"), 0.5])
    table = pd.DataFrame({"layer": ["L"] * 2, "unit": [2, 4], "concepts": [["nodule"], ["effusion", "rib"]],
                          "scores": [[0.3], [0.2, 0.1]]})
    lookup = concept_lookup(table, "L")
    assert [u["unit"] for u in top_units(c, 3, lookup)] == [2, 4, 0]
    assert top_units(c, 2, lookup)[1]["concepts"] == ["effusion", "rib"]
    assert concept_lookup(table, "other") == {}

    out = explain_prediction(model, images, top_k=3, concepts={0: ["effusion"]})
    assert len(out) == 4
    with torch.no_grad():
        logits = model(images)
    for b, item in enumerate(out):
        (entry,) = item["targets"]
        assert entry["index"] == int(logits[b].argmax()) and entry["class"] == CLASSES[entry["index"]]
        assert entry["logit"] == pytest.approx(float(logits[b].max()), abs=1e-5)
        contribs = [u["contribution"] for u in entry["units"]]
        assert contribs == sorted(contribs, reverse=True) and len(contribs) == 3
