"""DWARF: disease-weighted attention map refinement (query decoder + per-disease expert heads).

- :mod:`training.dwarf.model`: :class:`DwarfModel`, :func:`build_dwarf`, :func:`load_dwarf`.
- :mod:`training.dwarf.losses`: :func:`fp_soft_dice`, :class:`DwarfLoss`.
- :mod:`training.dwarf.train`: :func:`train` (methods ``vlm``, ``gain``, ``dwarf``), :func:`evaluate`.
- :mod:`training.dwarf.supervision`: masks from boxes/polygons/masks, pseudo-labels, clinician feedback.
- :mod:`training.dwarf.data`: :func:`~training.dwarf.data.load_splits`, a manifest's splits with masks
  (plus clinician feedback) cached in memory.
- :mod:`training.dwarf.metrics`: Max Dice, classification metrics.
"""
from training.dwarf.losses import DwarfLoss, FPSoftDiceLoss, fp_soft_dice, tversky_index
from training.dwarf.model import DwarfConfig, DwarfModel, DwarfOutput, build_dwarf, load_dwarf
from training.dwarf.train import Evaluation, TrainConfig, evaluate, list_methods, train

__all__ = ["DwarfConfig", "DwarfLoss", "DwarfModel", "DwarfOutput", "Evaluation", "FPSoftDiceLoss", "TrainConfig",
           "build_dwarf", "evaluate", "fp_soft_dice", "list_methods", "load_dwarf", "train", "tversky_index"]
