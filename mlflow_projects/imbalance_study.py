"""MLflow entry point ``imbalance_study``: the four cost-sensitive losses on the same data and seed.

A parent run holds one nested child run per loss (``bce``, ``wbce``, ``focal``, ``cb_focal``; each a
full :func:`mlflow_projects.common.train_one`: per-epoch metrics, per-class tables, ROC plot)
and one comparison table ``comparison/imbalance_comparison.{csv,html}``: per loss and class the AUROC,
AP and mean predicted probability (with the class prevalence), on the test split when it exists,
else on validation, plus one ``mean`` row per loss. Models are not registered (``train_classifier``
does that).

The interpret columns (the shape of the paper's Tables 1 and 2, Khakzar et al.; multilabel task only)
are computed by :func:`interpret.experiments.interpret_table` on the images of the compared split that
have boxes:

- ``iobb``, ``ior``: soft IoBB ``sum(A M) / sum(M)`` and soft IoR ``sum(A M) / sum(A)`` of the CAM
  map of each boxed class (raw CAM, no ReLU, unlike the maps the service and the audit score; min-max
  normalised to [0, 1]; M the union of the class's boxes), averaged over the images with a box of that class (``n_boxed``);
- ``disjoint``, ``unique``: dissection of the feature layer against the boxes (unit threshold at the
  quantile ``1 - q``; q = 0.01 for DenseNet-family architectures, 0.04 otherwise, or
  ``--dissection-q``): Disjoint = components overlapping a box of the class / images,
  Unique = (image, unit) pairs with such a component / images, so ``disjoint >= unique >= 0``.

Each child run logs them as metrics (``interp_{iobb,ior,disjoint,unique}.{class}`` and
``interp_*_mean``, plus ``dissection_{disjoint,unique}`` over all boxes); the parent logs
``comparison/imbalance_dissection.{csv,html}``, one row per loss with the overall Disjoint / Unique
(Table 2).

    python -m mlflow_projects.imbalance_study --data outputs/phantom/manifest.parquet --arch resnet18
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mlflow_projects.common import (ClassifierRunConfig, EXPERIMENTS, add_classifier_arguments, ensure_data,
                                    entry_parser, finite_metrics, log_config, log_table, print_table, quiet_console,
                                    run_cli, show_progress, start_run, train_one)

log = logging.getLogger(__name__)

LOSSES = ("bce", "wbce", "focal", "cb_focal")
#: The columns of :func:`interpret.experiments.interpret_table` (its ``INTERPRET_COLUMNS``; not imported at
#: module level, which would import torch before :func:`quiet_console`; a test checks they agree).
INTERPRET_COLUMNS = ("n_boxed", "iobb", "ior", "disjoint", "unique")
BASE_COLUMNS = ("auroc", "ap", "mean_prob", "prevalence", "n_pos")


def dissection_q(arch: str) -> float:
    """Dissection quantile of DESIGN.md: 0.01 for DenseNet-family models (T-DenseNet), else 0.04 (ResNet50)."""
    return 0.01 if "densenet" in arch else 0.04


def _unit_fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text!r}")
    return v


def parse_args(argv: Sequence[str] | None = None, return_all: bool = False):
    """Parse and validate (exit 2 on a bad value).

    Returns:
        ``(config, losses)``; with ``return_all`` ``(config, losses, interpret)`` where ``interpret`` is
        ``{"enabled": bool, "q": float}`` (``q`` from :func:`dissection_q` unless ``--dissection-q``).
    """
    from training.losses import list_losses

    p = entry_parser("imbalance_study", __doc__)
    add_classifier_arguments(p)
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of the losses")
    p.add_argument("--experiment", default=EXPERIMENTS["imbalance_study"])
    p.add_argument("--dissection-q", type=_unit_fraction, default=None,
                   help="top fraction per unit for dissection (default 0.01 DenseNet family, 0.04 others)")
    p.add_argument("--no-interpret", action="store_true", help="skip the IoBB/IoR and dissection columns")
    a = p.parse_args(argv)
    losses = [x.strip() for x in a.losses.split(",") if x.strip()]
    bad = [x for x in losses if x not in list_losses()]
    if bad or not losses:
        p.error(f"argument --losses: unknown loss {bad or a.losses!r}; valid: {', '.join(list_losses())}")
    cfg = ClassifierRunConfig(data=a.data, arch=a.arch, epochs=a.epochs,
                              image_size=a.image_size, seed=a.seed, batch_size=a.batch_size, task=a.task,
                              experiment=a.experiment)
    if return_all:
        q = a.dissection_q if a.dissection_q is not None else dissection_q(a.arch)
        return cfg, losses, {"enabled": not a.no_interpret, "q": q}
    return cfg, losses


def comparison_table(tables: dict[str, pd.DataFrame],
                     interpret: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Long table (loss, class) -> auroc, ap, mean_prob, prevalence, n_pos, plus a ``mean`` row per loss.

    Args:
        tables: per loss the per-class classification table (indexed by class).
        interpret: optional per loss a table indexed by class with :data:`INTERPRET_COLUMNS` (see
            :func:`interpret.experiments.interpret_table`); its columns are appended. The ``mean`` row averages classes
            (NaN-skipping; ``n_pos`` and ``n_boxed`` are summed).
    """
    cols = list(BASE_COLUMNS) + (list(INTERPRET_COLUMNS) if interpret is not None else [])
    rows = []
    for loss, table in tables.items():
        t = table[list(BASE_COLUMNS)].copy()
        if interpret is not None:
            extra = interpret.get(loss)
            if extra is None:
                extra = pd.DataFrame(index=t.index, columns=list(INTERPRET_COLUMNS), dtype=float)
            t = t.join(extra[list(INTERPRET_COLUMNS)], how="left")
            t["n_boxed"] = t["n_boxed"].fillna(0).astype(int)
        t.insert(0, "loss", loss)
        t = t.reset_index()
        mean: dict[str, Any] = {"loss": loss, "class": "mean"}
        for c in cols:
            if c in ("n_pos", "n_boxed"):
                mean[c] = int(t[c].sum())
            else:
                v = t[c].astype(float)
                mean[c] = float(np.nanmean(v)) if v.notna().any() else np.nan
        rows.append(pd.concat([t, pd.DataFrame([mean])], ignore_index=True))
    return pd.concat(rows, ignore_index=True)[["loss", "class"] + cols]


def boxed_subset(manifest: Path, split: str, image_size: int):
    """The images of ``split`` with at least one box, as ``(ManifestDataset, indices)``."""
    from training.data.dataset import ManifestDataset

    ds = ManifestDataset(manifest, image_size=image_size, split=split)
    idx = [i for i, labs in enumerate(ds.box_label_arrays) if len(labs)]
    return ds, idx


def dissection_table(overall: dict[str, dict[str, float]], q: float) -> pd.DataFrame:
    """Table 2 shape: one row per loss with the overall dissection figures (``loss, q, n_images,
    disjoint, unique, units_detecting``)."""
    rows = [{"loss": loss, "q": q, **o} for loss, o in overall.items()]
    cols = ["loss", "q", "n_images", "disjoint", "unique", "units_detecting"]
    t = pd.DataFrame(rows, columns=cols)
    t[["n_images", "units_detecting"]] = t[["n_images", "units_detecting"]].astype(int)
    return t


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the study; returns the comparison table."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import torch

    from interpret.experiments import interpret_table
    from training.train import class_distribution, load_splits

    cfg, losses, interp = parse_args(argv, return_all=True)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, False, True,
                                                     progress=show_progress())
    split = "test" if test_ds is not None else "val"
    tables: dict[str, pd.DataFrame] = {}
    interp_tables: dict[str, pd.DataFrame] = {}
    overall: dict[str, dict[str, float]] = {}
    probe, probe_idx = (boxed_subset(manifest, split, cfg.image_size) if interp["enabled"] else (None, []))
    if interp["enabled"] and cfg.task != "multilabel":
        log.warning("interpret columns need per-class outputs; task %r has none, so they are skipped", cfg.task)
    elif interp["enabled"] and not probe_idx:
        log.warning("no image of the %s split has boxes: interpret columns are skipped", split)
    do_interp = interp["enabled"] and cfg.task == "multilabel" and bool(probe_idx)
    with start_run(cfg.experiment, run_name=f"imbalance_study-{cfg.arch}") as parent, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log_config({**{k: v for k, v in vars(cfg).items() if k not in ("loss", "registered_name", "pretrained")},
                    "losses": losses, "compared_on": split, "interpret": do_interp,
                    "dissection_q": interp["q"], "n_boxed_images": len(probe_idx)})
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
                if do_interp:
                    it, ov = interpret_table(result.model.cpu().eval(), probe, probe_idx, interp["q"],
                                             2 * cfg.batch_size, progress=show_progress())
                    interp_tables[loss], overall[loss] = it, ov
                    mlflow.log_metrics(finite_metrics({f"interp_{col}.{cls}": row[col] for cls, row in it.iterrows()
                                                       for col in INTERPRET_COLUMNS[1:]}))
                    mlflow.log_metrics(finite_metrics({f"interp_{col}_mean": it[col].mean(skipna=True)
                                                       for col in INTERPRET_COLUMNS[1:]}))
                    mlflow.log_metrics(finite_metrics({f"dissection_{k}": v for k, v in ov.items()}))
            tables[loss] = test_table if test_table is not None else result.val_table
            means = tables[loss][["auroc", "ap", "mean_prob"]].mean(skipna=True)
            mlflow.log_metrics(finite_metrics({f"{loss}.{k}_mean": v for k, v in means.items()}))
        table = comparison_table(tables, interp_tables if do_interp else None)
        if do_interp:
            log_table(dissection_table(overall, interp["q"]), tmp, "imbalance_dissection",
                      f"Dissection of {cfg.arch} ({split} split, {len(probe_idx)} boxed images, q = {interp['q']})",
                      "comparison")
        log_table(table, tmp, "imbalance_comparison",
                  f"Imbalance study: {cfg.arch} on {manifest.name} ({split} split, seed {cfg.seed})", "comparison")
    shown = [c for c in ("loss", "auroc", "ap", "mean_prob", "iobb", "ior", "disjoint", "unique") if c in table]
    print_table(table[table["class"] == "mean"][shown],
                f"imbalance study: {cfg.arch} on {manifest.name}, {split} split, seed {cfg.seed} (means over classes; "
                f"per class in the run's comparison/imbalance_comparison.csv)")
    return table


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "imbalance_study"))
