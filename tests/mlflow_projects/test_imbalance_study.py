"""imbalance_study glue: comparison table, parameter checks, and the full study on a tiny phantom (slow)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlflow_projects.imbalance_study import comparison_table, parse_args


def test_comparison_table_has_a_mean_row_per_loss():
    t = pd.DataFrame({"n_pos": [2, 0], "auroc": [0.8, np.nan], "ap": [0.5, np.nan], "mean_prob": [0.2, 0.4],
                      "prevalence": [0.1, 0.0]}, index=pd.Index(["A", "B"], name="class"))
    table = comparison_table({"bce": t, "focal": t.assign(auroc=[0.6, np.nan])})
    assert list(table.columns) == ["loss", "class", "auroc", "ap", "mean_prob", "prevalence", "n_pos"]
    means = table[table["class"] == "mean"].set_index("loss")
    assert means.loc["bce", "auroc"] == pytest.approx(0.8) and means.loc["focal", "auroc"] == pytest.approx(0.6)
    assert means.loc["bce", "mean_prob"] == pytest.approx(0.3)


def test_bad_parameters(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data", str(tmp_path / "nope.parquet")])
    assert exc.value.code == 2 and "manifest not found" in capsys.readouterr().err
    m = tmp_path / "m.parquet"
    m.write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["--data", str(m), "--losses", "bce,dice"])
    assert "valid: bce, cb_focal, focal, wbce" in capsys.readouterr().err
    cfg, losses = parse_args(["--data", str(m), "--losses", "bce, focal"])
    assert losses == ["bce", "focal"] and cfg.loss == "bce"


@pytest.mark.slow
def test_study_logs_parent_with_four_children_and_comparison(tiny_phantom, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from mlflow_projects.imbalance_study import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    table = main(["--data", str(tiny_phantom), "--arch", "test_resnet", "--epochs", "1", "--image-size", "32",
                  "--batch-size", "16", "--experiment", "imbalance-test"])
    assert sorted(table["loss"].unique()) == ["bce", "cb_focal", "focal", "wbce"]
    n_classes = (table["class"] != "mean").sum() // 4
    assert len(table) == 4 * (n_classes + 1)
    # same data and seed: every loss sees the same class prevalences
    prev = table[table["class"] != "mean"].pivot(index="class", columns="loss", values="prevalence")
    assert (prev.nunique(axis=1) == 1).all()

    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    exp = client.get_experiment_by_name("imbalance-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["loss"] for c in children} == {"bce", "wbce", "focal", "cb_focal"}
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "comparison")}
    assert arts == {"comparison/imbalance_comparison.csv", "comparison/imbalance_comparison.html"}
    local = client.download_artifacts(parents[0].info.run_id, "comparison/imbalance_comparison.csv", str(tmp_path))
    logged = pd.read_csv(local)
    assert len(logged) == len(table) and set(logged["loss"]) == {"bce", "wbce", "focal", "cb_focal"}
