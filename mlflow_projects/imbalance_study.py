"""MLflow entry point ``imbalance_study``: the four cost-sensitive losses on the same data, over seeds.

A parent run holds one nested child run per (seed, loss) (``bce``, ``wbce``, ``focal``, ``cb_focal``; each a
full :func:`mlflow_projects.common.train_one`: per-epoch metrics, per-class tables, ROC plot)
and the comparison tables under ``comparison/``:

- ``imbalance_comparison.{csv,html}``: per seed, loss and class the AUROC, AP and mean predicted probability
  (with the class prevalence), on the test split when it exists, else on validation, plus one ``mean`` row per
  (seed, loss);
- ``imbalance_dissection.{csv,html}``: per seed and loss the overall Disjoint / Unique (Table 2 shape);
- ``imbalance_summary.md`` (and ``.csv``): per loss the class means of AUROC, AP, IoBB, IoR, Disjoint and
  Unique as mean +- SD over the seeds (``--seeds 0,1,2``), the one table to read.

The data (phantom or manifest) and its splits are the same for every seed; a seed changes the initial weights
and the batch order. Models are not registered (``train_classifier`` does that).

The interpret columns (the shape of the paper's Tables 1 and 2, Khakzar et al.) are computed by
:func:`interpret.experiments.interpret_table` on the images of the compared split that have boxes:

- ``iobb``, ``ior``: soft IoBB ``sum(A M) / sum(M)`` and soft IoR ``sum(A M) / sum(A)`` of the Grad-CAM map
  of each boxed class exactly as the service serves it (ReLU, bilinear upsampling, min-max normalised to
  [0, 1], as the authors' code: Grad-CAM with ReLU, then min-max), M the union of the class's boxes, averaged
  over the images with a box of that class (``n_boxed``; ``n_flat`` maps left without positive evidence score
  0). The ``binary`` task explains its one output against the union of all boxes (the authors' NIH binary
  setting);
- ``disjoint``, ``unique``: dissection of the feature layer against the boxes (unit threshold at the
  quantile ``1 - q``; q = 0.01 for DenseNet-family architectures (T-DenseNet), 0.04 otherwise (ResNet50),
  or ``--dissection-q``), by the paper's protocol (``--dissection-protocol paper``: Disjoint = components
  overlapping a box of the class / images, Unique = (image, unit) pairs with such a component / images, so
  ``disjoint >= unique >= 0``) or by the authors' released code's (``authors_code``: per-batch quantile,
  ``>=``, contours inside the boxes, quantile batches of :func:`authors_batch` images; see
  :mod:`interpret.dissection`). T-DenseNet's maps are 28 x 28 only
  at ``--image-size 224`` (S/8); the dissected map size is logged (``dissection_map_size``).

Each child run logs them as metrics (``interp_{iobb,ior,disjoint,unique}.{class}`` and
``interp_*_mean``, plus ``dissection_{disjoint,unique}`` over all boxes).

    python -m mlflow_projects.imbalance_study --data outputs/phantom/manifest.parquet --arch resnet18 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import sys
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mlflow_projects.common import (ClassifierRunConfig, EXPERIMENTS, add_classifier_arguments, choice_of,
                                    ensure_data, entry_parser, finite_metrics, log_config, log_table, print_table, quiet_console,
                                    run_cli, show_progress, start_run, train_one)

log = logging.getLogger(__name__)

LOSSES = ("bce", "wbce", "focal", "cb_focal")
#: The columns of :func:`interpret.experiments.interpret_table` (its ``INTERPRET_COLUMNS``; not imported at
#: module level, which would import torch before :func:`quiet_console`; a test checks they agree).
INTERPRET_COLUMNS = ("n_boxed", "n_flat", "iobb", "ior", "disjoint", "unique")
BASE_COLUMNS = ("auroc", "ap", "mean_prob", "prevalence", "n_pos")
#: The columns of the seed summary (class means, then mean +- SD over seeds), in the paper's order.
SUMMARY_METRICS = ("auroc", "ap", "iobb", "ior", "disjoint", "unique")
#: Dissection protocols (:data:`interpret.dissection.PROTOCOLS`; a test checks they agree).
DISSECTION_PROTOCOLS = ("paper", "authors_code")


def dissection_q(arch: str) -> float:
    """Dissection quantile of DESIGN.md: 0.01 for DenseNet-family models (T-DenseNet), else 0.04 (ResNet50)."""
    return 0.01 if "densenet" in arch else 0.04


def authors_batch(arch: str) -> int:
    """Images per quantile batch of the authors' counting (imba-explain configs: 128 T-DenseNet, 64 ResNet50)."""
    return 128 if "densenet" in arch else 64


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated non-negative integers, got {text!r}") from None
    if any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


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
    p.add_argument("--seeds", type=_seed_list, default=[],
                   help="comma-separated seeds (e.g. 0,1,2): the study is run once per seed and summarised as "
                        "mean +- SD over seeds; empty: --seed only")
    p.add_argument("--dissection-protocol", type=choice_of(DISSECTION_PROTOCOLS, "dissection protocol"),
                   default="paper", help="paper (NetDissect counting, default) or authors_code (imba-explain's)")
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
        return cfg, losses, {"enabled": not a.no_interpret, "q": q, "protocol": a.dissection_protocol,
                             "seeds": a.seeds or [a.seed]}
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
            t[["n_boxed", "n_flat"]] = t[["n_boxed", "n_flat"]].fillna(0).astype(int)
        t.insert(0, "loss", loss)
        t = t.reset_index()
        mean: dict[str, Any] = {"loss": loss, "class": "mean"}
        for c in cols:
            if c in ("n_pos", "n_boxed", "n_flat"):
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


def dissection_table(overall: dict[str, dict[str, Any]], q: float) -> pd.DataFrame:
    """Table 2 shape: one row per loss with the overall dissection figures (``loss, q, n_images,
    disjoint, unique, units_detecting``, plus ``map_size`` and ``protocol`` when given)."""
    rows = [{"loss": loss, "q": q, **o} for loss, o in overall.items()]
    cols = ["loss", "q", "n_images", "disjoint", "unique", "units_detecting"]
    cols += [c for c in ("map_size", "protocol") if any(c in o for o in overall.values())]
    t = pd.DataFrame(rows, columns=cols)
    t[["n_images", "units_detecting"]] = t[["n_images", "units_detecting"]].astype(int)
    return t


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per loss the class means of :data:`SUMMARY_METRICS` as mean and SD (ddof 1) over the seeds.

    Args:
        table: the long comparison table with a ``seed`` column (the ``mean`` rows are used).

    Returns:
        One row per loss (in first-seen order): ``loss``, ``n_seeds`` and ``{metric}_mean``, ``{metric}_sd``
        for every metric present (SD NaN with one seed).
    """
    means = table[table["class"] == "mean"]
    rows = []
    for loss in dict.fromkeys(means["loss"]):
        part = means[means["loss"] == loss]
        row: dict[str, Any] = {"loss": loss, "n_seeds": int(part["seed"].nunique())}
        for m in SUMMARY_METRICS:
            if m in part:
                v = part[m].astype(float).dropna()
                row[f"{m}_mean"] = float(v.mean()) if len(v) else np.nan
                row[f"{m}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(summary: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """The seed summary as a markdown table: one row per loss, ``mean ± SD`` per metric."""
    metrics = [m for m in SUMMARY_METRICS if f"{m}_mean" in summary]
    head = {"auroc": "AUROC", "ap": "AP", "iobb": "IoBB", "ior": "IoR", "disjoint": "Disjoint", "unique": "Unique"}
    lines = [f"**{title}**", "", "| loss | seeds | " + " | ".join(head[m] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for _, r in summary.iterrows():
        cells = []
        for m in metrics:
            mu, sd = r[f"{m}_mean"], r[f"{m}_sd"]
            digits = 2 if m in ("disjoint", "unique") else 3
            cells.append("n/a" if not np.isfinite(mu) else
                         f"{mu:.{digits}f}" + (f" ± {sd:.{digits}f}" if np.isfinite(sd) else ""))
        lines.append(f"| {r['loss']} | {int(r['n_seeds'])} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the study (every seed, every loss); returns the long comparison table (with a ``seed`` column)."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import torch

    from interpret.experiments import IMBALANCE_METHOD, interpret_table
    from training.train import class_distribution, load_splits

    cfg, losses, interp = parse_args(argv, return_all=True)
    seeds = interp["seeds"]
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, False, True,
                                                     progress=show_progress())
    split = "test" if test_ds is not None else "val"
    tables: list[pd.DataFrame] = []
    dissections: list[pd.DataFrame] = []
    probe, probe_idx = (boxed_subset(manifest, split, cfg.image_size) if interp["enabled"] else (None, []))
    if interp["enabled"] and not probe_idx:
        log.warning("no image of the %s split has boxes: interpret columns are skipped", split)
    do_interp = interp["enabled"] and bool(probe_idx)
    map_size = ""
    with start_run(cfg.experiment, run_name=f"imbalance_study-{cfg.arch}-{cfg.task}") as parent, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log_config({**{k: v for k, v in vars(cfg).items() if k not in ("loss", "registered_name", "pretrained",
                                                                         "seed")},
                    "seeds": seeds, "losses": losses, "compared_on": split, "interpret": do_interp,
                    "attention_method": IMBALANCE_METHOD, "dissection_q": interp["q"],
                    "dissection_protocol": interp["protocol"], "n_boxed_images": len(probe_idx)})
        mlflow.set_tags({"manifest": str(manifest), "study": "imbalance", "classes": ",".join(classes)})
        class_distribution({"train": train_ds, "val": val_ds, "test": test_ds}, classes).to_csv(
            tmp / "class_distribution.csv", index=False)
        mlflow.log_artifact(str(tmp / "class_distribution.csv"), "data")
        for seed in seeds:
            per_loss: dict[str, pd.DataFrame] = {}
            interp_tables: dict[str, pd.DataFrame] = {}
            overall: dict[str, dict[str, Any]] = {}
            for loss in losses:
                run_cfg = replace(cfg, loss=loss, seed=seed)
                sub = tmp / f"{loss}-{seed}"
                sub.mkdir()
                torch.manual_seed(seed)
                with mlflow.start_run(run_name=f"{cfg.arch}-{loss}-seed{seed}", nested=True):
                    log_config(run_cfg)
                    mlflow.set_tags({"parent_study": parent.info.run_id, "loss": loss, "seed": str(seed)})
                    result, test_table, _, _ = train_one(run_cfg, train_ds, val_ds, test_ds, classes, sub)
                    if do_interp:
                        it, ov = interpret_table(result.model.cpu().eval(), probe, probe_idx, interp["q"],
                                                 2 * cfg.batch_size, progress=show_progress(),
                                                 protocol=interp["protocol"],
                                                 dissection_batch=(authors_batch(cfg.arch)
                                                                   if interp["protocol"] == "authors_code" else None))
                        interp_tables[loss], overall[loss] = it, ov
                        map_size = ov["map_size"]
                        mlflow.log_metrics(finite_metrics({f"interp_{col}.{cls}": row[col]
                                                           for cls, row in it.iterrows()
                                                           for col in INTERPRET_COLUMNS[2:]}))
                        mlflow.log_metrics(finite_metrics({f"interp_{col}_mean": it[col].mean(skipna=True)
                                                           for col in INTERPRET_COLUMNS[2:]}))
                        mlflow.log_metrics(finite_metrics({f"dissection_{k}": ov[k]
                                                           for k in ("disjoint", "unique", "units_detecting")}))
                        mlflow.log_params({"dissection_map_size": ov["map_size"]})
                per_loss[loss] = test_table if test_table is not None else result.val_table
                means = per_loss[loss][["auroc", "ap", "mean_prob"]].mean(skipna=True)
                mlflow.log_metrics(finite_metrics({f"{loss}.{k}_mean.seed{seed}": v for k, v in means.items()}))
            tables.append(comparison_table(per_loss, interp_tables if do_interp else None).assign(seed=seed))
            if do_interp:
                dissections.append(dissection_table(overall, interp["q"]).assign(seed=seed))
        table = pd.concat(tables, ignore_index=True)
        table = table[["seed"] + [c for c in table.columns if c != "seed"]]
        if do_interp:
            dis = pd.concat(dissections, ignore_index=True)
            log_table(dis[["seed"] + [c for c in dis.columns if c != "seed"]], tmp, "imbalance_dissection",
                      f"Dissection of {cfg.arch} ({split} split, {len(probe_idx)} boxed images, q = {interp['q']}, "
                      f"{interp['protocol']} protocol, maps {map_size})", "comparison")
        log_table(table, tmp, "imbalance_comparison",
                  f"Imbalance study: {cfg.arch}, {cfg.task}, on {manifest.name} ({split} split, seeds {seeds})",
                  "comparison")
        summary = seed_summary(table)
        log_table(summary, tmp, "imbalance_summary", "Imbalance study: class means, mean and SD over seeds",
                  "comparison")
        for m in SUMMARY_METRICS:
            mlflow.log_metrics(finite_metrics({f"{r['loss']}.{m}_mean": r.get(f"{m}_mean", np.nan)
                                               for _, r in summary.iterrows()}))
        notes = [f"{cfg.arch}, task {cfg.task}, {manifest} ({split} split), image size {cfg.image_size}, "
                 f"{cfg.epochs} epochs, batch {cfg.batch_size}, seeds {','.join(map(str, seeds))} "
                 f"(mean ± SD over seeds of the class means)"]
        if do_interp:
            notes.append(f"IoBB / IoR: {IMBALANCE_METHOD} maps as served (ReLU, upsampling, min-max) on "
                         f"{len(probe_idx)} boxed {split} images; Disjoint / Unique: {interp['protocol']} protocol, "
                         f"q = {interp['q']}, {map_size} maps")
        md = summary_markdown(summary, f"Imbalance study: {cfg.arch}, {cfg.task}", notes)
        (tmp / "imbalance_summary.md").write_text(md)
        mlflow.log_artifact(str(tmp / "imbalance_summary.md"), "comparison")
    shown = [c for c in ("seed", "loss", "auroc", "ap", "mean_prob", "iobb", "ior", "disjoint", "unique") if c in table]
    print_table(table[table["class"] == "mean"][shown],
                f"imbalance study: {cfg.arch} ({cfg.task}) on {manifest.name}, {split} split, seeds {seeds} "
                f"(means over classes; per class in the run's comparison/imbalance_comparison.csv)")
    sys.stdout.write(md)
    return table


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "imbalance_study"))
