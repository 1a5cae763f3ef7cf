"""The manifest: one typed definition (DESIGN.md "Manifest"), validation, Parquet I/O, splits, masks.

A manifest is a table with one row per image:

========== ================================= ====================================================
column     type                              meaning
========== ================================= ====================================================
image_id   string, unique                    identifier of the image
path       string or null                    absolute, or relative to the manifest's folder; null
                                             when only annotations were converted
patient_id string                            patient (images of one patient share one split)
split      "train" | "val" | "test"
view       string or null                    e.g. ``PA``, ``AP``
labels     list<string>                      positive findings (canonical NIH spellings); empty =
                                             no finding
boxes      list<struct{label, x, y, w, h,    boxes in pixels of the original image; ``rater`` is
           rater}>                           null unless the source has several readers (VinDr:
                                             ``"union"``, see :mod:`training.data.readers.vindr`)
width      int32 or null                     original image width in pixels
height     int32 or null                     original image height in pixels
report     string or null                    free-text report
source     string                            ``nih``, ``chestx-det``, ``vindr``, ``phantom``, ...
========== ================================= ====================================================

Optional columns (present only where a source has them; :data:`OPTIONAL_FIELDS`):

* ``polygons`` ``list<struct{label, points: list<list<double>>}>``: outlines in original-image
  pixels, ``points`` as ``[[x, y], ...]`` (ChestX-Det). Turn them into masks with
  :func:`polygon_mask`.
* ``rater_boxes`` ``list<box struct>``: every reader's own boxes with ``rater`` set to the reader id
  (VinDr ``R1`` ... ``R17``). ``boxes`` then holds the per-class union (``rater="union"``), so code
  that ignores raters sees each finding once.
* ``raters`` ``list<string>``: the reader ids that read the image (VinDr).

Other extra columns are kept as they are (types inferred by pyarrow).

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame([{"image_id": "a", "path": "a.png", "patient_id": "p1", "split": "train",
    ...     "view": "PA", "labels": ["Nodule"], "width": 64, "height": 64, "report": None,
    ...     "source": "demo", "boxes": [{"label": "Nodule", "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0}]}])
    >>> validate_manifest(df).loc[0, "boxes"][0]["rater"] is None
    True
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "NIH_CLASSES", "PHANTOM_CLASSES", "NO_FINDING", "SPLITS", "BOX_TYPE", "POLYGON_TYPE",
    "MANIFEST_SCHEMA", "OPTIONAL_FIELDS", "MANIFEST_COLUMNS", "ManifestError", "canonical_label",
    "validate_manifest", "read_manifest", "write_manifest", "patient_split", "polygon_mask",
]

#: The 14 findings of NIH ChestX-ray14 in their canonical spelling and the usual order.
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

#: The findings the phantom draws (a subset of :data:`NIH_CLASSES`, same order as there).
PHANTOM_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax",
    "Consolidation", "Hernia",
)

#: The "nothing found" pseudo-label of the sources; never stored in ``labels`` (empty list instead).
NO_FINDING = "No Finding"

SPLITS: tuple[str, ...] = ("train", "val", "test")

BOX_TYPE = pa.struct([
    pa.field("label", pa.string(), nullable=False),
    pa.field("x", pa.float64(), nullable=False),
    pa.field("y", pa.float64(), nullable=False),
    pa.field("w", pa.float64(), nullable=False),
    pa.field("h", pa.float64(), nullable=False),
    pa.field("rater", pa.string()),          # null, a reader id, or "union"
])

POLYGON_TYPE = pa.struct([
    pa.field("label", pa.string(), nullable=False),
    pa.field("points", pa.list_(pa.list_(pa.float64()))),   # [[x, y], ...] original pixels
])

#: The required columns, in order.
MANIFEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("patient_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("view", pa.string()),
    pa.field("labels", pa.list_(pa.string()), nullable=False),
    pa.field("boxes", pa.list_(BOX_TYPE), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("report", pa.string()),
    pa.field("source", pa.string(), nullable=False),
])

#: Optional columns with a fixed type (written only when the frame has them).
OPTIONAL_FIELDS: dict[str, pa.Field] = {
    "polygons": pa.field("polygons", pa.list_(POLYGON_TYPE)),
    "rater_boxes": pa.field("rater_boxes", pa.list_(BOX_TYPE)),
    "raters": pa.field("raters", pa.list_(pa.string())),
}

MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)


class ManifestError(ValueError):
    """A manifest breaks the schema; the message names the row (and its image_id) and the field.

    Attributes:
        row: position of the first bad row (``None`` for table-level problems).
        field: the offending column (``boxes[2].w`` style for nested values).
    """

    def __init__(self, message: str, row: int | None = None, field: str | None = None):
        super().__init__(message)
        self.row = row
        self.field = field


# ----------------------------------------------------------------------------------------------
# labels

def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_ALIASES: dict[str, str] = {_key(c): c for c in NIH_CLASSES}
_ALIASES.update({
    # NIH bounding-box list and general synonyms
    "infiltrate": "Infiltration", "infiltrates": "Infiltration",
    "pleural effusion": "Effusion", "effusions": "Effusion",
    "pleural thickening": "Pleural_Thickening",
    "pulmonary fibrosis": "Fibrosis",
    "oedema": "Edema", "pulmonary edema": "Edema", "pulmonary oedema": "Edema",
    "atelectases": "Atelectasis", "nodules": "Nodule", "masses": "Mass",
    "pneumothoraces": "Pneumothorax", "enlarged heart": "Cardiomegaly",
    # "nothing found" in its many spellings
    "no finding": NO_FINDING, "no findings": NO_FINDING, "normal": NO_FINDING,
})


def canonical_label(name: str, *, strict: bool = False) -> str:
    """Map a source's finding name to the canonical spelling used in manifests.

    NIH names and their aliases become the NIH spelling (``Infiltrate`` -> ``Infiltration``,
    ``Pleural effusion`` -> ``Effusion``, ``Pleural thickening`` -> ``Pleural_Thickening``,
    ``Pulmonary fibrosis`` -> ``Fibrosis``; case, spaces, hyphens and underscores do not matter).
    "No finding" in any spelling becomes :data:`NO_FINDING`. A name without an NIH equivalent keeps
    its words, capitalised and joined by ``_`` like ``Pleural_Thickening``
    (``Aortic enlargement`` -> ``Aortic_Enlargement``, ``Nodule/Mass`` -> ``Nodule_Mass``,
    ``ILD`` -> ``ILD``), so the same finding from two sources gets one name.

    Args:
        name: the source's label.
        strict: raise for names that are neither NIH classes nor "no finding".

    Returns:
        The canonical label.

    Raises:
        ValueError: ``name`` is empty or not a string, or (``strict``) has no NIH equivalent.

    Example:
        >>> canonical_label("Infiltrate"), canonical_label("Pleural effusion")
        ('Infiltration', 'Effusion')
        >>> canonical_label("Aortic enlargement")
        'Aortic_Enlargement'
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a finding label must be a non-empty string, got {name!r}")
    return _canonical(name, bool(strict))


@functools.lru_cache(maxsize=4096)
def _canonical(name: str, strict: bool) -> str:
    hit = _ALIASES.get(_key(name))
    if hit is not None:
        return hit
    if strict:
        raise ValueError(f"unknown finding {name!r}; valid: {list(NIH_CLASSES)} (or '{NO_FINDING}')")
    words = [w for w in re.split(r"[\s_/\-]+", name.strip()) if w]
    return "_".join(w if w.isupper() else w[:1].upper() + w[1:].lower() for w in words)


# ----------------------------------------------------------------------------------------------
# validation

def _is_null(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float):
        return v != v
    if isinstance(v, (str, list, dict, tuple, np.ndarray, int)):
        return False
    if v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, np.floating) and bool(np.isnan(v))


def _as_list(v: Any) -> list | None:
    """Parquet list cells arrive as numpy arrays, lists, tuples or null."""
    if _is_null(v):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(v)
    return None


def _num(v: Any) -> float | None:
    if type(v) is float or type(v) is int:   # fast path (the common case)
        return float(v) if v == v and v not in (math.inf, -math.inf) else None
    if isinstance(v, (bool, np.bool_)) or _is_null(v):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class _Checker:
    """Collects the first few problems so one error message shows what is wrong where."""

    def __init__(self, ids: Sequence[Any]):
        self.ids = ids
        self.errors: list[tuple[int | None, str, str]] = []

    def add(self, row: int | None, field: str, msg: str) -> None:
        self.errors.append((row, field, msg))

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        lines = []
        for row, field, msg in self.errors[:10]:
            where = "" if row is None else f"row {row} (image_id {self.ids[row]!r}), "
            lines.append(f"{where}field {field!r}: {msg}")
        more = f" (and {len(self.errors) - 10} more)" if len(self.errors) > 10 else ""
        row, field, _ = self.errors[0]
        raise ManifestError("invalid manifest: " + "; ".join(lines) + more, row=row, field=field)


def _check_label(chk: _Checker, r: int, field: str, lab: Any) -> str | None:
    if not isinstance(lab, str) or not lab.strip():
        chk.add(r, field, f"a label must be a non-empty string, got {lab!r}")
        return None
    canon = canonical_label(lab)
    if canon == NO_FINDING:
        chk.add(r, field, f"{lab!r} is not a finding; 'no finding' is an empty labels list")
        return None
    if canon != lab:
        chk.add(r, field, f"label {lab!r} is not canonical; use {canon!r}")
        return None
    return lab


def _check_boxes(chk: _Checker, r: int, field: str, cell: Any) -> list[dict] | None:
    items = _as_list(cell)
    if items is None:
        chk.add(r, field, f"must be a list of boxes, got {type(cell).__name__}")
        return None
    out = []
    for k, b in enumerate(items):
        f = f"{field}[{k}]"
        if not isinstance(b, dict):
            chk.add(r, f, f"a box must be a dict {{label, x, y, w, h}}, got {type(b).__name__}")
            continue
        lab = _check_label(chk, r, f + ".label", b.get("label"))
        vals = {}
        for key in ("x", "y", "w", "h"):
            v = _num(b.get(key))
            if v is None:
                chk.add(r, f"{f}.{key}", f"must be a finite number, got {b.get(key)!r}")
            elif key in ("w", "h") and v <= 0:
                chk.add(r, f"{f}.{key}", f"must be > 0, got {v}")
            vals[key] = v
        rater = b.get("rater")
        if _is_null(rater):
            rater = None
        elif not isinstance(rater, str):
            chk.add(r, f + ".rater", f"must be a string or null, got {rater!r}")
        if lab is not None and None not in vals.values():
            out.append({"label": lab, **vals, "rater": rater})
    return out


def _check_polygons(chk: _Checker, r: int, cell: Any) -> list[dict] | None:
    items = _as_list(cell)
    if items is None:
        chk.add(r, "polygons", f"must be a list of {{label, points}}, got {type(cell).__name__}")
        return None
    out = []
    for k, p in enumerate(items):
        f = f"polygons[{k}]"
        if not isinstance(p, dict):
            chk.add(r, f, f"a polygon must be a dict {{label, points}}, got {type(p).__name__}")
            continue
        lab = _check_label(chk, r, f + ".label", p.get("label"))
        try:
            pts = np.asarray([np.asarray(q, dtype=np.float64) for q in (_as_list(p.get("points")) or [])])
            ok = pts.ndim == 2 and pts.shape[1] == 2 and np.isfinite(pts).all() and len(pts) >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            chk.add(r, f + ".points", "must be a non-empty list of finite [x, y] pairs")
            continue
        if lab is not None:
            out.append({"label": lab, "points": pts.tolist()})
    return out


def _opt_str(chk: _Checker, r: int, field: str, v: Any) -> str | None:
    if _is_null(v):
        return None
    if not isinstance(v, str):
        chk.add(r, field, f"must be a string or null, got {v!r}")
        return None
    return v


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Check a manifest frame against the schema and return it normalised.

    Normalised means: list cells are Python lists, boxes are dicts with all six keys (``rater``
    filled with ``None``), numbers are floats, ``width``/``height`` nullable ``Int32``, nulls are
    ``None``. Extra columns are kept; optional columns (:data:`OPTIONAL_FIELDS`) are checked too.

    Args:
        df: the manifest (one row per image).

    Returns:
        A new, normalised frame with the required columns first and a fresh ``RangeIndex``.

    Raises:
        ManifestError: a required column is missing, an ``image_id`` repeats, or a value breaks its
            field's rule; the message names the row (with its image_id) and the field, e.g.
            ``row 3 (image_id 'x.png'), field 'boxes[0].w': must be > 0, got -2.0``.
    """
    if not isinstance(df, pd.DataFrame):
        raise ManifestError(f"a manifest must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks columns {missing}; required: {list(MANIFEST_COLUMNS)}",
                            field=missing[0])
    df = df.reset_index(drop=True)
    ids = df["image_id"].tolist()
    chk = _Checker(ids)
    n = len(df)

    image_id = [None] * n
    patient_id = [None] * n
    for r, (iid, pid) in enumerate(zip(ids, df["patient_id"].tolist())):
        if not isinstance(iid, str) or not iid:
            chk.add(r, "image_id", f"must be a non-empty string, got {iid!r}")
        image_id[r] = iid
        if isinstance(pid, (int, np.integer)) and not isinstance(pid, bool):
            pid = str(pid)
        if not isinstance(pid, str) or not pid:
            chk.add(r, "patient_id", f"must be a non-empty string, got {pid!r}")
        patient_id[r] = pid
    dup = pd.Series(ids)[pd.Series(ids).duplicated(keep="first")]
    for r, iid in dup.items():
        chk.add(int(r), "image_id", f"{iid!r} is not unique")

    split = df["split"].tolist()
    for r, s in enumerate(split):
        if s not in SPLITS:
            chk.add(r, "split", f"must be one of {list(SPLITS)}, got {s!r}")
    source = df["source"].tolist()
    for r, s in enumerate(source):
        if not isinstance(s, str) or not s:
            chk.add(r, "source", f"must be a non-empty string, got {s!r}")

    path = [_opt_str(chk, r, "path", v) for r, v in enumerate(df["path"].tolist())]
    view = [_opt_str(chk, r, "view", v) for r, v in enumerate(df["view"].tolist())]
    report = [_opt_str(chk, r, "report", v) for r, v in enumerate(df["report"].tolist())]

    sizes = {}
    for col in ("width", "height"):
        vals = []
        for r, v in enumerate(df[col].tolist()):
            if _is_null(v):
                vals.append(pd.NA)
                continue
            f = _num(v)
            if f is None or f != int(f) or f < 1:
                chk.add(r, col, f"must be a positive integer or null, got {v!r}")
                vals.append(pd.NA)
            else:
                vals.append(int(f))
        sizes[col] = pd.array(vals, dtype="Int32")

    labels = []
    for r, cell in enumerate(df["labels"].tolist()):
        items = _as_list(cell)
        if items is None:
            chk.add(r, "labels", f"must be a list of strings, got {type(cell).__name__}")
            labels.append([])
            continue
        labs = [_check_label(chk, r, f"labels[{k}]", lab) for k, lab in enumerate(items)]
        labs = [lab for lab in labs if lab is not None]
        if len(set(labs)) != len(labs):
            chk.add(r, "labels", f"repeats a label: {labs}")
        labels.append(labs)

    boxes = [_check_boxes(chk, r, "boxes", cell) or [] for r, cell in enumerate(df["boxes"].tolist())]
    extra: dict[str, list] = {}
    if "rater_boxes" in df.columns:
        extra["rater_boxes"] = [_check_boxes(chk, r, "rater_boxes", c) or []
                                for r, c in enumerate(df["rater_boxes"].tolist())]
    if "polygons" in df.columns:
        extra["polygons"] = [_check_polygons(chk, r, c) or [] for r, c in enumerate(df["polygons"].tolist())]
    chk.raise_if_any()

    obj = lambda v: pd.Series(v, dtype=object)  # noqa: E731 - keeps None (pandas 3 would use NaN)
    out = pd.DataFrame({
        "image_id": image_id, "path": obj(path), "patient_id": patient_id, "split": split,
        "view": obj(view), "labels": obj(labels), "boxes": obj(boxes), "width": sizes["width"],
        "height": sizes["height"], "report": obj(report), "source": source,
    })
    for col in df.columns:
        if col in MANIFEST_COLUMNS:
            continue
        out[col] = pd.Series(extra[col], dtype=object) if col in extra else df[col]
    return out


# ----------------------------------------------------------------------------------------------
# Parquet I/O

def _extra_array(col: pd.Series, type: pa.DataType | None = None) -> pa.Array:
    if col.dtype == object:
        values = [None if (not isinstance(v, (list, dict, np.ndarray)) and _is_null(v)) else v for v in col]
        return pa.array(values, type=type, from_pandas=True)
    return pa.Array.from_pandas(col, type=type)


def _arrow_schema(df: pd.DataFrame) -> pa.Schema:
    fields = list(MANIFEST_SCHEMA)
    for col in df.columns:
        if col in MANIFEST_COLUMNS:
            continue
        if col in OPTIONAL_FIELDS:
            fields.append(OPTIONAL_FIELDS[col])
        else:
            fields.append(pa.field(col, _extra_array(df[col]).type))
    return pa.schema(fields)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate a manifest and write it to Parquet with the typed schema.

    Paths are written as given (use paths relative to the manifest's folder for a relocatable data
    set). Parent folders are created.

    Args:
        df: the manifest.
        path: output ``.parquet`` file.

    Returns:
        The written path.

    Raises:
        ManifestError: ``df`` breaks the schema (nothing is written).
    """
    df = validate_manifest(df)
    schema = _arrow_schema(df)
    cols = {}
    for f in schema:
        if f.name not in MANIFEST_COLUMNS and f.name not in OPTIONAL_FIELDS:
            cols[f.name] = _extra_array(df[f.name], f.type)
            continue
        values = df[f.name].tolist()
        values = [None if (not isinstance(v, (list, dict)) and _is_null(v)) else v for v in values]
        cols[f.name] = pa.array(values, type=f.type)
    table = pa.Table.from_pydict(cols, schema=schema)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def read_manifest(path: str | os.PathLike, *, resolve_paths: bool = True) -> pd.DataFrame:
    """Read and validate a Parquet manifest.

    Args:
        path: the ``.parquet`` file.
        resolve_paths: turn relative image paths into absolute ones against the manifest's folder.

    Returns:
        The normalised manifest (see :func:`validate_manifest`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ManifestError: the file is not Parquet or breaks the schema.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{p} is not a readable Parquet manifest: {e}") from None
    known = set(MANIFEST_COLUMNS) | set(OPTIONAL_FIELDS)
    df = pd.DataFrame({
        name: (table.column(name).to_pylist()
               if name in known or pa.types.is_nested(table.schema.field(name).type)
               else table.column(name).to_pandas())
        for name in table.column_names})
    try:
        df = validate_manifest(df)
    except ManifestError as e:
        raise ManifestError(f"{p}: {e}", row=e.row, field=e.field) from None
    if resolve_paths:
        base = p.resolve().parent
        df["path"] = pd.Series([None if v is None else (v if os.path.isabs(v) else str(base / v)) for v in df["path"]], dtype=object)
    return df


# ----------------------------------------------------------------------------------------------
# splits and masks

def patient_split(patient_ids: Iterable[Any], fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0, splits: Sequence[str] = SPLITS) -> np.ndarray:
    """Assign a split to every row so that no patient appears in two splits.

    The distinct patients (sorted, so row order does not matter) are shuffled by ``seed`` and cut by
    ``fractions`` of the patient count; each split with a non-zero fraction gets at least one patient
    when there are enough patients.

    Args:
        patient_ids: one id per row (any hashable; compared as strings).
        fractions: share of patients per split, same length as ``splits`` (normalised to sum 1).
        seed: the same seed and ids give the same assignment.
        splits: names of the splits.

    Returns:
        Array (N,) of split names, one per row.

    Raises:
        ValueError: fractions negative, all zero, or not one per split.

    Example:
        >>> patient_split(["a", "a", "b", "c"], (0.5, 0.5), seed=0, splits=("train", "val")).tolist()
        ['train', 'train', 'val', 'train']
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) != len(splits) or (fr < 0).any() or fr.sum() <= 0 or not np.isfinite(fr).all():
        raise ValueError(f"fractions must be {len(splits)} non-negative numbers (one per split "
                         f"{list(splits)}) with a positive sum, got {list(fractions)}")
    ids = np.asarray([str(p) for p in patient_ids], dtype=object)
    uniq, inverse = np.unique(ids, return_inverse=True)
    n = len(uniq)
    counts = np.floor(fr / fr.sum() * n + 0.5).astype(int)
    counts[-1] = n - counts[:-1].sum()
    if counts[-1] < 0:   # rounding overshoot: take from the largest earlier split
        counts[np.argmax(counts[:-1])] += counts[-1]
        counts[-1] = 0
    want = fr > 0
    if n >= want.sum():
        for k in np.flatnonzero(want & (counts == 0)):
            counts[np.argmax(counts)] -= 1
            counts[k] += 1
    order = np.random.default_rng(seed).permutation(n)
    assign = np.empty(n, dtype=object)
    assign[order] = np.repeat(np.asarray(splits, dtype=object), counts)
    return assign[inverse].astype(str)


def polygon_mask(polygons: Iterable[Any], height: int, width: int, *, label: str | None = None,
                 scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Rasterise polygons into one boolean mask (their union).

    Args:
        polygons: polygons as ``[[x, y], ...]`` point lists, flat ``[x0, y0, x1, y1, ...]`` lists,
            or manifest ``{label, points}`` dicts.
        height: mask height in pixels.
        width: mask width in pixels.
        label: with dict polygons, keep only this label.
        scale: ``(sx, sy)`` applied to the points first (original -> current image pixels).

    Returns:
        Boolean array (height, width); polygons with fewer than 3 points are skipped.

    Raises:
        ValueError: non-positive ``height``/``width`` or malformed points.

    Example:
        >>> int(polygon_mask([[[0, 0], [3, 0], [3, 3], [0, 3]]], 5, 5).sum())
        16
    """
    from PIL import Image, ImageDraw

    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    img = Image.new("1", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(img)
    sx, sy = scale
    for k, poly in enumerate(polygons):
        if isinstance(poly, dict):
            if label is not None and poly.get("label") != label:
                continue
            poly = poly.get("points")
        pts = _as_list(poly)
        if pts is None:
            raise ValueError(f"polygon {k} must be a list of points, got {type(poly).__name__}")
        try:
            arr = np.asarray([np.asarray(p, dtype=np.float64) for p in pts], dtype=np.float64)
            arr = arr.reshape(-1, 2)
        except (TypeError, ValueError):
            raise ValueError(f"polygon {k} has malformed points (want [[x, y], ...])") from None
        if len(arr) < 3:
            continue
        arr = arr * np.array([sx, sy])
        draw.polygon([tuple(p) for p in arr.tolist()], fill=1, outline=1)
    return np.array(img, dtype=bool)
