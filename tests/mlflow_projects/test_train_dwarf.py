"""DWARF glue: argument validation, the pyfunc contract, and the real entry points (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlflow_projects.train_dwarf import parse_args

ROOT = Path(__file__).resolve().parents[2]


def _store(tmp_path, monkeypatch=None) -> dict:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CXR_ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    if monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    return env


def test_arguments_are_validated(capsys, tmp_path):
    cfg = parse_args(["--epochs", "2", "--lam", "0.3", "--classes", "Nodule, Mass", "--feedback", ""])
    assert cfg.epochs == 2 and cfg.lam == 0.3 and cfg.classes == ["Nodule", "Mass"] and cfg.feedback is None
    assert cfg.clip == "scratch"  # the untrained ViT is the default by name, never a silent fallback
    assert parse_args(["--feedback", str(tmp_path)]).feedback == str(tmp_path)
    assert cfg.min_val_positives == 5 and parse_args(["--min-val-positives", "2"]).min_val_positives == 2
    for bad, needle in ((["--epochs", "0"], "positive integer"), (["--lam", "1.5"], "[0, 1]"),
                        (["--min-val-positives", "0"], "--min-val-positives"),
                        (["--image-size", "x"], "'x'"), (["--image-size", "7"], "image size >= 16, got '7'"),
                        (["--feedback", str(tmp_path / "nope")], f"folder not found: {tmp_path / 'nope'}"),
                        (["--data", str(tmp_path)], "is a folder")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def _cli(args, env, timeout=300):
    """``python -m mlflow_projects.train_dwarf ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mlflow_projects.train_dwarf", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_unknown_classes_and_unloadable_clip_are_refused_in_one_line(tiny_phantom, tmp_path):
    """`--classes Covid` used to train on nothing and succeed; a mistyped or unregistered --clip used to fall back
    to an untrained CLIP. Both now stop before any training, exit 2, one line, the valid values listed."""
    from mlflow_projects.train_dwarf import check_classes, manifest_classes

    valid = manifest_classes(tiny_phantom)
    assert "Effusion" in valid and "Covid" not in valid
    check_classes(["Effusion"], tiny_phantom)
    with pytest.raises(ValueError, match=r"unknown class 'Covid' for --classes; valid .*Effusion"):
        check_classes(["Effusion", "Covid"], tiny_phantom)
    env = _store(tmp_path)
    proc = _cli(["--data", str(tiny_phantom), "--classes", "Covid", "--epochs", "1", "--image-size", "32"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train_dwarf: error: unknown class 'Covid'")
    assert "Effusion" in proc.stderr.strip().splitlines()[-1]
    proc = _cli(["--data", str(tiny_phantom), "--clip", "models:/cxr-clip@candidate", "--image-size", "32"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train_dwarf: error: no registered model 'cxr-clip'" in proc.stderr
    proc = _cli(["--data", str(tiny_phantom), "--clip", "cxr-tiny-vt", "--image-size", "32"], env)
    assert proc.returncode == 2 and "cannot load CLIP 'cxr-tiny-vt'" in proc.stderr and "scratch" in proc.stderr


@pytest.mark.slow
def test_pyfunc_returns_probabilities_and_refined_maps(tmp_path, monkeypatch):
    import mlflow
    import torch

    from mlflow_projects.common import setup_tracking
    from mlflow_projects.pyfunc_dwarf import log_dwarf_model
    from tests.training.dwarf_helpers import CLASSES, tiny_bundle
    from training.dwarf.model import build_dwarf

    _store(tmp_path, monkeypatch)
    setup_tracking("test-dwarf")
    model = build_dwarf(tiny_bundle(), CLASSES, d_model=32, heads=2).eval()
    torch.nn.init.normal_(model.experts.conv2.weight, std=0.05)
    with mlflow.start_run():
        info = log_dwarf_model(model)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    images = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out = loaded.predict(images, params={"return_raw": True, "batch_size": 2})
    assert out["probabilities"].shape == (3, 3) and out["maps"].shape == (3, 3, 32, 32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images))
    np.testing.assert_allclose(out["probabilities"], ref.logits.sigmoid().numpy(), atol=1e-5)
    np.testing.assert_allclose(out["maps"], ref.refined_maps.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["raw_maps"], ref.raw_maps.numpy(), atol=1e-5)
    meta = loaded.unwrap_python_model().meta
    assert meta["classes"] == CLASSES and meta["input"]["channels"] == 1
    from mlflow.exceptions import MlflowException

    other = loaded.predict(np.zeros((1, 1, 48, 48), dtype=np.float32))  # any S x S: resized inside
    assert other["maps"].shape == (1, 3, 48, 48)
    with pytest.raises((ValueError, MlflowException), match=r"-1, 1, -1, -1|\(B, 1, S, S\)"):  # signature or pyfunc
        loaded.predict(np.zeros((2, 3, 32, 32), dtype=np.float32))


def test_load_splits_phantom_masks_and_service_feedback(tmp_path):
    """The phantom's mask files are the masks; records the service's FeedbackStore writes join training."""
    from mlflow_projects.serving.feedback import FeedbackStore
    from training.data.imageio import read_image
    from training.data.phantom import generate_phantom
    from training.data.schema import read_manifest
    from training.dwarf.data import load_splits
    from training.dwarf.supervision import sha256_file

    manifest = generate_phantom(tmp_path / "ph", n=24, size=64, seed=3, masks=True, workers=1)
    df = read_manifest(manifest)
    train, val, test, classes = load_splits(manifest, 32, classes=["Effusion", "Nodule", "Mass"])
    assert classes == ["Effusion", "Nodule", "Mass"] and len(train) + len(val) + len(test) == 24
    assert train.images.shape[1:] == (1, 32, 32) and train.masks.shape[1:] == (3, 32, 32)
    # every positive finding has a non-empty mask (from its mask file)
    pos = train.labels > 0
    assert pos.any() and bool((train.masks.flatten(2).sum(-1)[pos] > 0).all())
    # feedback: one record with the image stored by the service, one found by the manifest file's hash
    store = FeedbackStore(tmp_path / "feedback")
    first, second = df["path"].iloc[0], df["path"].iloc[1]
    store.append(image_sha256="cd" * 32, finding="Nodule", boxes=[[0, 0, 32, 32]], image=read_image(first))
    store.append(image_sha256=sha256_file(second), finding="Mass", boxes=[[32, 32, 32, 32]])
    store.append(image_sha256="ef" * 32, finding="Hernia", boxes=[[1, 1, 4, 4]], image=read_image(first))
    fb_train, *_ = load_splits(manifest, 32, classes=classes, feedback=str(tmp_path / "feedback"))
    assert len(fb_train) == len(train) + 3 - 1  # the Hernia record is not among the classes: skipped
    extra = slice(len(train), None)
    assert fb_train.labels[extra].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert fb_train.cls_valid[extra].tolist() == [[0, 1, 0], [0, 0, 1]]  # says nothing about the rest
    assert fb_train.masks[len(train), 1, :16, :16].all() and fb_train.masks[len(train) + 1, 2, 16:, 16:].all()


@pytest.mark.slow
def test_mlflow_run_train_dwarf_registers_candidate(tmp_path):
    """As the README runs it, with clinician feedback: the records join training, the table is printed."""
    from mlflow_projects.serving.feedback import FeedbackStore
    from tests.mlflow_projects.mlflow_run import artifacts_under_root, mlflow_run, project_env, setup_store
    from training.data.imageio import read_image
    from training.data.phantom import generate_phantom
    from training.data.schema import read_manifest

    manifest = generate_phantom(tmp_path / "phantom", n=48, size=64, seed=0, masks=True, workers=1)
    feedback = FeedbackStore(tmp_path / "feedback")
    feedback.append(image_sha256="cd" * 32, finding="Effusion", boxes=[[0, 0, 32, 32]],
                    image=read_image(read_manifest(manifest)["path"].iloc[0]))
    env = project_env(tmp_path)
    setup_store(env)
    proc = mlflow_run("train_dwarf", {"data": manifest, "epochs": 1, "image_size": 32,
                                      "feedback": tmp_path / "feedback"}, env, "cxr-dwarf")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "adding 1 feedback images" in proc.stderr
    assert "cxr-dwarf version 1 (@candidate), CLIP scratch:cxr-tiny-vit (untrained)" in proc.stdout
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    mv = client.get_model_version_by_alias("cxr-dwarf", "candidate")
    classes = json.loads(mv.tags["classes"])
    thresholds, positives = json.loads(mv.tags["thresholds"]), json.loads(mv.tags["threshold_positives"])
    assert len(classes) >= 1 and len(thresholds) == len(positives) == len(classes)
    assert mv.tags["min_val_positives"] == "5"
    # a disease with fewer than 5 validation positives has no threshold (null), the others one in [0, 1]
    assert [t is None for t in thresholds] == [n < 5 for n in positives]
    assert all(0 <= t <= 1 for t in thresholds if t is not None)
    assert json.loads(mv.tags["input"])["channels"] == 1 and mv.tags["kind"] == "dwarf"
    assert mv.tags["clip"] == "scratch:cxr-tiny-vit (untrained)"  # the default, by name
    run = client.get_run(mv.run_id)
    assert artifacts_under_root(run, env) and run.data.params["feedback"] == str(tmp_path / "feedback")
    assert {"auc_mean", "max_dice_mean"} <= set(run.data.metrics)
    # F1 / MCC need a threshold: their means are logged when at least one disease has one
    assert ({"f1_mean", "mcc_mean"} <= set(run.data.metrics)) == any(t is not None for t in thresholds)
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "gallery")]
    assert arts and all(a.endswith(".png") for a in arts)
    model = mlflow.pyfunc.load_model("models:/cxr-dwarf@candidate")
    meta = model.unwrap_python_model().meta
    assert meta["thresholds"] == thresholds and meta["threshold_positives"] == positives
    out = model.predict(np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32))
    assert out["probabilities"].shape == (2, len(classes)) and out["maps"].shape == (2, len(classes), 32, 32)


