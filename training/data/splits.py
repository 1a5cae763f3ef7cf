"""The split names and the patient-wise split: no patient has images in two splits."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["SPLITS", "patient_split"]

#: The values of the manifest's ``split`` column.
SPLITS: tuple[str, ...] = ("train", "val", "test")


def patient_split(patient_ids: Iterable[Any], fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0, splits: Sequence[str] = SPLITS) -> np.ndarray:
    """Assign a split to every row so that no patient appears in two splits.

    The distinct patients (sorted, so row order does not matter) are shuffled by ``seed`` and cut by
    ``fractions`` of the patient count; each split with a non-zero fraction gets at least one patient
    when there are enough patients.

    Args:
        patient_ids: one id per row (any hashable; compared as strings).
        fractions: share of patients per split, same length as ``splits`` (normalised to sum 1).
        seed: the same seed and ids give the same assignment.
        splits: names of the splits.

    Returns:
        Array (N,) of split names, one per row.

    Raises:
        ValueError: fractions negative, all zero, or not one per split.

    Example:
        >>> patient_split(["a", "a", "b", "c"], (0.5, 0.5), seed=0, splits=("train", "val")).tolist()
        ['train', 'train', 'val', 'train']
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) != len(splits) or (fr < 0).any() or fr.sum() <= 0 or not np.isfinite(fr).all():
        raise ValueError(f"fractions must be {len(splits)} non-negative numbers (one per split "
                         f"{list(splits)}) with a positive sum, got {list(fractions)}")
    ids = np.asarray([str(p) for p in patient_ids], dtype=object)
    uniq, inverse = np.unique(ids, return_inverse=True)
    n = len(uniq)
    counts = np.floor(fr / fr.sum() * n + 0.5).astype(int)
    counts[-1] = n - counts[:-1].sum()
    if counts[-1] < 0:   # rounding overshoot: take from the largest earlier split
        counts[np.argmax(counts[:-1])] += counts[-1]
        counts[-1] = 0
    want = fr > 0
    if n >= want.sum():
        for k in np.flatnonzero(want & (counts == 0)):
            counts[np.argmax(counts)] -= 1
            counts[k] += 1
    order = np.random.default_rng(seed).permutation(n)
    assign = np.empty(n, dtype=object)
    assign[order] = np.repeat(np.asarray(splits, dtype=object), counts)
    return assign[inverse].astype(str)
