"""The probing set: images, labels, boxes and reports of a manifest split.

The images (and the phantom's ground-truth marker masks) are kept on disk in a
:class:`~interpret.audit.store.SpillArray` by :func:`load_probe`, so the audit's memory does not grow with the
number of probing images; a :class:`Probe` built by hand may hold tensors (the sections index either the same way).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from interpret.audit.store import SpillArray

@dataclass
class Probe:
    """The probing set."""

    images: Any  # (N, 1, S, S) float32 in [0, 1]: a tensor or a SpillArray (indexing returns tensors)
    labels: np.ndarray  # (N, C)
    boxes: list[np.ndarray]  # per image (K, 4) xyxy in S px
    box_labels: list[np.ndarray]  # per image (K,)
    image_ids: list[str]
    reports: list[str]
    classes: list[str]
    artefacts: Any = None  # (N, S, S) bool ground-truth markers/tags (phantom_meta.parquet): array or SpillArray

    @property
    def n(self) -> int:
        return len(self.image_ids)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def file_fingerprint(path: Path, chunk: int = 1 << 20, length: int | None = 16) -> str:
    """SHA-256 hex of a file's bytes, its first ``length`` characters (None: all 64)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:length]


def load_probe(manifest: Path, classes: Sequence[str], image_size: int, split: str, max_images: int,
               seed: int = 0, on_disk: bool = False) -> Probe:
    """Read the probing set (``split`` or all rows, at most ``max_images`` drawn with ``seed``).

    With ``on_disk`` (the audit) the images and marker masks go to :class:`SpillArray` stores as they are read,
    one image in memory at a time; else ``images`` is one (N, C, S, S) tensor and ``artefacts`` an array."""
    from tqdm.auto import tqdm

    from training.data.dataset import ManifestDataset
    from training.data.schema import read_manifest

    ds = ManifestDataset(manifest, classes=list(classes), image_size=image_size,
                         split=None if split == "all" else split)
    if len(ds) == 0:
        raise ValueError(f"no images in split {split!r} of {manifest}; valid splits: all, train, val, test")
    idx = np.arange(len(ds))
    if len(ds) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_images, replace=False))
    df = read_manifest(manifest)
    report_of = dict(zip(df["image_id"], df["report"])) if "report" in df else {}
    import torch

    images: SpillArray | None = None
    kept: list = []  # the images when not on disk
    labels, boxes, box_labels, image_ids = [], [], [], []
    for i in tqdm(idx, desc="audit: probing set", unit="img", leave=False):
        it = ds[int(i)]
        if on_disk:
            if images is None:
                images = SpillArray(tuple(it["image"].shape))
            images.append(it["image"][None])  # one image in memory at a time
        else:
            kept.append(it["image"])
        labels.append(it["labels"].numpy())
        boxes.append(it["boxes"].numpy().reshape(-1, 4))
        box_labels.append(it["box_labels"].numpy().reshape(-1))
        image_ids.append(str(it["image_id"]))
    artefacts = phantom_artefacts(manifest, df, image_ids, image_size)
    if not on_disk:
        images = torch.stack(kept)  # every image is preprocessed to (C, S, S)
        artefacts = artefacts.numpy() if artefacts is not None else None
    return Probe(artefacts=artefacts, images=images,
                 labels=(np.stack(labels) if labels else np.zeros((0, len(classes)))).astype(np.float32),
                 boxes=boxes, box_labels=box_labels, image_ids=image_ids,
                 reports=[str(report_of.get(i) or "") for i in image_ids], classes=list(classes))


def phantom_artefacts(manifest: Path, df, image_ids: Sequence[str], size: int) -> SpillArray | None:
    """Ground-truth text markers and planted shortcut tags from the phantom's ``phantom_meta.parquet``
    (boxes ``[x, y, w, h]`` in original pixels, scaled to ``size``) as (N, S, S) bool (a :class:`SpillArray`
    read as NumPy arrays); None without it."""
    import pandas as pd

    side = manifest.parent / "phantom_meta.parquet"
    if not side.is_file():
        return None
    meta = pd.read_parquet(side).set_index("image_id")
    width = dict(zip(df["image_id"], df["width"]))
    c = np.arange(size) + 0.5
    out = SpillArray((size, size), dtype=bool, as_tensor=False)
    for iid in image_ids:
        mask = np.zeros((size, size), dtype=bool)
        if iid not in meta.index:
            out.append(mask[None])
            continue
        scale = size / float(width.get(iid) or size)
        for col in ("marker_box", "shortcut_box"):
            box = meta.at[iid, col] if col in meta.columns else None
            if box is None or len(box) != 4:
                continue
            x, y, w, h = (float(v) * scale for v in box)
            mask |= ((c[:, None] >= y) & (c[:, None] < y + h)) & ((c[None, :] >= x) & (c[None, :] < x + w))
        out.append(mask[None])
    return out


def labelled_classes(manifest: Path) -> set[str]:
    """The classes a manifest labels: those with at least one positive label or box in any row (a class with
    neither cannot be audited on it)."""
    from training.data.cells import as_list
    from training.data.schema import read_manifest

    df = read_manifest(manifest)
    found: set[str] = set()
    for labels in df["labels"]:
        found.update(str(v) for v in as_list(labels) or [])
    if "boxes" in df:
        for boxes in df["boxes"]:
            found.update(str(b["label"]) for b in as_list(boxes) or [] if b is not None)
    return found


def penultimate_layer(model) -> str:
    """The block before the feature layer: the second-to-last child of ``model.features`` (up to the
    feature layer) that contains a convolution (ResNet: ``features.layer3``; DenseNet121:
    ``features.transition3``); a model may name it (``penultimate_hint``, an imported DenseNet)."""
    import torch.nn as nn

    hint = getattr(model, "penultimate_hint", None)
    if hint:
        return hint

    top = model.feature_layer.split(".")
    parent = model.get_submodule(".".join(top[:-1])) if len(top) > 1 else model
    prefix = ".".join(top[:-1])
    conv_children = []
    for name, child in parent.named_children():
        if any(isinstance(m, nn.Conv2d) for m in child.modules()):
            conv_children.append(name)
        if name == top[-1]:
            break
    if len(conv_children) < 2:
        raise ValueError(f"cannot find a block before {model.feature_layer!r}; pass --penultimate-layer")
    return f"{prefix}.{conv_children[-2]}" if prefix else conv_children[-2]


def probe_patients(manifest: Path, image_ids: Sequence[str]) -> list[str]:
    """The patient id of each probing image (the image id where the manifest has none), so that a split of
    the probing set (e.g. the OOD detector's fit / calibration halves) never puts one patient on both sides."""
    from training.data.schema import read_manifest

    df = read_manifest(manifest)
    col = dict(zip(df["image_id"], df["patient_id"])) if "patient_id" in df else {}
    return [str(col.get(i) or i) for i in image_ids]
