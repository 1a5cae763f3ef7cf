"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` (+ ``BBox_List_2017.csv``, official split lists) -> manifest.

Formats handled:

* ``Data_Entry_2017.csv`` as first released (``Patient Age`` like ``058Y``, a trailing empty column)
  and the 2020 revision (integer ages, no trailing column); plain or gzipped (found from the bytes).
  The header ``OriginalImage[Width,Height]`` splits into two names by the comma inside the
  brackets, which is exactly how the data rows split, so columns are found by name.
* ``BBox_List_2017.csv`` whose header ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` does not
  line up with its rows: the rows are read by position (id, label, x, y, w, h).
* ``train_val_list.txt`` / ``test_list.txt`` (one image name a line), optional.

Coordinates: the public PNGs are 1024 x 1024 and ``BBox_List_2017`` is in those pixels, while the
``OriginalImage[Width,Height]`` columns give the size *before* that resize. The manifest's
``width``/``height`` must be the frame of its boxes, so they are :data:`NIH_IMAGE_SIZE` (1024),
or the header size of the image found under ``images`` (boxes are then scaled to it, e.g. for
down-sized copies); the metadata sizes and pixel spacing are kept in the extra columns
``original_width``, ``original_height``, ``pixel_spacing_x``, ``pixel_spacing_y``.

Example:
    >>> df = read_nih("Data_Entry_2017.csv.gz", bbox="BBox_List_2017.csv")  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Any

import pandas as pd

from training.data.readers._common import ImageIndex, assign_splits, open_text, read_list, unique_ordered
from training.data.schema import NO_FINDING, canonical_label, validate_manifest

logger = logging.getLogger(__name__)

__all__ = ["read_nih", "read_nih_boxes", "NIH_IMAGE_SIZE"]

#: side of the distributed NIH PNGs, the frame of ``BBox_List_2017`` coordinates
NIH_IMAGE_SIZE = 1024


def _col(header: list[str], *names: str, required: bool = True, path: str = "") -> int | None:
    norm = [h.strip().lower() for h in header]
    for name in names:
        for i, h in enumerate(norm):
            if h == name.lower() or h.startswith(name.lower()):
                return i
    if required:
        raise ValueError(f"{path}: no column {names[0]!r} in header {header}")
    return None


def _float(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_nih_boxes(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Boxes of ``BBox_List_2017.csv`` by image name, labels canonical (``Infiltrate`` -> ``Infiltration``).

    Args:
        path: the CSV (plain or gzipped).

    Returns:
        ``{image_name: [{label, x, y, w, h, rater: None}, ...]}`` in 1024-px coordinates.

    Raises:
        ValueError: a row without a label or with a non-numeric / non-positive box (names the line).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    with open_text(path) as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{path}: empty bounding-box file")
        for line, row in enumerate(rows, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < 6:
                raise ValueError(f"{path}, line {line}: expected 'Image Index,Finding Label,x,y,w,h', got {row}")
            name, label = row[0].strip(), row[1].strip()
            vals = [_float(v) for v in row[2:6]]
            if not name or not label or None in vals or vals[2] <= 0 or vals[3] <= 0:
                raise ValueError(f"{path}, line {line}: bad box row {row[:6]}")
            x, y, w, h = vals
            out.setdefault(name, []).append(
                {"label": canonical_label(label), "x": x, "y": y, "w": w, "h": h, "rater": None})
    return out


def read_nih(data_entry: str | os.PathLike, bbox: str | os.PathLike | None = None,
             images: str | os.PathLike | None = None, *, train_val_list: str | os.PathLike | None = None,
             test_list: str | os.PathLike | None = None, seed: int = 0) -> pd.DataFrame:
    """Convert NIH ChestX-ray14 metadata (and boxes) into a manifest.

    Args:
        data_entry: ``Data_Entry_2017.csv`` (2017 or 2020 revision, plain or ``.gz``).
        bbox: optional ``BBox_List_2017.csv``; images that have boxes but no metadata row are added
            (patient from the file name) with a warning.
        images: optional image folder (searched recursively); ``path`` is set for images found
            there and stays null otherwise.
        train_val_list: optional official ``train_val_list.txt``.
        test_list: optional official ``test_list.txt``; without it the split is patient-wise by
            ``seed`` (70/10/20 % of patients); with it, the other patients are split train/val 7:1.
        seed: seed of the patient-wise split.

    Returns:
        A validated manifest (source ``nih``) with the extra columns described in the module
        docstring.

    Raises:
        FileNotFoundError: a given file or folder does not exist.
        ValueError: a malformed file (the message names file and line).
    """
    index = ImageIndex(images)
    boxes = read_nih_boxes(bbox) if bbox is not None else {}
    rows: list[dict[str, Any]] = []
    with open_text(data_entry) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{data_entry}: empty file")
        p = str(data_entry)
        i_id, i_lab = _col(header, "Image Index", path=p), _col(header, "Finding Labels", path=p)
        i_pat = _col(header, "Patient ID", path=p)
        i_view = _col(header, "View Position", required=False)
        i_w = _col(header, "OriginalImage[Width", "OriginalImageWidth", required=False)
        i_sp = _col(header, "OriginalImagePixelSpacing[x", "OriginalImagePixelSpacing", required=False)
        for line, row in enumerate(reader, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(i_id, i_lab, i_pat):
                raise ValueError(f"{p}, line {line}: too few columns ({len(row)}) for header {header}")
            name = row[i_id].strip()
            labs = [canonical_label(t) for t in row[i_lab].split("|") if t.strip()]
            pid = row[i_pat].strip()
            if not name or not pid:
                raise ValueError(f"{p}, line {line}: empty 'Image Index' or 'Patient ID'")
            get = lambda i: row[i].strip() if i is not None and i < len(row) else ""  # noqa: E731
            ow, oh = _float(get(i_w)), _float(get(None if i_w is None else i_w + 1))
            sx, sy = _float(get(i_sp)), _float(get(None if i_sp is None else i_sp + 1))
            rows.append({
                "image_id": name, "patient_id": str(int(pid)) if pid.isdigit() else pid,
                "view": get(i_view) or None, "labels": [lab for lab in labs if lab != NO_FINDING],
                "original_width": None if ow is None else int(ow), "original_height": None if oh is None else int(oh),
                "pixel_spacing_x": sx, "pixel_spacing_y": sy,
            })
    known = {r["image_id"] for r in rows}
    orphans = [n for n in boxes if n not in known]
    if orphans:
        logger.warning("%d images of %s have boxes but no Data_Entry row (e.g. %s); added with the "
                       "patient from the file name", len(orphans), bbox, orphans[0])
        for n in orphans:
            rows.append({"image_id": n, "patient_id": str(int(n.split("_")[0])) if n.split("_")[0].isdigit()
                         else n, "view": None, "labels": [], "original_width": None, "original_height": None,
                         "pixel_spacing_x": None, "pixel_spacing_y": None})

    missing = 0
    for r in rows:
        bxs = [dict(b) for b in boxes.get(r["image_id"], [])]
        r["labels"] = unique_ordered(r["labels"] + [b["label"] for b in bxs])
        path = index.find(r["image_id"])
        missing += images is not None and path is None
        w, h = index.size(path)
        if w is None or h is None:
            w = h = NIH_IMAGE_SIZE
        elif (w, h) != (NIH_IMAGE_SIZE, NIH_IMAGE_SIZE):
            sx, sy = w / NIH_IMAGE_SIZE, h / NIH_IMAGE_SIZE
            for b in bxs:
                b.update(x=b["x"] * sx, y=b["y"] * sy, w=b["w"] * sx, h=b["h"] * sy)
        r.update(path=path, boxes=bxs, width=w, height=h, report=None, source="nih")
    if missing:
        logger.warning("%d of %d NIH images not found under %s; their path is null", missing, len(rows), images)

    official_test, official_tv = read_list(test_list), read_list(train_val_list)
    fixed = None
    if official_test or official_tv:
        fixed = ["test" if r["image_id"] in official_test else None for r in rows]
        unlisted = sum(1 for r in rows if r["image_id"] not in official_test and r["image_id"] not in official_tv)
        if unlisted and official_tv:
            logger.warning("%d images are in neither official list; split with train_val by seed", unlisted)
    splits = assign_splits([r["patient_id"] for r in rows], fixed, seed=seed)
    for r, s in zip(rows, splits):
        r["split"] = s
    cols = ["image_id", "path", "patient_id", "split", "view", "labels", "boxes", "width", "height",
            "report", "source", "original_width", "original_height", "pixel_spacing_x", "pixel_spacing_y"]
    return validate_manifest(pd.DataFrame(rows, columns=cols))
