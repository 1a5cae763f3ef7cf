"""MLflow entry point ``train_dwarf``: train DWARF on a manifest, log metrics and galleries, register.

Steps: (1) data (:func:`training.dwarf.data.load_splits`): the manifest (default: the phantom, generated with
masks when missing), plus clinician feedback records (``--feedback``, the folder the service's ``/feedback`` writes) added to the training
split; (2) CLIP (:func:`mlflow_projects.common.resolve_clip`; DWARF needs a ViT image tower): ``scratch``
(the default: an untrained ``cxr-tiny-vit``), a ``models:/`` URI of a registered ViT ``cxr-clip`` (e.g.
trained with ``train_clip --model cxr-minilm-vit``), or an open_clip spec; anything that cannot be
loaded is refused, never replaced by an untrained model; (3) the VLM stage (classification only) and cyclic DWARF fine-tuning, ``--epochs`` cycles of
one epoch per disease; (4) thresholds chosen on ``val`` (none, ``null`` in the tags, for a disease with
fewer than ``--min-val-positives`` validation positives), AUC / F1 / MCC / Max Dice on ``test`` per
disease and their means (the VLM stage is logged too, prefixed ``vlm.``); (5) galleries
``gallery/<disease>.png`` (image, raw map, refined map, ground truth); (6) the pyfunc of
:mod:`mlflow_projects.pyfunc_dwarf` registered as ``cxr-dwarf`` with alias ``candidate``.

    python -m mlflow_projects.train_dwarf --data outputs/phantom/manifest.parquet --epochs 2
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from mlflow_projects.common import (data_tags, DEFAULT_DATA, DWARF_MIN_IMAGE_SIZE, EXPERIMENTS, ensure_data, entry_parser,
                                    finite_metrics, int_at_least, log_config, manifest_arg, nonneg_int,
                                    positive_float, positive_int, print_table, quiet_console, register_version,
                                    resolve_clip, run_cli, show_progress, start_run, unit_float)

log = logging.getLogger(__name__)

DEFAULT_CLIP = "scratch"
EXPERIMENT = EXPERIMENTS["train_dwarf"]
MIN_IMAGE_SIZE = DWARF_MIN_IMAGE_SIZE


@dataclass
class DwarfRunConfig:
    data: str = DEFAULT_DATA
    clip: str = DEFAULT_CLIP
    epochs: int = 4  # cycles over the diseases (each cycle = one epoch per disease)
    image_size: int = 64
    seed: int = 0
    lam: float = 0.5
    registered_name: str = "cxr-dwarf"
    batch_size: int = 16
    lr: float = 1e-3
    w_fp: float = 2.0
    vlm_epochs: int = 6  # classification-only epochs of the VLM stage
    classes: list[str] | None = None  # default: manifest classes with >= 2 train and test positives
    feedback: str | None = None  # folder of clinician feedback records added to the training set
    phantom_n: int = 240  # images of the phantom generated when the default data is missing
    device: str | None = None
    d_model: int = 128
    decoder_layers: int = 2
    heads: int = 4
    map_layers: int = 1
    gallery_n: int = 4
    min_val_positives: int = 5  # = training.metrics.MIN_VAL_POSITIVES: fewer val positives, no threshold
    experiment: str = EXPERIMENT
    extra: dict[str, Any] = field(default_factory=dict)


# ---- data ----------------------------------------------------------------------------------
def manifest_classes(manifest: Path) -> list[str]:
    """The finding classes a manifest names (labels and box labels), sorted."""
    from training.data.schema import read_manifest

    frame = read_manifest(manifest)
    names = {str(c) for labels in frame["labels"] for c in (labels if labels is not None else [])}
    if "boxes" in frame:
        names |= {str(b["label"]) for boxes in frame["boxes"] if boxes is not None for b in boxes}
    return sorted(names)


def check_classes(classes: Sequence[str] | None, manifest: Path) -> None:
    """Refuse diseases the manifest does not name (the error lists the ones it does)."""
    if not classes:
        return
    valid = manifest_classes(manifest)
    bad = [c for c in classes if c not in valid]
    if bad:
        raise ValueError(f"unknown class{'es' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} for --classes; "
                         f"valid (the classes of {manifest}): {', '.join(valid)}")


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> DwarfRunConfig:
    p = entry_parser("train_dwarf", __doc__)
    p.add_argument("--data", type=manifest_arg, default=DEFAULT_DATA,
                   help="manifest (default: the phantom, generated with masks if missing)")
    p.add_argument("--clip", default=DEFAULT_CLIP,
                   help="ViT CLIP: 'scratch' (an untrained cxr-tiny-vit), 'scratch:<config>', a models:/ URI of a "
                        "registered ViT cxr-clip, or an open_clip spec")
    p.add_argument("--epochs", type=positive_int, default=4, help="cycles; each trains one epoch per disease")
    p.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE, "an image size"), default=64,
                   help=f"input side in px (>= {MIN_IMAGE_SIZE}: a grid of 8-px patches)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--lam", type=unit_float, default=0.5, help="lambda of L = lambda L_seg + (1 - lambda) L_cls")
    p.add_argument("--registered-name", default="cxr-dwarf")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--w-fp", type=positive_float, default=2.0, help="false-positive weight of the soft Dice")
    p.add_argument("--vlm-epochs", type=nonneg_int, default=6)
    p.add_argument("--classes", default="", help="comma-separated diseases (default: those with positives)")
    p.add_argument("--feedback", default="",
                   help="folder of clinician feedback records (what the service's POST /feedback writes, "
                        "CXR_FEEDBACK_DIR) added to the training split")
    p.add_argument("--phantom-n", type=positive_int, default=240)
    p.add_argument("--device", default="")
    p.add_argument("--d-model", type=positive_int, default=128)
    p.add_argument("--decoder-layers", type=positive_int, default=2)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--map-layers", type=positive_int, default=1)
    p.add_argument("--gallery-n", type=nonneg_int, default=4)
    p.add_argument("--min-val-positives", type=positive_int, default=DwarfRunConfig().min_val_positives,
                   help="validation positives a disease needs for a decision threshold; with fewer it gets none "
                        "(null) and the service makes no call for it")
    p.add_argument("--experiment", default=EXPERIMENT)
    a = p.parse_args(argv)
    if a.feedback and not Path(a.feedback).expanduser().is_dir():
        p.error(f"argument --feedback: folder not found: {Path(a.feedback).expanduser().resolve()}")
    return DwarfRunConfig(data=a.data, clip=a.clip, epochs=a.epochs, image_size=a.image_size, seed=a.seed, lam=a.lam,
                          registered_name=a.registered_name, batch_size=a.batch_size, lr=a.lr, w_fp=a.w_fp,
                          vlm_epochs=a.vlm_epochs, classes=[c.strip() for c in a.classes.split(",") if c.strip()] or None,
                          feedback=str(Path(a.feedback).expanduser().resolve()) if a.feedback else None, phantom_n=a.phantom_n, device=a.device or None,
                          d_model=a.d_model, decoder_layers=a.decoder_layers, heads=a.heads, map_layers=a.map_layers,
                          gallery_n=a.gallery_n, min_val_positives=a.min_val_positives, experiment=a.experiment)


def _log_scores(mlflow, scores, prefix: str = "") -> None:
    metrics = finite_metrics(scores.means(), prefix)
    metrics.update(finite_metrics({f"{col}.{cls}": row[col] for cls, row in scores.table.iterrows()
                                   for col in ("auc", "f1", "mcc", "max_dice", "max_dice_raw")}, prefix))
    mlflow.log_metrics(metrics)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the entry point; returns the registered model version."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import torch

    from mlflow_projects.pyfunc_dwarf import log_dwarf_model, model_meta
    from training.dwarf.data import load_splits
    from training.dwarf.pipeline import finetune, pretrain, save_gallery, score
    from training.dwarf.train import TrainConfig, resolve_device

    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n, masks=True)
    check_classes(cfg.classes, manifest)
    bundle, clip_used = resolve_clip(cfg.clip, cfg.image_size, require_vit=True)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, cfg.classes, cfg.feedback,
                                                     progress=show_progress())
    device = str(resolve_device(cfg.device))
    with start_run(cfg.experiment, run_name="train_dwarf") as run, tempfile.TemporaryDirectory() as tmp:
        log_config(cfg)
        mlflow.set_tags({"clip.resolved": clip_used, "manifest": str(manifest), "classes": ",".join(classes),
                         "device": device, **data_tags(manifest)})
        tcfg = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, lam=cfg.lam, w_fp=cfg.w_fp, seed=cfg.seed,
                           device=device, checkpoint_dir=str(Path(tmp) / "ckpt"), progress=show_progress())
        model_kw = dict(d_model=cfg.d_model, decoder_layers=cfg.decoder_layers, heads=cfg.heads,
                        map_layers=cfg.map_layers)
        base = pretrain(bundle, classes, train_ds, tcfg, cfg.vlm_epochs, **model_kw)
        _log_scores(mlflow, score(base, val_ds, test_ds, device=device, use_raw_maps=True,
                                  min_positives=cfg.min_val_positives), prefix="vlm.")
        model = finetune(base, "dwarf", train_ds, tcfg, cycles=cfg.epochs)
        scores = score(model, val_ds, test_ds, device=device, min_positives=cfg.min_val_positives)
        model.thresholds = [float(t) for t in scores.thresholds]
        model.threshold_positives = [int(n) for n in scores.threshold_positives]  # written to meta.json
        model.min_val_positives = scores.min_positives
        unfit = [f"{c} ({n})" for c, t, n in zip(classes, model.thresholds, model.threshold_positives) if math.isnan(t)]
        if unfit:
            log.warning("no threshold for %s: fewer than %d validation positives (no call is made for them)",
                        ", ".join(unfit), cfg.min_val_positives)
        _log_scores(mlflow, scores)
        table_path = Path(tmp) / "metrics.csv"
        scores.table.to_csv(table_path)
        mlflow.log_artifact(str(table_path))
        gallery = Path(tmp) / "gallery"
        gallery.mkdir()
        if cfg.gallery_n:
            for disease in classes:
                save_gallery(model, test_ds, str(gallery / f"{disease}.png"), disease, cfg.gallery_n, device)
            mlflow.log_artifacts(str(gallery), "gallery")
        info = log_dwarf_model(model)
        meta = model_meta(model)
        tags = {"classes": meta["classes"], "thresholds": meta["thresholds"],
                "threshold_positives": meta["threshold_positives"], "min_val_positives": meta["min_val_positives"],
                "input": meta["input"], "kind": "dwarf", "clip": clip_used, "train_run_id": run.info.run_id,
                "max_dice_mean": round(scores.means()["max_dice_mean"], 4)}
        mv = register_version(info.model_uri, cfg.registered_name, tags,
                              description=f"DWARF on {len(classes)} diseases, CLIP {clip_used}")
    cols = [c for c in ("auc", "f1", "mcc", "max_dice", "max_dice_raw") if c in scores.table]
    print_table(scores.table[cols].reset_index(),
                f"{cfg.registered_name} version {mv.version} (@candidate), CLIP {clip_used}: test metrics per disease "
                f"(thresholds chosen on val)")
    return str(mv.version)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "train_dwarf"))
