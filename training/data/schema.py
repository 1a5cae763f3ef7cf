"""The manifest: its one typed definition (DESIGN.md "Manifest") and its validation.

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

The rest of the manifest's ideas have their own modules, and their names stay importable from here:
class names and :func:`canonical_label` (:mod:`training.data.labels`), :data:`SPLITS` and
:func:`patient_split` (:mod:`training.data.splits`), :func:`polygon_mask` (:mod:`training.data.masks`),
:func:`read_manifest` / :func:`write_manifest` (:mod:`training.data.manifest`, which imports this module,
so those two are looked up on first use).

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame([{"image_id": "a", "path": "a.png", "patient_id": "p1", "split": "train",
    ...     "view": "PA", "labels": ["Nodule"], "width": 64, "height": 64, "report": None,
    ...     "source": "demo", "boxes": [{"label": "Nodule", "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0}]}])
    >>> validate_manifest(df).loc[0, "boxes"][0]["rater"] is None
    True
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from training.data.cells import as_list, as_number, is_null
from training.data.labels import NIH_CLASSES, NO_FINDING, PHANTOM_CLASSES, canonical_label
from training.data.masks import polygon_mask
from training.data.splits import SPLITS, patient_split

__all__ = [
    "NIH_CLASSES", "PHANTOM_CLASSES", "NO_FINDING", "SPLITS", "BOX_TYPE", "POLYGON_TYPE",
    "MANIFEST_SCHEMA", "OPTIONAL_FIELDS", "MANIFEST_COLUMNS", "ManifestError", "canonical_label",
    "validate_manifest", "read_manifest", "write_manifest", "patient_split", "polygon_mask",
]

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
# validation

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
    items = as_list(cell)
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
            v = as_number(b.get(key))
            if v is None:
                chk.add(r, f"{f}.{key}", f"must be a finite number, got {b.get(key)!r}")
            elif key in ("w", "h") and v <= 0:
                chk.add(r, f"{f}.{key}", f"must be > 0, got {v}")
            vals[key] = v
        rater = b.get("rater")
        if is_null(rater):
            rater = None
        elif not isinstance(rater, str):
            chk.add(r, f + ".rater", f"must be a string or null, got {rater!r}")
        if lab is not None and None not in vals.values():
            out.append({"label": lab, **vals, "rater": rater})
    return out


def _check_polygons(chk: _Checker, r: int, cell: Any) -> list[dict] | None:
    items = as_list(cell)
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
            pts = np.asarray([np.asarray(q, dtype=np.float64) for q in (as_list(p.get("points")) or [])])
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
    if is_null(v):
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
            if is_null(v):
                vals.append(pd.NA)
                continue
            f = as_number(v)
            if f is None or f != int(f) or f < 1:
                chk.add(r, col, f"must be a positive integer or null, got {v!r}")
                vals.append(pd.NA)
            else:
                vals.append(int(f))
        sizes[col] = pd.array(vals, dtype="Int32")

    labels = []
    for r, cell in enumerate(df["labels"].tolist()):
        items = as_list(cell)
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


# read_manifest / write_manifest live in training.data.manifest, which imports this module; they stay
# importable from here (PEP 562) without an import cycle.
_MANIFEST_IO = ("read_manifest", "write_manifest")


def __getattr__(name: str) -> Any:
    if name in _MANIFEST_IO:
        from training.data import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MANIFEST_IO])
