"""training.data: manifest schema, format readers, image I/O, the phantom and the torch Dataset.

Modules: :mod:`~training.data.labels` (class names, canonical labels), :mod:`~training.data.schema`
(the typed manifest and its validation), :mod:`~training.data.manifest` (Parquet I/O),
:mod:`~training.data.splits` (patient-wise splits), :mod:`~training.data.masks` (polygon masks),
:mod:`~training.data.cells` (reading pandas/Parquet cells), :mod:`~training.data.imageio`.

Light to import (no torch): the schema and image I/O are re-exported here; the Dataset, the phantom
and the readers are imported on first use (``training.data.ManifestDataset`` works too).
"""
from __future__ import annotations

from training.data.imageio import ImageReadError, image_size, read_image
from training.data.labels import NIH_CLASSES, NO_FINDING, PHANTOM_CLASSES, canonical_label
from training.data.manifest import read_manifest, write_manifest
from training.data.masks import polygon_mask
from training.data.schema import ManifestError, validate_manifest
from training.data.splits import SPLITS, patient_split

__all__ = [
    "NIH_CLASSES", "PHANTOM_CLASSES", "NO_FINDING", "SPLITS", "ManifestError", "canonical_label",
    "validate_manifest", "read_manifest", "write_manifest", "patient_split", "polygon_mask",
    "ImageReadError", "read_image", "image_size", "ManifestDataset", "collate", "generate_phantom",
]

_LAZY = {"ManifestDataset": "training.data.dataset", "collate": "training.data.dataset",
         "generate_phantom": "training.data.phantom"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'training.data' has no attribute {name!r}")
