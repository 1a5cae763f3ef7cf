"""ONNX export: two outputs, dynamic batch, agreement with eager within 1e-4."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.export import OUTPUT_NAMES, export_onnx, onnx_session
from training.models import create_model


@pytest.mark.parametrize("name", ["test_resnet", "test_densenet"])
def test_export_outputs_logits_and_features_with_dynamic_batch(tmp_path, name):
    model = create_model(name, classes=["A", "B", "C"], image_size=32).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    sess = onnx_session(path)
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES) and sess.get_inputs()[0].name == "images"
    for batch in (1, 5):
        x = torch.rand(batch, 1, 32, 32)
        logits, feats = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)
            np.testing.assert_allclose(feats, model.forward_features(x).numpy(), atol=1e-4)
    assert model.training is False and next(model.parameters()).device.type == "cpu"


def test_export_rejects_bad_size(tmp_path):
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        export_onnx(create_model("test_resnet", num_classes=1), tmp_path / "m.onnx", image_size=4)
