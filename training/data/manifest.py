"""Manifest files: validated Parquet I/O with the typed schema of :mod:`training.data.schema`.

:func:`write_manifest` validates and writes with the fixed Arrow types (required columns, then optional
and extra ones); :func:`read_manifest` reads, validates and resolves relative image paths against the
manifest's folder. Both names are also importable from :mod:`training.data.schema` and :mod:`training.data`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.data.cells import is_null
from training.data.schema import MANIFEST_COLUMNS, MANIFEST_SCHEMA, OPTIONAL_FIELDS, ManifestError, validate_manifest

__all__ = ["read_manifest", "write_manifest"]


def _extra_array(col: pd.Series, type: pa.DataType | None = None) -> pa.Array:
    if col.dtype == object:
        values = [None if (not isinstance(v, (list, dict, np.ndarray)) and is_null(v)) else v for v in col]
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
        values = [None if (not isinstance(v, (list, dict)) and is_null(v)) else v for v in values]
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
