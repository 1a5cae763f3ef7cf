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

