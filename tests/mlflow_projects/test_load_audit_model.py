"""load_audit_model: a classifier or a cxr-dwarf version, and DWARF maps audited == DWARF maps served."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from interpret import attention_maps
from interpret.models import DwarfClassifierView
from mlflow_projects.common import ModelIdentity, load_audit_model
from tests.training.dwarf_helpers import CLASSES, tiny_bundle


def _tiny_dwarf():
    from training.dwarf.model import build_dwarf

    torch.manual_seed(0)
    model = build_dwarf(tiny_bundle(), CLASSES, d_model=32, heads=2).eval()
    torch.nn.init.normal_(model.experts.conv2.weight, std=0.05)  # refined maps != raw maps
    model.thresholds = [0.3, 0.5, 0.7]
    return model


@pytest.fixture(scope="module")
def dwarf_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A cxr-dwarf MLflow model folder as ``log_dwarf_model`` writes it (same pyfunc, same meta.json, same
    artifact names), saved locally: no tracking store."""
    import mlflow

    from mlflow_projects.pyfunc_dwarf import DwarfPyfunc, model_meta

    model = _tiny_dwarf()
    model.threshold_positives, model.min_val_positives = [6, 7, 8], 5
    tmp = tmp_path_factory.mktemp("dwarf")
    torch.save(model.checkpoint(), tmp / "checkpoint.pt")
    (tmp / "meta.json").write_text(json.dumps(model_meta(model)))
    folder = tmp / "model"
    mlflow.pyfunc.save_model(str(folder), python_model=DwarfPyfunc(), pip_requirements=["torch"],
                             artifacts={"checkpoint": str(tmp / "checkpoint.pt"), "meta": str(tmp / "meta.json")})
    return folder, model


def test_a_dwarf_folder_loads_as_a_classifier_view(dwarf_folder, tmp_path):
    folder, model = dwarf_folder
    view, meta = load_audit_model(str(folder), tmp_path)
    assert isinstance(view, DwarfClassifierView) and view.kind == "dwarf" and not view.training
    assert meta["kind"] == "dwarf" and meta["classes"] == CLASSES
    assert view.class_names == CLASSES and view.thresholds == [0.3, 0.5, 0.7]
    assert view.threshold_positives == [6, 7, 8] and view.min_val_positives == 5
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(view(x), ref.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(view.maps(x), ref.refined_maps, rtol=0, atol=1e-6)


def test_audited_dwarf_maps_equal_the_served_maps(dwarf_folder, tmp_path):
    """The audit's maps (attention_maps(view, ..., method="dwarf"), batched) are the service's /explain maps
    (serving.load_model of the same folder -> the pyfunc's maps -> explanation_maps), image by image."""
    from mlflow_projects.serving import ServeConfig, explanation_maps, load_model

    folder, _ = dwarf_folder
    view, _ = load_audit_model(str(folder), tmp_path)
    served = load_model(ModelIdentity("cxr-dwarf", "1", None, "models:/cxr-dwarf/1", "models:/cxr-dwarf/1"),
                        ServeConfig(cache_dir=str(tmp_path / "cache")), source=folder)
    assert served.kind == "maps" and served.methods == ("dwarf",) and served.image_size == 32
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = [[0, 2], [1, 0], [2, 1], [1, 2]]
    maps, raw = attention_maps(view, images, targets, method="dwarf", return_raw=True)  # (B, T, S, S)
    for i in range(len(images)):
        s_maps, s_raw = explanation_maps(served, images[i:i + 1].numpy(), targets[i], "dwarf")
        np.testing.assert_allclose(maps[i].numpy(), s_maps, rtol=0, atol=1e-6)
        np.testing.assert_allclose(raw[i].numpy(), s_raw, rtol=0, atol=1e-6)


def test_a_classifier_folder_loads_as_before(tmp_path):
    from training.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("test_resnet", classes=["Effusion", "Nodule"], image_size=32).eval()
    folder = tmp_path / "clf"
    save_checkpoint(model, folder / "artifacts" / "checkpoint.pt")
    meta = {"arch": model.arch, "classes": model.class_names, "thresholds": model.thresholds,
            "input": model.input_spec, "feature_layer": model.feature_layer, "head": "gap_linear"}
    (folder / "artifacts" / "meta.json").write_text(json.dumps(meta))
    loaded, got = load_audit_model(str(folder), tmp_path / "dst")
    assert not isinstance(loaded, DwarfClassifierView) and getattr(loaded, "kind", None) != "dwarf"
    assert got == meta and loaded.class_names == ["Effusion", "Nodule"] and not loaded.training
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_folder_with_neither_names_the_path_and_what_was_expected(tmp_path, dwarf_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty}.*expected a cxr-classifier model .* or a cxr-dwarf model"):
        load_audit_model(str(empty), tmp_path / "dst")
    no_ckpt = tmp_path / "no-ckpt" / "artifacts"
    no_ckpt.mkdir(parents=True)
    (no_ckpt / "meta.json").write_text(json.dumps({"kind": "dwarf", "classes": CLASSES}))
    with pytest.raises(FileNotFoundError, match=r"kind 'dwarf' but .*checkpoint.pt is missing"):
        load_audit_model(str(no_ckpt.parent), tmp_path / "dst")
    clip = tmp_path / "clip" / "artifacts"
    clip.mkdir(parents=True)
    (clip / "meta.json").write_text(json.dumps({"kind": "clip", "classes": CLASSES}))
    with pytest.raises(ValueError, match=r"is a clip pyfunc the audit cannot load; expected a cxr-classifier"):
        load_audit_model(str(clip.parent), tmp_path / "dst")


@pytest.mark.slow
def test_a_logged_dwarf_run_loads_by_uri(tmp_path, monkeypatch):
    """The real ``log_dwarf_model`` under a tracking store, loaded by ``runs:/`` URI (downloaded)."""
    import mlflow

    from mlflow_projects.common import setup_tracking
    from mlflow_projects.pyfunc_dwarf import log_dwarf_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    setup_tracking("test-dwarf")
    model = _tiny_dwarf()
    with mlflow.start_run():
        info = log_dwarf_model(model)
    view, meta = load_audit_model(info.model_uri, tmp_path / "dst")
    assert isinstance(view, DwarfClassifierView) and meta["kind"] == "dwarf"
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(view.maps(x), model(x).refined_maps, rtol=0, atol=1e-6)
