"""DWARF's data: the splits of a manifest with masks, plus clinician feedback, cached in memory.

Masks come from :class:`training.data.dataset.ManifestDataset` (``masks=True``) on
:func:`training.dwarf.supervision.manifest_for_masks` (mask files and polygons win over the boxes
around them); feedback records (the folder the service's feedback store writes) join the training
split through :class:`training.dwarf.supervision.FeedbackDataset`.

Example:
    >>> train, val, test, classes = load_splits("phantom/manifest.parquet", 64)   # doctest: +SKIP
    >>> train.masks.shape                                                           # doctest: +SKIP
    torch.Size([144, 5, 64, 64])
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from torch.utils.data import ConcatDataset

from training.data.dataset import ManifestDataset
from training.dwarf.supervision import (FeedbackDataset, SupervisedDataset, index_images_by_sha256, load_feedback,
                                        manifest_for_masks)
from training.dwarf.train import InMemoryDataset

log = logging.getLogger(__name__)

__all__ = ["load_splits"]


def load_splits(manifest: str | os.PathLike, image_size: int, classes: Sequence[str] | None = None,
                feedback: str | os.PathLike | None = None, min_positives: int = 2, prefer_shapes: bool = True,
                progress: bool = False) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset, list[str]]:
    """In-memory train/val/test datasets with masks and validity, restricted to usable classes.

    Feedback records are added to the training split, their images found by ``image_path`` or,
    failing that, by the SHA-256 of the manifest's image files.

    Args:
        manifest: manifest Parquet path.
        image_size: side S of the images and masks.
        classes: diseases to keep (default: those with >= ``min_positives`` training positives and a
            test positive).
        feedback: folder of clinician feedback records, or None.
        min_positives: see ``classes``.
        prefer_shapes: see :func:`training.dwarf.supervision.manifest_for_masks`.
        progress: tqdm bars while caching.

    Returns:
        ``(train, val, test, classes)``; the datasets are :class:`training.dwarf.train.InMemoryDataset`
        (images (N, 1, S, S), labels (N, C), masks (N, C, S, S) bool, ``classes`` set).

    Raises:
        ValueError: no usable class, an empty split, or a feedback record whose image cannot be found.
    """
    frame = manifest_for_masks(manifest, prefer_shapes=prefer_shapes)
    all_classes = ManifestDataset(frame, classes=classes).classes  # same columns in every split

    def split(name: str) -> InMemoryDataset:
        base = ManifestDataset(frame, classes=all_classes, image_size=image_size, masks=True, split=name)
        ds = SupervisedDataset(base, len(all_classes))
        if name == "train" and feedback:
            records = load_feedback(feedback)
            lookup = None
            if any(not r.image_path for r in records):
                lookup = index_images_by_sha256(p for p in frame["path"] if isinstance(p, str))
            extra = FeedbackDataset(records, all_classes, image_size, image_lookup=lookup)
            log.info("adding %d feedback images (%d records) from %s", len(extra), len(records), feedback)
            ds = ConcatDataset([ds, extra])
        out = InMemoryDataset(ds, progress=progress)
        out.classes = list(all_classes)
        return out

    train_ds, val_ds, test_ds = split("train"), split("val"), split("test")
    if classes is None:
        keep = [i for i in range(len(all_classes))
                if train_ds.labels[:, i].sum() >= min_positives and test_ds.labels[:, i].sum() >= 1]
        if not keep:
            raise ValueError(f"no class has >= {min_positives} training positives and a test positive in "
                             f"{manifest}; classes: {all_classes}")
        train_ds, val_ds, test_ds = (d.select_classes(keep) for d in (train_ds, val_ds, test_ds))
    return train_ds, val_ds, test_ds, list(train_ds.classes)
