"""MLflow entry point ``train_dwarf``: train DWARF on a manifest, log metrics and galleries, register.

Steps: (1) data: the manifest (default: the phantom, generated with masks when missing); (2) CLIP: a
``models:/`` URI of a registered ``cxr-clip`` (falls back, with a warning, to an untrained
``cxr-tiny-vit`` when nothing is registered), an open_clip spec for :func:`training.clip.load_clip`, or
``scratch``; (3) the VLM stage (classification only) and cyclic DWARF fine-tuning, ``--epochs`` cycles of
one epoch per disease; (4) thresholds chosen on ``val``, AUC / F1 / MCC / Max Dice on ``test`` per
disease and their means (the VLM stage is logged too, prefixed ``vlm.``); (5) galleries
``gallery/<disease>.png`` (image, raw map, refined map, ground truth); (6) the pyfunc of
:mod:`mlflow_projects.pyfunc_dwarf` registered as ``cxr-dwarf`` with alias ``candidate``.

    python -m mlflow_projects.train_dwarf --data outputs/phantom/manifest.parquet --epochs 2
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_projects.common import DEFAULT_DATA, ensure_data as common_ensure_data
from mlflow_projects.common import (log_config, nonneg_int, positive_int, register_version, setup_tracking,
                                    unit_float)

log = logging.getLogger(__name__)

DEFAULT_CLIP = "models:/cxr-clip@candidate"
FALLBACK_CLIP = "cxr-tiny-vit"
EXPERIMENT = "cxr-dwarf"


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
    experiment: str = EXPERIMENT
    extra: dict[str, Any] = field(default_factory=dict)


# ---- data and CLIP ---------------------------------------------------------------------------
def ensure_data(data: str, image_size: int, seed: int, n: int) -> Path:
    """:func:`mlflow_projects.common.ensure_data` with phantom masks (DWARF's supervision)."""
    return common_ensure_data(data, image_size, seed, n, masks=True)


def resolve_clip(spec: str, image_size: int | None = None) -> tuple[Any, str]:
    """Load the CLIP bundle named by ``spec``; returns ``(bundle, resolved description)``.

    ``scratch`` (and the fallback when a ``models:/`` URI cannot be loaded, or holds a CLIP without a ViT
    image tower, such as the default ``cxr-minilm-rn`` concept VLM: DWARF cross-attends to patch tokens) is
    an untrained ``cxr-tiny-vit`` built for ``image_size`` (its own 64 px when None): an untrained tower
    gains nothing from a larger input than the data. An explicit non-ViT spec is refused by the model.
    """
    from open_clip.transformer import VisionTransformer

    from training.clip import load_clip

    if spec.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        try:
            from mlflow_projects.pyfunc_clip import load_registered_clip

            bundle = load_registered_clip(spec)
        except (MlflowException, OSError, ValueError, KeyError) as exc:
            log.warning("could not load CLIP %s (%s); falling back to an untrained %s", spec, exc, FALLBACK_CLIP)
            return load_clip(FALLBACK_CLIP, image_size=image_size), f"scratch:{FALLBACK_CLIP}"
        visual = getattr(bundle.model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            log.warning("CLIP %s has a %s image tower, DWARF needs a ViT (patch tokens); falling back to an untrained "
                        "%s (pass --clip with a ViT CLIP, e.g. one trained with train_clip --model cxr-minilm-vit)",
                        spec, type(visual).__name__, FALLBACK_CLIP)
            return (load_clip(FALLBACK_CLIP, image_size=image_size),
                    f"scratch:{FALLBACK_CLIP} ({spec} has no ViT image tower)")
        return bundle, spec
    if spec == "scratch":
        return load_clip(FALLBACK_CLIP, image_size=image_size), f"scratch:{FALLBACK_CLIP}"
    return load_clip(spec), spec


def load_splits(manifest: Path, image_size: int, classes: Sequence[str] | None = None,
                feedback: str | None = None, min_positives: int = 2, prefer_shapes: bool = True):
    """In-memory train/val/test datasets with masks + validity, restricted to usable classes.

    Masks come from :class:`training.data.ManifestDataset` (``masks=True``) on
    :func:`training.dwarf.supervision.manifest_for_masks` (mask files and polygons win over the boxes
    around them); feedback records (a folder written by the service's feedback store) are added to
    the training split, their images found by ``image_path`` or, failing that, by the SHA-256 of the
    manifest's image files.

    Args:
        manifest: manifest Parquet path.
        image_size: side S of the images and masks.
        classes: diseases to keep (default: those with >= ``min_positives`` training positives and a
            test positive).
        feedback: folder of clinician feedback records, or None.
        min_positives: see ``classes``.
        prefer_shapes: see :func:`training.dwarf.supervision.manifest_for_masks`.

    Returns:
        ``(train, val, test, classes)``; the datasets are :class:`training.dwarf.train.InMemoryDataset`.

    Raises:
        ValueError: no usable class, or a feedback record whose image cannot be found.
    """
    from torch.utils.data import ConcatDataset

    from training.data.dataset import ManifestDataset
    from training.dwarf.supervision import (FeedbackDataset, SupervisedDataset, index_images_by_sha256,
                                            load_feedback, manifest_for_masks)
    from training.dwarf.train import InMemoryDataset

    frame = manifest_for_masks(manifest, prefer_shapes=prefer_shapes)
    all_classes = ManifestDataset(frame, classes=classes).classes  # same columns in every split

    def split(name: str) -> InMemoryDataset:
        base = ManifestDataset(frame, classes=all_classes, image_size=image_size, masks=True, split=name)
        ds = SupervisedDataset(base, len(all_classes))
        if name == "train" and feedback:
            records = load_feedback(feedback)
            lookup = None
            if any(not r.image_path for r in records):
                lookup = index_images_by_sha256(p for p in frame["path"] if isinstance(p, str))
            extra = FeedbackDataset(records, all_classes, image_size, image_lookup=lookup)
            log.info("adding %d feedback images (%d records) from %s", len(extra), len(records), feedback)
            ds = ConcatDataset([ds, extra])
        out = InMemoryDataset(ds, progress=True)
        out.classes = list(all_classes)
        return out

    train_ds, val_ds, test_ds = split("train"), split("val"), split("test")
    if classes is None:
        keep = [i for i in range(len(all_classes))
                if train_ds.labels[:, i].sum() >= min_positives and test_ds.labels[:, i].sum() >= 1]
        if not keep:
            raise ValueError(f"no class has >= {min_positives} training positives and a test positive in "
                             f"{manifest}; classes: {all_classes}")
        train_ds, val_ds, test_ds = (d.select_classes(keep) for d in (train_ds, val_ds, test_ds))
    return train_ds, val_ds, test_ds, list(train_ds.classes)


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> DwarfRunConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="manifest (default: the phantom, generated if missing)")
    p.add_argument("--clip", default=DEFAULT_CLIP,
                   help="models:/ URI of a registered cxr-clip, an open_clip spec, or 'scratch'")
    p.add_argument("--epochs", type=positive_int, default=4, help="cycles; each trains one epoch per disease")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--lam", type=unit_float, default=0.5, help="lambda of L = lambda L_seg + (1 - lambda) L_cls")
    p.add_argument("--registered-name", default="cxr-dwarf")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--w-fp", type=float, default=2.0, help="false-positive weight of the soft Dice")
    p.add_argument("--vlm-epochs", type=nonneg_int, default=6)
    p.add_argument("--classes", default="", help="comma-separated diseases (default: those with positives)")
    p.add_argument("--feedback", default="", help="folder of clinician feedback records (JSON)")
    p.add_argument("--phantom-n", type=positive_int, default=240)
    p.add_argument("--device", default="")
    p.add_argument("--d-model", type=positive_int, default=128)
    p.add_argument("--decoder-layers", type=positive_int, default=2)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--map-layers", type=positive_int, default=1)
    p.add_argument("--gallery-n", type=nonneg_int, default=4)
    p.add_argument("--experiment", default=EXPERIMENT)
    a = p.parse_args(argv)
    return DwarfRunConfig(data=a.data, clip=a.clip, epochs=a.epochs, image_size=a.image_size, seed=a.seed, lam=a.lam,
                          registered_name=a.registered_name, batch_size=a.batch_size, lr=a.lr, w_fp=a.w_fp,
                          vlm_epochs=a.vlm_epochs, classes=[c.strip() for c in a.classes.split(",") if c.strip()] or None,
                          feedback=a.feedback or None, phantom_n=a.phantom_n, device=a.device or None,
                          d_model=a.d_model, decoder_layers=a.decoder_layers, heads=a.heads, map_layers=a.map_layers,
                          gallery_n=a.gallery_n, experiment=a.experiment)


def _log_scores(mlflow, scores, prefix: str = "") -> None:
    metrics = {f"{prefix}{k}": v for k, v in scores.means().items() if np.isfinite(v)}
    for cls, row in scores.table.iterrows():
        for col in ("auc", "f1", "mcc", "max_dice", "max_dice_raw"):
            if np.isfinite(row[col]):
                metrics[f"{prefix}{col}.{cls}"] = float(row[col])
    mlflow.log_metrics(metrics)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the entry point; returns the registered model version."""
    import mlflow
    import torch

    from mlflow_projects.pyfunc_dwarf import log_dwarf_model, model_meta
    from training.dwarf.pipeline import finetune, pretrain, save_gallery, score
    from training.dwarf.train import TrainConfig, resolve_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    setup_tracking(cfg.experiment)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    bundle, clip_used = resolve_clip(cfg.clip, cfg.image_size)
    train_ds, val_ds, test_ds, classes = load_splits(manifest, cfg.image_size, cfg.classes, cfg.feedback)
    device = str(resolve_device(cfg.device))
    with mlflow.start_run(run_name="train_dwarf") as run, tempfile.TemporaryDirectory() as tmp:
        log_config(cfg)
        mlflow.set_tags({"clip.resolved": clip_used, "manifest": str(manifest), "classes": ",".join(classes),
                         "device": device})
        tcfg = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, lam=cfg.lam, w_fp=cfg.w_fp, seed=cfg.seed,
                           device=device, checkpoint_dir=str(Path(tmp) / "ckpt"))
        model_kw = dict(d_model=cfg.d_model, decoder_layers=cfg.decoder_layers, heads=cfg.heads,
                        map_layers=cfg.map_layers)
        base = pretrain(bundle, classes, train_ds, tcfg, cfg.vlm_epochs, **model_kw)
        _log_scores(mlflow, score(base, val_ds, test_ds, device=device, use_raw_maps=True), prefix="vlm.")
        model = finetune(base, "dwarf", train_ds, tcfg, cycles=cfg.epochs)
        scores = score(model, val_ds, test_ds, device=device)
        model.thresholds = [float(t) for t in scores.thresholds]
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
        tags = {"classes": meta["classes"], "thresholds": meta["thresholds"], "input": meta["input"],
                "kind": "dwarf", "clip": clip_used, "train_run_id": run.info.run_id,
                "max_dice_mean": round(scores.means()["max_dice_mean"], 4)}
        mv = register_version(info.model_uri, cfg.registered_name, tags,
                              description=f"DWARF on {len(classes)} diseases, CLIP {clip_used}")
    return str(mv.version)


if __name__ == "__main__":
    main()
