"""dwarf_benchmark entry point end to end on a real MLflow store: one row per (disease count, method), the
table artifacts and the flat metrics, and clear errors for bad arguments."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.mlflow_projects.audit_fixtures import tracking


@pytest.mark.slow
def test_entry_point_logs_one_row_per_count_and_method(tmp_path, tiny_phantom, capsys):
    from mlflow_projects import dwarf_benchmark

    with tracking(tmp_path):
        table = dwarf_benchmark.main(["--data", str(tiny_phantom), "--clip", "scratch", "--epochs", "1",
                                      "--vlm-epochs", "1", "--diseases", "1,2,9", "--batch-size", "8"])
        assert sorted(set(table["n_diseases"])) == [1, 2]  # 9: more than the usable diseases, skipped
        methods = set(table["method"])
        assert len(methods) >= 3 and len(table) == 2 * len(methods)  # DWARF, GAIN, the VLM stage, per count
        for col in ("auc_mean", "f1_mean", "mcc_mean", "max_dice_mean"):
            vals = table[col].to_numpy(dtype=float)
            assert np.all((vals[np.isfinite(vals)] >= -1) & (vals[np.isfinite(vals)] <= 1)), col
        run = mlflow.search_runs(experiment_names=["cxr-dwarf-benchmark"], output_format="list")[0]
        assert run.data.params["clip.resolved"].startswith("scratch")
        logged = run.data.metrics
        for _, row in table.iterrows():
            if np.isfinite(row["max_dice_mean"]):
                assert logged[f"{row['method']}.{row['n_diseases']}.max_dice_mean"] == pytest.approx(row["max_dice_mean"])
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl"))
        assert pd.read_csv(f"{folder}/dwarf_benchmark.csv").shape[0] == len(table)
        assert "max_dice_mean" in open(f"{folder}/dwarf_benchmark.md", encoding="utf-8").read()
    out = capsys.readouterr().out  # the table is printed at the end
    assert "DWARF benchmark" in out and "max_dice_mean" in out and len(out.splitlines()) == len(table) + 2


def test_bad_arguments_exit_2_naming_the_value(capsys, tmp_path):
    from mlflow_projects.dwarf_benchmark import parse_args

    for bad, needle in ((["--diseases", "0"], "expected comma-separated positive counts"),
                        (["--diseases", "four"], "got 'four'"), (["--image-size", "7"], "image size >= 16"),
                        (["--data", str(tmp_path / "m.parquet")], "manifest not found")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert parse_args(["--diseases", "7, 4,4"]).diseases == "4,7"



@pytest.mark.slow
def test_mlflow_run_dwarf_benchmark(tiny_phantom, tmp_path):
    """As the README runs it (``mlflow run . -e dwarf_benchmark --experiment-name cxr-dwarf-benchmark``), at a
    tiny size: one run with the table artifacts and the flat metrics per method, the table on stdout."""
    from tests.mlflow_projects.mlflow_run import artifacts_under_root, client, mlflow_run, project_env, setup_store

    env = project_env(tmp_path)
    setup_store(env)
    proc = mlflow_run("dwarf_benchmark", {"data": tiny_phantom, "clip": "scratch", "diseases": 1, "epochs": 1,
                                          "vlm_epochs": 1, "image_size": 32, "batch_size": 8}, env,
                      "cxr-dwarf-benchmark")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DWARF benchmark on manifest.parquet (CLIP scratch" in proc.stdout and "Traceback" not in proc.stderr
    c = client(env)
    runs = c.search_runs([c.get_experiment_by_name("cxr-dwarf-benchmark").experiment_id])
    assert len(runs) == 1 and artifacts_under_root(runs[0], env) and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["diseases"] == "1" and run.data.params["image_size"] == "32"
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"dwarf_benchmark.csv", "dwarf_benchmark.md"}
    table = pd.read_csv(c.download_artifacts(run.info.run_id, "dwarf_benchmark.csv", str(tmp_path)))
    assert set(table["n_diseases"]) == {1} and len(table) == len(set(table["method"])) >= 3
    for method in table["method"]:
        assert any(k.startswith(f"{method}.1.") for k in run.data.metrics), method
