"""demo: arguments, the closing message, and (slow) the whole chain at a tiny size in a temporary store."""
from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_projects import demo


def test_where_to_look_names_ui_report_and_service(tmp_path):
    res = demo.DemoResult("sqlite:////x/mlflow.db", tmp_path / "m.parquet", "3", "2", tmp_path / "audit",
                          "passed", True, {"phantom": 1.0, "total": 42.0})
    text = demo.where_to_look(res, 3000)
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in text
    assert str(tmp_path / "audit" / "audit" / "report.html") in text
    assert f"bentoml serve {demo.SERVICE_TARGET} --port 3000" in text and "promoted to @champion" in text
    assert "serves @champion" in text
    assert "Review page" in text and "http://127.0.0.1:3000/ui/" in text
    refused = demo.DemoResult("sqlite:////x/mlflow.db", tmp_path / "m.parquet", "3", "2", tmp_path / "audit",
                              "failed", False, {"total": 42.0})
    text = demo.where_to_look(refused, 3000)
    assert "NOT promoted" in text and "serves @candidate" in text and "serves @champion" not in text


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        demo.parse_args(["--n", "0"])


@pytest.mark.slow
def test_demo_runs_end_to_end_tiny(tmp_path, capsys):
    pytest.importorskip("mlflow_projects.train_classifier")
    pytest.importorskip("mlflow_projects.train_clip")
    from tests.mlflow_projects.audit_fixtures import tracking

    with tracking(tmp_path):
        assert demo.main(["--out", str(tmp_path / "demo"), "--n", "80", "--size", "64", "--arch", "resnet18",
                          "--epochs", "1", "--image-size", "64", "--clip-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out
    assert Path(tmp_path / "demo" / "audit" / "audit" / "report.html").is_file()


def test_steps_do_not_inherit_the_launchers_run(monkeypatch):
    """Under `mlflow run . -e demo` each step opens its own run: MLFLOW_RUN_ID and the launcher's experiment
    are not passed on (one run cannot hold two trainings' parameters); the tracking store is."""
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/mlflow.db")
    env = demo.step_env()
    assert not set(demo.LAUNCHER_VARIABLES) & set(env) and env["MLFLOW_TRACKING_URI"] == "sqlite:////x/mlflow.db"


@pytest.mark.slow
def test_mlflow_run_demo_tiny(tmp_path):
    """``mlflow run . -e demo`` at a tiny size: every step's run in its own experiment, cxr-classifier and
    cxr-clip registered with alias candidate, the audit run and its report, the launcher's run tagged with
    what the demo produced."""
    import json

    from tests.mlflow_projects.mlflow_run import artifacts_under_root, client, mlflow_run, project_env, setup_store

    env = project_env(tmp_path)
    setup_store(env)
    out = tmp_path / "demo"
    proc = mlflow_run("demo", {"out": out, "n": 80, "size": 64, "epochs": 1, "image_size": 64, "clip_epochs": 1},
                      env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cxr-interpret demo finished" in proc.stdout and "Traceback" not in proc.stderr
    assert (out / "audit" / "audit" / "report.html").is_file() and (out / "phantom" / "manifest.parquet").is_file()
    c = client(env)
    by_experiment = {e.name: c.search_runs([e.experiment_id]) for e in c.search_experiments()}
    assert len(by_experiment["cxr-classifier"]) == 1 and len(by_experiment["cxr-clip"]) == 1
    assert len(by_experiment["cxr-audit"]) == 1 and len(by_experiment["Default"]) == 1
    assert all(artifacts_under_root(r, env) for runs in by_experiment.values() for r in runs)
    assert all(r.info.status == "FINISHED" for runs in by_experiment.values() for r in runs)
    classifier = c.get_model_version_by_alias("cxr-classifier", "candidate")
    clip = c.get_model_version_by_alias("cxr-clip", "candidate")
    assert str(classifier.version) == "1" and str(clip.version) == "1"
    assert classifier.tags["audit.status"] in {"passed", "failed"}
    assert json.loads(classifier.tags["classes"]) and "val_auroc_mean" in by_experiment["cxr-classifier"][0].data.metrics
    audit_run = by_experiment["cxr-audit"][0]
    assert classifier.tags["audit.run_id"] == audit_run.info.run_id
    assert "audit/report.html" in {a.path for a in c.list_artifacts(audit_run.info.run_id, "audit")}
    launcher = by_experiment["Default"][0]
    tags = launcher.data.tags
    assert tags["demo.classifier"] == "cxr-classifier/1" and tags["demo.clip"] == "cxr-clip/1"
    assert tags["demo.audit_status"] == classifier.tags["audit.status"]
    promoted = tags["demo.promoted"] == "true"
    champion = c.get_registered_model("cxr-classifier").aliases.get("champion")
    assert promoted == (champion == "1") == (classifier.tags["promotion.status"] == "promoted")
    assert {"time.phantom", "time.train_classifier", "time.audit", "time.total"} <= set(launcher.data.metrics)
