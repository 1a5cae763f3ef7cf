"""Manifest schema: canonical labels, validation naming row and field, Parquet round trip, splits, masks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from training.data.schema import (MANIFEST_COLUMNS, MANIFEST_SCHEMA, NIH_CLASSES, NO_FINDING, PHANTOM_CLASSES,
                                  ManifestError, canonical_label, patient_split, polygon_mask, read_manifest,
                                  validate_manifest, write_manifest)


def _row(i: int, **kw) -> dict:
    row = {"image_id": f"img{i}.png", "path": f"images/img{i}.png", "patient_id": f"p{i // 2}", "split": "train",
           "view": "PA", "labels": ["Nodule"], "width": 64, "height": 48, "report": "Small nodule.",
           "source": "test", "boxes": [{"label": "Nodule", "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0}]}
    row.update(kw)
    return row


def test_class_lists():
    assert len(NIH_CLASSES) == 14 and len(set(NIH_CLASSES)) == 14
    assert "Infiltration" in NIH_CLASSES and "Pleural_Thickening" in NIH_CLASSES
    assert list(PHANTOM_CLASSES) == ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                                     "Pneumothorax", "Consolidation", "Hernia"]
    assert set(PHANTOM_CLASSES) <= set(NIH_CLASSES)
    assert all(canonical_label(c) == c for c in NIH_CLASSES)


@pytest.mark.parametrize("name, want", [
    ("Infiltrate", "Infiltration"), ("Pleural effusion", "Effusion"), ("Pleural thickening", "Pleural_Thickening"),
    ("Pleural Thickening", "Pleural_Thickening"), ("pneumothorax", "Pneumothorax"), ("Pulmonary fibrosis", "Fibrosis"),
    ("No finding", NO_FINDING), ("No Finding", NO_FINDING), ("Aortic enlargement", "Aortic_Enlargement"),
    ("Nodule/Mass", "Nodule_Mass"), ("ILD", "ILD"), ("Lung Opacity", "Lung_Opacity"), ("Other lesion", "Other_Lesion"),
])
def test_canonical_label(name, want):
    assert canonical_label(name) == want


def test_canonical_label_errors():
    with pytest.raises(ValueError, match="non-empty"):
        canonical_label("  ")
    with pytest.raises(ValueError, match="Atelectasis"):   # strict lists the valid names
        canonical_label("Aortic enlargement", strict=True)


def test_round_trip_resolves_relative_paths(tmp_path):
    df = pd.DataFrame([_row(0), _row(1, path=None, labels=[], boxes=[], width=None, height=None, report=None,
                                     view=None, split="test")])
    out = write_manifest(df, tmp_path / "sub" / "m.parquet")
    table = pq.read_table(out)
    assert table.schema.names == list(MANIFEST_COLUMNS)
    assert table.schema.field("boxes").type == MANIFEST_SCHEMA.field("boxes").type
    assert table.column("path").to_pylist() == ["images/img0.png", None]   # written as given
    m = read_manifest(out)
    assert m.loc[0, "path"] == str((tmp_path / "sub" / "images" / "img0.png").resolve())
    assert m.loc[1, "path"] is None and m.loc[1, "report"] is None and m.loc[1, "labels"] == []
    assert m.loc[0, "boxes"] == [{"label": "Nodule", "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0, "rater": None}]
    assert int(m.loc[0, "width"]) == 64 and pd.isna(m.loc[1, "height"])
    assert read_manifest(out, resolve_paths=False).loc[0, "path"] == "images/img0.png"


def test_optional_columns_round_trip(tmp_path):
    poly = [{"label": "Nodule", "points": [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0]]}]
    rb = [{"label": "Nodule", "x": 1.0, "y": 1.0, "w": 2.0, "h": 2.0, "rater": "R1"}]
    df = pd.DataFrame([_row(0, polygons=poly, rater_boxes=rb, raters=["R1"], extra=7)])
    m = read_manifest(write_manifest(df, tmp_path / "m.parquet"))
    assert m.loc[0, "polygons"] == poly and m.loc[0, "rater_boxes"] == rb and m.loc[0, "raters"] == ["R1"]
    assert int(m.loc[0, "extra"]) == 7


@pytest.mark.parametrize("change, field", [
    ({"split": "training"}, "split"),
    ({"labels": ["Infiltrate"]}, "labels[0]"),
    ({"labels": ["No Finding"]}, "labels[0]"),
    ({"boxes": [{"label": "Nodule", "x": 1, "y": 2, "w": -3, "h": 4}]}, "boxes[0].w"),
    ({"boxes": [{"label": "Nodule", "x": float("nan"), "y": 2, "w": 3, "h": 4}]}, "boxes[0].x"),
    ({"width": 0}, "width"),
    ({"patient_id": ""}, "patient_id"),
    ({"path": 3}, "path"),
    ({"labels": "Nodule"}, "labels"),
])
def test_validation_names_row_and_field(change, field):
    df = pd.DataFrame([_row(0), _row(1), _row(2, **change)])
    with pytest.raises(ManifestError) as e:
        validate_manifest(df)
    assert e.value.row == 2 and e.value.field == field
    assert "row 2 (image_id 'img2.png')" in str(e.value) and repr(field) in str(e.value)


def test_validation_table_level():
    with pytest.raises(ManifestError, match="lacks columns \\['source'\\]"):
        validate_manifest(pd.DataFrame([_row(0)]).drop(columns="source"))
    with pytest.raises(ManifestError, match="not unique") as e:
        validate_manifest(pd.DataFrame([_row(0), _row(0)]))
    assert e.value.row == 1
    assert isinstance(e.value, ValueError)


def test_write_refuses_bad_manifest(tmp_path):
    with pytest.raises(ManifestError):
        write_manifest(pd.DataFrame([_row(0, split="x")]), tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="junk.parquet"):
        read_manifest(tmp_path / "junk.parquet")


def test_patient_split_no_leakage_and_reproducible():
    rng = np.random.default_rng(0)
    pids = [f"p{k}" for k in rng.integers(0, 300, size=1000)]
    a = patient_split(pids, seed=3)
    assert np.array_equal(a, patient_split(pids, seed=3))
    assert not np.array_equal(a, patient_split(pids, seed=4))
    per_patient = pd.DataFrame({"p": pids, "s": a}).groupby("p")["s"].nunique()
    assert (per_patient == 1).all()
    n_pat = pd.Series(pids).nunique()
    counts = pd.DataFrame({"p": pids, "s": a}).drop_duplicates("p")["s"].value_counts()
    assert counts["train"] == round(0.7 * n_pat) and counts["val"] == round(0.1 * n_pat)
    # order of rows does not change a patient's split
    perm = rng.permutation(len(pids))
    b = patient_split([pids[i] for i in perm], seed=3)
    assert np.array_equal(b, a[perm])


def test_patient_split_small_and_errors():
    s = patient_split(["a", "b", "c"], seed=0)
    assert sorted(s) == ["test", "train", "val"]   # every split gets a patient when there are enough
    with pytest.raises(ValueError, match="fractions"):
        patient_split(["a"], (0.5, 0.5))


def test_polygon_mask():
    square = [[1, 1], [4, 1], [4, 4], [1, 4]]
    m = polygon_mask([square], 6, 8)
    assert m.shape == (6, 8) and m.dtype == bool
    assert m.sum() == 16 and m[1:5, 1:5].all()
    flat = [1, 1, 4, 1, 4, 4, 1, 4]
    assert np.array_equal(polygon_mask([flat], 6, 8), m)
    polys = [{"label": "Nodule", "points": square}, {"label": "Mass", "points": [[6, 0], [7, 0], [7, 1], [6, 1]]}]
    assert polygon_mask(polys, 6, 8, label="Mass").sum() == 4
    assert polygon_mask(polys, 6, 8).sum() == 20
    assert polygon_mask([square], 12, 16, scale=(2, 2)).sum() == 49    # 7 x 7 pixels
    assert polygon_mask([[[0, 0], [1, 1]]], 4, 4).sum() == 0            # < 3 points skipped
    with pytest.raises(ValueError):
        polygon_mask([square], 0, 4)
