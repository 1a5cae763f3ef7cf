"""MLflow entry point ``imbalance_study``: the four cost-sensitive losses on the same data and seed.

A parent run holds one nested child run per loss (``bce``, ``wbce``, ``focal``, ``cb_focal``; each a
full :func:`mlflow_projects.train_classifier.train_one`: per-epoch metrics, per-class tables, ROC plot)
and one comparison table ``comparison/imbalance_comparison.{csv,html}``: per loss and class the AUROC,
AP and mean predicted probability (with the class prevalence), on the test split when it exists,
else on validation, plus one ``mean`` row per loss. Models are not registered (``train_classifier``
does that). The interpret parts of the study (IoBB/IoR, dissection concept counts) are not in yet.

    python -m mlflow_projects.imbalance_study --data outputs/phantom/manifest.parquet --arch resnet18
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mlflow_projects.common import choice_of, log_config, nonneg_int, positive_int
from mlflow_projects.train_classifier import (DEFAULT_DATA, EXPERIMENT, ClassifierRunConfig, _image_size,
                                              class_distribution, ensure_data, finite_metrics, load_splits,
                                              log_resolved_config, start_run, train_one)

log = logging.getLogger(__name__)

LOSSES = ("bce", "wbce", "focal", "cb_focal")


def parse_args(argv: Sequence[str] | None = None) -> tuple[ClassifierRunConfig, list[str]]:
    """Parse and validate (exit 2 on a bad value). Returns the shared config and the losses to compare."""
    from training.losses import list_losses
    from training.models import list_models
    from training.train import TASKS

    p = argparse.ArgumentParser(prog="imbalance_study", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--arch", type=choice_of(list_models(), "arch"), default="resnet18")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--image-size", type=_image_size, default=128)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--task", type=choice_of(TASKS, "task"), default="multilabel")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of the losses")
    p.add_argument("--experiment", default=EXPERIMENT)
    a = p.parse_args(argv)
    data = Path(a.data).expanduser()
    if not data.is_file() and a.data != DEFAULT_DATA:
        p.error(f"argument --data: manifest not found: {data.resolve()}")
    losses = [x.strip() for x in a.losses.split(",") if x.strip()]
    bad = [x for x in losses if x not in list_losses()]
    if bad or not losses:
        p.error(f"argument --losses: unknown loss {bad or a.losses!r}; valid: {', '.join(list_losses())}")
    cfg = ClassifierRunConfig(data=str(data.resolve()) if data.is_file() else a.data, arch=a.arch, epochs=a.epochs,
                              image_size=a.image_size, seed=a.seed, batch_size=a.batch_size, task=a.task,
                              experiment=a.experiment)
    return cfg, losses


def comparison_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table (loss, class) -> auroc, ap, mean_prob, prevalence, n_pos, plus a ``mean`` row per loss."""
    rows = []
    for loss, table in tables.items():
        t = table[["auroc", "ap", "mean_prob", "prevalence", "n_pos"]].copy()
        t.insert(0, "loss", loss)
        t = t.reset_index()
        mean = {"loss": loss, "class": "mean", "auroc": np.nanmean(t["auroc"]) if t["auroc"].notna().any() else np.nan,
                "ap": np.nanmean(t["ap"]) if t["ap"].notna().any() else np.nan,
                "mean_prob": float(t["mean_prob"].mean()), "prevalence": float(t["prevalence"].mean()),
                "n_pos": int(t["n_pos"].sum())}
        rows.append(pd.concat([t, pd.DataFrame([mean])], ignore_index=True))
    return pd.concat(rows, ignore_index=True)[["loss", "class", "auroc", "ap", "mean_prob", "prevalence", "n_pos"]]


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the study; returns the comparison table."""
    import mlflow
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, losses = parse_args(argv)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, False, True)
    split = "test" if test_ds is not None else "val"
    tables: dict[str, pd.DataFrame] = {}
    with start_run(cfg.experiment, run_name=f"imbalance_study-{cfg.arch}") as parent, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log_resolved_config({**{k: v for k, v in vars(cfg).items() if k not in ("loss", "registered_name", "pretrained")},
                    "losses": losses, "compared_on": split})
        mlflow.set_tags({"manifest": str(manifest), "study": "imbalance", "classes": ",".join(classes)})
        class_distribution({"train": train_ds, "val": val_ds, "test": test_ds}, classes).to_csv(
            tmp / "class_distribution.csv", index=False)
        mlflow.log_artifact(str(tmp / "class_distribution.csv"), "data")
        for loss in losses:
            run_cfg = replace(cfg, loss=loss)
            sub = tmp / loss
            sub.mkdir()
            torch.manual_seed(cfg.seed)
            with mlflow.start_run(run_name=f"{cfg.arch}-{loss}", nested=True):
                log_config(run_cfg)
                mlflow.set_tags({"parent_study": parent.info.run_id, "loss": loss})
                result, test_table, _, _ = train_one(run_cfg, train_ds, val_ds, test_ds, classes, sub)
            tables[loss] = test_table if test_table is not None else result.val_table
            means = tables[loss][["auroc", "ap", "mean_prob"]].mean(skipna=True)
            mlflow.log_metrics(finite_metrics({f"{loss}.{k}_mean": v for k, v in means.items()}))
        table = comparison_table(tables)
        table.to_csv(tmp / "imbalance_comparison.csv", index=False)
        (tmp / "imbalance_comparison.html").write_text(
            f"<h2>Imbalance study: {cfg.arch} on {manifest.name} ({split} split, seed {cfg.seed})</h2>"
            + table.to_html(index=False, float_format="%.4f"))
        mlflow.log_artifact(str(tmp / "imbalance_comparison.csv"), "comparison")
        mlflow.log_artifact(str(tmp / "imbalance_comparison.html"), "comparison")
    return table


if __name__ == "__main__":
    main()
