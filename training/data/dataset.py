"""A torch ``Dataset`` over a manifest (DESIGN.md schema), with boxes moved by every transform.

Each item is a dict (docs/ARCHITECTURE.md, "training.data"):

- ``image``: (1, S, S) float32 in [0, 1] (grey; resized with antialiasing);
- ``labels``: (C,) float32 multi-hot over ``ds.classes``;
- ``boxes``: (K, 4) float32 ``xyxy`` in pixels of the S x S image; ``box_labels``: (K,) int64;
- ``mask``: (C, S, S) float32 when ``masks=True``: the union of the class's boxes, and where the
  manifest row has polygons (``polygons`` column: ``{label, points}``) or mask files (a ``mask_paths``
  column ``{label: path}`` or the phantom's ``masks.parquet`` beside the manifest) those shapes too;
  the mask is warped with the image by augmentation;
- ``image_id``: str; ``index``: int.

The object holds plain Python lists and numpy arrays only (no open files, no lambdas), so it pickles
into ``DataLoader`` workers; augmentation draws from torch's RNG, which the DataLoader seeds per worker.

Example:
    >>> from torch.utils.data import DataLoader
    >>> ds = ManifestDataset("phantom/manifest.parquet", image_size=64, augment=True)  # doctest: +SKIP
    >>> batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate)))        # doctest: +SKIP
    >>> batch["image"].shape                                                         # doctest: +SKIP
    torch.Size([8, 1, 64, 64])
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from training.data import transforms as T
from training.data.imageio import read_image
from training.data.schema import NIH_CLASSES, PHANTOM_CLASSES, read_manifest, validate_manifest
from training.runtime import collate, multi_hot  # noqa: F401  (collate: the data layer's name for it)

logger = logging.getLogger(__name__)

__all__ = ["ManifestDataset", "collate", "SPLITS"]

SPLITS = ("train", "val", "test")


def _as_list(value) -> list:
    """Parquet list cells arrive as numpy arrays, lists or None."""
    if value is None:
        return []
    if isinstance(value, float) and np.isnan(value):
        return []
    return list(value)


def _default_classes(df: pd.DataFrame) -> list[str]:
    if len(df) and (df["source"] == "phantom").all():
        return list(PHANTOM_CLASSES)
    present: set[str] = set()
    for labs, boxes in zip(df["labels"], df["boxes"]):
        present.update(_as_list(labs))
        present.update(b["label"] for b in _as_list(boxes))
    known = [c for c in NIH_CLASSES if c in present]
    return known + sorted(present - set(known))


def _points(points) -> list[tuple[float, float]]:
    """Polygon points given flat ``[x0, y0, x1, y1, ...]`` or as pairs."""
    pts = _as_list(points)
    if pts and np.ndim(pts[0]) == 0:
        flat = [float(p) for p in pts]
        return list(zip(flat[0::2], flat[1::2]))
    return [(float(p[0]), float(p[1])) for p in pts]


class ManifestDataset(Dataset):
    """Images and annotations of a manifest as tensors.

    Args:
        manifest: path to a manifest Parquet file (relative image paths resolve against its folder)
            or a DataFrame in the manifest schema (its paths are used as given).
        classes: class names, in output order. Default: ``PHANTOM_CLASSES`` when every row has source
            ``phantom``, else the classes present in labels or boxes in canonical NIH order (others
            appended alphabetically), taken before the split filter. Labels and boxes of other
            classes are ignored.
        image_size: output side S.
        augment: ``True`` for :class:`~training.data.transforms.AugmentConfig` defaults, an
            ``AugmentConfig`` for custom ranges, ``False`` for none.
        masks: also return ``mask`` (C, S, S).
        split: keep only rows of this split (``"train"``, ``"val"``, ``"test"`` or a list of them).
        max_pixels: decompression-bomb limit passed to ``read_image``.

    Raises:
        ValueError: unknown split, bad ``image_size``, duplicate classes, rows without an image path.
        training.data.schema.ManifestError: a manifest that breaks the schema.
    """

    def __init__(self, manifest: str | os.PathLike | pd.DataFrame, classes: Sequence[str] | None = None,
                 image_size: int = 224, augment: bool | T.AugmentConfig = False, masks: bool = False,
                 split: str | Iterable[str] | None = None, max_pixels: int = 50_000_000):
        if not isinstance(image_size, (int, np.integer)) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        side_masks: dict[str, list[tuple[str, str]]] = {}
        root: Path | None = None  # folder that relative mask paths resolve against
        if isinstance(manifest, pd.DataFrame):
            df = validate_manifest(manifest.copy())
        else:
            mpath = Path(manifest)
            root = mpath.resolve().parent
            df = read_manifest(mpath)
            side = mpath.parent / "masks.parquet"
            if masks and side.is_file():
                for iid, lab, p in pd.read_parquet(side).itertuples(index=False):
                    p = p if os.path.isabs(p) else str(mpath.parent / p)
                    side_masks.setdefault(iid, []).append((lab, p))
        # default classes come from the whole manifest, so every split gets the same columns
        self.classes: list[str] = list(classes) if classes is not None else _default_classes(df)
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            bad = [s for s in wanted if s not in SPLITS]
            if bad:
                raise ValueError(f"unknown split {bad}; valid: {list(SPLITS)}")
            df = df[df["split"].isin(wanted)]
            if df.empty:
                logger.warning("ManifestDataset: no rows in split %s", wanted)
        df = df.reset_index(drop=True)
        if df["path"].isna().any():
            n = int(df["path"].isna().sum())
            raise ValueError(f"{n} manifest rows have no image path (annotations-only manifest); "
                             f"first: {df.loc[df['path'].isna(), 'image_id'].iloc[0]!r}")

        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be a non-empty list of unique names (pass classes= when "
                             f"the manifest has no labels), got {self.classes}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.image_size = int(image_size)
        self.augment = T.AugmentConfig() if augment is True else (augment or None)
        self.masks = bool(masks)
        self.max_pixels = int(max_pixels)

        self.paths: list[str] = [str(p) for p in df["path"]]
        self.image_ids: list[str] = [str(i) for i in df["image_id"]]
        self.sizes: list[tuple[int | None, int | None]] = [
            (None if pd.isna(w) else int(w), None if pd.isna(h) else int(h))
            for w, h in zip(df["width"], df["height"])]
        self.label_matrix = multi_hot((_as_list(labs) for labs in df["labels"]), self.classes)  # (N, C)
        self.box_arrays: list[np.ndarray] = []   # (K, 4) xyxy original pixels
        self.box_label_arrays: list[np.ndarray] = []
        for boxes in df["boxes"]:
            bl = [b for b in _as_list(boxes) if b["label"] in index]
            arr = np.array([[b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]] for b in bl],
                           dtype=np.float32).reshape(-1, 4)
            self.box_arrays.append(arr)
            self.box_label_arrays.append(np.array([index[b["label"]] for b in bl], dtype=np.int64))
        missing = [c for c in self.classes if self.label_matrix[:, index[c]].sum() == 0]
        if missing and len(df):
            logger.info("ManifestDataset: no positives for %s", missing)

        # optional shape annotations for masks: polygons and mask files (label, path)
        self.polygons: list[list[tuple[int, list[tuple[float, float]]]]] = [[] for _ in range(len(df))]
        self.mask_files: list[list[tuple[int, str]]] = [[] for _ in range(len(df))]
        if self.masks:
            if "polygons" in df.columns:
                for r, polys in enumerate(df["polygons"]):
                    self.polygons[r] = [(index[p["label"]], _points(p["points"]))
                                        for p in _as_list(polys) if p["label"] in index]
            if "mask_paths" in df.columns:
                for r, mp in enumerate(df["mask_paths"]):
                    items = mp.items() if isinstance(mp, dict) else [
                        (x["label"], x["path"]) if isinstance(x, dict) else tuple(x)
                        for x in _as_list(mp)]
                    self.mask_files[r] = [(index[k], str(root / v if root and not os.path.isabs(v)
                                                          else v)) for k, v in items if k in index]
            for r, iid in enumerate(self.image_ids):
                self.mask_files[r] += [(index[lab], p) for lab, p in side_masks.get(iid, [])
                                       if lab in index]

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative image counts per class, each (C,) int64, over this dataset."""
        pos = self.label_matrix.sum(0).astype(np.int64)
        return pos, len(self) - pos

    def _mask(self, r: int, boxes_s: torch.Tensor, box_labels: torch.Tensor, sx: float, sy: float):
        S, C = self.image_size, len(self.classes)
        mask = T.boxes_to_mask(boxes_s, box_labels, C, S)
        if self.polygons[r]:
            for c in range(C):
                polys = [pts for lab, pts in self.polygons[r] if lab == c and len(pts) >= 3]
                if not polys:
                    continue
                canvas = Image.new("L", (S, S), 0)
                draw = ImageDraw.Draw(canvas)
                for pts in polys:
                    draw.polygon([(x * sx, y * sy) for x, y in pts], fill=1)
                mask[c] = torch.maximum(mask[c], torch.from_numpy(np.asarray(canvas, np.float32)))
        for c, path in self.mask_files[r]:
            m = torch.from_numpy(read_image(path, max_pixels=self.max_pixels))[None, None]
            m = torch.nn.functional.interpolate(m, size=(S, S), mode="bilinear", align_corners=False)
            mask[c] = torch.maximum(mask[c], (m[0, 0] >= 0.5).float())
        return mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)}")
        r = i % len(self)
        S = self.image_size
        arr = read_image(self.paths[r], max_pixels=self.max_pixels)      # (H, W) float32 [0, 1]
        h, w = arr.shape
        mw, mh = self.sizes[r]
        sx, sy = S / (mw or w), S / (mh or h)
        image = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]  # (1, H, W)
        boxes = torch.from_numpy(self.box_arrays[r].copy())
        box_labels = torch.from_numpy(self.box_label_arrays[r].copy())
        image, boxes, _ = T.resize(image, boxes, S, box_scale=(sx, sy))
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, S)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, S)
        mask = self._mask(r, boxes, box_labels, sx, sy) if self.masks else None
        if self.augment is not None:
            image, boxes, box_labels, mask = T.random_augment(image, boxes, box_labels, mask,
                                                              self.augment)
        item = {
            "image": image.float().contiguous(),                   # (1, S, S)
            "labels": torch.from_numpy(self.label_matrix[r].copy()),  # (C,)
            "boxes": boxes.float(),                                # (K, 4) xyxy
            "box_labels": box_labels.long(),                       # (K,)
            "image_id": self.image_ids[r],
            "index": r,
        }
        if mask is not None:
            item["mask"] = mask.float()                            # (C, S, S)
        return item

    def __repr__(self) -> str:
        return (f"ManifestDataset(n={len(self)}, classes={len(self.classes)}, "
                f"image_size={self.image_size}, augment={self.augment is not None}, masks={self.masks})")

