"""promote: gates parsing and evaluation; against a real store, refuses a failing version (alias untouched,
failed gates listed, exit 1) and accepts a passing one (alias moved, description = audit summary)."""
from __future__ import annotations

import json

import pytest

from mlflow_projects import promote
from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking, write_gates


def test_parse_and_evaluate_gates():
    gates = promote.parse_gates({"gates": [{"name": "auc", "metric": "auroc_mean", "min": 0.7},
                                           {"metric": "shortcut_class_fraction", "max": 0.2},
                                           {"metric": "pointing_mean", "min": 0.5, "optional": True}]})
    res = promote.evaluate_gates({"auroc_mean": 0.8, "shortcut_class_fraction": 0.5}, gates)
    assert [r.status for r in res] == ["passed", "failed", "skipped"]
    assert not promote.gates_passed(res)
    assert promote.gates_passed(promote.evaluate_gates({"auroc_mean": 0.7, "shortcut_class_fraction": 0.2}, gates))
    assert promote.evaluate_gates({"auroc_mean": float("nan")}, gates[:1])[0].status == "failed"


@pytest.mark.parametrize("bad, match", [({"gates": [{"metric": "x"}]}, "needs 'min' or 'max'"),
                                        ({"gates": [{"metric": "x", "min": 1, "mni": 2}]}, "unknown keys"),
                                        ({"gates": [{"metric": "x", "min": "high"}]}, "must be a number"),
                                        ({"gate": []}, "list under 'gates'")])
def test_bad_gates_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        promote.parse_gates(bad)


def test_default_gates_file_is_valid():
    names = [g.metric for g in promote.load_gates()]
    assert {"auroc_mean", "iobb_mean", "concept_coverage"} <= set(names)


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
