"""imbalance_study glue: comparison table, parameter checks, and the full study on a tiny phantom (slow)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlflow_projects.imbalance_study import (DISSECTION_PROTOCOLS, INTERPRET_COLUMNS, comparison_table, dissection_q,
                                             dissection_table, parse_args, seed_summary, summary_markdown)


def test_comparison_table_has_a_mean_row_per_loss():
    t = pd.DataFrame({"n_pos": [2, 0], "auroc": [0.8, np.nan], "ap": [0.5, np.nan], "mean_prob": [0.2, 0.4],
                      "prevalence": [0.1, 0.0]}, index=pd.Index(["A", "B"], name="class"))
    table = comparison_table({"bce": t, "focal": t.assign(auroc=[0.6, np.nan])})
    assert list(table.columns) == ["loss", "class", "auroc", "ap", "mean_prob", "prevalence", "n_pos"]
    means = table[table["class"] == "mean"].set_index("loss")
    assert means.loc["bce", "auroc"] == pytest.approx(0.8) and means.loc["focal", "auroc"] == pytest.approx(0.6)
    assert means.loc["bce", "mean_prob"] == pytest.approx(0.3)


def test_comparison_table_appends_interpret_columns():
    t = pd.DataFrame({"n_pos": [2, 1], "auroc": [0.8, 0.7], "ap": [0.5, 0.4], "mean_prob": [0.2, 0.4],
                      "prevalence": [0.1, 0.05]}, index=pd.Index(["A", "B"], name="class"))
    it = pd.DataFrame({"n_boxed": [3, 0], "n_flat": [1, 0], "iobb": [0.6, np.nan], "ior": [0.2, np.nan],
                       "disjoint": [4.0, np.nan], "unique": [2.0, np.nan]}, index=pd.Index(["A", "B"], name="class"))
    table = comparison_table({"bce": t, "wbce": t}, {"bce": it})
    assert list(table.columns) == ["loss", "class", "auroc", "ap", "mean_prob", "prevalence", "n_pos",
                                   *INTERPRET_COLUMNS]
    means = table[table["class"] == "mean"].set_index("loss")
    assert means.loc["bce", "iobb"] == pytest.approx(0.6) and means.loc["bce", "n_boxed"] == 3
    assert np.isnan(means.loc["wbce", "iobb"]) and means.loc["wbce", "n_boxed"] == 0   # no interpret table
    d = dissection_table({"bce": {"n_images": 3, "disjoint": 4.0, "unique": 2.0, "units_detecting": 5}}, 0.04)
    assert list(d.columns) == ["loss", "q", "n_images", "disjoint", "unique", "units_detecting"]


def test_interpret_table_lives_in_interpret_and_keeps_its_columns(tiny_phantom):
    """interpret.experiments.interpret_table (CAM IoBB / IoR and dissection) on the boxed test images of an
    untrained tiny classifier: one row per data class, NaN scores exactly where no image has a box."""
    import torch

    from interpret import experiments
    from training.data.dataset import ManifestDataset
    from training.models import create_model

    from interpret.dissection import PROTOCOLS

    assert experiments.INTERPRET_COLUMNS == INTERPRET_COLUMNS  # the copy this module keeps (no torch at import)
    assert PROTOCOLS == DISSECTION_PROTOCOLS
    ds = ManifestDataset(tiny_phantom, image_size=32, split="test")
    boxed = [i for i, labels in enumerate(ds.box_label_arrays) if len(labels)]
    assert boxed
    torch.manual_seed(0)
    model = create_model("test_resnet", classes=ds.classes).eval()
    table, overall = experiments.interpret_table(model, ds, boxed, q=0.04, batch_size=4, progress=False)
    assert list(table.columns) == list(INTERPRET_COLUMNS) and list(table.index) == list(ds.classes)
    per_class = {c: sum(ds.classes.index(c) in set(ds.box_label_arrays[i].tolist()) for i in boxed)
                 for c in ds.classes}
    assert table["n_boxed"].to_dict() == per_class
    has = table["n_boxed"] > 0
    assert table.loc[has, ["iobb", "ior"]].apply(lambda v: v.between(0, 1)).all().all()
    assert table.loc[~has, ["iobb", "ior"]].isna().all().all()
    assert overall["n_images"] == len(boxed) and overall["disjoint"] >= overall["unique"] >= 0
    with pytest.raises(ValueError, match="at least one image with boxes"):
        experiments.interpret_table(model, ds, [], q=0.04)


def test_dissection_q_by_arch(tmp_path):
    from mlflow_projects.imbalance_study import authors_batch

    assert dissection_q("t_densenet") == 0.01 and dissection_q("resnet50") == 0.04
    assert authors_batch("t_densenet") == 128 and authors_batch("resnet50") == 64
    m = tmp_path / "m.parquet"
    pd.DataFrame({"image_id": ["a"]}).to_parquet(m)
    assert parse_args(["--data", str(m), "--arch", "t_densenet"], return_all=True)[2] == {
        "enabled": True, "q": 0.01, "protocol": "paper", "seeds": [0]}
    assert parse_args(["--data", str(m), "--arch", "resnet50", "--seeds", "0,1,2", "--dissection-protocol",
                       "authors_code"], return_all=True)[2] == {"enabled": True, "q": 0.04, "protocol": "authors_code",
                                                                "seeds": [0, 1, 2]}
    assert parse_args(["--data", str(m), "--dissection-q", "0.1", "--no-interpret", "--seed", "5", "--seeds", ""],
                      return_all=True)[2] == {"enabled": False, "q": 0.1, "protocol": "paper", "seeds": [5]}
    for bad in (["--dissection-q", "1.5"], ["--seeds", "0,x"], ["--seeds", "1,1"], ["--dissection-protocol", "bau"]):
        with pytest.raises(SystemExit):
            parse_args(["--data", str(m), *bad])


def test_seed_summary_and_markdown():
    rows = []
    for seed, (auc, iobb) in enumerate([(0.7, 0.5), (0.8, 0.6), (0.9, 0.7)]):
        rows += [{"seed": seed, "loss": "bce", "class": "A", "auroc": auc, "iobb": iobb},
                 {"seed": seed, "loss": "bce", "class": "mean", "auroc": auc, "iobb": iobb},
                 {"seed": seed, "loss": "focal", "class": "mean", "auroc": 0.6, "iobb": np.nan}]
    summary = seed_summary(pd.DataFrame(rows))
    assert list(summary["loss"]) == ["bce", "focal"] and list(summary["n_seeds"]) == [3, 3]
    bce = summary.set_index("loss").loc["bce"]
    assert bce["auroc_mean"] == pytest.approx(0.8) and bce["auroc_sd"] == pytest.approx(0.1)   # ddof 1
    assert np.isnan(summary.set_index("loss").loc["focal", "iobb_mean"])
    md = summary_markdown(summary, "T", ["note"])
    assert "| loss | seeds | AUROC | IoBB |" in md and "| bce | 3 | 0.800 ± 0.100 | 0.600 ± 0.100 |" in md
    assert "| focal | 3 | 0.600 ± 0.000 | n/a |" in md and md.rstrip().endswith("- note")


def test_bad_parameters(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data", str(tmp_path / "nope.parquet")])
    assert exc.value.code == 2 and "manifest not found" in capsys.readouterr().err
    m = tmp_path / "m.parquet"
    pd.DataFrame({"image_id": ["a"]}).to_parquet(m)
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
    # interpret columns (Table 1 shape): soft IoBB / IoR in [0, 1], Disjoint >= Unique >= 0
    assert set(INTERPRET_COLUMNS) <= set(table.columns)
    boxed = table[(table["class"] != "mean") & (table["n_boxed"] > 0)]
    assert len(boxed) >= 4 and boxed[["iobb", "ior", "disjoint", "unique"]].notna().all().all()
    assert boxed["iobb"].between(0, 1).all() and boxed["ior"].between(0, 1).all()
    assert (boxed["unique"] >= 0).all() and (boxed["disjoint"] >= boxed["unique"] - 1e-12).all()
    assert table.loc[table["n_boxed"] == 0, ["iobb", "ior"]].isna().all().all()
    # same boxed images for every loss
    assert table[table["class"] != "mean"].pivot(index="class", columns="loss", values="n_boxed").nunique(axis=1).eq(1).all()

    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    exp = client.get_experiment_by_name("imbalance-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["loss"] for c in children} == {"bce", "wbce", "focal", "cb_focal"}
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "comparison")}
    assert arts == {f"comparison/imbalance_{name}.{ext}" for name in ("comparison", "dissection", "summary")
                    for ext in ("csv", "html")} | {"comparison/imbalance_summary.md"}
    assert (table["seed"] == 0).all()
    local = client.download_artifacts(parents[0].info.run_id, "comparison/imbalance_comparison.csv", str(tmp_path))
    logged = pd.read_csv(local)
    assert len(logged) == len(table) and set(logged["loss"]) == {"bce", "wbce", "focal", "cb_focal"}
    assert set(INTERPRET_COLUMNS) <= set(logged.columns)
    local = client.download_artifacts(parents[0].info.run_id, "comparison/imbalance_dissection.csv", str(tmp_path))
    diss = pd.read_csv(local)
    assert sorted(diss["loss"]) == ["bce", "cb_focal", "focal", "wbce"] and (diss["q"] == 0.04).all()
    assert (diss["n_images"] > 0).all() and (diss["disjoint"] >= diss["unique"]).all() and (diss["unique"] >= 0).all()
    print("\nTABLE1\n" + table[table["class"] == "mean"].to_string() + "\nTABLE2\n" + diss.to_string())
    for c in children:
        m = c.data.metrics
        assert "interp_iobb_mean" in m and 0 <= m["interp_iobb_mean"] <= 1 and "dissection_disjoint" in m
        assert m["dissection_disjoint"] >= m["dissection_unique"] >= 0


@pytest.mark.slow
def test_mlflow_run_imbalance_study(tiny_phantom, tmp_path):
    """As the README runs it (``mlflow run . -e imbalance_study --experiment-name cxr-classifier``), at a tiny
    size: the launcher's run is the parent, one child per loss, the comparison tables under mlartifacts/."""
    from tests.mlflow_projects.mlflow_run import artifacts_under_root, client, mlflow_run, project_env, setup_store

    env = project_env(tmp_path)
    setup_store(env)
    proc = mlflow_run("imbalance_study", {"data": tiny_phantom, "arch": "test_resnet", "epochs": 1, "image_size": 32,
                                          "batch_size": 16, "losses": "bce,cb_focal", "seeds": "0,1",
                                          "task": "binary"}, env, "cxr-classifier")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "imbalance study: test_resnet" in proc.stdout and "Traceback" not in proc.stderr
    c = client(env)
    runs = c.search_runs([c.get_experiment_by_name("cxr-classifier").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 and all(artifacts_under_root(r, env) for r in runs)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["losses"] == "bce,cb_focal"
    assert {ch.data.tags["mlflow.parentRunId"] for ch in children} == {parent.info.run_id}
    assert {(ch.data.params["loss"], ch.data.params["seed"]) for ch in children} == {
        (loss, seed) for loss in ("bce", "cb_focal") for seed in ("0", "1")}
    assert {"bce.auroc_mean", "cb_focal.auroc_mean", "cb_focal.iobb_mean"} <= set(parent.data.metrics)
    assert "| cb_focal | 2 |" in proc.stdout and "task binary" in proc.stdout
    for ch in children:
        assert {"interp_iobb_mean", "dissection_disjoint"} <= set(ch.data.metrics)
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/imbalance_comparison.csv", "comparison/imbalance_dissection.csv",
            "comparison/imbalance_summary.md"} <= arts
    table = pd.read_csv(c.download_artifacts(parent.info.run_id, "comparison/imbalance_comparison.csv",
                                             str(tmp_path)))
    assert set(table["loss"]) == {"bce", "cb_focal"} and set(INTERPRET_COLUMNS) <= set(table.columns)
    assert set(table["seed"]) == {0, 1} and set(table["class"]) == {"Abnormal", "mean"}   # binary: one output
    assert table.loc[table["class"] == "Abnormal", "n_boxed"].gt(0).all()
    md = open(c.download_artifacts(parent.info.run_id, "comparison/imbalance_summary.md", str(tmp_path))).read()
    assert "| loss | seeds | AUROC | AP | IoBB | IoR | Disjoint | Unique |" in md and "± " in md
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "data")} >= {"data/class_distribution.csv"}
