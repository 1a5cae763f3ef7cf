"""The service asks ONNX Runtime for CUDA when the installed onnxruntime has it (the gpu extra), else CPU."""
from __future__ import annotations

import pytest


def test_service_session_asks_for_the_chosen_providers_and_logs_them(monkeypatch, tmp_path, caplog):
    import json
    import logging

    import onnxruntime as ort

    from mlflow_projects.serving.runtime import load_model
    from mlflow_projects.serving.settings import ServeConfig
    from training.export import export_onnx
    from training.models import create_model, save_checkpoint

    art = tmp_path / "artifacts"
    art.mkdir()
    net = create_model("test_resnet", num_classes=2, image_size=32).eval()
    save_checkpoint(net, art / "checkpoint.pt")
    export_onnx(net, art / "model.onnx", image_size=32)
    (art / "meta.json").write_text(json.dumps({"classes": net.class_names, "input": net.input_spec}))
    asked = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        asked.append(providers)
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    identity = type("Identity", (), {"uri": "models:/m/1"})()
    with caplog.at_level(logging.INFO, logger="mlflow_projects.serving.runtime"):
        m = load_model(identity, ServeConfig(threads=1), source=tmp_path)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert m.session is not None
    assert any("ONNX Runtime runs models:/m/1 on CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_gradient_methods_run_torch_on_the_chosen_device_and_say_so(monkeypatch, tmp_path, caplog):
    """CUDA when torch sees one (training.runtime.resolve_device), CXR_TORCH_DEVICE overriding; logged once."""
    import json
    import logging

    import numpy as np
    import torch

    from mlflow_projects.serving.explain import explanation_maps
    from mlflow_projects.serving.runtime import load_model
    from mlflow_projects.serving.settings import ServeConfig
    from training.models import create_model, save_checkpoint

    art = tmp_path / "artifacts"
    art.mkdir()
    net = create_model("test_resnet", num_classes=2, image_size=32).eval()
    save_checkpoint(net, art / "checkpoint.pt")
    (art / "meta.json").write_text(json.dumps({"classes": net.class_names, "input": net.input_spec}))
    identity = type("Identity", (), {"uri": "models:/m/2"})()
    monkeypatch.setenv("CXR_TORCH_DEVICE", "cpu")
    with caplog.at_level(logging.INFO, logger="mlflow_projects.serving.runtime"):
        m = load_model(identity, ServeConfig(threads=1), source=tmp_path)
    assert m.torch_device == torch.device("cpu")
    assert next(m.torch_model.parameters()).device == torch.device("cpu")
    assert any("torch runs the gradient methods of models:/m/2 on cpu" in r.getMessage() for r in caplog.records)
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    maps, raw = explanation_maps(m, x, [1], "gradcam")
    want = __import__("interpret").attention_maps(net, torch.from_numpy(x), [[1]], method="gradcam")[0].numpy()
    np.testing.assert_allclose(maps, want, atol=1e-6)
    monkeypatch.setenv("CXR_TORCH_DEVICE", "gpu0")  # a typo is refused with the valid forms, not ignored
    with pytest.raises(ValueError, match=r"unknown CXR_TORCH_DEVICE value 'gpu0'; valid: auto, cpu, cuda, cuda:N"):
        load_model(identity, ServeConfig(threads=1), source=tmp_path)
