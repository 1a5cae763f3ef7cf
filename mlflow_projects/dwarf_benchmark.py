"""MLflow entry point ``dwarf_benchmark``: DWARF vs GAIN vs the pretrained VLM on 4 and 7 diseases, over seeds,
with the paper's ablations.

Reproduces the DWARF paper's comparison on the phantom (or any manifest with masks/boxes): for each
disease count k, the k most frequent diseases of the training split; all methods start from the same
classification-trained VLM stage (the untuned VLM, row ``pretrained``); GAIN (plain soft Dice, the paper's
GAIN) gets as many training samples as DWARF's ``--epochs`` cycles; DWARF uses the FP-weighted soft Dice
and classifies from ``(I, M'_c)`` (Algorithm 1 line 15). ``--ablations`` adds the paper's two ablations,
``random_init`` (Fig. 2: random instead of identity-initialised expert heads) and ``direct`` (Table 4:
the soft Dice on the attention map itself, no expert heads), and ``cls_query`` (the classifier reads the
query token only; our measurement of Algorithm 1 line 15). ``--seeds`` repeats everything per training
seed (the data stay fixed).

Artifacts: ``dwarf_benchmark.csv`` (+ ``.md``): one row per (k, method), mean over seeds of each
class-mean metric (AUC / F1 / MCC / Max Dice) with its seed SD (``<metric>_sd``, ddof 1; NaN for one
seed) and ``n_seeds``; ``dwarf_benchmark_seeds.csv``: one row per (seed, k, method) with Max Dice per
disease; ``dwarf_benchmark_paired.csv``: per-seed paired differences of the paper's comparisons (DWARF vs
GAIN vs the untuned VLM, identity vs random experts, expert heads vs direct) with 95 % t intervals. Metrics ``<method>.<k>.<metric>`` (seed means) and ``<method>.<k>.<metric>_sd``. The table is
printed at the end.

    python -m mlflow_projects.dwarf_benchmark --data outputs/phantom/manifest.parquet --epochs 4 --clip scratch \
        --seeds 0,1,2 --ablations all
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

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
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the phantom (and of the training when --seeds is not given)")
    p.add_argument("--seeds", default="", help="comma-separated training seeds, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--ablations", default="none",
                   help="none, all, or a comma list of random_init (Fig. 2), direct (Table 4), cls_query")
    p.add_argument("--gain-w-fp", type=nonneg_float, default=1.0,
                   help="GAIN's soft-Dice false-positive weight (1 = plain Dice, the paper's GAIN)")
    p.add_argument("--w-fp", type=nonneg_float, default=2.0, help="DWARF's soft-Dice false-positive weight")
    p.add_argument("--classify-from", default="map", choices=["map", "query"],
                   help="DWARF classifier: 'map' = from (I, M'_c) as Algorithm 1 line 15, 'query' = query token")
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
    try:
        seeds = [int(k) for k in a.seeds.split(",") if k.strip()] if a.seeds.strip() else [a.seed]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        p.error(f"argument --seeds: expected distinct comma-separated seeds >= 0, e.g. 0,1,2; got {a.seeds!r}")
    a.seeds = ",".join(map(str, seeds))
    from training.dwarf.pipeline import resolve_ablations

    try:
        a.ablations = ",".join(resolve_ablations(a.ablations)) or "none"
    except ValueError as exc:
        p.error(f"argument --ablations: {exc}")
    return a


METRICS = ("auc_mean", "f1_mean", "mcc_mean", "max_dice_mean", "max_dice_raw_mean")
DEPARTURES = ("phantom at tiny sizes, untrained-from-scratch CLIP unless --clip names one; "
              "classifier on (I, M'_c) is our reading of Algorithm 1 line 15 (the paper gives no formula); "
              "GAIN = classification + plain soft Dice on the raw attention maps (no GAIN attention-mining term)")


def summarize(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Seed means and SDs (ddof 1) of the class-mean metrics per (n_diseases, method), in arm order."""
    if per_seed.empty:
        return per_seed
    keys = ["n_diseases", "method"]
    order = {m: i for i, m in enumerate(dict.fromkeys(per_seed["method"]))}
    grouped = per_seed.groupby(keys, sort=False)
    mean = grouped[list(METRICS)].mean()
    sd = grouped[list(METRICS)].std(ddof=1).add_suffix("_sd")
    out = pd.concat([mean, sd], axis=1)
    out["n_seeds"] = grouped.size()
    out = out.reset_index()
    out = out.sort_values(["n_diseases", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                          kind="stable").reset_index(drop=True)
    cols = keys + ["n_seeds"] + [c for m in METRICS for c in (m, f"{m}_sd")]
    return out[cols]


# (arm a, arm b, the paper's claim): does a beat b? The last pair has no paper figure (our reading of line 15).
COMPARISONS = (("dwarf", "gain", "DWARF > GAIN"), ("gain", "pretrained", "GAIN > untuned VLM"),
               ("dwarf", "pretrained", "DWARF > untuned VLM"),
               ("dwarf", "dwarf_random_init", "identity-initialised experts > random (Fig. 2)"),
               ("dwarf", "dwarf_direct", "expert heads > optimising the attention directly (Table 4)"),
               ("dwarf", "dwarf_cls_query", "classify from (I, M'_c) vs query token (no paper figure)"))


def paired_differences(per_seed: pd.DataFrame, metrics: Sequence[str] = ("max_dice_mean", "auc_mean")
                       ) -> pd.DataFrame:
    """Per-seed paired differences ``a - b`` of the :data:`COMPARISONS` present in ``per_seed``.

    Returns:
        One row per (n_diseases, comparison, metric): ``mean_diff``, ``sd_diff`` (ddof 1), ``ci_low`` /
        ``ci_high`` (95 % t interval over seeds; NaN for one seed), ``n_seeds`` and ``a_wins`` (seeds
        where a > b).
    """
    from scipy import stats

    rows = []
    if per_seed.empty:
        return pd.DataFrame(rows)
    for k, group in per_seed.groupby("n_diseases", sort=True):
        table = group.set_index(["method", "seed"])
        arms = set(group["method"])
        for a, b, claim in COMPARISONS:
            if a not in arms or b not in arms:
                continue
            for m in metrics:
                diff = (table.loc[a][m] - table.loc[b][m]).dropna()
                n = len(diff)
                mean, sd = float(diff.mean()), float(diff.std(ddof=1)) if n > 1 else float("nan")
                half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
                rows.append({"n_diseases": int(k), "a": a, "b": b, "claim": claim, "metric": m,
                             "mean_diff": mean, "sd_diff": sd, "ci_low": mean - half, "ci_high": mean + half,
                             "n_seeds": n, "a_wins": int((diff > 0).sum())})
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame) -> str:
    """``mean ± SD`` cells per metric (the md artifact)."""
    rows = ["| diseases | method | seeds | " + " | ".join(m.replace("_mean", "") for m in METRICS) + " |",
            "|---|---|---|" + "---|" * len(METRICS)]
    for _, r in summary.iterrows():
        cells = [f"{r[m]:.3f} ± {r[m + '_sd']:.3f}" if np.isfinite(r[m + "_sd"]) else f"{r[m]:.3f}"
                 for m in METRICS]
        rows.append(f"| {r['n_diseases']} | {r['method']} | {r['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the benchmark in an MLflow run; returns (and prints) the table."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow

    from training.dwarf.data import load_splits
    from training.dwarf.pipeline import compare_methods
    from training.dwarf.train import TrainConfig, resolve_device

    a = parse_args(argv)
    counts = [int(k) for k in a.diseases.split(",")]
    seeds = [int(k) for k in a.seeds.split(",")]
    ablations = [] if a.ablations == "none" else a.ablations.split(",")
    manifest = ensure_data(a.data, a.image_size, a.seed, a.phantom_n, masks=True)
    bundle, clip_used = resolve_clip(a.clip, a.image_size, require_vit=True)
    train_all, val_all, test_all, classes = load_splits(manifest, a.image_size, progress=show_progress())
    order = np.argsort(-train_all.labels.sum(0).numpy(), kind="stable")  # most frequent first
    device = str(resolve_device(a.device or None))
    tables = []
    with start_run(a.experiment, run_name="dwarf_benchmark"), tempfile.TemporaryDirectory() as tmp:
        log_config({**vars(a), "data": str(manifest), "clip.resolved": clip_used, "departures": DEPARTURES})
        for seed in tqdm(seeds, desc="seeds", disable=not show_progress() or len(seeds) < 2):
            for k in counts:
                if k > len(classes):
                    log.warning("only %d usable diseases; skipping k=%d", len(classes), k)
                    continue
                idx = sorted(order[:k].tolist())
                sub = [d.select_classes(idx) for d in (train_all, val_all, test_all)]
                cfg = TrainConfig(batch_size=a.batch_size, lr=a.lr, encoder_lr_scale=a.encoder_lr_scale, lam=a.lam,
                                  w_fp=a.w_fp, gain_w_fp=a.gain_w_fp, seed=seed, device=device,
                                  progress=show_progress())
                table = compare_methods(bundle, sub[0].classes, *sub, config=cfg, cycles=a.epochs,
                                        vlm_epochs=a.vlm_epochs, ablations=ablations,
                                        classify_from=a.classify_from)
                table.insert(0, "seed", seed)
                tables.append(table)
        per_seed = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        result = summarize(per_seed)
        for _, row in result.iterrows():
            mlflow.log_metrics(finite_metrics({f"{row['method']}.{row['n_diseases']}.{m}{sfx}": row[m + sfx]
                                               for m in METRICS[:4] for sfx in ("", "_sd")}))
        csv, md = Path(tmp) / "dwarf_benchmark.csv", Path(tmp) / "dwarf_benchmark.md"
        seeds_csv = Path(tmp) / "dwarf_benchmark_seeds.csv"
        paired_csv = Path(tmp) / "dwarf_benchmark_paired.csv"
        result.to_csv(csv, index=False)
        per_seed.to_csv(seeds_csv, index=False)
        paired_differences(per_seed).to_csv(paired_csv, index=False)
        md.write_text((markdown(result) if not result.empty else "(no rows)\n") + f"\nDepartures: {DEPARTURES}\n",
                      encoding="utf-8")
        for f in (csv, md, seeds_csv, paired_csv):
            mlflow.log_artifact(str(f))
    cols = ["n_diseases", "method", "n_seeds"] + [c for m in METRICS[:4] for c in (m, f"{m}_sd")]
    print_table(result[cols] if not result.empty else None,
                f"DWARF benchmark on {manifest.name} (CLIP {clip_used}, seeds {a.seeds}): test means over seeds "
                f"(_sd: seed SD) per method")
    print(f"Departures from the paper: {DEPARTURES}", flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "dwarf_benchmark"))
