"""End-to-end DWARF recipes shared by the MLflow glue and the benchmark (no mlflow here).

``pretrained -> {gain, dwarf}``: every fine-tuned model starts from the same classification-trained VLM
stage (the "pretrained VLM" baseline, the untuned VLM), and the baselines get about as many training
samples as the cyclic DWARF run (:func:`training.dwarf.train.matched_epochs`).

Ablations (:data:`ABLATIONS`, the arms the DWARF paper reports plus one for our reading of its
classifier), each a DWARF run from the same VLM stage unless stated:

- ``random_init`` (paper Fig. 2): expert heads randomly initialised instead of at identity.
- ``direct`` (paper Table 4): the soft Dice optimises the attention map itself (no expert heads).
- ``cls_query``: the classifier reads the decoder's query token only (the map never feeds
  classification), instead of Algorithm 1 line 15's ``(I, M'_c)``; needs its own VLM stage (a different
  classification head), trained with the same seed and epochs.
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
ABLATIONS = {"random_init": "dwarf_random_init", "direct": "dwarf_direct", "cls_query": "dwarf_cls_query"}


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
             labels: np.ndarray | None = None, expert_init: str | None = None) -> DwarfModel:
    """Copy ``base`` and fine-tune it with ``gain`` or ``dwarf`` for ``cycles`` cycles of C disease-epochs
    (``gain``: the multi-label epochs matching that many samples).

    Args:
        expert_init: ``dwarf`` only: re-initialise the copy's expert heads before training, ``"identity"``
            or ``"random"`` (drawn from a generator seeded with ``config.seed``); None keeps ``base``'s
            (identity: the earlier stages never train the experts).
    """
    labels = label_matrix(train_ds) if labels is None else labels
    model = copy.deepcopy(base)
    if expert_init is not None and method == "dwarf" and model.experts is not None:
        model.experts.reset(expert_init, generator=torch.Generator().manual_seed(config.seed))
        model.config.expert_init = expert_init
    c = len(model.class_names)
    epochs = cycles * c if method == "dwarf" else matched_epochs(labels, cycles * c, config.negatives_per_positive)
    train(model, train_ds, method, replace(config, epochs=epochs, checkpoint_dir=_sub(config.checkpoint_dir, method)),
          labels=labels)
    return model


def resolve_ablations(spec: str | Sequence[str] | None) -> list[str]:
    """Ablation names from ``"none"``, ``"all"`` or a comma list of :data:`ABLATIONS` keys.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if spec is None:
        return []
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return list(ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; valid: none, all, {', '.join(ABLATIONS)}")
    return [n for n in ABLATIONS if n in names]


def compare_methods(bundle: Any, classes: Sequence[str], train_ds: Dataset, val_ds: Dataset, test_ds: Dataset,
                    config: TrainConfig, cycles: int, vlm_epochs: int, min_positives: int = MIN_VAL_POSITIVES,
                    ablations: Sequence[str] = (), **model_kw: Any) -> pd.DataFrame:
    """DWARF vs GAIN vs pretrained VLM on one data set (the DWARF paper's comparison), plus ``ablations``
    (keys of :data:`ABLATIONS`); ``min_positives`` as in :func:`score`. Models are built after
    ``torch.manual_seed(config.seed)``, so a seed fixes the whole comparison.

    Returns:
        One row per method (``pretrained``, ``gain``, ``dwarf``, then ``dwarf_<ablation>``): ``method``,
        ``n_diseases``, the means of :meth:`Scores.means` and ``max_dice[<class>]`` per disease.
    """
    ablations = resolve_ablations(list(ablations))
    labels = label_matrix(train_ds)
    torch.manual_seed(config.seed)
    base = pretrain(bundle, classes, train_ds, config, vlm_epochs, labels=labels, **model_kw)
    arms: list[tuple[str, Any]] = [(m, None) for m in BENCH_METHODS] + [(ABLATIONS[a], a) for a in ablations]
    rows = []
    for method, ablation in arms:
        acfg = config if ablation is None else replace(config, checkpoint_dir=_sub(config.checkpoint_dir, ablation))
        raw_maps = method != "dwarf" and ablation not in ("random_init", "cls_query")
        if method == "pretrained":
            model = base
        elif ablation is None:
            model = finetune(base, method, train_ds, config, cycles, labels)
        elif ablation == "random_init":
            model = finetune(base, "dwarf", train_ds, acfg, cycles, labels, expert_init="random")
        elif ablation == "direct":
            model = finetune(base, "dwarf", train_ds, replace(acfg, dwarf_target="attention"), cycles, labels)
        else:  # cls_query: its own VLM stage with the query-token classifier
            torch.manual_seed(config.seed)
            qcfg = acfg
            qbase = pretrain(bundle, classes, train_ds, qcfg, vlm_epochs, labels=labels,
                             **{**model_kw, "classify_from": "query"})
            model = finetune(qbase, "dwarf", train_ds, qcfg, cycles, labels)
        s = score(model, val_ds, test_ds, device=config.device, use_raw_maps=raw_maps,
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
