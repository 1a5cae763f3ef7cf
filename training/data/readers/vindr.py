"""VinDr-CXR: the training CSV with several radiologists per image -> manifest.

Rows are ``image_id, class_name, [class_id,] rad_id, x_min, y_min, x_max, y_max`` (the Kaggle
``train.csv`` and the PhysioNet ``annotations_train.csv`` / ``annotations_test.csv`` layouts; columns
found by name; optional ``width``/``height`` columns are used when present). "No finding" rows and
rows with empty coordinates give no box.

How both views of the readers are kept:

* ``rater_boxes`` (optional column): every radiologist's own boxes, ``rater`` = ``rad_id``.
* ``boxes``: the **union per class**: for each image and class, boxes of all radiologists that
  overlap (positive-area intersection, transitively) are merged into their enclosing box, with
  ``rater="union"``. Separate lesions stay separate boxes; code that ignores ``rater`` sees each
  finding once.
* ``labels``: every class at least one radiologist marked (canonical names: ``Pleural effusion`` ->
  ``Effusion``, ``Nodule/Mass`` -> ``Nodule_Mass``, ``Aortic enlargement`` -> ``Aortic_Enlargement``);
  empty when all said "No finding".
* ``raters`` (extra column): the radiologist ids that read the image.

There are no patient ids, so each image is its own patient; the split is by seed (70/10/20 %), or
``test`` for every row of a file whose name contains ``test``. Sizes come from the CSV when it has
them, else from the image header (``<id>.dicom``/``.dcm``/``.png`` under ``images``), else null.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from training.data.readers._common import ImageIndex, assign_splits, open_text, unique_ordered
from training.data.schema import NO_FINDING, canonical_label, validate_manifest

logger = logging.getLogger(__name__)

__all__ = ["read_vindr", "union_boxes"]


def union_boxes(boxes: Sequence[dict[str, Any]], rater: str = "union") -> list[dict[str, Any]]:
    """Merge overlapping boxes of the same label into their enclosing boxes.

    Boxes overlap when their intersection has positive area; merging is transitive (connected
    components of the overlap graph), so A-B and B-C overlapping give one box even if A and C do not.

    Args:
        boxes: ``{label, x, y, w, h, ...}`` dicts (any raters).
        rater: the ``rater`` value of the merged boxes.

    Returns:
        Merged boxes sorted by label then position, each ``{label, x, y, w, h, rater}``.

    Example:
        >>> bs = [{"label": "A", "x": 0, "y": 0, "w": 2, "h": 2}, {"label": "A", "x": 1, "y": 1, "w": 2, "h": 2},
        ...       {"label": "A", "x": 9, "y": 9, "w": 1, "h": 1}]
        >>> [(b["x"], b["y"], b["w"], b["h"]) for b in union_boxes(bs)]
        [(0.0, 0.0, 3.0, 3.0), (9.0, 9.0, 1.0, 1.0)]
    """
    out: list[dict[str, Any]] = []
    for label in sorted({b["label"] for b in boxes}):
        xyxy = np.array([[b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]] for b in boxes
                         if b["label"] == label], dtype=np.float64)   # (K, 4)
        k = len(xyxy)
        iw = np.minimum(xyxy[:, None, 2], xyxy[None, :, 2]) - np.maximum(xyxy[:, None, 0], xyxy[None, :, 0])
        ih = np.minimum(xyxy[:, None, 3], xyxy[None, :, 3]) - np.maximum(xyxy[:, None, 1], xyxy[None, :, 1])
        adj = (iw > 0) & (ih > 0)                                          # (K, K) overlap graph
        comp = np.arange(k)
        while True:   # label propagation to the smallest index in each connected component
            new = np.where(adj, comp[None, :], k).min(axis=1)
            new = np.minimum(new, comp)
            if np.array_equal(new, comp):
                break
            comp = new
        for c in np.unique(comp):
            g = xyxy[comp == c]
            x1, y1 = g[:, 0].min(), g[:, 1].min()
            x2, y2 = g[:, 2].max(), g[:, 3].max()
            out.append({"label": label, "x": float(x1), "y": float(y1), "w": float(x2 - x1),
                        "h": float(y2 - y1), "rater": rater})
    out.sort(key=lambda b: (b["label"], b["x"], b["y"]))
    return out


def _num(v: str | None) -> float | None:
    if v is None or not str(v).strip():
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if np.isfinite(f) else None


def read_vindr(csv_file: str | os.PathLike, images: str | os.PathLike | None = None, *,
               seed: int = 0) -> pd.DataFrame:
    """Convert a VinDr-CXR annotation CSV into a manifest (see the module docstring for the layout).

    Args:
        csv_file: the CSV (plain or gzipped).
        images: optional image folder (searched recursively) to set ``path`` and read sizes.
        seed: seed of the split.

    Returns:
        A validated manifest (source ``vindr``) with the ``rater_boxes`` and ``raters`` columns.

    Raises:
        FileNotFoundError: the file or folder does not exist.
        ValueError: missing columns, or a row with a partial or inverted box (names the line).
    """
    index = ImageIndex(images)
    per_image: dict[str, dict[str, Any]] = {}
    with open_text(csv_file) as f:
        reader = csv.DictReader(f)
        need = ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_file}: missing columns {missing}; found {reader.fieldnames}, need {need}")
        for line, row in enumerate(reader, start=2):
            iid = (row["image_id"] or "").strip()
            if not iid:
                raise ValueError(f"{csv_file}, line {line}: empty image_id")
            rec = per_image.setdefault(iid, {"labels": [], "rater_boxes": [], "raters": [],
                                             "width": None, "height": None})
            rad = (row["rad_id"] or "").strip() or None
            if rad is not None:
                rec["raters"].append(rad)
            label = canonical_label(row["class_name"] or NO_FINDING)
            for key in ("width", "height"):
                v = _num(row.get(key))
                if v is not None:
                    rec[key] = int(v)
            if label == NO_FINDING:
                continue
            rec["labels"].append(label)
            coords = [_num(row[c]) for c in ("x_min", "y_min", "x_max", "y_max")]
            if all(c is None for c in coords):
                continue
            if any(c is None for c in coords) or coords[2] <= coords[0] or coords[3] <= coords[1]:
                raise ValueError(f"{csv_file}, line {line}: bad box {[row[c] for c in need[3:]]}")
            x1, y1, x2, y2 = coords
            rec["rater_boxes"].append({"label": label, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                                       "rater": rad})
    rows = []
    for iid, rec in per_image.items():
        path = index.find(iid)
        w, h = rec["width"], rec["height"]
        if w is None or h is None:
            w, h = index.size(path)
        rows.append({
            "image_id": iid, "path": path, "patient_id": iid, "view": None,
            "labels": unique_ordered(rec["labels"]), "boxes": union_boxes(rec["rater_boxes"]),
            "width": w, "height": h, "report": None, "source": "vindr",
            "rater_boxes": rec["rater_boxes"], "raters": sorted(set(rec["raters"])),
        })
    if images is not None:
        missing_n = sum(r["path"] is None for r in rows)
        if missing_n:
            logger.warning("%d of %d VinDr images not found under %s", missing_n, len(rows), images)
    fixed = ["test"] * len(rows) if "test" in Path(csv_file).name.lower() else None
    for r, s in zip(rows, assign_splits([r["patient_id"] for r in rows], fixed, seed=seed)):
        r["split"] = s
    cols = ["image_id", "path", "patient_id", "split", "view", "labels", "boxes", "width", "height",
            "report", "source", "rater_boxes", "raters"]
    return validate_manifest(pd.DataFrame(rows, columns=cols))
