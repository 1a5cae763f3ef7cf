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
    """Two seeds, every ablation: one summary row per (count, arm) with seed means and SDs, one per-seed row per
    (seed, count, arm), flat metrics, the table and the named departures printed."""
    from mlflow_projects import dwarf_benchmark

    with tracking(tmp_path):
        table = dwarf_benchmark.main(["--data", str(tiny_phantom), "--clip", "scratch", "--epochs", "1",
                                      "--vlm-epochs", "1", "--diseases", "2,9", "--batch-size", "8",
                                      "--image-size", "32", "--seeds", "0,1", "--ablations", "all"])
        assert sorted(set(table["n_diseases"])) == [2]  # 9: more than the usable diseases, skipped
        assert list(table["method"]) == ["pretrained", "gain", "dwarf", "dwarf_random_init", "dwarf_direct",
                                         "dwarf_cls_query"]
        assert (table["n_seeds"] == 2).all()
        for col in ("auc_mean", "f1_mean", "mcc_mean", "max_dice_mean"):
            vals = table[col].to_numpy(dtype=float)
            assert np.all((vals[np.isfinite(vals)] >= -1) & (vals[np.isfinite(vals)] <= 1)), col
        assert np.isfinite(table["max_dice_mean_sd"].to_numpy(dtype=float)).all()  # two seeds: an SD
        run = mlflow.search_runs(experiment_names=["cxr-dwarf-benchmark"], output_format="list")[0]
        assert run.data.params["clip.resolved"].startswith("scratch") and run.data.params["seeds"] == "0,1"
        logged = run.data.metrics
        for _, row in table.iterrows():
            key = f"{row['method']}.{row['n_diseases']}.max_dice_mean"
            assert logged[key] == pytest.approx(row["max_dice_mean"])
            assert logged[key + "_sd"] == pytest.approx(row["max_dice_mean_sd"])
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl"))
        assert pd.read_csv(f"{folder}/dwarf_benchmark.csv").shape[0] == len(table)
        per_seed = pd.read_csv(f"{folder}/dwarf_benchmark_seeds.csv")
        assert len(per_seed) == 2 * len(table) and set(per_seed["seed"]) == {0, 1}
        dwarf = per_seed[per_seed["method"] == "dwarf"].set_index("seed")["max_dice_mean"]
        row = table.set_index("method").loc["dwarf"]
        assert row["max_dice_mean"] == pytest.approx(dwarf.mean())
        assert row["max_dice_mean_sd"] == pytest.approx(dwarf.std(ddof=1))
        assert "±" in open(f"{folder}/dwarf_benchmark.md", encoding="utf-8").read()
        paired = pd.read_csv(f"{folder}/dwarf_benchmark_paired.csv")
        assert len(paired) == 6 * 2 and (paired["n_seeds"] == 2).all()  # 6 comparisons x 2 metrics
    out = capsys.readouterr().out  # the table is printed at the end, then the departures
    assert "DWARF benchmark" in out and "max_dice_mean_sd" in out and len(out.splitlines()) == len(table) + 3
    assert out.splitlines()[-1].startswith("Departures from the paper:")


def test_summary_is_the_seed_mean_and_sd_per_count_and_method():
    from mlflow_projects.dwarf_benchmark import METRICS, markdown, summarize

    rows = []
    for seed, base in ((0, 0.2), (1, 0.4), (2, 0.6)):
        for method, shift in (("pretrained", 0.0), ("dwarf", 0.1)):
            rows.append({"seed": seed, "n_diseases": 4, "method": method, **{m: base + shift for m in METRICS}})
    out = summarize(pd.DataFrame(rows))
    assert list(out["method"]) == ["pretrained", "dwarf"] and (out["n_seeds"] == 3).all()
    assert out.loc[1, "max_dice_mean"] == pytest.approx(0.5)
    assert out.loc[1, "max_dice_mean_sd"] == pytest.approx(0.2)  # SD of 0.3, 0.5, 0.7 (ddof 1)
    assert "0.500 ± 0.200" in markdown(out)


def test_paired_differences_per_seed_with_t_interval():
    from mlflow_projects.dwarf_benchmark import paired_differences

    dwarf, gain = [0.30, 0.50, 0.40], [0.20, 0.45, 0.41]
    rows = [{"seed": s, "n_diseases": 4, "method": m, "max_dice_mean": v, "auc_mean": 0.5}
            for s in range(3) for m, v in (("dwarf", dwarf[s]), ("gain", gain[s]))]
    out = paired_differences(pd.DataFrame(rows))
    row = out[(out["a"] == "dwarf") & (out["b"] == "gain") & (out["metric"] == "max_dice_mean")].iloc[0]
    diffs = np.array(dwarf) - np.array(gain)  # 0.10, 0.05, -0.01
    assert row["mean_diff"] == pytest.approx(diffs.mean()) and row["sd_diff"] == pytest.approx(diffs.std(ddof=1))
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert row["ci_low"] == pytest.approx(diffs.mean() - half) and row["ci_high"] == pytest.approx(diffs.mean() + half)
    assert row["a_wins"] == 2 and row["n_seeds"] == 3
    assert set(out["b"]) == {"gain"}  # comparisons with an absent arm are left out


def test_bad_arguments_exit_2_naming_the_value(capsys, tmp_path):
    from mlflow_projects.dwarf_benchmark import parse_args

    for bad, needle in ((["--diseases", "0"], "expected comma-separated positive counts"),
                        (["--diseases", "four"], "got 'four'"), (["--image-size", "7"], "image size >= 16"),
                        (["--data", str(tmp_path / "m.parquet")], "manifest not found")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert parse_args(["--diseases", "7, 4,4"]).diseases == "4,7"
    for bad, needle in ((["--seeds", "a"], "got 'a'"), (["--seeds", "1,1"], "distinct"),
                        (["--ablations", "fig2"], "valid: none, all, random_init, direct, cls_query")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    a = parse_args(["--seed", "3", "--ablations", "direct, random_init"])
    assert a.seeds == "3" and a.ablations == "random_init,direct"  # default seeds: --seed; paper order
    assert parse_args(["--ablations", "all"]).ablations == "random_init,direct,cls_query"



@pytest.mark.slow
def test_mlflow_run_dwarf_benchmark(tiny_phantom, tmp_path):
    """As the README runs it (``mlflow run . -e dwarf_benchmark --experiment-name cxr-dwarf-benchmark``), at a
    tiny size: one run with the table artifacts and the flat metrics per method, the table on stdout."""
    from tests.mlflow_projects.mlflow_run import artifacts_under_root, client, mlflow_run, project_env, setup_store

    env = project_env(tmp_path)
    setup_store(env)
    proc = mlflow_run("dwarf_benchmark", {"data": tiny_phantom, "clip": "scratch", "diseases": 1, "epochs": 1,
                                          "vlm_epochs": 1, "image_size": 32, "batch_size": 8,  # seeds: default "" = --seed
                                          "ablations": "direct"}, env,
                      "cxr-dwarf-benchmark")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DWARF benchmark on manifest.parquet (CLIP scratch" in proc.stdout and "Traceback" not in proc.stderr
    c = client(env)
    runs = c.search_runs([c.get_experiment_by_name("cxr-dwarf-benchmark").experiment_id])
    assert len(runs) == 1 and artifacts_under_root(runs[0], env) and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["diseases"] == "1" and run.data.params["image_size"] == "32"
    assert run.data.params["ablations"] == "direct"
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"dwarf_benchmark.csv", "dwarf_benchmark.md"}
    table = pd.read_csv(c.download_artifacts(run.info.run_id, "dwarf_benchmark.csv", str(tmp_path)))
    assert set(table["n_diseases"]) == {1} and len(table) == len(set(table["method"])) == 4
    assert "dwarf_direct" in set(table["method"])
    for method in table["method"]:
        assert any(k.startswith(f"{method}.1.") for k in run.data.metrics), method
