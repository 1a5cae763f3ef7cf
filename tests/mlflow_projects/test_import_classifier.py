"""import_classifier end to end, the way the README runs it: a TorchXRayVision DenseNet, a timm ViT-Tiny and a
torchvision ResNet50 state dict imported (python -m and mlflow run), audited on the phantom (the classes they
share with it; the others listed as not audited) and served over HTTP (/explain returns maps for each).
Offline: architectures built with no pretrained weights, state dicts in tmp files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_projects.mlflow_run import BIN, ROOT, client, mlflow_run, project_env, setup_store

pytestmark = pytest.mark.slow

SIZE = 64
XRV_KW = '{"growth_rate": 8, "block_config": [1, 1], "num_init_features": 8}'
PHANTOM = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax",
           "Consolidation"]


def _py(args, env, timeout=300):
    return subprocess.run([str(BIN / "python"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import timm
    import torch
    import torchvision
    import torchxrayvision as xrv

    tmp = tmp_path_factory.mktemp("byom")
    env = project_env(tmp)
    setup_store(env)
    proc = _py(["-m", "training.data", "phantom", "--out", str(tmp / "phantom"), "--n", "48", "--size", str(SIZE),
                "--seed", "0"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(weights=None, growth_rate=8, block_config=(1, 1), num_init_features=8).state_dict(),
               tmp / "xrv.pt")
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, in_chans=1,
                                 img_size=SIZE).state_dict(), tmp / "vit.pt")
    torch.save(torchvision.models.resnet50(weights=None, num_classes=3).state_dict(), tmp / "r50.pt")
    manifest = tmp / "phantom" / "manifest.parquet"
    versions = {}
    proc = _py(["-m", "mlflow_projects.import_classifier", "--source", "xrv:DenseNet", "--weights", str(tmp / "xrv.pt"),
                "--image-size", str(SIZE), "--model-kwargs", XRV_KW, "--calibrate-on", str(manifest)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported xrv:DenseNet; 18 classes; feature layer net.relu; head gap_linear; ONNX yes" in proc.stdout
    versions["xrv"] = "1"
    proc = _py(["-m", "mlflow_projects.import_classifier", "--source", "timm:vit_tiny_patch16_224", "--weights",
                str(tmp / "vit.pt"), "--classes", "Effusion,Nodule,Lung Lesion", "--image-size", str(SIZE),
                "--channels", "1", "--thresholds", "0.5,null,0.4"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "head other" in proc.stdout and "thresholds 2/3" in proc.stdout
    versions["vit"] = "2"
    proc = mlflow_run("import_classifier", {"source": "torchvision:resnet50", "weights": tmp / "r50.pt",
                                            "classes": "Cardiomegaly,Effusion,Mass", "image_size": SIZE}, env,
                      experiment="cxr-classifier")
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions["r50"] = "3"
    return tmp, env, manifest, versions


def test_registered_like_a_trained_classifier(store):
    tmp, env, _, versions = store
    c = client(env)
    xrv = c.get_model_version("cxr-classifier", versions["xrv"])
    tags = xrv.tags
    assert json.loads(tags["classes"])[:3] == ["Atelectasis", "Consolidation", "Infiltration"]
    assert len(json.loads(tags["thresholds"])) == 18 and json.loads(tags["min_val_positives"]) == 5
    assert json.loads(tags["input"])["scale"] == [-1024.0, 1024.0] and tags["head"] == "gap_linear"
    thresholds = dict(zip(json.loads(tags["classes"]), json.loads(tags["thresholds"])))
    assert thresholds["Lung Lesion"] is None  # no validation positives in the phantom: no threshold
    vit = c.get_model_version("cxr-classifier", versions["vit"]).tags
    assert json.loads(vit["thresholds"]) == [0.5, None, 0.4] and vit["head"] == "other"
    assert str(c.get_model_version_by_alias("cxr-classifier", "candidate").version) == versions["r50"]
    files = {f.path for f in c.list_artifacts(c.get_model_version("cxr-classifier", versions["r50"]).run_id, "onnx")}
    assert "onnx/model.onnx" in files


def test_bad_input_is_refused_before_anything_is_registered(store, tmp_path):
    import torch
    import torchvision

    tmp, env, _, _ = store
    before = len(client(env).search_model_versions("name = 'cxr-classifier'"))
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r18.pt")
    proc = _py(["-m", "mlflow_projects.import_classifier", "--source", "torchvision:resnet50", "--weights",
                str(tmp_path / "r18.pt"), "--classes", "Effusion,Nodule,Mass", "--image-size", str(SIZE)], env)
    assert proc.returncode == 2
    assert "does not fit the architecture: missing keys" in proc.stderr and "layer1.0.conv3.weight" in proc.stderr
    proc = _py(["-m", "mlflow_projects.import_classifier", "--source", "factory:no_such_pkg:build", "--classes",
                "Effusion"], env)
    assert proc.returncode == 2 and "cannot import factory module 'no_such_pkg'" in proc.stderr
    proc = _py(["-m", "mlflow_projects.import_classifier", "--source", "xrv:DenseNet", "--weights", str(tmp / "xrv.pt"),
                "--model-kwargs", XRV_KW, "--image-size", str(SIZE), "--classes", "Effusion,Nodule"], env)
    assert proc.returncode == 2 and "does not fit the architecture" in proc.stderr  # 18 outputs in the file, 2 names
    proc = _py(["-m", "mlflow_projects.import_classifier", "--source", "timm:resnet18", "--classes", "Effusion",
                "--channels", "4"], env)
    assert proc.returncode == 2 and "--channels" in proc.stderr
    assert len(client(env).search_model_versions("name = 'cxr-classifier'")) == before


@pytest.fixture(scope="module")
def audits(store):
    tmp, env, manifest, versions = store
    out = {}
    for key, version in versions.items():
        proc = _py(["-m", "mlflow_projects.audit", "--model-uri", f"models:/cxr-classifier/{version}", "--data",
                    str(manifest), "--clip", "scratch", "--split", "all", "--max-images", "32", "--n-bootstrap", "50",
                    "--sanity-images", "3", "--faithfulness-max-per-class", "4", "--out", str(tmp / f"audit-{key}")],
                   env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[key] = json.loads((tmp / f"audit-{key}" / "audit" / "summary.json").read_text())
    return out


def test_audited_on_the_shared_classes(audits):
    xrv, vit, r50 = audits["xrv"], audits["vit"], audits["r50"]
    assert set(xrv["model"]["classes"]) <= set(PHANTOM) and "Effusion" in xrv["model"]["classes"]
    assert "Lung Lesion" in xrv["model"]["not_audited"] and "Edema" in xrv["model"]["not_audited"]
    assert len(xrv["model"]["classes"]) + len(xrv["model"]["not_audited"]) == 18  # none dropped silently
    assert xrv["config"]["attention"] == "cam" and xrv["sections"]["concepts"]["status"] == "ok"
    assert vit["model"]["classes"] == ["Effusion", "Nodule"] and list(vit["model"]["not_audited"]) == ["Lung Lesion"]
    assert vit["config"]["attention"] == "gradcam" and vit["model"]["head"] == "other"
    assert vit["sections"]["importance"]["status"] == "skipped" and "Grad-CAM" in vit["sections"]["importance"]["reason"]
    for summary in (xrv, vit, r50):
        for section in ("performance", "localization", "faithfulness", "sanity", "ood"):
            assert summary["sections"][section]["status"] == "ok", (section, summary["sections"][section])
        assert [v["class"] for v in summary["verdicts"]] == summary["model"]["classes"]
    assert r50["model"]["classes"] == ["Cardiomegaly", "Effusion", "Mass"] and r50["config"]["attention"] == "cam"


def test_served_over_http_with_maps(store, audits, tmp_path):
    import httpx

    from tests.service.helpers import bentoml_serve, png_bytes

    tmp, env, _, versions = store
    for key, version in versions.items():
        senv = dict(env, CXR_MODEL_URI=f"models:/cxr-classifier/{version}", BENTOML_HOME=str(tmp_path / "bentoml"),
                    CXR_SERVE_CACHE=str(tmp_path / f"cache-{key}"), CXR_THREADS="1", BENTOML_DO_NOT_TRACK="True",
                    CXR_FEEDBACK_DIR=str(tmp_path / "feedback"), PYTHONPATH=str(ROOT))
        senv.pop("CXR_API_KEYS", None)
        with bentoml_serve(["service:CXRExplainer", "--host", "127.0.0.1"], ROOT, senv, tmp_path / f"{key}.log") as base:
            files = {"image": ("x.png", png_bytes(64, 64, seed=1), "image/png")}
            r = httpx.post(f"{base}/explain", files=files, data={"targets": "Effusion"}, timeout=120)
            assert r.status_code == 200, r.text[:2000]
            body = r.json()
            assert body["model"]["version"] == version
            heat = body["heatmaps"][0]
            assert heat["target"] == "Effusion" and heat["map_png"] and heat["overlay_png"]
            assert body["method"] == ("gradcam" if key == "vit" else "cam")
            if key == "vit":
                bad = httpx.post(f"{base}/explain", files=files, data={"method": "cam"}, timeout=60)
                assert bad.status_code == 400 and "gradcam" in bad.json()["error"]
                assert heat["top_units"] == []
            else:
                assert heat["top_units"]
