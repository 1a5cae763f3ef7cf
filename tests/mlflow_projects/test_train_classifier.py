"""train_classifier glue: parameter validation (exit 2 before training) and a real `mlflow run` (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlflow_projects.train_classifier import parse_args

ROOT = Path(__file__).resolve().parents[2]


def _manifest(tmp_path) -> Path:
    """A Parquet file (parsing checks the format, not the rows)."""
    import pandas as pd

    path = tmp_path / "m.parquet"
    pd.DataFrame({"image_id": ["a"]}).to_parquet(path)
    return path


def _exit_message(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_parameters_exit_2_with_clear_messages(capsys, tmp_path):
    manifest = _manifest(tmp_path)
    err = _exit_message(capsys, ["--data", str(manifest), "--arch", "vgg16"])
    assert "unknown arch 'vgg16'" in err and "densenet121" in err and "test_resnet" in err
    err = _exit_message(capsys, ["--data", str(manifest), "--epochs", "abc"])
    assert "--epochs" in err and "'abc'" in err
    err = _exit_message(capsys, ["--data", str(tmp_path / "missing" / "manifest.parquet")])
    assert "manifest not found" in err and str(tmp_path / "missing" / "manifest.parquet") in err
    err = _exit_message(capsys, ["--data", str(manifest), "--loss", "dice"])
    assert "valid: bce, cb_focal, focal, wbce" in err
    err = _exit_message(capsys, ["--data", str(manifest), "--pretrained", str(tmp_path / "w.pth")])
    assert "weights file not found" in err and "never downloaded" in err
    err = _exit_message(capsys, ["--data", str(manifest), "--task", "multiclass"])
    assert "valid: binary, multilabel" in err
    err = _exit_message(capsys, ["--data", str(manifest), "--image-size", "8"])
    assert "--image-size" in err and "expected an image size >= 16, got '8'" in err
    # a folder, or a file that is not Parquet, is refused with one line naming it
    err = _exit_message(capsys, ["--data", str(tmp_path)])
    assert f"manifest {tmp_path} is a folder" in err and "DIR/manifest.parquet" in err
    (tmp_path / "manifest.parquet").write_bytes(manifest.read_bytes())
    err = _exit_message(capsys, ["--data", str(tmp_path)])
    assert f"did you mean {tmp_path / 'manifest.parquet'}?" in err
    csv = tmp_path / "labels.csv"
    csv.write_text("image_id,labels\n")
    err = _exit_message(capsys, ["--data", str(csv)])
    assert f"manifest {csv} is not a Parquet file" in err and "Traceback" not in err


def test_parsed_config(tmp_path):
    manifest = _manifest(tmp_path)
    cfg = parse_args(["--data", str(manifest), "--arch", "t_densenet", "--loss", "cb_focal", "--epochs", "2",
                      "--image-size", "96", "--task", "binary", "--pretrained", ""])
    assert (cfg.arch, cfg.loss, cfg.epochs, cfg.image_size, cfg.task, cfg.pretrained) == \
        ("t_densenet", "cb_focal", 2, 96, "binary", None)
    assert cfg.data == str(manifest.resolve())
    assert cfg.min_val_positives == 5  # the library's default, training.metrics.MIN_VAL_POSITIVES
    assert parse_args(["--data", str(manifest), "--min-val-positives", "3"]).min_val_positives == 3


def test_min_val_positives_defaults_agree_and_bad_values_exit_2(capsys, tmp_path):
    from mlflow_projects.common import ClassifierRunConfig
    from training.metrics import MIN_VAL_POSITIVES
    from training.train import TrainConfig

    assert ClassifierRunConfig().min_val_positives == TrainConfig().min_val_positives == MIN_VAL_POSITIVES
    manifest = _manifest(tmp_path)
    for bad in ("0", "-2", "many"):
        err = _exit_message(capsys, ["--data", str(manifest), "--min-val-positives", bad])
        assert "--min-val-positives" in err and f"'{bad}'" in err


def test_thresholds_tag_is_json_with_null_for_a_class_without_threshold():
    """DESIGN.md: the version tag ``thresholds`` is JSON with ``null`` for a class without enough validation
    positives (NaN in memory), never the invalid ``NaN``; the meta.json of the pyfunc says the same."""
    from mlflow_projects.common import to_tag
    from mlflow_projects.pyfunc_classifier import model_meta
    from training.models import create_model

    text = to_tag([0.25, float("nan"), 0.5])
    assert text == "[0.25, null, 0.5]" and json.loads(text) == [0.25, None, 0.5]
    assert json.loads(to_tag({"a": float("inf"), "b": [1, float("nan")]})) == {"a": None, "b": [1, None]}
    assert to_tag("text") == "text"
    model = create_model("test_resnet", classes=["Effusion", "Hernia"])
    model.thresholds, model.threshold_positives, model.min_val_positives = [0.3, float("nan")], [9, 1], 5
    meta = model_meta(model)
    assert meta["thresholds"] == [0.3, None] and meta["threshold_positives"] == [9, 1]
    assert meta["min_val_positives"] == 5
    json.dumps(meta, allow_nan=False)
    old = model_meta(create_model("test_resnet", classes=["Effusion"]))  # nothing recorded: null, not invented
    assert old["threshold_positives"] is None and old["min_val_positives"] is None


@pytest.mark.slow
def test_mlflow_run_registers_candidate_that_loads_and_agrees_with_onnx(tiny_phantom, tmp_path, monkeypatch):
    import mlflow
    import torch
    from mlflow import MlflowClient

    from mlflow_projects.common import setup_tracking

    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CXR_ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    for k, v in store.items():
        monkeypatch.setenv(k, v)
    setup_tracking("cxr-classifier")  # the experiment (with its artifact root in tmp) before `mlflow run`
    # MLproject commands call `python`: the venv's must come first on PATH
    env = {**os.environ, **store, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):  # set_experiment exports the id
        env.pop(key, None)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "train_classifier",
           "--env-manager", "local", "--experiment-name", "cxr-classifier",
           "-P", f"data={tiny_phantom}", "-P", "arch=test_resnet", "-P", "epochs=1", "-P", "image_size=32",
           "-P", "batch_size=16", "-P", "loss=focal"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    mlflow.set_tracking_uri(store["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    mv = client.get_model_version_by_alias("cxr-classifier", "candidate")
    assert str(mv.version) == "1"
    classes = json.loads(mv.tags["classes"])
    thresholds = json.loads(mv.tags["thresholds"])
    positives = json.loads(mv.tags["threshold_positives"])
    spec = json.loads(mv.tags["input"])
    assert len(classes) >= 2 and len(thresholds) == len(positives) == len(classes)
    # a class with fewer than 5 validation positives (the default) has no threshold: null, not a number
    assert [t is None for t in thresholds] == [n < 5 for n in positives] and mv.tags["min_val_positives"] == "5"
    assert all(0 <= t <= 1 for t in thresholds if t is not None)
    assert spec["size"] == 32 and spec["channels"] == 1 and len(spec["mean"]) == 1 and len(spec["std"]) == 1
    assert mv.tags["arch"] == "test_resnet" and mv.tags["loss"] == "focal"

    run = client.get_run(mv.run_id)
    assert run.data.params["arch"] == "test_resnet" and run.data.params["epochs"] == "1"
    assert {"train_loss", "val_loss", "lr"} <= set(run.data.metrics)
    assert any(k.startswith("val_auroc") for k in run.data.metrics)
    arts = {a.path for d in ("", "plots", "metrics", "data", "onnx") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/val_roc.png", "metrics/val_metrics.csv", "data/class_distribution.csv", "onnx/model.onnx",
            "config.json"} <= arts

    model = mlflow.pyfunc.load_model("models:/cxr-classifier@candidate")
    images = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    probs = model.predict(images)
    assert probs.shape == (3, len(classes)) and ((probs >= 0) & (probs <= 1)).all()
    onnx_out = model.predict(images, params={"backend": "onnx", "return_features": True})
    np.testing.assert_allclose(onnx_out["probabilities"], probs, atol=1e-5)
    net = model.unwrap_python_model().model
    with torch.no_grad():
        feats = net.forward_features(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(onnx_out["features"], feats, atol=1e-4)
    meta = model.unwrap_python_model().meta
    assert meta["classes"] == classes and meta["thresholds"] == thresholds and meta["head"] == "gap_linear"
    assert meta["threshold_positives"] == positives and meta["min_val_positives"] == 5
    assert net.threshold_positives == positives and net.min_val_positives == 5  # the checkpoint too
    assert meta["feature_layer"] == "features.layer4"
