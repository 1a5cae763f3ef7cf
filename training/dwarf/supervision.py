"""Segmentation supervision for DWARF: masks from boxes, polygons or masks, pseudo-labels from a
segmentation model, and clinician feedback records.

Every source ends in the same per-image tensors: ``mask`` (C, S, S) float {0, 1} and ``seg_valid``
(C,) float, 1 where the mask of that disease is known (an empty known mask means "not there").

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
      "author": "dr-x"                      # str, optional
    }

A record must carry ``boxes`` or ``mask_png`` (both: their union). A record marks its finding as
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

Polygon = Sequence[Sequence[float]]  # [[x0, y0], [x1, y1], ...] or flat [x0, y0, x1, y1, ...]


# ---- geometry -> masks -----------------------------------------------------------------------
def boxes_to_masks(boxes: torch.Tensor, box_labels: torch.Tensor, num_classes: int, size: int | tuple[int, int]
                   ) -> torch.Tensor:
    """Rasterise ``xyxy`` pixel boxes into per-class masks (union of each class's boxes).

    Args:
        boxes: (K, 4) float ``x0, y0, x1, y1`` in pixels of the (S, S) image.
        box_labels: (K,) int class index of each box.
        num_classes: C.
        size: S or (H, W).

    Returns:
        (C, H, W) float32 masks in {0, 1}. A pixel belongs to a box when its centre lies inside.
    """
    h, w = (size, size) if isinstance(size, int) else size
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    box_labels = torch.as_tensor(box_labels, dtype=torch.long).reshape(-1)
    if boxes.shape[0] != box_labels.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {box_labels.shape[0]} box labels")
    if box_labels.numel() and (box_labels.min() < 0 or box_labels.max() >= num_classes):
        raise ValueError(f"box label out of range [0, {num_classes}): {box_labels.tolist()}")
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # (K, H)
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # (K, W)
    per_box = (inside_y[:, :, None] & inside_x[:, None, :]).float()  # (K, H, W)
    onehot = F.one_hot(box_labels, num_classes).float()  # (K, C)
    return (onehot.T @ per_box.view(len(per_box), -1)).clamp(max=1.0).view(num_classes, h, w)


def polygons_to_mask(polygons: Iterable[Polygon], size: int | tuple[int, int], scale: float | tuple[float, float] = 1.0
                     ) -> torch.Tensor:
    """Rasterise polygons (ChestX-Det style) into one (H, W) float mask (union).

    Args:
        polygons: each a list of ``[x, y]`` points or a flat ``[x0, y0, x1, y1, ...]`` list, in pixels of
            the original image.
        size: output S or (H, W).
        scale: factor (or (sx, sy)) from original pixels to output pixels.
    """
    from PIL import Image, ImageDraw

    h, w = (size, size) if isinstance(size, int) else size
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(pts)}")
        draw.polygon([(x * sx, y * sy) for x, y in pts], fill=1)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32))


def item_supervision(item: Mapping[str, Any], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks and validity for one dataset item (``training.data.ManifestDataset`` layout).

    Uses ``item["mask"]`` when present (phantom masks, or masks the data layer derived), otherwise
    rasterises ``item["boxes"]`` / ``item["box_labels"]``. Returns ``mask`` (C, S, S) and
    ``seg_valid`` (C,): with a ``mask`` every channel is known; from boxes only positive classes that
    have at least one box (and all negatives) are known: a positive finding without a box is unknown.
    """
    image = item["image"]
    size = tuple(image.shape[-2:])
    if "seg_valid" in item and "mask" in item:
        return torch.as_tensor(item["mask"]).float(), torch.as_tensor(item["seg_valid"]).float()
    if "mask" in item and item["mask"] is not None:
        return torch.as_tensor(item["mask"]).float(), torch.ones(num_classes)
    labels = torch.as_tensor(item["labels"]).float()
    boxes = item.get("boxes", torch.zeros(0, 4))
    box_labels = item.get("box_labels", torch.zeros(0, dtype=torch.long))
    masks = boxes_to_masks(boxes, box_labels, num_classes, size)
    has_box = masks.flatten(1).amax(1) > 0
    valid = ((labels == 0) | has_box).float()
    return masks, valid


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
        if not boxes and not data.get("mask_png"):
            raise ValueError(f"feedback record{where} has neither 'boxes' nor 'mask_png'")
        return cls(id=str(data["id"]), image_sha256=str(data["image_sha256"]).lower(), finding=str(data["finding"]),
                   created=str(data["created"]), boxes=[[float(v) for v in b] for b in boxes],
                   mask_png=data.get("mask_png"), image_path=data.get("image_path"), author=data.get("author"),
                   source=source)

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "image_sha256": self.image_sha256, "finding": self.finding, "created": self.created}
        for key in ("boxes", "mask_png", "image_path", "author"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out

    def region(self, width: int, height: int, size: int) -> torch.Tensor:
        """The record's region as an (S, S) {0, 1} mask for an original image of ``width`` x ``height``."""
        out = torch.zeros(size, size)
        if self.boxes:
            b = torch.tensor(self.boxes)
            xyxy = torch.stack([b[:, 0] * size / width, b[:, 1] * size / height,
                                (b[:, 0] + b[:, 2]) * size / width, (b[:, 1] + b[:, 3]) * size / height], 1)
            out = boxes_to_masks(xyxy, torch.zeros(len(b), dtype=torch.long), 1, size)[0]
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
            warning.
        image_size: S.
        folder: base folder for relative ``image_path`` (default: each record's own folder).
        image_lookup: ``{sha256: path}`` for records without ``image_path``.
    """

    def __init__(self, records: Sequence[FeedbackRecord], classes: Sequence[str], image_size: int,
                 folder: str | Path | None = None, image_lookup: Mapping[str, str | Path] | None = None) -> None:
        from training.data.imageio import read_image  # noqa: F401 - fail early if the data layer is missing

        self.classes, self.image_size = list(classes), image_size
        index = {c: i for i, c in enumerate(self.classes)}
        lookup = {k.lower(): Path(v) for k, v in (image_lookup or {}).items()}
        groups: dict[str, dict[str, Any]] = {}
        for rec in records:
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
        from training.data.imageio import read_image

        entry = self.items[i]
        raw = read_image(entry["path"])  # (H, W) float32 [0, 1]
        height, width = raw.shape
        s, c = self.image_size, len(self.classes)
        image = F.interpolate(torch.from_numpy(np.ascontiguousarray(raw))[None, None], size=(s, s),
                              mode="bilinear", align_corners=False)[0].clamp(0, 1)
        mask, labels = torch.zeros(c, s, s), torch.zeros(c)
        for rec in entry["records"]:
            k = self.classes.index(rec.finding)
            labels[k] = 1.0
            mask[k] = torch.maximum(mask[k], rec.region(width, height, s))
        return {"image": image, "labels": labels, "mask": mask, "seg_valid": labels.clone(),
                "cls_valid": labels.clone(), "image_id": entry["records"][0].image_sha256, "index": i}
