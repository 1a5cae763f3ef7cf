"""Readers on the real annotation excerpts: every count is recounted here with csv/json/xml directly."""
from __future__ import annotations

import ast
import csv
import gzip
import json
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from training.data.readers import (get_reader, list_readers, read_chestx_det, read_iu_xml, read_nih,
                                   read_text_reports, read_vindr, union_boxes, write_reports)
from training.data.readers.nih import NIH_IMAGE_SIZE
from training.data.schema import NIH_CLASSES, polygon_mask, read_manifest, write_manifest

NIH_ALIASES = {"Infiltrate": "Infiltration"}


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _no_leak(df: pd.DataFrame) -> bool:
    return bool((df.groupby("patient_id")["split"].nunique() == 1).all())


# ------------------------------------------------------------------------------------------ NIH

@pytest.fixture(scope="module")
def nih_files(real_fixtures):
    return real_fixtures / "nih" / "Data_Entry_2017_excerpt.csv", real_fixtures / "nih" / "BBox_List_2017_excerpt.csv"


def test_nih_counts(nih_files):
    entry, bbox = nih_files
    df = read_nih(entry, bbox)
    data = _csv_rows(entry)[1:]
    boxes = _csv_rows(bbox)[1:]
    assert len(data) == 212 and len(boxes) == 60          # what the excerpts hold
    assert len(df) == len(data) and df["image_id"].tolist() == [r[0] for r in data]
    assert df["boxes"].map(len).sum() == len(boxes)
    per_image = Counter(r[0] for r in boxes)
    assert {i: len(b) for i, b in zip(df["image_id"], df["boxes"]) if b} == dict(per_image)
    # classes: images per class from Finding Labels (+ box labels), recounted by hand
    want = Counter()
    box_labels = {}
    for r in boxes:
        box_labels.setdefault(r[0], set()).add(NIH_ALIASES.get(r[1], r[1]))
    for r in data:
        labs = {t for t in r[1].split("|") if t != "No Finding"} | box_labels.get(r[0], set())
        want.update(labs)
    got = Counter(lab for labs in df["labels"] for lab in labs)
    assert got == want and set(got) <= set(NIH_CLASSES)
    assert len(got) == 13 and got["Atelectasis"] == 79                 # 13 of the 14 classes appear
    assert sum(1 for labs in df["labels"] if not labs) == sum(1 for r in data if r[1] == "No Finding") == 82
    assert (df["source"] == "nih").all() and df["path"].isna().all() and df["report"].isna().all()
    assert (df["width"] == NIH_IMAGE_SIZE).all() and (df["height"] == NIH_IMAGE_SIZE).all()


def test_nih_rows_by_hand(nih_files):
    entry, bbox = nih_files
    df = read_nih(entry, bbox).set_index("image_id")
    r = df.loc["00000001_000.png"]
    assert r["labels"] == ["Cardiomegaly"] and r["patient_id"] == "1" and r["view"] == "PA"
    assert (r["original_width"], r["original_height"]) == (2682, 2749)
    assert r["pixel_spacing_x"] == pytest.approx(0.143)
    r = df.loc["00000181_061.png"]
    assert r["labels"] == ["Atelectasis", "Effusion", "Infiltration"] and r["view"] == "AP"
    b = df.loc["00013118_008.png", "boxes"]
    assert b == [{"label": "Atelectasis", "x": 225.084745762712, "y": 547.019216763771, "w": 86.7796610169491,
                  "h": 79.1864406779661, "rater": None}]
    assert "Atelectasis" in df.loc["00013118_008.png", "labels"]


def test_nih_infiltrate_renamed_and_images(nih_files, real_fixtures, tmp_path):
    entry, bbox = nih_files
    rows = _csv_rows(bbox)
    rows.append(["00000001_000.png", "Infiltrate", "100", "200", "50", "60"])
    extra = tmp_path / "bbox.csv"
    with open(extra, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    df = read_nih(entry, extra, images=real_fixtures / "images").set_index("image_id")
    r = df.loc["00000001_000.png"]
    assert r["labels"] == ["Cardiomegaly", "Infiltration"]
    assert not any("Infiltrate" in labs for labs in df["labels"])
    # the real image is 512 px: size from its header, the 1024-px box scaled by 0.5
    assert (r["width"], r["height"]) == (512, 512)
    assert r["path"] == str((real_fixtures / "images" / "00000001_000.png").resolve())
    assert r["boxes"] == [{"label": "Infiltration", "x": 50.0, "y": 100.0, "w": 25.0, "h": 30.0, "rater": None}]
    assert df["path"].notna().sum() == 2


def test_nih_gzip_and_2017_layout(nih_files, tmp_path):
    entry, bbox = nih_files
    ref = read_nih(entry, bbox)
    gz = tmp_path / "entry.csv"                     # gzip found from the bytes, not the name
    gz.write_bytes(gzip.compress(entry.read_bytes()))
    pd.testing.assert_frame_equal(read_nih(gz, bbox), ref)
    # the 2017 release: ages like "057Y" and a trailing empty column
    rows = _csv_rows(entry)
    old = tmp_path / "Data_Entry_2017.csv"
    with open(old, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0] + [""])
        for r in rows[1:]:
            w.writerow(r[:4] + [f"{int(r[4]):03d}Y"] + r[5:] + [""])
    pd.testing.assert_frame_equal(read_nih(old, bbox), ref)


def test_nih_patient_split(nih_files, tmp_path):
    entry, bbox = nih_files
    a = read_nih(entry, bbox, seed=1)
    assert _no_leak(a) and set(a["split"]) == {"train", "val", "test"}
    assert read_nih(entry, bbox, seed=1)["split"].tolist() == a["split"].tolist()
    assert read_nih(entry, bbox, seed=2)["split"].tolist() != a["split"].tolist()
    # official lists: listed test images go to test, with all images of their patients
    ids = a["image_id"].tolist()
    test_ids = ids[:30]
    (tmp_path / "test_list.txt").write_text("\n".join(test_ids) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(ids[30:]) + "\n")
    b = read_nih(entry, bbox, test_list=tmp_path / "test_list.txt", train_val_list=tmp_path / "train_val_list.txt")
    test_patients = set(b.loc[b["image_id"].isin(test_ids), "patient_id"])
    assert (b.loc[b["image_id"].isin(test_ids), "split"] == "test").all()
    assert set(b.loc[b["split"] == "test", "patient_id"]) == test_patients
    assert _no_leak(b) and {"train", "val"} <= set(b["split"])


def test_nih_bad_input(nih_files, tmp_path):
    entry, bbox = nih_files
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_nih(tmp_path / "nope.csv")
    bad = tmp_path / "bbox.csv"
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Nodule,1,2,-3,4\n")
    with pytest.raises(ValueError, match="bbox.csv, line 2"):
        read_nih(entry, bad)
    wrong = tmp_path / "entry.csv"
    wrong.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="Image Index"):
        read_nih(wrong)


# ------------------------------------------------------------------------------------------ ChestX-Det

@pytest.fixture(scope="module")
def chestx_entries(real_fixtures):
    raw = json.loads((real_fixtures / "chestx_det" / "ChestX_Det_train_excerpt.json").read_text())
    lit = lambda v: ast.literal_eval(v) if isinstance(v, str) else v  # noqa: E731
    return [{"file_name": e["file_name"], "syms": lit(e["syms"]), "boxes": lit(e["boxes"]),
             "polygons": lit(e["polygons"])} for e in raw]


def test_chestx_det_counts(real_fixtures, chestx_entries):
    df = read_chestx_det(real_fixtures / "chestx_det" / "ChestX_Det_train_excerpt.json")
    n_boxes = sum(len(e["boxes"]) for e in chestx_entries)
    assert len(df) == len(chestx_entries) == 30 and n_boxes == 73
    assert df["boxes"].map(len).sum() == n_boxes and df["polygons"].map(len).sum() == n_boxes
    assert sum(1 for labs in df["labels"] if not labs) == sum(1 for e in chestx_entries if not e["syms"]) == 5
    canon = {"Pleural Thickening": "Pleural_Thickening"}
    want = Counter(canon.get(s, s) for e in chestx_entries for s in e["syms"])
    got = Counter(b["label"] for bs in df["boxes"] for b in bs)
    assert got == want and len(got) == 11 and got["Nodule"] == 29
    assert (df["source"] == "chestx-det").all() and df["width"].isna().all() and _no_leak(df)


def test_chestx_det_by_hand(real_fixtures, chestx_entries):
    df = read_chestx_det([real_fixtures / "chestx_det" / "ChestX_Det_train_excerpt.json"]).set_index("image_id")
    r = df.loc["36204.png"]
    assert r["labels"] == ["Cardiomegaly", "Nodule"]
    assert r["boxes"][0] == {"label": "Cardiomegaly", "x": 387.0, "y": 497.0, "w": 365.0, "h": 237.0, "rater": None}
    assert r["boxes"][1] == {"label": "Nodule", "x": 233.0, "y": 666.0, "w": 25.0, "h": 27.0, "rater": None}
    assert r["polygons"][0]["points"][:2] == [[410.0, 497.0], [410.0, 498.0]]
    # the polygon's mask lies in its box and fills much of it
    m = polygon_mask(r["polygons"], 1024, 1024, label="Cardiomegaly")
    ys, xs = np.nonzero(m)
    assert xs.min() >= 387 and xs.max() <= 752 and ys.min() >= 497 and ys.max() <= 734
    assert m.sum() > 0.5 * 365 * 237


def test_chestx_det_several_files(chestx_entries, tmp_path):
    (tmp_path / "ChestX_Det_train.json").write_text(json.dumps(chestx_entries[:20]))   # real lists, not strings
    (tmp_path / "ChestX_Det_test.json").write_text(json.dumps(chestx_entries[20:]))
    df = read_chestx_det([tmp_path / "ChestX_Det_train.json", tmp_path / "ChestX_Det_test.json"], seed=0)
    assert len(df) == 30 and df["boxes"].map(len).sum() == 73
    test_ids = {e["file_name"] for e in chestx_entries[20:]}
    assert set(df.loc[df["split"] == "test", "image_id"]) == test_ids
    assert set(df.loc[~df["image_id"].isin(test_ids), "split"]) == {"train", "val"}
    m = read_manifest(write_manifest(df, tmp_path / "m.parquet"))
    assert m["polygons"].map(len).sum() == 73
    with pytest.raises(ValueError, match="already listed"):
        read_chestx_det([tmp_path / "ChestX_Det_train.json", tmp_path / "ChestX_Det_train.json"])


def test_chestx_det_bad_input(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"file_name": "a.png", "syms": ["Nodule"], "boxes": [[5, 5, 1, 9]], "polygons": []}]))
    with pytest.raises(ValueError, match="x.json, entry 0: box 0"):
        read_chestx_det(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_chestx_det(p)


# ------------------------------------------------------------------------------------------ VinDr

def test_vindr_counts(real_fixtures):
    path = real_fixtures / "vindr" / "vinbigdata_train_excerpt.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    df = read_vindr(path)
    with_box = [r for r in rows if r["x_min"]]
    assert len(rows) == 200 and len(with_box) == 110
    assert len(df) == len({r["image_id"] for r in rows}) == 200
    assert df["rater_boxes"].map(len).sum() == len(with_box)
    # one reader per image in this excerpt: the union is one box per reader box
    assert df["boxes"].map(len).sum() == len(with_box)
    assert all(b["rater"] == "union" for bs in df["boxes"] for b in bs)
    assert {b["rater"] for bs in df["rater_boxes"] for b in bs} == {r["rad_id"] for r in with_box}
    no_finding = {r["image_id"] for r in rows if r["class_name"] == "No finding"}
    assert len(no_finding) == 90
    nf = df[df["image_id"].isin(no_finding)]
    assert nf["labels"].map(len).sum() == 0 and nf["boxes"].map(len).sum() == 0
    canon = {"Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening", "Pulmonary fibrosis": "Fibrosis",
             "Aortic enlargement": "Aortic_Enlargement", "Nodule/Mass": "Nodule_Mass", "Other lesion": "Other_Lesion",
             "Lung Opacity": "Lung_Opacity"}
    want = Counter(canon.get(r["class_name"], r["class_name"]) for r in with_box)
    assert Counter(lab for labs in df["labels"] for lab in labs) == want
    assert len(want) == 13 and want["Aortic_Enlargement"] == 26
    assert (df["source"] == "vindr").all() and _no_leak(df)
    r0 = next(r for r in rows if r["x_min"])
    b = df.set_index("image_id").loc[r0["image_id"], "rater_boxes"][0]
    assert (b["x"], b["y"]) == (float(r0["x_min"]), float(r0["y_min"]))
    assert b["w"] == pytest.approx(float(r0["x_max"]) - float(r0["x_min"]))


def test_vindr_several_raters(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max,width,height\n"
        "a,Nodule/Mass,8,R1,10,10,20,20,100,80\n"
        "a,Nodule/Mass,8,R2,15,15,30,25,100,80\n"       # overlaps R1: merged
        "a,Nodule/Mass,8,R3,60,60,70,70,100,80\n"       # elsewhere: its own union box
        "a,Pleural effusion,10,R2,0,50,40,79,100,80\n"
        "b,No finding,14,R1,,,,,90,90\n"
        "b,Cardiomegaly,3,R2,30,40,70,60,90,90\n"       # one reader sees something
        "c,No finding,14,R1,,,,,,\n"
        "c,No finding,14,R2,,,,,,\n")
    df = read_vindr(p).set_index("image_id")
    a = df.loc["a"]
    assert a["labels"] == ["Nodule_Mass", "Effusion"] and a["raters"] == ["R1", "R2", "R3"]
    assert (a["width"], a["height"]) == (100, 80)
    assert len(a["rater_boxes"]) == 4
    assert [(b["label"], b["x"], b["y"], b["w"], b["h"]) for b in a["boxes"]] == [
        ("Effusion", 0.0, 50.0, 40.0, 29.0), ("Nodule_Mass", 10.0, 10.0, 20.0, 15.0), ("Nodule_Mass", 60.0, 60.0, 10.0, 10.0)]
    assert df.loc["b", "labels"] == ["Cardiomegaly"] and len(df.loc["b", "boxes"]) == 1
    assert df.loc["c", "labels"] == [] and df.loc["c", "boxes"] == [] and pd.isna(df.loc["c", "width"])


def test_union_boxes_transitive():
    bs = [{"label": "A", "x": 0, "y": 0, "w": 2, "h": 2}, {"label": "A", "x": 1.5, "y": 0, "w": 2, "h": 2},
          {"label": "A", "x": 3, "y": 0, "w": 2, "h": 2}, {"label": "B", "x": 0, "y": 0, "w": 1, "h": 1},
          {"label": "A", "x": 2, "y": 5, "w": 1, "h": 1}]   # touching edges only do not merge
    out = union_boxes(bs)
    assert [(b["label"], b["x"], b["y"], b["w"], b["h"]) for b in out] == [
        ("A", 0.0, 0.0, 5.0, 2.0), ("A", 2.0, 5.0, 1.0, 1.0), ("B", 0.0, 0.0, 1.0, 1.0)]
    assert union_boxes([]) == []


def test_vindr_bad_input(tmp_path):
    p = tmp_path / "v.csv"
    p.write_text("image_id,class_name\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_vindr(p)
    p.write_text("image_id,class_name,rad_id,x_min,y_min,x_max,y_max\na,Nodule/Mass,R1,10,10,,20\n")
    with pytest.raises(ValueError, match="v.csv, line 2"):
        read_vindr(p)


# ------------------------------------------------------------------------------------------ reports

def _iu_expected(folder):
    out = []
    for p in sorted(folder.glob("*.xml"), key=lambda q: int(q.stem)):
        sec = {e.get("Label"): " ".join("".join(e.itertext()).split()) for e in ET.parse(p).iter("AbstractText")}
        text = " ".join(t for t in (sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")) if t)
        if text:
            out.append(text)
    return out


def test_iu_xml_folder_and_tgz(real_fixtures, tmp_path):
    folder = real_fixtures / "iu_reports"
    want = _iu_expected(folder)
    assert len(list(folder.glob("*.xml"))) == 20 and len(want) == 19     # one file has neither section
    reps = read_iu_xml(folder)
    assert [r.text for r in reps] == want
    r1 = reps[0]
    assert r1.report_id == "CXR1" and r1.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert r1.text.startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert r1.impression and r1.text.endswith(r1.impression)
    tgz = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(folder, arcname="ecgen-radiology")
    assert [r.text for r in read_iu_xml(tgz)] == want
    out = write_reports(reps, tmp_path / "r.txt")
    lines = out.read_text().splitlines()
    assert lines == want
    assert [r.text for r in read_text_reports(out)] == want


def test_text_reports(tmp_path):
    d = tmp_path / "mimic" / "p10" / "p10000032"
    d.mkdir(parents=True)
    (d / "s1.txt").write_text("                FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n"
                              " FINDINGS:\n Lungs are clear.\n No effusion.\n\n IMPRESSION:\n No acute process.\n")
    (d / "s2.txt").write_text("Portable chest. Small left effusion.\n")
    (d / "empty.txt").write_text("   \n")
    reps = read_text_reports(tmp_path / "mimic")
    assert [r.text for r in reps] == ["Lungs are clear. No effusion. No acute process.", "Portable chest. Small left effusion."]
    f = tmp_path / "lines.txt"
    f.write_text("first report.\n\nsecond  report\twith tab.\n")
    assert [r.text for r in read_text_reports(f)] == ["first report.", "second report with tab."]
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no .txt reports"):
        read_text_reports(tmp_path / "emptydir")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_reports(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="no .xml reports"):
        read_iu_xml(tmp_path / "emptydir")


def test_registry():
    assert list_readers() == ["chestx-det", "nih", "vindr"]
    assert get_reader("nih") is read_nih
    with pytest.raises(ValueError, match="valid: \\['chestx-det', 'nih', 'vindr'\\]"):
        get_reader("mimic")
