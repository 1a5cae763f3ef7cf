"""Audit entry point (glue): a full audit of a tiny registered model in a temporary MLflow store (every
artifact and tag), resume after a tracking outage, the README's command in a subprocess, and bad input
refused with one line before anything is downloaded or written. The sections themselves are tested in
tests/interpret/audit."""
from __future__ import annotations

import json
import socket

import pytest

from mlflow_projects import audit
from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking, write_gates

ARTIFACTS = ["summary.json", "concepts.parquet", "neuron_importance.parquet", "localization.parquet",
             "faithfulness.parquet", "sanity.parquet", "explanations.parquet", "dissection.json", "report.html"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_audit_logs_every_artifact_and_tag_then_resume_after_outage(tmp_path, tiny_phantom, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.0)
    with tracking(tmp_path) as uri:
        version = register_tiny_classifier(tmp_path)
        argv = ["--model-uri", "models:/cxr-classifier@candidate", "--data", str(tiny_phantom), "--split", "all",
                "--clip", "scratch", "--gates", str(gates), "--max-images", "24", "--gallery-n", "1"]
        assert audit.main(argv + ["--out", str(tmp_path / "a1")]) == 0
        client = MlflowClient()
        mv = client.get_model_version("cxr-classifier", version)
        run_id = mv.tags["audit.run_id"]
        assert mv.tags["audit.status"] == "passed" and "Audit passed" in mv.tags["audit.summary"]
        run = client.get_run(run_id)
        assert run.data.tags["model.name"] == "cxr-classifier" and run.data.tags["model.version"] == version
        assert "auroc_mean" in run.data.metrics
        logged = {f.path for f in client.list_artifacts(run_id, "audit")}
        assert {f"audit/{a}" for a in ARTIFACTS} <= logged and "audit/heatmaps" in logged
        assert client.list_artifacts(run_id, "audit/heatmaps")
        summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/audit/summary.json")
        assert set(summary["sections"]) == {"performance", "localization", "faithfulness", "sanity", "dissection",
                                            "concepts", "importance", "shortcuts", "ood"}
        # per-class verdicts: one per class, tagged on the version, and opening the report
        assert [v["class"] for v in summary["verdicts"]] == summary["model"]["classes"]
        assert json.loads(mv.tags["audit.unfit_classes"]) == summary["unfit_classes"]
        assert all(v["verdict"] in ("fit", "unfit") and (v["verdict"] == "fit") == (not v["reasons"])
                   for v in summary["verdicts"])
        assert summary["performance"][0]["auroc_ci"]["n_resamples"] == 1000
        assert summary["model"]["version"] == version and summary["data"]["n_images"] == 24
        # pointing game within Zhang et al.'s tolerance scaled to the probe, reported with its chance level
        loc = summary["localization"]
        assert loc["pointing_tolerance_px"] == pytest.approx(15 * summary["data"]["image_size"] / 224)
        assert all(0 < r["pointing_chance"] <= 1 for r in loc["per_class"])
        assert "pointing_chance_mean" in summary["metrics"]
        html = (tmp_path / "a1" / "audit" / "report.html").read_text()
        assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
        # an untrained VLM is checked on the probing set, and the report says whether it sees the findings
        assert summary["concepts"]["vlm_check"]["n_classes"] > 0 and "VLM check" in html
        assert html.index("Per-class verdicts") < html.index("Verdict against the promotion gates")
        assert "Faithfulness: do the highlighted pixels" in html and "Sanity check" in html

        # outage: everything is computed, logging fails, the folder stays; resume logs the same results
        folder = audit.compute_audit(audit.parse_args(argv + ["--out", str(tmp_path / "a2")])[0])
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
        assert audit.main(["--resume", str(folder)]) == audit.EX_TEMPFAIL
        state = json.loads((folder / audit.STATE_FILE).read_text())
        assert not state["logged"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert audit.main(["--resume", str(folder)]) == 0
        mv = MlflowClient().get_model_version("cxr-classifier", version)
        new_run = mv.tags["audit.run_id"]
        assert new_run != run_id
        logged = mlflow.artifacts.load_dict(f"runs:/{new_run}/audit/summary.json")
        assert logged == json.loads((folder / "audit" / "summary.json").read_text())
        assert logged["metrics"] == summary["metrics"]  # same model, same data: same figures
        assert audit.main(["--resume", str(folder)]) == 0  # idempotent




def _env(uri):
    import os
    import sys
    from pathlib import Path

    return {**os.environ, "MLFLOW_TRACKING_URI": uri,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.slow
def test_audit_as_the_readme_runs_it(tmp_path, tiny_phantom):
    """`mlflow run . -e audit --env-manager local -P model_uri=... -P data=...` in a subprocess (the
    command once crashed with a NameError while every in-process test passed): the version gets its audit
    tags and the run holds the artifacts."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.0)
    with tracking(tmp_path) as uri:
        version = register_tiny_classifier(tmp_path)
    root = Path(__file__).resolve().parents[2]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "audit", "--env-manager", "local",
           "-P", "model_uri=models:/cxr-classifier@candidate", "-P", f"data={tiny_phantom}", "-P", "clip=scratch",
           "-P", f"gates={gates}", "-P", "max_images=16", "-P", f"out={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=root, env=_env(uri), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with tracking(tmp_path, uri):
        mv = MlflowClient().get_model_version("cxr-classifier", version)
        assert mv.tags["audit.status"] == "passed"
        logged = {f.path for f in MlflowClient().list_artifacts(mv.tags["audit.run_id"], "audit")}
    assert {f"audit/{a}" for a in ARTIFACTS} <= logged
    # for CI pipelines: a failed gate makes the command fail with -P fail_on_gates=true (default: exit 0)
    strict = write_gates(tmp_path / "strict.yaml", auroc_mean=1.01)
    cmd = [a if not a.startswith("gates=") else f"gates={strict}" for a in cmd]
    cmd = [a if not a.startswith("out=") else f"out={tmp_path / 'strict'}" for a in cmd]
    done = subprocess.run(cmd + ["-P", "fail_on_gates=true"], cwd=root, env=_env(uri), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and "gates failed (--fail-on-gates)" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_audit_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_phantom):
    """Unknown model name, version, a missing manifest (checked before any download), a missing gates file
    and an unresolvable CLIP: exit 2, one line naming the problem, no traceback, no audit folder."""
    import subprocess
    import sys

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.0)
    with tracking(tmp_path) as uri:
        version = register_tiny_classifier(tmp_path)
    base = ["--data", str(tiny_phantom), "--clip", "scratch", "--gates", str(gates)]
    cases = [
        (["--model-uri", "models:/nope@candidate"], "cxr-classifier"),                  # lists registered names
        (["--model-uri", "models:/cxr-classifier/9"], version),                         # lists the versions
        (["--model-uri", "models:/cxr-classifier/1", "--data", str(tmp_path / "missing.parquet")], "missing.parquet"),
        (["--model-uri", "models:/cxr-classifier/1", "--gates", str(tmp_path / "nogates.yaml")], "nogates.yaml"),
        (["--model-uri", "models:/cxr-classifier/1", "--clip", "models:/cxr-clip@candidate"], "cxr-clip"),
        (["--model-uri", "models:/cxr-classifier@champion"], "champion"),                # no fallback: named only
        (["--resume", str(tmp_path / "not-an-audit")], "not-an-audit"),
        (["--model-uri", "models:/cxr-classifier/1", "--attention", "dwarf"], "DWARF"),   # method of another kind
        (["--model-uri", "models:/cxr-classifier/1", "--faithfulness-metrics", "deletion,nope"], "road_morf"),
    ]
    for i, (args, expect) in enumerate(cases):
        out = tmp_path / f"out{i}"
        argv = [sys.executable, "-m", "mlflow_projects.audit", *base, *args, "--out", str(out)]
        done = subprocess.run(argv, env=_env(uri), capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and expect in done.stderr, (args, done.stderr[-2000:])
        assert not out.exists()
