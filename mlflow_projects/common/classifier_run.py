"""Classifier training runs, shared by ``train_classifier`` and ``imbalance_study``: the run config, its
arguments, one training run with its logging, the ROC plot."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import mlflow

from mlflow_projects.common.cli import choice_of, int_at_least, nonneg_int, positive_int, show_progress
from mlflow_projects.common.reporting import finite_metrics, table_metrics
from mlflow_projects.common.settings import DEFAULT_DATA
from mlflow_projects.common.tracking import manifest_arg

log = logging.getLogger("mlflow_projects.common")


# ---- classifier training, shared by train_classifier and imbalance_study ----------------------
@dataclass
class ClassifierRunConfig:
    """The resolved configuration of one classifier training (logged as ``config.json``)."""

    data: str = DEFAULT_DATA
    arch: str = "resnet18"
    loss: str = "bce"
    epochs: int = 3
    image_size: int = 128
    batch_size: int = 32
    seed: int = 0
    task: str = "multilabel"  # "multilabel" | "binary"
    pretrained: str | None = None  # local weights file (never downloaded)
    registered_name: str = "cxr-classifier"
    lr: float = 4e-4
    weight_decay: float = 1e-6
    warmup_epochs: float = 0.5
    patience: int = 0  # early stopping on val mean AUROC; 0 = off
    min_val_positives: int = 5  # = training.metrics.MIN_VAL_POSITIVES: fewer val positives, no threshold
    augment: bool = False
    cache: bool = True  # decode images once (only without augmentation)
    device: str | None = None
    num_workers: int = 0
    phantom_n: int = 400  # images of the phantom generated when the default data is missing
    experiment: str = "cxr-classifier"


#: argparse type of a classifier's ``--image-size`` (smaller inputs leave no feature map to explain).
classifier_image_size = int_at_least(16, "an image size")


def add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    """The options every classifier entry point shares: ``--data``, ``--arch``, ``--epochs``,
    ``--image-size``, ``--batch-size``, ``--seed``, ``--task`` (defaults of :class:`ClassifierRunConfig`)."""
    from training.models import list_models
    from training.train import TASKS

    d = ClassifierRunConfig()
    p.add_argument("--data", type=manifest_arg, default=d.data,
                   help="manifest (default: the phantom, generated if missing)")
    p.add_argument("--arch", type=choice_of(list_models(), "arch"), default=d.arch)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--image-size", type=classifier_image_size, default=d.image_size)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--seed", type=nonneg_int, default=d.seed)
    p.add_argument("--task", type=choice_of(TASKS, "task"), default=d.task)


def plot_roc(y_true, y_prob, classes: Iterable[str], path: str | Path, title: str = "validation ROC") -> Path:
    """One ROC curve per class with both labels present; writes a PNG.

    Args:
        y_true: (N, C) labels, NaN where unknown.
        y_prob: (N, C) probabilities.
        classes: the C class names.
        path: PNG file to write.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    try:
        for j, name in enumerate(classes):
            known = ~np.isnan(y_true[:, j])
            y, p = y_true[known, j], y_prob[known, j]
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, p):.2f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)


def train_one(cfg: ClassifierRunConfig, train_ds, val_ds, test_ds, classes: Iterable[str], tmp: Path,
              log_epochs: bool = True):
    """Fit one classifier (:func:`training.train.fit`) inside the active run and log per-epoch metrics,
    validation (and test) metrics per class as CSV/HTML and the validation ROC plot.

    Returns:
        ``(TrainResult, test_table | None, test_probs | None, test_targets | None)``.
    """
    from training.metrics import classification_metrics, summarize
    from training.models import create_model
    from training.train import TrainConfig, fit, predict, task_classes

    out_classes = task_classes(list(classes), cfg.task)
    model = create_model(cfg.arch, classes=out_classes, pretrained=cfg.pretrained, image_size=cfg.image_size)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_epochs=cfg.warmup_epochs, loss=cfg.loss, task=cfg.task, seed=cfg.seed,
                       device=cfg.device, patience=cfg.patience, num_workers=cfg.num_workers,
                       checkpoint_dir=str(tmp / "ckpt"), progress=show_progress(),
                       min_val_positives=cfg.min_val_positives)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if log_epochs:
            mlflow.log_metrics(finite_metrics(metrics), step=epoch)

    result = fit(model, train_ds, val_ds, tcfg, callback=on_epoch)
    mlflow.log_metrics(finite_metrics(summarize(result.val_table), "val_"))
    mlflow.log_metrics(table_metrics(result.val_table, "val_"))
    mlflow.log_metrics({"best_epoch": result.best_epoch})
    result.val_table.to_csv(tmp / "val_metrics.csv")
    (tmp / "val_metrics.html").write_text(result.val_table.to_html(float_format="%.4f"))
    mlflow.log_artifact(str(tmp / "val_metrics.csv"), "metrics")
    mlflow.log_artifact(str(tmp / "val_metrics.html"), "metrics")
    plot_roc(result.val_targets, result.val_probs, result.classes, tmp / "val_roc.png")
    mlflow.log_artifact(str(tmp / "val_roc.png"), "plots")
    test_table = test_probs = test_targets = None
    if test_ds is not None:
        test_probs, test_targets = predict(result.model, test_ds, 2 * cfg.batch_size, cfg.device, cfg.task)
        test_table = classification_metrics(test_targets, test_probs, result.thresholds, result.classes)
        mlflow.log_metrics(finite_metrics(summarize(test_table), "test_"))
        mlflow.log_metrics(table_metrics(test_table, "test_"))
        test_table.to_csv(tmp / "test_metrics.csv")
        mlflow.log_artifact(str(tmp / "test_metrics.csv"), "metrics")
    return result, test_table, test_probs, test_targets


