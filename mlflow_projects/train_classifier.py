"""MLflow entry point ``train_classifier``: train a classifier on a manifest, log it, register it.

Steps: (1) validate every parameter (exit 2 with a clear message before any training); (2) data: the
manifest's ``train`` / ``val`` (/ ``test``) splits (default: the phantom, generated when missing);
(3) :func:`training.train.fit` with per-epoch metrics logged through its callback; (4) logs the
resolved config, the class distribution per split, validation (and test) metrics per class as
CSV/HTML, a validation ROC plot; (5) the pyfunc of :mod:`mlflow_projects.pyfunc_classifier`
(checkpoint + ONNX checked against eager + meta, signature, input example) registered under
``--registered-name`` with alias ``candidate`` and version tags ``classes``, ``thresholds`` (JSON; ``null``
for a class with fewer than ``--min-val-positives`` validation positives: no threshold is fitted on so
little), ``threshold_positives``, ``min_val_positives``, ``input``.

    python -m mlflow_projects.train_classifier --data outputs/phantom/manifest.parquet --arch resnet18 \
        --loss focal --epochs 3 --image-size 128

Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) the run is the one the CLI created, in its experiment
(pass ``--experiment-name cxr-classifier`` to ``mlflow run`` to keep runs together).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from mlflow_projects.common import (data_tags, ClassifierRunConfig, EXPERIMENTS, add_classifier_arguments, choice_of,
                                    ensure_data, entry_parser, log_config, nonneg_float, nonneg_int, positive_float,
                                    positive_int, print_table, quiet_console, register_version, run_cli,
                                    show_progress, start_run, train_one)

log = logging.getLogger(__name__)

EXPERIMENT = EXPERIMENTS["train_classifier"]


def build_parser() -> argparse.ArgumentParser:
    from training.losses import list_losses

    p = entry_parser("train_classifier", __doc__)
    add_classifier_arguments(p)
    p.add_argument("--loss", type=choice_of(list_losses(), "loss"), default="bce")
    p.add_argument("--pretrained", default="", help="local weights file for the backbone ('' = random init)")
    p.add_argument("--registered-name", default="cxr-classifier")
    p.add_argument("--lr", type=positive_float, default=4e-4)
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-6)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=0.5)
    p.add_argument("--patience", type=nonneg_int, default=0)
    p.add_argument("--min-val-positives", type=positive_int, default=ClassifierRunConfig().min_val_positives,
                   help="validation positives a class needs for a decision threshold; with fewer it gets none "
                        "(null) and the service makes no call for it")
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
    pretrained = a.pretrained.strip() or None
    if pretrained and not Path(pretrained).expanduser().is_file():
        p.error(f"argument --pretrained: weights file not found: {Path(pretrained).expanduser().resolve()} "
                "(weights are never downloaded; pass a local file or '')")
    if not a.registered_name.strip():
        p.error("argument --registered-name: must not be empty")
    return ClassifierRunConfig(
        data=a.data, arch=a.arch, loss=a.loss, epochs=a.epochs,
        image_size=a.image_size, batch_size=a.batch_size, seed=a.seed, task=a.task,
        pretrained=str(Path(pretrained).expanduser().resolve()) if pretrained else None,
        registered_name=a.registered_name.strip(), lr=a.lr, weight_decay=a.weight_decay,
        warmup_epochs=a.warmup_epochs, patience=a.patience, min_val_positives=a.min_val_positives,
        augment=a.augment, cache=not a.no_cache,
        device=a.device or None, num_workers=a.num_workers, phantom_n=a.phantom_n, experiment=a.experiment)


# ---- entry point ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> str:
    """Run the entry point; returns the registered model version."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import torch

    from mlflow_projects.pyfunc_classifier import log_classifier_model, model_meta
    from training.metrics import summarize
    from training.train import class_distribution, load_splits

    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, cfg.augment, cfg.cache,
                                                     progress=show_progress())
    with start_run(cfg.experiment, run_name=f"train_classifier-{cfg.arch}-{cfg.loss}") as run, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log_config(cfg)
        mlflow.set_tags({"manifest": str(manifest), "classes": ",".join(classes), "task": cfg.task,
                         **data_tags(manifest)})  # the model card's manifest SHA-256 and sources
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
        tags = {"classes": meta["classes"], "thresholds": meta["thresholds"],
                "threshold_positives": meta["threshold_positives"], "min_val_positives": meta["min_val_positives"],
                "input": meta["input"], "arch": cfg.arch, "loss": cfg.loss, "task": cfg.task,
                "feature_layer": meta["feature_layer"],
                "train_run_id": run.info.run_id,
                "val_auroc_mean": round(val_means["auroc_mean"], 4) if np.isfinite(val_means["auroc_mean"]) else "nan"}
        mv = register_version(info.model_uri, cfg.registered_name, tags,
                              description=f"{cfg.arch} ({cfg.loss}, {cfg.task}) on {manifest.name}, "
                                          f"{cfg.epochs} epochs at {cfg.image_size} px")
        mlflow.set_tag("registered_version", f"{cfg.registered_name}/{mv.version}")
    log.info("registered %s version %s (alias candidate)", cfg.registered_name, mv.version)
    table = result.val_table if test_table is None else test_table
    print_table(table.reset_index()[["class", "n_pos", "auroc", "ap", "f1", "mcc"]],
                f"{cfg.registered_name} version {mv.version} (@candidate): "
                f"{'test' if test_table is not None else 'validation'} metrics per class")
    return str(mv.version)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "train_classifier"))
