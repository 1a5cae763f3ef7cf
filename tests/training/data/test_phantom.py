"""The phantom: determinism, tight boxes, findings where they belong, prevalence, reports, sizes."""
from __future__ import annotations

import collections
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.data.phantom import (MAX_SIZE, MIN_SIZE, PREVALENCE, generate_phantom, list_findings,
                                   register_finding, render_case)
from training.data.phantom.findings import get_drawer
from training.data.phantom.generator import _bbox, _render
from training.data.reports_phantom import LABEL_TERMS, NEGATIONS
from training.data.schema import PHANTOM_CLASSES

N_SMALL = 300  # cases at 64 px for statistics (about a second)


@pytest.fixture(scope="module")
def cases64():
    return [render_case(seed=3, index=i, size=64) for i in range(N_SMALL)]


def _xywh(box):
    return tuple(int(box[k]) for k in "xywh")


def test_render_is_deterministic_per_seed_and_index():
    a, b = render_case(7, 11, 96), render_case(7, 11, 96)
    np.testing.assert_array_equal(a.image, b.image)
    assert (a.labels, a.boxes, a.report, a.meta) == (b.labels, b.boxes, b.report, b.meta)
    assert not np.array_equal(a.image, render_case(8, 11, 96).image)
    assert not np.array_equal(a.image, render_case(7, 12, 96).image)
    assert a.image.dtype == np.float32 and a.image.shape == (96, 96)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0


def test_boxes_are_tight_bounding_boxes_of_the_drawn_masks(cases64):
    n_boxes = 0
    for case in cases64:
        assert len(case.boxes) == len(case.instance_masks)
        assert {b["label"] for b in case.boxes} == set(case.labels)
        for box, m in zip(case.boxes, case.instance_masks):
            assert m.dtype == bool and m.shape == case.image.shape
            assert _xywh(box) == _bbox(m)
            n_boxes += 1
        for label, union in case.masks.items():
            inst = [m for b, m in zip(case.boxes, case.instance_masks) if b["label"] == label]
            np.testing.assert_array_equal(union, np.logical_or.reduce(inst))
    assert n_boxes > 100


def test_findings_change_pixels_only_inside_their_boxes(cases64):
    """Render the same case without findings: the difference lies inside the union of the boxes."""
    checked = 0
    for i, case in enumerate(cases64[:120]):
        if not case.boxes:
            continue
        plain = _render(3, i, 64, draw_findings=False)
        outside = np.ones(case.image.shape, bool)
        for b in case.boxes:
            x, y, w, h = _xywh(b)
            outside[y:y + h, x:x + w] = False
        diff = np.abs(case.image - plain.image)
        assert diff[outside].max(initial=0.0) <= 2 / 255, (i, case.labels)
        assert diff[~outside].max() > 2 / 255
        checked += 1
    assert checked > 30


def test_prevalence_is_nih_like(cases64):
    counts = collections.Counter(lab for c in cases64 for lab in c.labels)
    no_finding = sum(not c.labels for c in cases64) / N_SMALL
    assert 0.40 <= no_finding <= 0.60
    assert counts.most_common(1)[0][0] == "Infiltration"
    assert counts["Hernia"] / N_SMALL <= 0.02
    for label, p in PREVALENCE.items():
        if p >= 0.04:  # binomial 4-sigma band
            sd = np.sqrt(p * (1 - p) / N_SMALL)
            assert abs(counts[label] / N_SMALL - p) < 4 * sd + 0.01, (label, counts[label])
    assert set(counts) <= set(PHANTOM_CLASSES)
    # several findings per image happen
    assert any(len(c.labels) >= 2 for c in cases64)


def test_hernia_is_drawn_and_rare():
    hernias = [c for c in (render_case(5, i, 64) for i in range(1200)) if "Hernia" in c.labels]
    assert 1 <= len(hernias) <= 20
    for c in hernias:
        (box,) = [b for b in c.boxes if b["label"] == "Hernia"]
        cx = box["x"] + box["w"] / 2
        assert abs(cx - 32) < 12 and box["y"] > 28  # retrocardiac, near the diaphragm


def test_findings_are_at_plausible_places(cases64):
    """Side of the box matches the recorded side; effusions basal, pneumothoraces apical, nodules
    smaller than masses, cardiomegaly with a cardiothoracic ratio above 0.5."""
    areas = collections.defaultdict(list)
    for case in cases64:
        mid = case.image.shape[1] / 2
        for f, b in zip(case.findings, case.boxes):
            cx, cy = b["x"] + b["w"] / 2, b["y"] + b["h"] / 2
            areas[f.label].append(b["w"] * b["h"])
            if f.side == "right":   # patient right is on the image left
                assert cx < mid, (f, b)
            elif f.side == "left":
                assert cx > mid, (f, b)
            if f.label == "Effusion":
                assert cy > 0.5 * 64
            if f.label == "Pneumothorax":
                assert b["y"] < 0.3 * 64 and cy < 0.5 * 64
            if f.label == "Cardiomegaly":
                assert f.extra["ctr"] > 0.5
                assert b["w"] / case.meta["thoracic_width_px"] > 0.5
    assert np.median(areas["Nodule"]) * 2 < np.median(areas["Mass"])  # nodules clamp to 2 px at 64 px
    normal = [c for c in cases64 if "Cardiomegaly" not in c.labels]
    assert all(c.meta["ctr"] < 0.5 for c in normal)


def test_reports_name_each_label_and_negate_only_absent_ones(cases64):
    negated_any = 0
    for case in cases64:
        text = case.report.lower()
        for label in case.labels:
            assert any(t in text for t in LABEL_TERMS[label]), (label, case.report)
        for f in case.findings:
            if f.side in ("right", "left"):
                said = f.side in text or "bilateral" in text or (f.side == "left" and "lingula" in text)
                assert said, (f, case.report)
        for label, sentences in NEGATIONS.items():
            hit = any(s.lower() in text for s in sentences)
            if label in case.labels:
                assert not hit, (label, case.report)
            negated_any += hit
        if case.meta["devices"]:
            assert re.search(r"catheter|line|tube|leads|wires", text)
    assert negated_any > N_SMALL // 2
    assert len({c.report for c in cases64}) > 0.9 * N_SMALL


def test_a_naive_reader_cannot_recover_labels(cases64):
    """Mentions move around (no fixed position), and keyword presence is fooled by negations."""
    offsets = collections.defaultdict(set)
    keyword_errors = 0
    for case in cases64:
        text = case.report.lower()
        for label in case.labels:
            pos = min(text.find(t) for t in LABEL_TERMS[label] if t in text)
            offsets[label].add(pos)
        keyword = {lab for lab, terms in LABEL_TERMS.items() if any(t in text for t in terms)}
        keyword_errors += keyword != set(case.labels)
    for label in ("Infiltration", "Effusion", "Atelectasis"):
        assert len(offsets[label]) > 5, label
    assert keyword_errors > 0.2 * N_SMALL


def test_non_finding_variation_is_recorded():
    metas = [render_case(0, i, 64).meta for i in range(60)]
    assert {m["marker"]["letter"] for m in metas} == {"L", "R"}
    assert len({m["marker"]["corner"] for m in metas}) >= 3
    assert any(m["devices"] for m in metas) and any(not m["devices"] for m in metas)
    assert {m["view"] for m in metas} == {"PA", "AP"}
    assert np.ptp([m["scale"] for m in metas]) > 0.05
    assert np.ptp([m["rotation_deg"] for m in metas]) > 3


@pytest.mark.parametrize("size", [MIN_SIZE, 160, MAX_SIZE])
def test_size_range(size):
    case = render_case(1, 2, size)
    assert case.image.shape == (size, size)
    assert float(case.image.std()) > 0.1  # anatomy, not a flat field


@pytest.mark.parametrize("size", [MIN_SIZE - 1, MAX_SIZE + 1, 100.5, "64"])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match="size"):
        render_case(0, 0, size)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="index"):
        render_case(0, -1, 64)
    with pytest.raises(ValueError, match="n must"):
        generate_phantom(tmp_path, n=0, size=64)
    with pytest.raises(ValueError, match="workers"):
        generate_phantom(tmp_path, n=2, size=64, workers=0)


def test_generate_writes_images_manifest_and_masks(tmp_path):
    m = generate_phantom(tmp_path / "a", n=40, size=64, seed=2, masks=True, workers=1)
    df = pd.read_parquet(m)
    assert len(df) == 40 and df["image_id"].is_unique
    assert (df["source"] == "phantom").all() and df["report"].str.len().min() > 10
    assert set(df["split"]) <= {"train", "val", "test"} and "train" in set(df["split"])
    assert df.groupby("patient_id")["split"].nunique().max() == 1   # patient-wise
    assert df["patient_id"].value_counts().max() == 2                # some patients have 2 images
    assert set(df["view"]) <= {"PA", "AP"}
    assert (df["width"] == 64).all() and (df["height"] == 64).all()
    row = df.iloc[5]
    png = Image.open((tmp_path / "a" / row["path"]) if not str(row["path"]).startswith("/")
                     else row["path"])
    assert png.mode == "L" and png.size == (64, 64)
    case = render_case(2, 5, 64)
    np.testing.assert_array_equal(np.asarray(png), np.round(case.image * 255).astype(np.uint8))
    assert list(row["labels"]) == case.labels
    assert [_xywh(b) for b in row["boxes"]] == [_xywh(b) for b in case.boxes]
    side = pd.read_parquet(tmp_path / "a" / "masks.parquet")
    n_masks = sum(len(render_case(2, i, 64).masks) for i in range(40))
    assert len(side) == n_masks
    if n_masks:
        first = side.iloc[0]
        idx = int(first["image_id"].split("_")[-1])
        saved = np.asarray(Image.open(tmp_path / "a" / first["path"])) > 127
        np.testing.assert_array_equal(saved, render_case(2, idx, 64).masks[first["label"]])


def test_generate_is_deterministic(tmp_path):
    a = pd.read_parquet(generate_phantom(tmp_path / "a", n=10, size=64, seed=4, workers=1))
    b = pd.read_parquet(generate_phantom(tmp_path / "b", n=10, size=64, seed=4, workers=1))
    cols = ["image_id", "patient_id", "split", "view", "report", "source"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert [list(x) for x in a["labels"]] == [list(x) for x in b["labels"]]
    for name in a["image_id"]:
        assert ((tmp_path / "a" / "images" / f"{name}.png").read_bytes()
                == (tmp_path / "b" / "images" / f"{name}.png").read_bytes())


@pytest.mark.slow
def test_parallel_generation_equals_serial(tmp_path):
    a = pd.read_parquet(generate_phantom(tmp_path / "a", n=24, size=64, seed=9, workers=1))
    b = pd.read_parquet(generate_phantom(tmp_path / "b", n=24, size=64, seed=9, workers=2))
    assert list(a["image_id"]) == list(b["image_id"]) and list(a["report"]) == list(b["report"])
    for name in a["image_id"]:
        assert ((tmp_path / "a" / "images" / f"{name}.png").read_bytes()
                == (tmp_path / "b" / "images" / f"{name}.png").read_bytes())


def test_planted_shortcut_tag_follows_its_class_and_is_recorded(tmp_path):
    """The shortcut tag sits outside every finding box, and co-occurs with its class far above chance."""
    cases = [render_case(4, i, 64, shortcut="Cardiomegaly") for i in range(120)]
    pos = [c for c in cases if "Cardiomegaly" in c.labels]
    neg = [c for c in cases if "Cardiomegaly" not in c.labels]
    assert pos and neg
    rate_pos = np.mean([c.meta["shortcut"]["box"] is not None for c in pos])
    rate_neg = np.mean([c.meta["shortcut"]["box"] is not None for c in neg])
    assert rate_pos >= 0.6 and rate_neg <= 0.2
    for c in cases:
        box = c.meta["shortcut"]["box"]
        if box is not None:
            x, y, w, h = box
            np.testing.assert_allclose(c.image[y:y + h, x:x + w], 1.0)
    # without the option nothing is planted and pixels are unchanged for tag-free images
    plain = render_case(4, 0, 64)
    assert plain.meta["shortcut"] == {"class": None, "box": None}
    with pytest.raises(ValueError, match="valid: .*Cardiomegaly"):
        render_case(0, 0, 64, shortcut="Cardiomegally")
    from training.data.phantom import generate_phantom
    import pandas as pd

    generate_phantom(tmp_path, n=6, size=64, seed=4, shortcut="Cardiomegaly")
    meta = pd.read_parquet(tmp_path / "phantom_meta.parquet")
    assert list(meta["image_id"]) == [f"phantom_{i:06d}" for i in range(6)]
    assert {"marker_box", "devices", "shortcut_box"} <= set(meta.columns)


def _case_fingerprint(case) -> str:
    """sha256 (first 16 hex) of the 8-bit image as written to PNG, the labels, boxes and report."""
    h = hashlib.sha256(np.round(case.image * 255).astype(np.uint8).tobytes())
    h.update(json.dumps([case.labels, case.boxes, case.report], sort_keys=True).encode())
    return h.hexdigest()[:16]


# Computed when the generator was split into a package (seed 0, 64 px); together these indices draw every
# finding, so a drawer, the anatomy or the artefacts cannot change silently.
PINNED = {0: "8221bc051bcd04bb",
          2: "fea4ba83364c30cc",
          4: "c51663665844a0ce",
          10: "d55d93f3f71f9a80",
          13: "060c78550cf897dd",
          20: "a6d66a872c3260b7",
          31: "9e884127ff46b223",
          87: "e1f3549d32e1c4de"}


def test_rendered_cases_are_pinned():
    got = {i: _case_fingerprint(render_case(seed=0, index=i, size=64)) for i in PINNED}
    assert got == PINNED
    drawn = {lab for i in PINNED for lab in render_case(seed=0, index=i, size=64).labels}
    assert drawn == set(PHANTOM_CLASSES)
    tagged = render_case(seed=0, index=4, size=64, shortcut="Effusion")
    assert tagged.meta["shortcut"]["box"] is not None and _case_fingerprint(tagged) == "f37914c52ab70bb0"


def test_every_class_has_one_registered_drawer():
    assert list_findings() == sorted(PHANTOM_CLASSES)
    with pytest.raises(ValueError, match="already has a drawer"):
        register_finding("Nodule")(lambda rng, ctx, label: [])
    with pytest.raises(ValueError, match="unknown phantom class 'Tumour'"):
        register_finding("Tumour")
    with pytest.raises(ValueError, match="cannot draw 'Tumour'; valid"):
        get_drawer("Tumour")
