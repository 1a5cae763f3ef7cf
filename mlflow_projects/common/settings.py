"""Paths, defaults and the experiment of each entry point."""
from __future__ import annotations

import logging
from pathlib import Path


log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
DEFAULT_ARTIFACT_ROOT = PROJECT_ROOT / "mlartifacts"
CANDIDATE, CHAMPION = "candidate", "champion"
DEFAULT_DATA = "outputs/phantom/manifest.parquet"  # the entry points' default manifest (the phantom)
DEFAULT_GATES = Path(__file__).resolve().parents[1] / "gates.yaml"  # the promotion policy
SCRATCH_CLIP = "cxr-tiny-vit"  # the CLIP config `--clip scratch` builds, untrained
DWARF_MIN_IMAGE_SIZE = 16  # DWARF's ViT has 8-px patches: at least a 2 x 2 grid of patch tokens


#: Experiments of the entry points (``mlflow run . -e NAME --experiment-name EXPERIMENT``).
EXPERIMENTS = {"train_classifier": "cxr-classifier", "imbalance_study": "cxr-classifier", "train_clip": "cxr-clip",
               "train_dwarf": "cxr-dwarf", "dwarf_benchmark": "cxr-dwarf-benchmark", "audit": "cxr-audit",
               "concept_benchmark": "concept_benchmark"}

