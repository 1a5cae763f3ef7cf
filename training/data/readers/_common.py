"""Helpers shared by the readers: gzip-aware text opening, image lookup, split assignment."""
from __future__ import annotations

import gzip
import io
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from training.data.imageio import ImageReadError, image_size
from training.data.schema import SPLITS, patient_split

logger = logging.getLogger(__name__)

#: shares of patients per split when a source has no official split
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
IMAGE_EXTENSIONS = (".png", ".dcm", ".dicom", ".jpg", ".jpeg")


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a text file for reading, gunzipping it when it starts with the gzip magic bytes.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8-sig", newline="")
    return open(p, encoding="utf-8-sig", newline="")


class ImageIndex:
    """Finds image files under a folder (searched recursively once) by file name or by stem.

    NIH ships its PNGs in ``images_001/images/...`` sub-folders and VinDr names files ``<id>.dicom``,
    so readers look an image up by its name (``00000001_000.png``) or id (``<id>`` + any of
    :data:`IMAGE_EXTENSIONS`).
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else Path(root)
        self.by_name: dict[str, str] = {}
        self.by_stem: dict[str, str] = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"images folder not found: {self.root}")
        for dirpath, _, files in os.walk(self.root):
            for fn in files:
                full = os.path.abspath(os.path.join(dirpath, fn))
                self.by_name.setdefault(fn, full)
                stem, ext = os.path.splitext(fn)
                if ext.lower() in IMAGE_EXTENSIONS:
                    self.by_stem.setdefault(stem, full)

    def find(self, name: str) -> str | None:
        """Absolute path of the image called ``name`` (file name or id), or ``None``."""
        if self.root is None:
            return None
        return self.by_name.get(os.path.basename(name)) or self.by_stem.get(os.path.splitext(os.path.basename(name))[0])

    def size(self, path: str | None) -> tuple[int | None, int | None]:
        """``(width, height)`` from the image header, ``(None, None)`` when unreadable or absent."""
        if path is None:
            return None, None
        try:
            return image_size(path)
        except ImageReadError as e:
            logger.warning("%s", e)
            return None, None


def assign_splits(patient_ids: Sequence[str], fixed: Sequence[str | None] | None = None,
                  seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Splits for rows: official ones where given, the rest patient-wise by ``seed``.

    Rows with ``fixed[i]`` set keep it, except that a patient never spans two splits: a patient with
    any ``test`` row goes wholly to ``test`` (then ``val``, ``train``). The remaining patients are
    split by :func:`training.data.schema.patient_split`; when some rows already are ``test``, only
    train/val are drawn, in the ratio of ``fractions``.

    Returns:
        Array (N,) of split names.
    """
    n = len(patient_ids)
    pids = np.asarray([str(p) for p in patient_ids], dtype=object)
    out = np.full(n, None, dtype=object)
    if fixed is not None:
        fixed_arr = np.asarray(list(fixed), dtype=object)
        bad = sorted({s for s in fixed_arr if s is not None and s not in SPLITS})
        if bad:
            raise ValueError(f"unknown split names {bad}; valid: {list(SPLITS)}")
        moved = 0
        for s in reversed(SPLITS):   # test wins over val over train
            pts = set(pids[fixed_arr == s])
            if not pts:
                continue
            hit = np.isin(pids, list(pts)) & (out == None)  # noqa: E711 - elementwise
            moved += int((hit & (fixed_arr != s) & (fixed_arr != None)).sum())  # noqa: E711
            out[hit] = s
        if moved:
            logger.warning("%d rows moved to their patient's other split so that no patient spans two", moved)
    rest = out == None  # noqa: E711
    if rest.any():
        fr = list(fractions)
        if (out == "test").any():
            fr = fr[:2] + [0.0]
        out[rest] = patient_split(pids[rest], fr, seed=seed)
    return out.astype(str)


def read_list(path: str | os.PathLike | None) -> set[str]:
    """Names from a one-name-a-line file (blank lines skipped), or an empty set for ``None``."""
    if path is None:
        return set()
    with open_text(path) as f:
        return {line.strip() for line in f if line.strip()}


def unique_ordered(items: Iterable[str]) -> list[str]:
    """Items without repeats, first occurrence order."""
    return list(dict.fromkeys(items))
