"""Segmentation supervision for DWARF: masks from boxes, polygons or masks, pseudo-labels from a
segmentation model, and clinician feedback records.

Every source ends in the same per-image tensors: ``mask`` (C, S, S) float {0, 1} and ``seg_valid``
(C,) float, 1 where the mask of that disease is known (an empty known mask means "not there").

- Boxes, polygons (ChestX-Det) and mask files (the phantom's ``masks.parquet``): rasterised by
  :class:`training.data.ManifestDataset` (``masks=True``); :func:`manifest_for_masks` makes a precise
  shape win over the box around it, :func:`item_supervision` / :class:`SupervisedDataset` add validity.
- Pseudo-labels: :class:`PseudoLabeler` thresholds a given segmentation model's output.
- Clinician feedback: :func:`load_feedback` + :class:`FeedbackDataset` read the records below.

Feedback record format (what the service's ``POST /feedback`` writes, one JSON file per record in a
folder, any file name ending in ``.json``)::

    {
      "id": "3f2a...",                      # str, unique per record
      "image_sha256": "ab12...",            # str, SHA-256 hex of the image file bytes as uploaded
      "image_path": "images/0001.png",      # str, optional: absolute, or relative to the folder
      "finding": "Nodule",                  # str, one finding (canonical NIH spelling)
      "boxes": [[x, y, w, h], ...],         # optional: pixels of the original image
      "mask_png": "iVBORw0KGgo...",         # optional: base64 PNG, non-zero = finding, any size
      "created": "2025-01-31T12:00:00Z",    # str, ISO 8601
      "author": "dr-x",                     # str, optional
      "judgement": "on" | "off",            # optional: the served map of "method" lies on / misses the finding
      "method": "gradcam"                   # str, with "judgement"
    }

A record must carry ``boxes`` or ``mask_png`` (both: their union), or a ``judgement``; a judgement alone has
no region, so :class:`FeedbackDataset` skips it (it is kept for review). A record marks its finding as
present, with the given region; it says nothing about other findings. Several records for the same
image are merged (union of regions, one channel per finding). When ``image_path`` is absent the image
is found by its SHA-256 in a lookup built with :func:`index_images_by_sha256`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.data.imageio import read_image
from training.data.transforms import boxes_to_mask, resize

log = logging.getLogger(__name__)

# ---- manifests -> masks ----------------------------------------------------------------------
def manifest_for_masks(manifest: str | os.PathLike, prefer_shapes: bool = True) -> pd.DataFrame:
    """A manifest frame for :class:`training.data.ManifestDataset` (``masks=True``) whose masks are the
    most precise shapes the data set has.

    ``ManifestDataset`` draws a class's mask as the union of its boxes, polygons and mask files. Where a
    finding has both a box and a precise shape (the phantom's mask files in ``masks.parquet``,
    ChestX-Det polygons) that union is the box, so the shape would be lost. With ``prefer_shapes`` the
    boxes of every (image, finding) that has a polygon or a mask file are dropped, so its mask is the
    shape itself; findings with boxes only (NIH, VinDr) keep their boxes as masks.

    Args:
        manifest: path of a manifest Parquet file (a ``masks.parquet`` side table ``image_id, label,
            path`` beside it is read, as ``ManifestDataset`` does).
        prefer_shapes: drop boxes superseded by a shape (``False``: keep the data layer's union).

    Returns:
        The manifest (absolute image paths) with a ``mask_paths`` column ``[{label, path}]`` of absolute
        mask-file paths; pass it to ``ManifestDataset(frame, masks=True, ...)``.

    Raises:
        FileNotFoundError: ``manifest`` does not exist.
    """
    from training.data.schema import read_manifest

    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path.resolve()}")
    df = read_manifest(path)
    files: dict[str, list[dict[str, str]]] = {}
    side = path.parent / "masks.parquet"
    if side.is_file():
        for iid, lab, mpath in pd.read_parquet(side, columns=["image_id", "label", "path"]).itertuples(index=False):
            mpath = mpath if os.path.isabs(mpath) else str((path.parent / mpath).resolve())
            files.setdefault(str(iid), []).append({"label": str(lab), "path": mpath})
    if "mask_paths" in df.columns:  # a manifest's own mask column: resolve and keep it too
        for r, (iid, cell) in enumerate(zip(df["image_id"], df["mask_paths"])):
            items = cell.items() if isinstance(cell, dict) else [
                (x["label"], x["path"]) if isinstance(x, dict) else tuple(x) for x in _as_list(cell)]
            files.setdefault(str(iid), []).extend(
                {"label": str(k), "path": v if os.path.isabs(v) else str((path.parent / v).resolve())}
                for k, v in items)
    df["mask_paths"] = [files.get(str(iid), []) for iid in df["image_id"]]
    if prefer_shapes:
        polys = df["polygons"] if "polygons" in df.columns else [None] * len(df)
        kept = []
        for boxes, mfiles, cell in zip(df["boxes"], df["mask_paths"], polys):
            shaped = {m["label"] for m in mfiles} | {p["label"] for p in _as_list(cell)}
            kept.append([b for b in _as_list(boxes) if b["label"] not in shaped])
        df["boxes"] = kept
    return df


def _as_list(value: Any) -> list:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return list(value)


def item_supervision(item: Mapping[str, Any], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks and validity for one dataset item (``training.data.ManifestDataset`` layout).

    Uses ``item["mask"]`` when present (``ManifestDataset(masks=True)``: boxes, polygons and mask
    files), otherwise rasterises ``item["boxes"]`` / ``item["box_labels"]``. An explicit
    ``item["seg_valid"]`` wins. Otherwise a channel is known when the finding is absent (known empty)
    or its mask is non-empty: a positive finding without any region (NIH images without boxes) is
    unknown rather than "empty", so it never teaches the map to go dark.

    Returns:
        ``mask`` (C, S, S) float {0, 1} and ``seg_valid`` (C,) float.
    """
    if item.get("mask") is not None:
        masks = torch.as_tensor(item["mask"]).float()
    else:
        size = int(item["image"].shape[-1])
        boxes = torch.as_tensor(item.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4)
        box_labels = torch.as_tensor(item.get("box_labels", torch.zeros(0)), dtype=torch.long).reshape(-1)
        masks = boxes_to_mask(boxes, box_labels, num_classes, size)
    if item.get("seg_valid") is not None:
        return masks, torch.as_tensor(item["seg_valid"]).float()
    labels = torch.as_tensor(item["labels"]).float()
    has_region = masks.flatten(1).amax(1) > 0
    return masks, ((labels == 0) | has_region).float()


# ---- pseudo-labels ---------------------------------------------------------------------------
class PseudoLabeler:
    """Turn a segmentation model's output into masks.

    Args:
        model: callable ``images (B, 1, S, S) -> (B, C, h, w)`` logits (``probabilities=False``) or
            probabilities; resized to S.
        threshold: probability above which a pixel is in the mask.
        probabilities: whether the model already returns probabilities.
        positives_only: keep masks only for the image's positive labels (others are known empty).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], threshold: float = 0.5,
                 probabilities: bool = False, positives_only: bool = True) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1)")
        self.model, self.threshold = model, threshold
        self.probabilities, self.positives_only = probabilities, positives_only

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (B, 1, S, S), ``labels`` (B, C) optional -> masks (B, C, S, S) in {0, 1}."""
        out = self.model(images)
        if isinstance(out, Mapping):
            out = out["maps"]
        out = out.float()
        prob = out if self.probabilities else out.sigmoid()
        prob = F.interpolate(prob, size=images.shape[-2:], mode="bilinear", align_corners=False)
        masks = (prob > self.threshold).float()
        if self.positives_only and labels is not None:
            masks = masks * labels.float()[:, :, None, None]
        return masks


class SupervisedDataset(Dataset):
    """Wrap a dataset so each item carries ``mask`` (C, S, S) and ``seg_valid`` (C,).

    Args:
        base: map-style dataset of ``training.data`` item dicts.
        num_classes: C.
        pseudo_labeler: optional :class:`PseudoLabeler`; when given it replaces the masks of every item
            (every channel known).
    """

    def __init__(self, base: Dataset, num_classes: int, pseudo_labeler: PseudoLabeler | None = None) -> None:
        self.base, self.num_classes, self.pseudo = base, num_classes, pseudo_labeler
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        if self.pseudo is not None:
            labels = torch.as_tensor(item["labels"]).float()
            item["mask"] = self.pseudo(item["image"][None], labels[None])[0]
            item["seg_valid"] = torch.ones(self.num_classes)
        else:
            item["mask"], item["seg_valid"] = item_supervision(item, self.num_classes)
        return item


# ---- clinician feedback ----------------------------------------------------------------------
@dataclass
class FeedbackRecord:
    """One clinician feedback record (see the module docstring for the JSON format)."""

    id: str
    image_sha256: str
    finding: str
    created: str
    boxes: list[list[float]] = field(default_factory=list)  # [[x, y, w, h]] original pixels
    mask_png: str | None = None  # base64 PNG
    image_path: str | None = None
    author: str | None = None
    judgement: str | None = None  # "on" / "off": the served map of `method` lies on / misses the finding
    method: str | None = None
    source: Path | None = None  # the JSON file it came from

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path | None = None) -> "FeedbackRecord":
        where = f" in {source}" if source else ""
        missing = [k for k in ("id", "image_sha256", "finding", "created") if not data.get(k)]
        if missing:
            raise ValueError(f"feedback record{where} lacks {missing}; required: id, image_sha256, finding, created")
        boxes = data.get("boxes") or []
        for box in boxes:
            if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"feedback record{where}: box {box} must be [x, y, w, h] with w, h > 0")
        if not boxes and not data.get("mask_png") and not data.get("judgement"):
            raise ValueError(f"feedback record{where} has neither 'boxes', 'mask_png' nor 'judgement'")
        return cls(id=str(data["id"]), image_sha256=str(data["image_sha256"]).lower(), finding=str(data["finding"]),
                   created=str(data["created"]), boxes=[[float(v) for v in b] for b in boxes],
                   mask_png=data.get("mask_png"), image_path=data.get("image_path"), author=data.get("author"),
                   judgement=data.get("judgement"), method=data.get("method"), source=source)

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "image_sha256": self.image_sha256, "finding": self.finding, "created": self.created}
        for key in ("boxes", "mask_png", "image_path", "author", "judgement", "method"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out

    @property
    def has_region(self) -> bool:
        """Whether the record draws a region (boxes or a mask), not only a judgement of a map."""
        return bool(self.boxes or self.mask_png)

    def region(self, width: int, height: int, size: int) -> torch.Tensor:
        """The record's region as an (S, S) {0, 1} mask for an original image of ``width`` x ``height``."""
        out = torch.zeros(size, size)
        if self.boxes:
            b = torch.tensor(self.boxes)
            xyxy = torch.stack([b[:, 0] * size / width, b[:, 1] * size / height,
                                (b[:, 0] + b[:, 2]) * size / width, (b[:, 1] + b[:, 3]) * size / height], 1)
            out = boxes_to_mask(xyxy, torch.zeros(len(b), dtype=torch.long), 1, size)[0]
        if self.mask_png:
            out = torch.maximum(out, decode_mask_png(self.mask_png, size))
        return out


def decode_mask_png(data: str, size: int) -> torch.Tensor:
    """Base64 PNG -> (S, S) float {0, 1} mask (nearest-neighbour resize; non-zero = inside)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("L")
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad record
        raise ValueError(f"mask_png is not a base64-encoded PNG: {exc}") from exc
    img = img.resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(img) > 0).astype(np.float32))


def encode_mask_png(mask: np.ndarray | torch.Tensor) -> str:
    """(H, W) mask -> base64 PNG string (for writing records)."""
    from PIL import Image

    arr = (np.asarray(mask) > 0).astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def load_feedback(folder: str | Path) -> list[FeedbackRecord]:
    """Read every ``*.json`` record in ``folder`` (sorted by ``created``, then ``id``).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: a record is malformed (the error names its file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"feedback folder not found: {folder.resolve()}")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"feedback record {path} is not valid JSON: {exc}") from exc
        records.append(FeedbackRecord.from_dict(data, source=path))
    return sorted(records, key=lambda r: (r.created, r.id))


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (what feedback records name images by)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_images_by_sha256(paths: Iterable[str | Path]) -> dict[str, Path]:
    """``{sha256: path}`` for image files, to resolve records without ``image_path``."""
    return {sha256_file(p): Path(p) for p in paths}


class FeedbackDataset(Dataset):
    """Clinician feedback records as DWARF training items.

    Records of the same image are merged into one item: ``labels`` 1 for the findings with feedback
    (0 elsewhere, with ``cls_valid`` 0 there because the record says nothing about them), ``mask``
    the union of each finding's regions and ``seg_valid`` 1 only for those findings.

    Args:
        records: from :func:`load_feedback`.
        classes: class names (order of the channels); records of other findings are skipped with a
            warning, records without a region (a judgement of a map only) with an info line.
        image_size: S.
        folder: base folder for relative ``image_path`` (default: each record's own folder).
        image_lookup: ``{sha256: path}`` for records without ``image_path``.
    """

    def __init__(self, records: Sequence[FeedbackRecord], classes: Sequence[str], image_size: int,
                 folder: str | Path | None = None, image_lookup: Mapping[str, str | Path] | None = None) -> None:
        self.classes, self.image_size = list(classes), image_size
        index = {c: i for i, c in enumerate(self.classes)}
        lookup = {k.lower(): Path(v) for k, v in (image_lookup or {}).items()}
        groups: dict[str, dict[str, Any]] = {}
        judged = [r for r in records if not r.has_region]
        if judged:
            log.info("%d feedback records judge a map without drawing a region: kept for review, not trained on",
                     len(judged))
        for rec in records:
            if not rec.has_region:
                continue
            if rec.finding not in index:
                log.warning("feedback %s: finding %r not among classes %s; skipped", rec.id, rec.finding, self.classes)
                continue
            if rec.image_path:
                path = Path(rec.image_path)
                if not path.is_absolute():
                    path = Path(folder) / path if folder else (rec.source.parent / path if rec.source else path)
            elif rec.image_sha256 in lookup:
                path = lookup[rec.image_sha256]
            else:
                raise ValueError(f"feedback {rec.id}: no image_path and sha256 {rec.image_sha256[:12]}... "
                                 "not in image_lookup")
            groups.setdefault(rec.image_sha256, {"path": path, "records": []})["records"].append(rec)
        self.items = list(groups.values())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.items[i]
        raw = read_image(entry["path"])  # (H, W) float32 [0, 1]
        height, width = raw.shape
        s, c = self.image_size, len(self.classes)
        image, _, _ = resize(torch.from_numpy(np.ascontiguousarray(raw))[None], torch.zeros(0, 4), s)  # (1, S, S)
        image = image.clamp(0, 1)
        mask, labels = torch.zeros(c, s, s), torch.zeros(c)
        for rec in entry["records"]:
            k = self.classes.index(rec.finding)
            labels[k] = 1.0
            mask[k] = torch.maximum(mask[k], rec.region(width, height, s))
        return {"image": image, "labels": labels, "mask": mask, "seg_valid": labels.clone(),
                "cls_valid": labels.clone(), "image_id": entry["records"][0].image_sha256, "index": i}
