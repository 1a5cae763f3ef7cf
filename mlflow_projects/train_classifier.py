"""MLflow entry point ``train_classifier``: train a classifier on a manifest, log it, register it.

Steps: (1) validate every parameter (exit 2 with a clear message before any training); (2) data: the
manifest's ``train`` / ``val`` (/ ``test``) splits (default: the phantom, generated when missing);
(3) :func:`training.train.fit` with per-epoch metrics logged through its callback; (4) logs the
resolved config, the class distribution per split, validation (and test) metrics per class as
CSV/HTML, a validation ROC plot; (5) the pyfunc of :mod:`mlflow_projects.pyfunc_classifier`
(checkpoint + ONNX checked against eager + meta, signature, input example) registered under
``--registered-name`` with alias ``candidate`` and version tags ``classes``, ``thresholds``, ``input``.

    python -m mlflow_projects.train_classifier --data outputs/phantom/manifest.parquet --arch resnet18 \
        --loss focal --epochs 3 --image-size 128

Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) the run is the one the CLI created, in its experiment
(pass ``--experiment-name cxr-classifier`` to ``mlflow run`` to keep runs together).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_projects.common import DEFAULT_DATA, ensure_data
from mlflow_projects.common import (choice_of, log_config, nonneg_int, positive_int, register_version,
                                    setup_tracking)

log = logging.getLogger(__name__)

EXPERIMENT = "cxr-classifier"


@dataclass
class ClassifierRunConfig:
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
    augment: bool = False
    cache: bool = True  # decode images once (only without augmentation)
    device: str | None = None
    num_workers: int = 0
    phantom_n: int = 400  # images of the phantom generated when the default data is missing
    experiment: str = EXPERIMENT


# ---- parameters -------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _image_size(text: str) -> int:
    value = positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected an image size >= 16, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from training.losses import list_losses
    from training.models import list_models
    from training.train import TASKS

    p = argparse.ArgumentParser(prog="train_classifier", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="manifest (default: the phantom, generated if missing)")
    p.add_argument("--arch", type=choice_of(list_models(), "arch"), default="resnet18")
    p.add_argument("--loss", type=choice_of(list_losses(), "loss"), default="bce")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--image-size", type=_image_size, default=128)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--task", type=choice_of(TASKS, "task"), default="multilabel")
    p.add_argument("--pretrained", default="", help="local weights file for the backbone ('' = random init)")
    p.add_argument("--registered-name", default="cxr-classifier")
    p.add_argument("--lr", type=_positive_float, default=4e-4)
    p.add_argument("--weight-decay", type=_nonneg_float, default=1e-6)
    p.add_argument("--warmup-epochs", type=_nonneg_float, default=0.5)
    p.add_argument("--patience", type=nonneg_int, default=0)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="read images from disk every epoch")
    p.add_argument("--device", default="")
    p.add_argument("--num-workers", type=nonneg_int, default=0)
    p.add_argument("--phantom-n", type=positive_int, default=400)
    p.add_argument("--experiment", default=EXPERIMENT)
    return p


def parse_args(argv: Sequence[str] | None = None) -> ClassifierRunConfig:
    """Parse and validate; any bad value exits with status 2 and a message naming it."""
    p = build_parser()
    a = p.parse_args(argv)
    data = Path(a.data).expanduser()
    if not data.is_file() and a.data != DEFAULT_DATA:
        p.error(f"argument --data: manifest not found: {data.resolve()}")
    pretrained = a.pretrained.strip() or None
    if pretrained and not Path(pretrained).expanduser().is_file():
        p.error(f"argument --pretrained: weights file not found: {Path(pretrained).expanduser().resolve()} "
                "(weights are never downloaded; pass a local file or '')")
    if not a.registered_name.strip():
        p.error("argument --registered-name: must not be empty")
    return ClassifierRunConfig(
        data=str(data.resolve()) if data.is_file() else a.data, arch=a.arch, loss=a.loss, epochs=a.epochs,
        image_size=a.image_size, batch_size=a.batch_size, seed=a.seed, task=a.task,
        pretrained=str(Path(pretrained).expanduser().resolve()) if pretrained else None,
        registered_name=a.registered_name.strip(), lr=a.lr, weight_decay=a.weight_decay,
        warmup_epochs=a.warmup_epochs, patience=a.patience, augment=a.augment, cache=not a.no_cache,
        device=a.device or None, num_workers=a.num_workers, phantom_n=a.phantom_n, experiment=a.experiment)


# ---- data -------------------------------------------------------------------------------------
def load_splits(manifest: Path, image_size: int, augment: bool = False, cache: bool = True):
    """``(train, val, test | None, classes)`` datasets of the manifest's splits.

    Raises:
        ValueError: no ``train`` or no ``val`` rows.
    """
    from training.data.dataset import ManifestDataset
    from training.train import InMemoryDataset

    def split(name: str, aug: bool):
        ds = ManifestDataset(manifest, image_size=image_size, augment=aug, split=name)
        if len(ds) == 0:
            return None
        return InMemoryDataset(ds, progress=len(ds) > 500) if cache and not aug else ds

    train_ds, val_ds, test_ds = split("train", augment), split("val", False), split("test", False)
    if train_ds is None or val_ds is None:
        raise ValueError(f"{manifest} needs rows in both the 'train' and 'val' splits "
                         f"(got train={0 if train_ds is None else len(train_ds)}, "
                         f"val={0 if val_ds is None else len(val_ds)})")
    return train_ds, val_ds, test_ds, list(train_ds.classes)


def class_distribution(datasets: dict[str, Any], classes: Sequence[str]):
    """Positives / negatives per class and split as a long DataFrame (split, class, positives, negatives)."""
    import pandas as pd

    from training.train import label_matrix

    rows = []
    for name, ds in datasets.items():
        if ds is None:
            continue
        y = label_matrix(ds)
        pos = np.nansum(y, 0)
        known = (~np.isnan(y)).sum(0)
        rows += [{"split": name, "class": c, "positives": int(pos[j]), "negatives": int(known[j] - pos[j]),
                  "prevalence": float(pos[j] / max(known[j], 1))} for j, c in enumerate(classes)]
    return pd.DataFrame(rows)


# ---- logging helpers --------------------------------------------------------------------------
def plot_roc(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], path: str | Path,
             title: str = "validation ROC") -> Path:
    """One ROC curve per class with both labels present; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def finite_metrics(values: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Metric dict without NaN/inf (MLflow rejects them), names prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v)}


def table_metrics(table, prefix: str) -> dict[str, float]:
    """``{prefix}{metric}.{class}`` for the metric columns of a per-class table (finite only)."""
    from training.metrics import METRIC_COLUMNS

    return finite_metrics({f"{col}.{cls}": row[col] for cls, row in table.iterrows() for col in METRIC_COLUMNS},
                          prefix)


def start_run(experiment: str, **kwargs):
    """Tracking set-up + ``mlflow.start_run``. Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) the CLI's run
    and experiment are kept (switching experiments would make MLflow refuse the run)."""
    import mlflow

    from mlflow_projects.common import DEFAULT_TRACKING_URI

    if os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    else:
        setup_tracking(experiment)
    return mlflow.start_run(**kwargs)


def log_resolved_config(config: Any) -> None:
    """:func:`mlflow_projects.common.log_config`, tolerant of params ``mlflow run`` already logged: a
    parameter already present with another spelling (e.g. ``pretrained=''``) is logged as ``resolved.<key>``."""
    import mlflow
    from dataclasses import is_dataclass

    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params if run else {}
    if not existing:
        log_config(config)
        return
    data = asdict(config) if is_dataclass(config) else dict(config)
    params = {}
    for key, value in data.items():
        text = "" if value is None else (value if isinstance(value, str) else json.dumps(value, default=str))
        if key not in existing:
            params[key] = text
        elif existing[key] != text:
            params[f"resolved.{key}"] = text
    if params:
        mlflow.log_params(params)
    mlflow.log_dict(json.loads(json.dumps(data, default=str)), "config.json")


def train_one(cfg: ClassifierRunConfig, train_ds, val_ds, test_ds, classes: Sequence[str], tmp: Path,
              log_epochs: bool = True):
    """Fit one model inside the active run and log metrics, tables and the ROC plot.

    Returns:
        ``(TrainResult, test_table | None, test_probs | None, test_targets | None)``.
    """
    import mlflow

    from training.metrics import classification_metrics, summarize
    from training.models import create_model
    from training.train import TrainConfig, fit, predict, task_classes

    out_classes = task_classes(classes, cfg.task)
    model = create_model(cfg.arch, classes=out_classes, pretrained=cfg.pretrained, image_size=cfg.image_size)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_epochs=cfg.warmup_epochs, loss=cfg.loss, task=cfg.task, seed=cfg.seed,
                       device=cfg.device, patience=cfg.patience, num_workers=cfg.num_workers,
                       checkpoint_dir=str(tmp / "ckpt"))

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


# ---- entry point ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> str:
    """Run the entry point; returns the registered model version."""
    import mlflow
    import torch

    from mlflow_projects.pyfunc_classifier import log_classifier_model, model_meta
    from training.metrics import summarize

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, cfg.augment, cfg.cache)
    with start_run(cfg.experiment, run_name=f"train_classifier-{cfg.arch}-{cfg.loss}") as run, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log_resolved_config(cfg)
        mlflow.set_tags({"manifest": str(manifest), "classes": ",".join(classes), "task": cfg.task})
        dist = class_distribution({"train": train_ds, "val": val_ds, "test": test_ds}, classes)
        dist.to_csv(tmp / "class_distribution.csv", index=False)
        mlflow.log_artifact(str(tmp / "class_distribution.csv"), "data")
        sizes = {"train": len(train_ds), "val": len(val_ds), "test": len(test_ds) if test_ds is not None else 0}
        summary = {split: {"images": sizes[split], "positives": dict(zip(g["class"], g["positives"].astype(int)))}
                   for split, g in dist.groupby("split", sort=False)}
        mlflow.log_dict(json.loads(json.dumps(summary, default=int)), "data/class_distribution.json")
        result, test_table, _, _ = train_one(cfg, train_ds, val_ds, test_ds, classes, tmp)
        model = result.model
        info = log_classifier_model(model)
        (tmp / "onnx").mkdir()
        from training.export import export_onnx

        mlflow.log_artifact(str(export_onnx(model, tmp / "onnx" / "model.onnx")), "onnx")
        meta = model_meta(model)
        val_means = summarize(result.val_table)
        tags = {"classes": meta["classes"], "thresholds": meta["thresholds"], "input": meta["input"],
                "arch": cfg.arch, "loss": cfg.loss, "task": cfg.task, "feature_layer": meta["feature_layer"],
                "train_run_id": run.info.run_id,
                "val_auroc_mean": round(val_means["auroc_mean"], 4) if np.isfinite(val_means["auroc_mean"]) else "nan"}
        mv = register_version(info.model_uri, cfg.registered_name, tags,
                              description=f"{cfg.arch} ({cfg.loss}, {cfg.task}) on {manifest.name}, "
                                          f"{cfg.epochs} epochs at {cfg.image_size} px")
        mlflow.set_tag("registered_version", f"{cfg.registered_name}/{mv.version}")
    log.info("registered %s version %s (alias candidate)", cfg.registered_name, mv.version)
    return str(mv.version)


if __name__ == "__main__":
    main()
