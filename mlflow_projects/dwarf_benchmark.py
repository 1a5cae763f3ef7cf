"""MLflow entry point ``dwarf_benchmark``: DWARF vs GAIN vs the pretrained VLM on 4 and 7 diseases.

Reproduces the DWARF paper's comparison on the phantom (or any manifest with masks/boxes): for each
disease count k, the k most frequent diseases of the training split; all three methods start from the
same classification-trained VLM stage; GAIN gets as many training samples as DWARF's ``--epochs``
cycles. One table artifact, ``dwarf_benchmark.csv`` (+ ``.md``), one row per (k, method), with mean
AUC / F1 / MCC / Max Dice and Max Dice per disease; the means are also logged as metrics
``<method>.<k>.<metric>``. The table is printed at the end.

    python -m mlflow_projects.dwarf_benchmark --data outputs/phantom/manifest.parquet --epochs 4 --clip scratch
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mlflow_projects.common import (DEFAULT_DATA, DWARF_MIN_IMAGE_SIZE, EXPERIMENTS, ensure_data, entry_parser,
                                    finite_metrics, int_at_least, log_config, manifest_arg, nonneg_float,
                                    nonneg_int, positive_float, positive_int, print_table, quiet_console,
                                    resolve_clip, run_cli, show_progress, start_run, unit_float)

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = entry_parser("dwarf_benchmark", __doc__)
    p.add_argument("--data", type=manifest_arg, default=DEFAULT_DATA,
                   help="manifest with masks or boxes (a phantom is generated when the default is missing)")
    p.add_argument("--epochs", type=positive_int, default=4, help="DWARF cycles (one epoch per disease each)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the phantom and of the training")
    p.add_argument("--clip", default="scratch",
                   help="VLM with a ViT image tower: 'scratch' (an untrained cxr-tiny-vit), 'scratch:<config>', a "
                        "models:/ URI of a registered ViT cxr-clip, an open_clip spec or local-dir:PATH")
    p.add_argument("--image-size", type=int_at_least(DWARF_MIN_IMAGE_SIZE, "an image size"), default=64,
                   help="input side (px)")
    p.add_argument("--diseases", default="4,7", help="comma-separated disease counts")
    p.add_argument("--vlm-epochs", type=nonneg_int, default=6, help="epochs of the shared classification-trained VLM stage")
    p.add_argument("--lam", type=unit_float, default=0.5, help="lambda of L = lambda L_seg + (1 - lambda) L_cls")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per step")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="learning rate (the image encoder gets lr * --encoder-lr-scale)")
    p.add_argument("--encoder-lr-scale", type=nonneg_float, default=0.1,
                   help="image-tower lr = lr * this (1.0 when the CLIP is untrained; 0 freezes it)")
    p.add_argument("--phantom-n", type=positive_int, default=240, help="images of the generated phantom")
    p.add_argument("--device", default="", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--experiment", default=EXPERIMENTS["dwarf_benchmark"], help="MLflow experiment name")
    a = p.parse_args(argv)
    try:
        counts = sorted({int(k) for k in a.diseases.split(",") if k.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        p.error(f"argument --diseases: expected comma-separated positive counts, e.g. 4,7; got {a.diseases!r}")
    a.diseases = ",".join(map(str, counts))
    return a


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the benchmark in an MLflow run; returns (and prints) the table."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import torch

    from training.dwarf.data import load_splits
    from training.dwarf.pipeline import compare_methods
    from training.dwarf.train import TrainConfig, resolve_device

    a = parse_args(argv)
    counts = [int(k) for k in a.diseases.split(",")]
    manifest = ensure_data(a.data, a.image_size, a.seed, a.phantom_n, masks=True)
    bundle, clip_used = resolve_clip(a.clip, a.image_size, require_vit=True)
    train_all, val_all, test_all, classes = load_splits(manifest, a.image_size, progress=show_progress())
    order = np.argsort(-train_all.labels.sum(0).numpy(), kind="stable")  # most frequent first
    device = str(resolve_device(a.device or None))
    tables = []
    with start_run(a.experiment, run_name="dwarf_benchmark"), tempfile.TemporaryDirectory() as tmp:
        log_config({**vars(a), "data": str(manifest), "clip.resolved": clip_used})
        for k in counts:
            if k > len(classes):
                log.warning("only %d usable diseases; skipping k=%d", len(classes), k)
                continue
            idx = sorted(order[:k].tolist())
            sub = [d.select_classes(idx) for d in (train_all, val_all, test_all)]
            torch.manual_seed(a.seed)
            cfg = TrainConfig(batch_size=a.batch_size, lr=a.lr, encoder_lr_scale=a.encoder_lr_scale, lam=a.lam,
                              seed=a.seed, device=device, progress=show_progress())
            table = compare_methods(bundle, sub[0].classes, *sub, config=cfg, cycles=a.epochs,
                                    vlm_epochs=a.vlm_epochs)
            for _, row in table.iterrows():
                mlflow.log_metrics(finite_metrics({f"{row['method']}.{k}.{m}": row[m] for m in
                                                   ("auc_mean", "f1_mean", "mcc_mean", "max_dice_mean")}))
            tables.append(table)
        result = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        csv, md = Path(tmp) / "dwarf_benchmark.csv", Path(tmp) / "dwarf_benchmark.md"
        result.to_csv(csv, index=False)
        cols = ["n_diseases", "method", "auc_mean", "f1_mean", "mcc_mean", "max_dice_mean", "max_dice_raw_mean"]
        md.write_text(result[[c for c in cols if c in result]].to_markdown(index=False, floatfmt=".3f")
                      if not result.empty and _has_tabulate() else result.to_string(index=False))
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(md))
    print_table(result[[c for c in cols if c in result]] if not result.empty else None,
                f"DWARF benchmark on {manifest.name} (CLIP {clip_used}, seed {a.seed}): test means per method")
    return result


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "dwarf_benchmark"))
