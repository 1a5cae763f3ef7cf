"""End-to-end DWARF recipes shared by the MLflow glue and the benchmark (no mlflow here).

``pretrained -> {gain, dwarf}``: every fine-tuned model starts from the same classification-trained VLM
stage (the "pretrained VLM" baseline), and the baselines get about as many training samples as the
cyclic DWARF run (:func:`training.dwarf.train.matched_epochs`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from training.dwarf.metrics import choose_thresholds, classification_table
from training.metrics import MIN_VAL_POSITIVES, positive_counts
from training.dwarf.model import DwarfModel, build_dwarf
from training.dwarf.train import TrainConfig, evaluate, label_matrix, matched_epochs, train

log = logging.getLogger(__name__)

BENCH_METHODS = ("pretrained", "gain", "dwarf")


@dataclass
class Scores:
    """Per-class scores on the test split with thresholds chosen on validation."""

    table: pd.DataFrame  # index class; columns auc, f1, mcc, max_dice, max_dice_raw, threshold, threshold_positives
    thresholds: np.ndarray  # (C,) NaN where a class had fewer than min_positives validation positives
    threshold_positives: np.ndarray | None = None  # (C,) validation positives each threshold rests on
    min_positives: int = MIN_VAL_POSITIVES

    def means(self) -> dict[str, float]:
        """Means over classes, NaN skipped (NaN when no class has a value)."""
        out = {}
        for k in ("auc", "f1", "mcc", "max_dice", "max_dice_raw"):
            values = self.table[k].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            out[f"{k}_mean"] = float(values.mean()) if values.size else float("nan")
        return out


def score(model: DwarfModel, val: Dataset, test: Dataset, device: str | None = None, progress: bool = False,
          use_raw_maps: bool = False, min_positives: int = MIN_VAL_POSITIVES) -> Scores:
    """Thresholds from ``val`` (max F1), then AUC/F1/MCC and Max Dice on ``test``.

    Args:
        use_raw_maps: report the raw maps as ``max_dice`` (for models without trained experts).
        min_positives: validation positives a disease needs for a threshold; with fewer it gets none
            (NaN) and no F1 / MCC.
    """
    ev_val = evaluate(model, val, device=device, progress=progress)
    thresholds = choose_thresholds(ev_val.labels, ev_val.probabilities, min_positives=min_positives)
    positives = positive_counts(ev_val.labels)
    ev = evaluate(model, test, device=device, progress=progress)
    table = classification_table(ev.labels, ev.probabilities, thresholds, model.class_names)
    table["max_dice"] = ev.max_dice_raw if use_raw_maps else ev.max_dice
    table["max_dice_raw"] = ev.max_dice_raw
    table["threshold"] = thresholds
    table["threshold_positives"] = positives
    return Scores(table=table, thresholds=np.asarray(thresholds, dtype=float), threshold_positives=positives,
                  min_positives=int(min_positives))


def pretrain(bundle: Any, classes: Sequence[str], train_ds: Dataset, config: TrainConfig, epochs: int,
             labels: np.ndarray | None = None, **model_kw: Any) -> DwarfModel:
    """Build a DWARF model on ``bundle`` and train its decoder for classification (the VLM stage)."""
    model = build_dwarf(bundle, classes, **model_kw)
    if epochs > 0:
        train(model, train_ds, "vlm", replace(config, epochs=epochs,
                                             checkpoint_dir=_sub(config.checkpoint_dir, "vlm")), labels=labels)
    return model


def finetune(base: DwarfModel, method: str, train_ds: Dataset, config: TrainConfig, cycles: int,
             labels: np.ndarray | None = None) -> DwarfModel:
    """Copy ``base`` and fine-tune it with ``gain`` or ``dwarf`` for ``cycles`` cycles of C disease-epochs
    (``gain``: the multi-label epochs matching that many samples)."""
    labels = label_matrix(train_ds) if labels is None else labels
    model = copy.deepcopy(base)
    c = len(model.class_names)
    epochs = cycles * c if method == "dwarf" else matched_epochs(labels, cycles * c, config.negatives_per_positive)
    train(model, train_ds, method, replace(config, epochs=epochs, checkpoint_dir=_sub(config.checkpoint_dir, method)),
          labels=labels)
    return model


def compare_methods(bundle: Any, classes: Sequence[str], train_ds: Dataset, val_ds: Dataset, test_ds: Dataset,
                    config: TrainConfig, cycles: int, vlm_epochs: int, min_positives: int = MIN_VAL_POSITIVES,
                    **model_kw: Any) -> pd.DataFrame:
    """DWARF vs GAIN vs pretrained VLM on one data set (the DWARF paper's comparison); ``min_positives`` as
    in :func:`score`.

    Returns:
        One row per method: ``method``, ``n_diseases``, the means of :meth:`Scores.means` and
        ``max_dice[<class>]`` per disease.
    """
    labels = label_matrix(train_ds)
    base = pretrain(bundle, classes, train_ds, config, vlm_epochs, labels=labels, **model_kw)
    rows = []
    for method in BENCH_METHODS:
        model = base if method == "pretrained" else finetune(base, method, train_ds, config, cycles, labels)
        s = score(model, val_ds, test_ds, device=config.device, use_raw_maps=method != "dwarf",
                  min_positives=min_positives)
        row = {"method": method, "n_diseases": len(classes), **s.means()}
        row.update({f"max_dice[{c}]": float(v) for c, v in s.table["max_dice"].items()})
        rows.append(row)
        log.info("%s (%d diseases): %s", method, len(classes), {k: round(v, 4) for k, v in s.means().items()})
    return pd.DataFrame(rows)


def _sub(folder: str | None, name: str) -> str | None:
    return None if folder is None else f"{folder}/{name}"


def save_gallery(model: DwarfModel, dataset: Dataset, path: str, disease: str, n: int = 4,
                 device: str | None = None) -> str | None:
    """PNG of ``n`` test images positive for ``disease``: image, raw map, refined map, ground truth.

    Returns:
        ``path``, or None when no image is positive for ``disease``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.dwarf.train import collate, resolve_device

    k = model.class_names.index(disease)
    idx = [i for i in range(len(dataset)) if float(dataset[i]["labels"][k]) > 0.5][:n]
    if not idx:
        return None
    batch = collate([dataset[i] for i in idx])
    dev = resolve_device(device)
    model.to(dev).eval()
    with torch.no_grad():
        out = model(batch["image"].to(dev))
    cols = ["image", "raw map", "refined map", "ground truth"]
    fig, axes = plt.subplots(len(idx), 4, figsize=(8, 2 * len(idx)), squeeze=False)
    for r in range(len(idx)):
        img = batch["image"][r, 0].numpy()
        panels = [img, out.raw_maps[r, k].cpu().numpy(), out.refined_maps[r, k].cpu().numpy(),
                  batch["mask"][r, k].numpy() if "mask" in batch else np.zeros_like(img)]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if c:
                ax.imshow(panel, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
    fig.suptitle(disease, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
