"""ChestX-Det (ChestX-Det10 / ChestX-Det, Deepwise): JSON annotation lists -> manifest.

Each JSON file is a list of ``{file_name, syms, boxes, polygons}``: ``syms[i]`` names the finding
outlined by ``polygons[i]`` (``[[x, y], ...]``) and boxed by ``boxes[i] = [x1, y1, x2, y2]``. Some
releases store those three fields as Python-literal strings (``"['Nodule']"``); both forms are read.
Boxes become ``x, y, w, h``; polygons go to the manifest's optional ``polygons`` column (masks on
demand: :func:`training.data.schema.polygon_mask`); names are made canonical
(``Pleural Thickening`` -> ``Pleural_Thickening``, ``Diffuse Nodule`` -> ``Diffuse_Nodule``).

The format has neither image sizes nor patients: ``width``/``height`` come from the image header
when ``images`` holds the file (else null) and each image is its own patient. Entries of a JSON file
whose name contains ``test`` go to the ``test`` split; the rest are split by seed.

Example:
    >>> df = read_chestx_det(["ChestX_Det_train.json", "ChestX_Det_test.json"])  # doctest: +SKIP
"""
from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from training.data.readers._common import ImageIndex, assign_splits, open_text, unique_ordered
from training.data.schema import NO_FINDING, canonical_label, validate_manifest

logger = logging.getLogger(__name__)

__all__ = ["read_chestx_det"]


def _field(entry: dict, key: str, where: str) -> list:
    v = entry.get(key, [])
    if v is None:
        return []
    if isinstance(v, str):
        try:
            v = ast.literal_eval(v) if v.strip() else []
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: field {key!r} is neither a list nor a list literal") from None
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{where}: field {key!r} must be a list, got {type(v).__name__}")
    return list(v)


def read_chestx_det(json_files: str | os.PathLike | Iterable[str | os.PathLike],
                    images: str | os.PathLike | None = None, *, seed: int = 0) -> pd.DataFrame:
    """Convert ChestX-Det JSON files into one manifest.

    Args:
        json_files: one or more JSON files (plain or gzipped).
        images: optional image folder (searched recursively) to set ``path`` and read sizes.
        seed: seed of the split of non-test entries (70/10/20 %, or train/val 7:1 when a test file
            is given).

    Returns:
        A validated manifest (source ``chestx-det``) with the optional ``polygons`` column.

    Raises:
        FileNotFoundError: a file or folder does not exist.
        ValueError: malformed JSON, mismatched ``syms``/``boxes``/``polygons`` lengths, a bad box, or
            an image listed twice (the message names file and entry).
    """
    files = [json_files] if isinstance(json_files, (str, os.PathLike)) else list(json_files)
    if not files:
        raise ValueError("read_chestx_det needs at least one JSON file")
    index = ImageIndex(images)
    rows: list[dict[str, Any]] = []
    fixed: list[str | None] = []
    seen: dict[str, str] = {}
    for jf in files:
        with open_text(jf) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{jf}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{jf}: expected a JSON list of entries, got {type(data).__name__}")
        is_test = "test" in Path(jf).name.lower()
        for k, e in enumerate(data):
            where = f"{jf}, entry {k}"
            if not isinstance(e, dict) or not isinstance(e.get("file_name"), str) or not e["file_name"]:
                raise ValueError(f"{where}: an entry needs a 'file_name' string")
            name = e["file_name"]
            if name in seen:
                raise ValueError(f"{where}: image {name!r} already listed in {seen[name]}")
            seen[name] = str(jf)
            syms = _field(e, "syms", where)
            bxs = _field(e, "boxes", where)
            polys = _field(e, "polygons", where)
            if len(bxs) != len(syms) or (polys and len(polys) != len(syms)):
                raise ValueError(f"{where}: {len(syms)} syms, {len(bxs)} boxes and {len(polys)} polygons "
                                 f"do not pair up")
            labels = [canonical_label(str(s)) for s in syms]
            boxes, polygons = [], []
            for i, (lab, b) in enumerate(zip(labels, bxs)):
                try:
                    x1, y1, x2, y2 = (float(v) for v in b)
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: box {i} must be [x1, y1, x2, y2], got {b!r}") from None
                if x2 <= x1 or y2 <= y1:
                    raise ValueError(f"{where}: box {i} {b!r} has x2 <= x1 or y2 <= y1")
                boxes.append({"label": lab, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1, "rater": None})
                if polys:
                    polygons.append({"label": lab, "points": [[float(p[0]), float(p[1])] for p in polys[i]]})
            path = index.find(name)
            w, h = index.size(path)
            rows.append({
                "image_id": name, "path": path, "patient_id": os.path.splitext(name)[0], "view": None,
                "labels": unique_ordered(lab for lab in labels if lab != NO_FINDING), "boxes": boxes,
                "width": w, "height": h, "report": None, "source": "chestx-det", "polygons": polygons,
            })
            fixed.append("test" if is_test else None)
    if images is not None:
        missing = sum(r["path"] is None for r in rows)
        if missing:
            logger.warning("%d of %d ChestX-Det images not found under %s; path and size are null",
                           missing, len(rows), images)
    splits = assign_splits([r["patient_id"] for r in rows], fixed if any(fixed) else None, seed=seed)
    for r, s in zip(rows, splits):
        r["split"] = s
    cols = ["image_id", "path", "patient_id", "split", "view", "labels", "boxes", "width", "height",
            "report", "source", "polygons"]
    return validate_manifest(pd.DataFrame(rows, columns=cols))
