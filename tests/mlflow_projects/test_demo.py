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
