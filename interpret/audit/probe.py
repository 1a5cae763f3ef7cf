"""The probing set: images, labels, boxes and reports of a manifest split, in memory."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

@dataclass
class Probe:
    """The probing set in memory."""

    images: Any  # (N, 1, S, S) float32 tensor in [0, 1]
    labels: np.ndarray  # (N, C)
    boxes: list[np.ndarray]  # per image (K, 4) xyxy in S px
    box_labels: list[np.ndarray]  # per image (K,)
    image_ids: list[str]
    reports: list[str]
    classes: list[str]
    artefacts: np.ndarray | None = None  # (N, S, S) bool ground-truth markers/tags (phantom_meta.parquet)

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
               seed: int = 0) -> Probe:
    """Read the probing set (``split`` or all rows, at most ``max_images`` drawn with ``seed``)."""
    import torch
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
    items = [ds[int(i)] for i in tqdm(idx, desc="audit: probing set", unit="img", leave=False)]
    artefacts = phantom_artefacts(manifest, df, [str(it["image_id"]) for it in items], image_size)
    return Probe(artefacts=artefacts, images=torch.stack([it["image"] for it in items]),
                 labels=np.stack([it["labels"].numpy() for it in items]).astype(np.float32),
                 boxes=[it["boxes"].numpy().reshape(-1, 4) for it in items],
                 box_labels=[it["box_labels"].numpy().reshape(-1) for it in items],
                 image_ids=[str(it["image_id"]) for it in items],
                 reports=[str(report_of.get(it["image_id"]) or "") for it in items],
                 classes=list(classes))


def phantom_artefacts(manifest: Path, df, image_ids: Sequence[str], size: int) -> np.ndarray | None:
    """Ground-truth text markers and planted shortcut tags from the phantom's ``phantom_meta.parquet``
    (boxes ``[x, y, w, h]`` in original pixels, scaled to ``size``) as (N, S, S) bool; None without it."""
    import pandas as pd

    side = manifest.parent / "phantom_meta.parquet"
    if not side.is_file():
        return None
    meta = pd.read_parquet(side).set_index("image_id")
    width = dict(zip(df["image_id"], df["width"]))
    c = np.arange(size) + 0.5
    out = np.zeros((len(image_ids), size, size), dtype=bool)
    for i, iid in enumerate(image_ids):
        if iid not in meta.index:
            continue
        scale = size / float(width.get(iid) or size)
        for col in ("marker_box", "shortcut_box"):
            box = meta.at[iid, col] if col in meta.columns else None
            if box is None or len(box) != 4:
                continue
            x, y, w, h = (float(v) * scale for v in box)
            out[i] |= ((c[:, None] >= y) & (c[:, None] < y + h)) & ((c[None, :] >= x) & (c[None, :] < x + w))
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
