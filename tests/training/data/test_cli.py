"""``python -m training.data``: round trips through main(argv) and one real subprocess."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.data.cli import main
from training.data.schema import PHANTOM_CLASSES, read_manifest

ROOT = Path(__file__).resolve().parents[3]


def test_convert_nih(real_fixtures, tmp_path, capsys):
    out = tmp_path / "nih.parquet"
    rc = main(["convert", "nih", "--data-entry", str(real_fixtures / "nih" / "Data_Entry_2017_excerpt.csv"),
               "--bbox", str(real_fixtures / "nih" / "BBox_List_2017_excerpt.csv"),
               "--images", str(real_fixtures / "images"), "--out", str(out), "--seed", "3"])
    assert rc == 0
    df = read_manifest(out)
    assert len(df) == 212 and df["boxes"].map(len).sum() == 60 and df["path"].notna().sum() == 2
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "212 images" in text and "60 boxes" in text


def test_convert_chestx_det_and_vindr(real_fixtures, tmp_path):
    js = real_fixtures / "chestx_det" / "ChestX_Det_train_excerpt.json"
    assert main(["convert", "chestx-det", "--json", str(js), "--out", str(tmp_path / "c.parquet")]) == 0
    c = read_manifest(tmp_path / "c.parquet")
    assert len(c) == 30 and c["polygons"].map(len).sum() == 73
    vcsv = real_fixtures / "vindr" / "vinbigdata_train_excerpt.csv"
    assert main(["convert", "vindr", "--csv", str(vcsv), "--out", str(tmp_path / "v.parquet")]) == 0
    v = read_manifest(tmp_path / "v.parquet")
    with open(vcsv, newline="") as f:
        n_boxes = sum(1 for r in csv.DictReader(f) if r["x_min"])
    assert len(v) == 200 and v["boxes"].map(len).sum() == n_boxes == 110


def test_reports(real_fixtures, tmp_path, capsys):
    out = tmp_path / "reports.txt"
    assert main(["reports", "--iu-xml", str(real_fixtures / "iu_reports"), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 19
    assert "19 reports" in capsys.readouterr().out
    again = tmp_path / "again.txt"
    assert main(["reports", "--text", str(out), "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_phantom(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "ph"), "--n", "6", "--size", "64", "--seed", "2"]) == 0
    df = read_manifest(tmp_path / "ph" / "manifest.parquet")
    assert len(df) == 6 and (df["source"] == "phantom").all()
    assert len(list((tmp_path / "ph" / "images").glob("*.png"))) == 6
    assert {lab for labs in df["labels"] for lab in labs} <= set(PHANTOM_CLASSES)
    assert "6 images" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["convert", "vindr", "--csv", "/nonexistent/v.csv", "--out", "{tmp}/x.parquet"], "file not found: /nonexistent/v.csv"),
    (["convert", "chestx-det", "--json", "{tmp}/bad.json", "--out", "{tmp}/x.parquet"], "not valid JSON"),
    (["reports", "--iu-xml", "{tmp}", "--out", "{tmp}/r.txt"], "no .xml reports"),
    (["phantom", "--out", "{tmp}/ph", "--n", "0"], "n must be a positive integer"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{oops")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "mimic", "--out", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["reports", "--iu-xml", "a", "--text", "b", "--out", "c"])   # mutually exclusive
    assert e.value.code == 2


def test_module_subprocess(real_fixtures, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "training.data", "convert", "vindr", "--csv",
                         str(real_fixtures / "vindr" / "vinbigdata_train_excerpt.csv"), "--out", str(tmp_path / "v.parquet")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "200 images" in ok.stdout and len(read_manifest(tmp_path / "v.parquet")) == 200
    bad = subprocess.run([sys.executable, "-m", "training.data", "convert", "nih", "--data-entry",
                          str(tmp_path / "missing.csv"), "--out", str(tmp_path / "n.parquet")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.csv" in bad.stderr and "Traceback" not in bad.stderr
