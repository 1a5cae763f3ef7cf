"""train_clip entry point: argument validation, pyfunc round trip, and a real `mlflow run` (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _store(tmp_path: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CXR_ARTIFACT_ROOT": str(tmp_path / "artifacts")}


def test_parse_args_validates_and_lists_valid_values(capsys, tmp_path):
    import pandas as pd

    from mlflow_projects.train_clip import parse_args

    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"image_id": ["a"]}).to_parquet(manifest)
    cfg = parse_args(["--data", str(manifest), "--epochs", "2", "--image-size", "32", "--seed", "3"])
    assert (cfg.model, cfg.epochs, cfg.image_size, cfg.seed, cfg.registered_name) == ("cxr-minilm-rn", 2, 32, 3, "cxr-clip")
    for bad, needle in ((["--epochs", "0"], "positive integer"), (["--model", "nope"], "cxr-tiny-vit"),
                        (["--zero-shot", "magic"], "contrast, similarity"), (["--batch-size", "1"], ">= 2 pairs"),
                        (["--pretrained", "/no/such.pt"], "file not found"), (["--image-size", "4"], ">= 8"),
                        (["--data", str(tmp_path / "nope.parquet")], "manifest not found")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert needle in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["cxr-tiny-vit", "cxr-minilm-vit", "cxr-minilm-convvit", "cxr-minilm-rn"])
def test_pyfunc_round_trip_and_load_registered_clip(tmp_path, monkeypatch, model_name):
    import mlflow

    from mlflow_projects.common import register_version, setup_tracking
    from mlflow_projects.pyfunc_clip import clip_meta, load_registered_clip, log_clip_model
    from training.clip import load_clip

    for k, v in _store(tmp_path).items():
        monkeypatch.setenv(k, v)
    setup_tracking("cxr-clip-test")
    torch.manual_seed(0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cxr-minilm-vit's text tower comes from an installed package
    bundle = load_clip(model_name, image_size=32)
    meta = clip_meta(bundle, ["Nodule", "Effusion"], model_name, "A chest x-ray image of a {}")
    with mlflow.start_run():
        info = log_clip_model(bundle, meta)
    mv = register_version(info.model_uri, "cxr-clip-test", {"classes": meta["classes"], "kind": "clip"})
    loaded = load_registered_clip("models:/cxr-clip-test@candidate")
    assert loaded.spec == "models:/cxr-clip-test@candidate" and loaded.image_size == 32
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(loaded.preprocess(x)),
                                   bundle.model.encode_image(bundle.preprocess(x)), rtol=0, atol=0)
        prompts = ["A chest x-ray image of a nodule", "no effusion"]
        torch.testing.assert_close(loaded.model.encode_text(loaded.tokenizer(prompts)),
                                   bundle.model.encode_text(bundle.tokenizer(prompts)), rtol=0, atol=1e-6)
    model = mlflow.pyfunc.load_model(f"models:/cxr-clip-test/{mv.version}")
    img = model.predict(x.numpy())
    txt = model.predict(["no effusion", "a nodule"])
    assert img.shape == (2, 128) and txt.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        load_registered_clip("models:/cxr-clip-test@champion")


@pytest.mark.slow
def test_mlflow_run_train_clip_registers_candidate(tmp_path, tiny_phantom, monkeypatch):
    env = {**os.environ, **_store(tmp_path), "HF_HUB_OFFLINE": "1",
           # MLproject runs `python -m ...`: the interpreter of this virtualenv must come first on PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    from mlflow_projects.common import setup_tracking

    for k, v in _store(tmp_path).items():  # the experiment (and its artifact root) live in tmp_path
        monkeypatch.setenv(k, v)
    setup_tracking("cxr-clip")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "train_clip", "--env-manager", "local",
           "--experiment-name", "cxr-clip", "-P", f"data={tiny_phantom}", "-P", "epochs=1", "-P", "image_size=64", "-P", "seed=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import mlflow
    from mlflow import MlflowClient

    from mlflow_projects.pyfunc_clip import load_registered_clip
    from training.data.schema import PHANTOM_CLASSES

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    mv = client.get_model_version_by_alias("cxr-clip", "candidate")
    assert mv.tags["kind"] == "clip" and mv.tags["open_clip_config"] == "cxr-minilm-rn"
    assert json.loads(mv.tags["classes"]) == list(PHANTOM_CLASSES)
    spec = json.loads(mv.tags["input"])
    assert spec["size"] == 64 and spec["channels"] == 1 and len(spec["mean"]) == 3
    run = client.get_run(mv.run_id)
    metrics = run.data.metrics
    assert {"loss", "val.i2t_recall_at_1", "val.i2t_recall_at_5", "val.t2i_recall_at_5", "val.zs_auroc_mean",
            "test.i2t_recall_at_5"} <= set(metrics)
    assert any(k.startswith("val.zs_auroc.") for k in metrics)
    assert 0.0 <= metrics["val.i2t_recall_at_5"] <= 1.0 and np.isfinite(metrics["loss"])
    assert run.data.params["model"] == "cxr-minilm-rn" and run.data.params["epochs"] == "1"
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())

    bundle = load_registered_clip("models:/cxr-clip@candidate")
    from interpret.vlm import VLMAdapter

    vlm = VLMAdapter(bundle, batch_size=8, progress=False)
    z = vlm.encode_images(torch.rand(3, 1, 64, 64))
    t = vlm.encode_texts(["A chest x-ray image of a nodule", "no effusion"])
    assert z.shape == (3, 128) and t.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
