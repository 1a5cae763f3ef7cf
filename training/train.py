"""Training loop for the classifiers of :mod:`training.models` (no mlflow: glue logs via ``callback``).

- Adam (lr 4e-4, weight decay 1e-6), linear warm-up then cosine decay, stepped per batch;
- AMP (bf16 where supported, else fp16 with a grad scaler) and channels-last only on CUDA;
- seeded and deterministic on CPU (same seed -> same weights);
- tasks ``multilabel`` (one output per class) and ``binary`` (one output ``Abnormal``: any finding);
- early stopping on the validation mean AUROC (mean validation loss, negated, when no class has an
  AUROC yet), best weights restored at the end;
- resumable: ``checkpoint_dir/last.pt`` after every epoch (model, optimiser, schedule, scaler, RNG,
  history, best weights); ``resume=True`` continues from it; ``checkpoint_dir/best.pt`` is a
  :func:`training.models.save_checkpoint` file of the best model;
- per-class thresholds chosen on validation (max F1, :func:`training.metrics.choose_thresholds`; none,
  NaN, for a class with fewer than ``min_val_positives`` validation positives) and stored on the model
  with the validation positives each rests on (``model.threshold_positives``); validation metrics from
  :func:`training.metrics.classification_metrics`.

Datasets are any ``Dataset`` of dicts with ``image`` (1, S, S) in [0, 1] and ``labels`` (C,) (NaN =
unknown), e.g. :class:`training.data.dataset.ManifestDataset`.

Example:
    >>> result = fit(model, train_ds, val_ds, TrainConfig(epochs=3, loss="focal"))  # doctest: +SKIP
    >>> result.val_table[["auroc", "f1"]]                                            # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from training.losses import create_loss, list_losses
from training.metrics import MIN_VAL_POSITIVES, choose_thresholds, classification_metrics, positive_counts, summarize
from training.models import CXRClassifier, save_checkpoint
from training.runtime import collate, label_matrix, resolve_device, seed_everything, warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "fit", "predict", "task_targets", "task_classes", "label_matrix",
           "train_counts", "warmup_cosine", "resolve_device", "TASKS", "BINARY_CLASS", "InMemoryDataset",
           "load_splits", "class_distribution"]

TASKS = ("multilabel", "binary")
BINARY_CLASS = "Abnormal"
Callback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 4e-4
    weight_decay: float = 1e-6
    warmup_epochs: float = 0.5  # linear warm-up length in epochs (fractions allowed), then cosine to 0
    loss: str = "bce"  # one of training.losses.list_losses()
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # alpha/beta/gamma overrides
    task: str = "multilabel"  # "multilabel" | "binary" (healthy vs any finding)
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    amp: bool | None = None  # default: on for CUDA only
    channels_last: bool | None = None  # default: on for CUDA only
    patience: int = 0  # epochs without val mean AUROC improvement before stopping; 0 = never stop early
    num_workers: int = 0
    checkpoint_dir: str | None = None  # last.pt / best.pt written here when set
    resume: bool = False  # continue from checkpoint_dir/last.pt when it exists
    progress: bool = True  # tqdm bars
    eval_batch_size: int | None = None  # default: 2 * batch_size
    min_val_positives: int = MIN_VAL_POSITIVES  # fewer validation positives: the class gets no threshold


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        model: the best model (eval mode, on CPU), ``thresholds`` set from validation.
        history: one dict per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_auroc_mean``, ``lr``,
            ``train_images_per_s``, ``val_auroc.<class>`` ...).
        best_epoch: epoch (1-based) of the best validation score.
        best_score: its validation mean AUROC (or negated loss, see module docstring).
        thresholds: (C,) chosen on validation; NaN for a class with fewer than ``min_val_positives``
            validation positives.
        threshold_positives: (C,) validation positives per class the thresholds rest on.
        val_table: :func:`training.metrics.classification_metrics` of the best model on validation.
        val_probs, val_targets: (N, C) validation probabilities and task targets.
        classes: output names; pos_counts, neg_counts: training-split counts the loss used.
        stopped_early: whether early stopping ended training.
    """

    model: CXRClassifier
    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    thresholds: np.ndarray
    val_table: pd.DataFrame
    val_probs: np.ndarray
    val_targets: np.ndarray
    classes: list[str]
    pos_counts: np.ndarray
    neg_counts: np.ndarray
    stopped_early: bool = False
    threshold_positives: np.ndarray | None = None


# ---- tasks and counts ------------------------------------------------------------------------
def task_classes(classes: Sequence[str], task: str) -> list[str]:
    """Output names of ``task`` for data classes ``classes``."""
    _check_task(task)
    return list(classes) if task == "multilabel" else [BINARY_CLASS]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def task_targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Targets of ``task`` from multi-hot labels (B, C) (NaN = unknown).

    ``binary``: 1 if any known label is positive, 0 if all labels are known negatives, NaN otherwise.

    Returns:
        (B, C) for ``multilabel``, (B, 1) for ``binary``.
    """
    _check_task(task)
    if task == "multilabel":
        return labels
    nan = torch.isnan(labels)
    any_pos = (torch.nan_to_num(labels, nan=0.0) > 0.5).any(1, keepdim=True)
    out = any_pos.to(labels.dtype)
    unknown = nan.any(1, keepdim=True) & ~any_pos
    return torch.where(unknown, torch.full_like(out, float("nan")), out)


def train_counts(ds: Dataset, task: str = "multilabel") -> tuple[np.ndarray, np.ndarray]:
    """N+ and N- per output of ``task`` over ``ds`` (unknown labels not counted), each (C,) int64."""
    y = task_targets(torch.from_numpy(label_matrix(ds)), task).numpy()
    known = ~np.isnan(y)
    pos = (np.nan_to_num(y) * known).sum(0).astype(np.int64)
    return pos, known.sum(0).astype(np.int64) - pos


class InMemoryDataset(Dataset):
    """Decode every item of a (small) dataset once and keep ``image`` and ``labels`` tensors.

    Multi-epoch CPU training of small models otherwise spends its time decoding PNGs. Only for data
    without random augmentation (the images are frozen).
    """

    def __init__(self, base: Dataset, progress: bool = False) -> None:
        if len(base) == 0:
            raise ValueError("dataset is empty")
        items = [base[i] for i in tqdm(range(len(base)), desc="caching", disable=not progress)]
        self.images = torch.stack([it["image"] for it in items])  # (N, 1, S, S)
        self.labels = torch.stack([it["labels"] for it in items]).float()  # (N, C)
        self.classes = list(getattr(base, "classes", [f"class_{i}" for i in range(self.labels.shape[1])]))
        self.image_ids = [str(it.get("image_id", i)) for i, it in enumerate(items)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "labels": self.labels[i], "index": i}


# ---- splits of a manifest ----------------------------------------------------------------------
def load_splits(manifest: str | Path, image_size: int, augment: bool = False, cache: bool = True,
                progress: bool = False) -> tuple[Dataset, Dataset, Dataset | None, list[str]]:
    """The ``train``, ``val`` and ``test`` splits of a manifest as classifier datasets.

    Args:
        manifest: manifest Parquet path (see :mod:`training.data.schema`).
        image_size: side S of the images, (1, S, S) in [0, 1].
        augment: random augmentation of the training split (which is then never cached).
        cache: decode every image once (:class:`InMemoryDataset`) for the splits without augmentation.
        progress: tqdm bar while caching a split of more than 500 images.

    Returns:
        ``(train, val, test, classes)``: :class:`training.data.dataset.ManifestDataset` or
        :class:`InMemoryDataset` items with ``image`` and ``labels``; ``test`` is None when the manifest
        has no ``test`` rows; ``classes`` the training split's class names.

    Raises:
        ValueError: no ``train`` or no ``val`` rows.

    Example:
        >>> train, val, test, classes = load_splits("phantom/manifest.parquet", 64)  # doctest: +SKIP
    """
    from training.data.dataset import ManifestDataset

    def split(name: str, aug: bool) -> Dataset | None:
        ds = ManifestDataset(manifest, image_size=image_size, augment=aug, split=name)
        if len(ds) == 0:
            return None
        return InMemoryDataset(ds, progress=len(ds) > 500 and progress) if cache and not aug else ds

    train_ds, val_ds, test_ds = split("train", augment), split("val", False), split("test", False)
    if train_ds is None or val_ds is None:
        raise ValueError(f"{manifest} needs rows in both the 'train' and 'val' splits "
                         f"(got train={0 if train_ds is None else len(train_ds)}, "
                         f"val={0 if val_ds is None else len(val_ds)})")
    return train_ds, val_ds, test_ds, list(train_ds.classes)


def class_distribution(datasets: dict[str, Dataset | None], classes: Sequence[str]) -> pd.DataFrame:
    """Positives and negatives per class and split (unknown labels counted in neither).

    Args:
        datasets: split name -> dataset with ``labels`` (C,) per item (None: the split is left out).
        classes: the C class names, in label order.

    Returns:
        Long DataFrame with columns ``split, class, positives, negatives, prevalence`` (one row per
        split and class; prevalence = positives / known labels).
    """
    rows = []
    for name, ds in datasets.items():
        if ds is None:
            continue
        y = label_matrix(ds)  # (N, C), NaN = unknown
        pos = np.nansum(y, 0)
        known = (~np.isnan(y)).sum(0)
        rows += [{"split": name, "class": c, "positives": int(pos[j]), "negatives": int(known[j] - pos[j]),
                  "prevalence": float(pos[j] / max(known[j], 1))} for j, c in enumerate(classes)]
    return pd.DataFrame(rows, columns=["split", "class", "positives", "negatives", "prevalence"])


# ---- devices -----------------------------------------------------------------------------------
def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: CXRClassifier, ds: Dataset, batch_size: int = 64, device: str | torch.device | None = None,
            task: str = "multilabel", progress: bool = False, channels_last: bool = False,
            amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and task targets over a dataset.

    Returns:
        ``(probs (N, C) float32, targets (N, C) float32 with NaN = unknown)``.
    """
    dev = resolve_device(str(device) if device is not None else None)
    was_training = model.training
    model.eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    probs, targets = [], []
    try:
        for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
            x = batch["image"].to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(dev, amp and dev.type == "cuda"):
                logits = model(x)
            probs.append(torch.sigmoid(logits.float()).cpu())
            targets.append(task_targets(batch["labels"].float(), task))
    finally:
        model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def _val_loss(loss_fn: torch.nn.Module, probs: np.ndarray, targets: np.ndarray) -> float:
    """The training loss on validation probabilities (logits recovered on CPU in float64)."""
    p = torch.from_numpy(probs).double().clamp(1e-7, 1 - 1e-7)
    logits = torch.log(p) - torch.log1p(-p)
    return float(loss_fn(logits.float(), torch.from_numpy(targets)))


# ---- the loop ---------------------------------------------------------------------------------
def fit(model: CXRClassifier, train_ds: Dataset, val_ds: Dataset, config: TrainConfig | None = None,
        callback: Callback | None = None) -> TrainResult:
    """Train ``model`` on ``train_ds``, select on ``val_ds``; see the module docstring.

    Args:
        model: from :func:`training.models.create_model` with one output per task class (the
            dataset's classes for ``multilabel``, ``[BINARY_CLASS]`` for ``binary``).
        train_ds, val_ds: datasets of dicts with ``image`` and ``labels``.
        config: :class:`TrainConfig`.
        callback: ``callback(epoch, metrics)`` after every epoch (1-based epoch; metrics as in
            ``TrainResult.history``), e.g. to log to MLflow.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: unknown loss/task, empty datasets, or a model whose outputs do not fit the task.
    """
    cfg = config or TrainConfig()
    _check_task(cfg.task)
    if cfg.loss not in list_losses():
        raise ValueError(f"unknown loss {cfg.loss!r}; valid: {', '.join(list_losses())}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs}, {cfg.batch_size}")
    mvp = cfg.min_val_positives
    if isinstance(mvp, bool) or not isinstance(mvp, int) or mvp < 1:
        raise ValueError(f"min_val_positives must be an integer >= 1, got {cfg.min_val_positives!r}")
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(f"empty split: {len(train_ds)} training and {len(val_ds)} validation items")
    pos, neg = train_counts(train_ds, cfg.task)
    if len(pos) != model.num_classes:
        raise ValueError(f"model has {model.num_classes} outputs but task {cfg.task!r} has {len(pos)}")
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    amp = cuda if cfg.amp is None else (bool(cfg.amp) and cuda)
    channels_last = cuda if cfg.channels_last is None else (bool(cfg.channels_last) and cuda)
    log.info("training on %s (amp %s, channels_last %s)", device, amp, channels_last)

    seed_everything(cfg.seed)
    loss_fn = create_loss(cfg.loss, pos, neg, **cfg.loss_kwargs).to(device)
    val_loss_fn = create_loss(cfg.loss, pos, neg, **cfg.loss_kwargs)  # on CPU
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
                        collate_fn=collate, num_workers=cfg.num_workers, generator=generator,
                        pin_memory=cuda, persistent_workers=cfg.num_workers > 0)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported()) if cuda else None

    history: list[dict[str, float]] = []
    best_score, best_epoch, bad_epochs, start_epoch = -math.inf, 0, 0, 0
    best_state = copy.deepcopy(model.state_dict())
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    last_path = ckpt_dir / "last.pt" if ckpt_dir else None
    if cfg.resume and last_path is not None and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best_score, best_epoch = state["history"], state["best_score"], state["best_epoch"]
        bad_epochs, start_epoch, best_state = state["bad_epochs"], state["epoch"], state["best_state"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at epoch %d", last_path, start_epoch)

    classes = list(model.class_names)
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and bad_epochs >= cfg.patience:
            stopped_early = True
            break
        model.train()
        running = torch.zeros((), device=device)
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = task_targets(batch["labels"].to(device, non_blocking=True).float(), cfg.task)
            with _autocast(device, amp):
                logits = model(x)  # (B, C)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            running += loss.detach() * len(x)
            seen += len(x)
        train_time = time.perf_counter() - t0
        probs, targets = predict(model, val_ds, eval_bs, device, cfg.task, channels_last=channels_last, amp=amp)
        table = classification_metrics(targets, probs, classes=classes)
        means = summarize(table)
        val_loss = _val_loss(val_loss_fn, probs, targets)
        score = means["auroc_mean"] if np.isfinite(means["auroc_mean"]) else -val_loss
        record = {"epoch": epoch + 1, "train_loss": float(running) / max(seen, 1), "val_loss": val_loss,
                  "val_auroc_mean": means["auroc_mean"], "val_ap_mean": means["ap_mean"],
                  "lr": float(optimizer.param_groups[0]["lr"]), "train_images_per_s": seen / max(train_time, 1e-9),
                  **{f"val_auroc.{c}": float(v) for c, v in table["auroc"].items()}}
        history.append(record)
        if score > best_score:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        log.info("epoch %d: train_loss %.4f val_loss %.4f val_auroc_mean %.4f", epoch + 1, record["train_loss"],
                 val_loss, means["auroc_mean"])
        if last_path is not None:
            last_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = last_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "history": history, "best_score": best_score, "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs, "epoch": epoch + 1, "best_state": best_state,
                        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                        "config": asdict(cfg)}, tmp)
            os.replace(tmp, last_path)
        if callback is not None:
            callback(epoch + 1, {k: v for k, v in record.items() if k != "epoch"})

    model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format)
    probs, targets = predict(model, val_ds, eval_bs, device, cfg.task)
    thresholds = choose_thresholds(targets, probs, min_positives=cfg.min_val_positives)
    threshold_positives = positive_counts(targets)
    model.thresholds = [float(t) for t in thresholds]
    model.threshold_positives = [int(n) for n in threshold_positives]
    model.min_val_positives = int(cfg.min_val_positives)
    unfit = [f"{c} ({int(n)})" for c, t, n in zip(classes, thresholds, threshold_positives) if np.isnan(t)]
    if unfit:
        log.warning("no threshold for %d class(es) with fewer than %d validation positives: %s (no call is made "
                    "for them)", len(unfit), cfg.min_val_positives, ", ".join(unfit))
    table = classification_metrics(targets, probs, thresholds, classes)
    model = model.cpu().eval()
    if ckpt_dir is not None:
        save_checkpoint(model, ckpt_dir / "best.pt", epoch=best_epoch, val_score=float(best_score))
    return TrainResult(model=model, history=history, best_epoch=best_epoch, best_score=float(best_score),
                       thresholds=thresholds, val_table=table, val_probs=probs, val_targets=targets,
                       classes=classes, pos_counts=pos, neg_counts=neg, stopped_early=stopped_early,
                       threshold_positives=threshold_positives)
