"""promote: gates parsing and evaluation; against a real store, refuses a failing version (alias untouched,
failed gates listed, exit 1) and accepts a passing one (alias moved, description = audit summary)."""
from __future__ import annotations


import pytest

from mlflow_projects import promote
from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking, write_gates


def _fake_audit(version: str, tmp_path, auroc: float) -> str:
    """Log an audit run holding a hand-made summary.json and tag the version as the audit entry point does."""
    import mlflow
    from mlflow import MlflowClient

    summary = {"model": {"name": "cxr-classifier", "version": version}, "status": "passed",
               "metrics": {"auroc_mean": auroc, "iobb_mean": 0.3}, "gates": {"results": []}}
    with mlflow.start_run() as run:
        mlflow.log_dict(summary, "audit/summary.json")
    MlflowClient().set_model_version_tag("cxr-classifier", version, "audit.run_id", run.info.run_id)
    return run.info.run_id


@pytest.mark.slow
def test_promote_refuses_failing_and_accepts_passing(tmp_path, caplog):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.7, iobb_mean=0.2)
    with tracking(tmp_path):
        v1 = register_tiny_classifier(tmp_path, seed=0)
        # no audit yet: refused
        assert promote.main(["--name", "cxr-classifier", "--version", v1, "--gates", str(gates)]) == 1
        _fake_audit(v1, tmp_path, auroc=0.55)
        assert promote.main(["--name", "cxr-classifier", "--version", v1, "--gates", str(gates)]) == 1
        assert "auroc_mean = 0.55 (required >= 0.7) -> failed" in caplog.text
        client = MlflowClient()
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias("cxr-classifier", "champion")
        assert "refused" in client.get_model_version("cxr-classifier", v1).description

        v2 = register_tiny_classifier(tmp_path, seed=1)
        run_id = _fake_audit(v2, tmp_path, auroc=0.81)
        assert promote.main(["--name", "cxr-classifier", "--gates", str(gates)]) == 0  # @candidate = v2
        assert str(client.get_model_version_by_alias("cxr-classifier", "champion").version) == v2
        desc = client.get_model_version("cxr-classifier", v2).description
        assert desc.startswith("Audit passed") and run_id in desc and "AUROC 0.810" in desc


@pytest.mark.slow
def test_promote_as_the_readme_runs_it_and_bad_input_is_one_line(tmp_path):
    """`mlflow run . -e promote` promotes an audited version; unknown names/versions and `--version abc`
    exit 2 with one line listing the valid values (no traceback)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.7)
    with tracking(tmp_path) as uri:
        v1 = register_tiny_classifier(tmp_path, seed=0)
        _fake_audit(v1, tmp_path, auroc=0.9)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*args, mlflow_run=False):
        cmd = ([str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "promote", "--env-manager", "local",
                *args] if mlflow_run else [sys.executable, "-m", "mlflow_projects.promote", *args])
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    done = run("-P", "name=cxr-classifier", "-P", f"version={v1}", "-P", f"gates={gates}", mlflow_run=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with tracking(tmp_path, uri):
        assert str(MlflowClient().get_model_version_by_alias("cxr-classifier", "champion").version) == v1
    for args, expect in ((["--name", "nope"], "cxr-classifier"), (["--version", "7"], v1),
                         (["--version", "abc!"], "positive integer")):
        bad = run(*args, "--gates", str(gates))
        assert bad.returncode == 2, (args, bad.stderr)
        assert "Traceback" not in bad.stderr and expect in bad.stderr, bad.stderr


@pytest.mark.slow
def test_a_dwarf_version_is_audited_and_promoted_by_the_same_gates(tmp_path, tiny_phantom):
    """A registered cxr-dwarf version (the real pyfunc) is audited through the entry point, gets its verdict tags
    and is promoted to @champion by `promote --name cxr-dwarf`, so `CXR_MODEL_URI=models:/cxr-dwarf@champion`
    is reachable."""
    import json

    import mlflow
    import torch
    from mlflow import MlflowClient

    from mlflow_projects import audit
    from mlflow_projects.common import register_version, setup_tracking
    from mlflow_projects.pyfunc_dwarf import log_dwarf_model, model_meta
    from tests.training.dwarf_helpers import CLASSES, tiny_bundle
    from training.dwarf.model import build_dwarf

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.0)
    with tracking(tmp_path):
        torch.manual_seed(0)
        model = build_dwarf(tiny_bundle(), CLASSES, d_model=32, heads=2).eval()
        setup_tracking("cxr-dwarf")
        with mlflow.start_run(run_name="tiny-dwarf"):
            info = log_dwarf_model(model)
        mv = register_version(info.model_uri, "cxr-dwarf", model_meta(model))
        argv = ["--model-uri", "models:/cxr-dwarf@candidate", "--data", str(tiny_phantom), "--split", "all",
                "--clip", "scratch", "--gates", str(gates), "--max-images", "16", "--sanity-images", "4",
                "--faithfulness-steps", "4", "--n-bootstrap", "200", "--out", str(tmp_path / "a")]
        assert audit.main(argv) == 0
        summary = json.loads((tmp_path / "a" / "audit" / "summary.json").read_text())
        assert summary["model"]["kind"] == "dwarf" and [v["class"] for v in summary["verdicts"]] == CLASSES
        client = MlflowClient()
        tags = client.get_model_version("cxr-dwarf", mv.version).tags
        assert tags["audit.status"] == "passed" and json.loads(tags["audit.unfit_classes"]) == summary["unfit_classes"]
        assert promote.main(["--name", "cxr-dwarf", "--gates", str(gates)]) == 0
        assert str(client.get_model_version_by_alias("cxr-dwarf", "champion").version) == str(mv.version)
