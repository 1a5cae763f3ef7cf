"""Image-report pairs of one manifest split, in memory: what the small CLIP trains and is evaluated on.

This module owns :class:`PairSplit` (images (N, 1, S, S) in [0, 1], reports, labels (N, C)) and
:func:`load_pairs`, which reads one split's rows that have a report. The training loop
(:mod:`training.clip.train`) and the evaluation (:mod:`training.clip.evaluation`) both take a
:class:`PairSplit`; the names stay importable from :mod:`training.clip.train`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class PairSplit:
    """Images (N, 1, S, S) in [0, 1], their reports and labels (N, C) of one split, in memory."""

    images: torch.Tensor
    reports: list[str]
    labels: np.ndarray
    classes: list[str]
    image_ids: list[str]


def load_pairs(manifest: str | os.PathLike, split: str, image_size: int,
               classes: Sequence[str] | None = None, progress: bool = True) -> PairSplit:
    """Read the image-report pairs of one split into memory (rows without a report are skipped).

    Args:
        manifest: manifest Parquet path.
        split: ``train``, ``val`` or ``test``.
        image_size: output side S.
        classes: label columns (default: the dataset's own default classes).
        progress: tqdm bar while the images are read.

    Returns:
        :class:`PairSplit`.

    Raises:
        ValueError: the split has no rows with a report.
    """
    from training.data.dataset import ManifestDataset, _default_classes
    from training.data.schema import read_manifest

    df = read_manifest(manifest)
    classes = list(classes) if classes is not None else _default_classes(df)
    part = df[(df["split"] == split) & df["report"].notna() & df["path"].notna()]
    part = part[part["report"].str.strip().str.len() > 0].reset_index(drop=True)
    if part.empty:
        raise ValueError(f"no image-report pairs in split {split!r} of {manifest} "
                         f"(splits present: {sorted(df['split'].unique())})")
    ds = ManifestDataset(part, classes=classes, image_size=image_size, split=None)
    images = torch.stack([ds[i]["image"] for i in tqdm(range(len(ds)), desc=f"load {split}", leave=False,
                                                     disable=not progress)])
    return PairSplit(images=images, reports=[str(r) for r in part["report"]], labels=ds.label_matrix.copy(),
                     classes=list(ds.classes), image_ids=list(ds.image_ids))
