"""Where the audit runs torch (``AuditConfig.device``, ``--device``, ``-P device=``), what it records about it,
and the audit's final-layer cosine named ``cos_vlm`` (old summaries' ``cos_clip`` read as ``cos_vlm``).

The machine that runs the suite may have no GPU: the CUDA comparison skips there, with the reason."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from interpret.audit import AuditConfig, run_audit
from interpret.devices import DEVICE_ENV, resolve_torch_device
from tests.mlflow_projects.mlflow_run import ROOT, mlflow_run, project_env, setup_store

CUDA = torch.cuda.is_available()
VOLATILE = ("created", "timings")  # differ between any two runs


def _tiny_cfg(manifest, **kw) -> AuditConfig:
    return AuditConfig(split="all", max_images=12, gallery_n=1, data=str(manifest), sanity_images=2,
                       faithfulness_steps=3, faithfulness_max_per_class=3, n_bootstrap=50, **kw)


def _model():
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    torch.manual_seed(0)
    return create_model("test_resnet", classes=list(PHANTOM_CLASSES), image_size=64).eval()


def _comparable(summary: dict) -> dict:
    s = {k: v for k, v in summary.items() if k not in VOLATILE + ("device",)}
    s["config"] = {k: v for k, v in s["config"].items() if k not in ("device", "out")}
    return s


@pytest.fixture(scope="module")
def two_cpu_audits(tiny_phantom, tmp_path_factory):
    """The same tiny audit with ``device="cpu"`` and with the default (``auto``, no override), log captured."""
    import os

    saved = os.environ.pop(DEVICE_ENV, None)
    handler_records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_records.append(record)

    h = Keep(level=logging.INFO)
    eng = logging.getLogger("interpret.audit.engine")
    old_level = eng.level
    eng.setLevel(logging.INFO)
    eng.addHandler(h)
    try:
        out = {}
        for name, kw in (("cpu", {"device": "cpu"}), ("default", {})):
            folder = tmp_path_factory.mktemp(f"audit-{name}")
            out[name] = (run_audit(_tiny_cfg(tiny_phantom, **kw), _model(), tiny_phantom, folder,
                                   model_info={"uri": "constructed"}, clip=None), folder)
    finally:
        eng.removeHandler(h)
        eng.setLevel(old_level)
        if saved is not None:
            os.environ[DEVICE_ENV] = saved
    return out, [r.getMessage() for r in handler_records]


def test_explicit_cpu_gives_the_default_audit(two_cpu_audits):
    if CUDA:
        pytest.skip("auto picks CUDA on this machine: test_audit_on_cuda_matches_the_cpu compares the two")
    (cpu, _), (default, _) = two_cpu_audits[0]["cpu"], two_cpu_audits[0]["default"]
    assert _comparable(cpu) == _comparable(default)
    assert cpu["sections"]["faithfulness"]["status"] == "ok" and cpu["sections"]["sanity"]["status"] == "ok"


def test_the_device_is_logged_once_and_recorded(two_cpu_audits):
    audits, messages = two_cpu_audits
    (cpu, cpu_dir), (default, _) = audits["cpu"], audits["default"]
    assert cpu["device"] == {"device": "cpu", "name": None, "requested": "cpu", "chosen_by": "the configuration"}
    assert default["device"]["requested"] == "auto" and default["device"]["chosen_by"].startswith("auto")
    assert default["device"]["device"] == ("cuda:0" if CUDA else "cpu")
    assert json.loads((cpu_dir / "summary.json").read_text())["device"] == cpu["device"]
    assert cpu["config"]["device"] == "cpu" and default["config"]["device"] == "auto"
    lines = [m for m in messages if m.startswith("audit runs torch on ")]
    assert len(lines) == 2, messages  # one per audit
    assert lines[0].startswith("audit runs torch on cpu (the model; the configuration)")
    assert "torch on cpu" in (cpu_dir / "report.html").read_text()


def test_unknown_device_fails_with_the_valid_forms(tiny_phantom, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"):
        run_audit(AuditConfig(device="tpu", data=str(tiny_phantom)), _model(), tiny_phantom, tmp_path / "x",
                  model_info={})
    assert not (tmp_path / "x").exists()  # refused before anything is written
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match=f"unknown {DEVICE_ENV} value 'gpu0'; valid: auto, cpu"):
        resolve_torch_device("auto")
    monkeypatch.setenv(DEVICE_ENV, "cpu")  # the service's override, honoured by auto only
    assert resolve_torch_device("auto") == torch.device("cpu")
    if not CUDA:
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_torch_device("cuda:1")


def test_cli_and_mlproject_refuse_an_unknown_device(tmp_path):
    env = project_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mlflow_projects.audit", "--device", "tpu"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert err == ["audit: error: argument --device: unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N "
                   "(N = a CUDA device index) (see --help)"], proc.stderr
    setup_store(env)  # the run's store and artifacts in tmp_path, as the README's first step
    run = mlflow_run("audit", {"device": "tpu", "data": "missing.parquet"}, env)
    assert run.returncode != 0 and "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N" in run.stderr


def _close(a, b, path="", atol=2e-3):
    """Nested summaries equal up to ``atol`` on floats (discrete figures compared as numbers too)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", atol)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif(not CUDA, reason="no CUDA device here (torch.cuda.is_available() is False); the audit's CUDA "
                                     "path is exercised only on a machine with a GPU")
def test_audit_on_cuda_matches_the_cpu(tiny_phantom, tmp_path):
    cpu = run_audit(_tiny_cfg(tiny_phantom, device="cpu", sanity_images=0), _model(), tiny_phantom, tmp_path / "cpu",
                    model_info={"uri": "constructed"}, clip=None)
    model = _model()
    gpu = run_audit(_tiny_cfg(tiny_phantom, device="cuda", sanity_images=0), model, tiny_phantom, tmp_path / "cuda",
                    model_info={"uri": "constructed"}, clip=None)
    assert gpu["device"]["device"].startswith("cuda:") and next(model.parameters()).is_cuda
    for key in ("performance", "faithfulness", "importance", "ood"):
        _close(cpu[key], gpu[key], key)
    # soft scores only: the pointing game's argmax may break a near-tie differently on another device
    soft = [[{k: r.get(k) for k in ("class", "iobb", "ior")} for r in s["localization"]["per_class"]]
            for s in (cpu, gpu)]
    _close(soft[0], soft[1], "localization")


def test_old_cos_clip_is_read_as_cos_vlm(tmp_path):
    """Audits before the rename stored the annotating VLM's own cosine as cos_clip: read as cos_vlm."""
    from interpret.audit import build_report, compare_summaries
    from interpret.audit.diff import upgrade_summary

    ci = {"estimate": 0.4, "low": 0.3, "high": 0.5, "n": 3}
    old = {"model": {"name": "m", "version": "1"}, "status": "passed",
           "evaluation": {"hit_rate": 0.5, "cos_clip": 0.41, "cos_clip_se": 0.02, "cos_minilm": 0.3},
           "metrics": {"auroc_mean": 0.7, "final_layer.cos_clip": 0.41, "final_layer.cos_clip_se": 0.02},
           "concepts": {"final_layer_comparison": {"methods": {"mammi": {"figures": {"f1": ci, "cos_clip": ci}}},
                                                   "difference": {"cos_clip": ci}}}}
    new = upgrade_summary(old)
    assert new["evaluation"] == {"hit_rate": 0.5, "cos_vlm": 0.41, "cos_vlm_se": 0.02, "cos_minilm": 0.3}
    assert new["metrics"] == {"auroc_mean": 0.7, "final_layer.cos_vlm": 0.41, "final_layer.cos_vlm_se": 0.02}
    comp = new["concepts"]["final_layer_comparison"]
    assert set(comp["methods"]["mammi"]["figures"]) == {"f1", "cos_vlm"} and set(comp["difference"]) == {"cos_vlm"}
    assert "cos_clip" in old["evaluation"]  # a copy: the summary read is left as it was
    assert upgrade_summary(new) == new
    html = build_report(old, tmp_path)
    assert "cos_vlm" in html and "scoring its own labels (circular" in html and ">cos_clip<" not in html
    assert compare_summaries(old, new)["metrics"][0] == {"metric": "auroc_mean", "a": 0.7, "b": 0.7, "delta": 0.0}
