"""Training loops for DWARF and its baselines, sharing one epoch function.

Methods (:func:`list_methods`):

- ``vlm``: classification-only training of the query decoder on the multi-label set (all diseases at
  once, ``L = L_cls``). This is the "pretrained VLM" stage: its maps are the baseline without
  fine-tuning, and every other method starts from it.
- ``gain``: GAIN-style fine-tuning: multi-label BCE + the *plain* soft Dice (``w_FP = 1``,
  ``TrainConfig.gain_w_fp``; the paper's GAIN baseline has no false-positive weighting, that is DWARF's)
  on the *raw* cross-attention maps of every disease; the expert heads stay frozen (at identity).
- ``dwarf``: cyclic training (DWARF). The multi-label set is decomposed into one single-label set per
  disease (the images positive for it plus ``negatives_per_positive`` times as many images without
  it); epoch ``e`` trains on the set of disease ``order[e mod C]`` only, with
  ``L = lambda L_seg + (1 - lambda) L_cls`` restricted to that disease and the soft Dice applied to
  the disease's *refined* map (expert head output). Cycling through the diseases over epochs refines
  each map iteratively while the shared decoder sees every disease in turn. ``TrainConfig.dwarf_target
  = "attention"`` is the paper's Table 4 ablation: the same cyclic schedule and loss, but the soft Dice
  optimises the raw attention map directly (expert heads frozen at identity, so ``M'_c == M_c``).

Only ``dwarf`` with ``dwarf_target="experts"`` trains the expert heads; every other method/target keeps
them frozen. Unknown (NaN) labels are masked out of both loss terms (:class:`DwarfLoss`).

Each epoch ends with a checkpoint (model, optimiser, AMP scaler, RNG, history) so a run resumes from
the last finished epoch. AMP (float16 autocast + GradScaler) is used on CUDA devices.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from training.dwarf.losses import DwarfLoss
from training.dwarf.metrics import MaxDiceAccumulator
from training.dwarf.model import DwarfModel
from training.runtime import collate as _collate
from training.runtime import label_matrix, resolve_device, seed_everything  # noqa: F401  (label_matrix: re-export)

log = logging.getLogger(__name__)

_METHODS = ("vlm", "gain", "dwarf")
DWARF_TARGETS = ("experts", "attention")


def list_methods() -> list[str]:
    """Training methods understood by :func:`train`."""
    return list(_METHODS)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method."""

    epochs: int = 4  # epochs to run; for "dwarf" one epoch trains one disease (C epochs = one cycle)
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1  # lr of the image encoder = lr * this (0 freezes it)
    weight_decay: float = 1e-4
    lam: float = 0.5  # lambda of L = lambda L_seg + (1 - lambda) L_cls
    w_fp: float = 2.0  # false-positive weight of DWARF's soft Dice
    gain_w_fp: float = 1.0  # "gain": false-positive weight of its soft Dice (1 = plain Dice, the paper's GAIN)
    dwarf_target: str = "experts"  # "dwarf": soft Dice on the refined maps ("experts") or the raw maps ("attention")
    smooth: float = 1.0  # smoothing of the soft Dice
    negatives_per_positive: float = 1.0  # "dwarf": negatives drawn per positive in a single-label set
    disease_order: list[str] | None = None  # "dwarf": cycle order (default: class order)
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    amp: bool = True  # float16 autocast + GradScaler on CUDA (ignored on CPU)
    num_workers: int = 0
    checkpoint_dir: str | None = None  # where <method>.pt is written after every epoch
    resume: bool = True  # continue from <checkpoint_dir>/<method>.pt when it exists
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"epochs={self.epochs} (>= 0), batch_size={self.batch_size} and lr={self.lr} (> 0) invalid")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam} must be in [0, 1]")
        if self.negatives_per_positive < 0:
            raise ValueError(f"negatives_per_positive={self.negatives_per_positive} must be >= 0")
        if self.w_fp < 0 or self.gain_w_fp < 0:
            raise ValueError(f"w_fp={self.w_fp} and gain_w_fp={self.gain_w_fp} must be >= 0")
        if self.dwarf_target not in DWARF_TARGETS:
            raise ValueError(f"dwarf_target={self.dwarf_target!r}; valid: {', '.join(DWARF_TARGETS)}")


# ---- data helpers ----------------------------------------------------------------------------
def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`training.runtime.collate` with DWARF's validity defaults.

    Items without ``cls_valid`` count as classification-supervised for every class; when every item
    has a ``mask``, items without ``seg_valid`` count as segmentation-supervised for every class, and
    without masks the batch has no ``seg_valid``.

    Returns:
        ``image`` (B, 1, S, S), ``labels`` (B, C), ``index`` (B,), ``cls_valid`` (B, C) and, when every
        item has one, ``mask`` (B, C, S, S) with ``seg_valid`` (B, C); other fields as the generic
        collate keeps them.
    """
    ones = torch.ones(len(batch[0]["labels"]))
    has_mask = all(b.get("mask") is not None for b in batch)
    out = _collate(batch, defaults={"cls_valid": ones, **({"seg_valid": ones} if has_mask else {})})
    if not has_mask:
        out.pop("seg_valid", None)
    return out


class InMemoryDataset(Dataset):
    """Load every item of a (small) dataset once and keep the tensors DWARF needs (masks as bool).

    Multi-epoch training on a CPU spends most of its time decoding images otherwise. Items keep
    ``image``, ``labels``, ``mask``, ``seg_valid``, ``cls_valid``, ``image_id`` and ``index``.
    """

    def __init__(self, base: Dataset, progress: bool = False) -> None:
        self.classes = getattr(base, "classes", None)
        items = [base[i] for i in tqdm(range(len(base)), desc="caching", disable=not progress)]
        if not items:
            raise ValueError("dataset is empty")
        batch = collate(items)
        self.images, self.labels = batch["image"], batch["labels"]
        self.masks = batch["mask"].bool() if "mask" in batch else None
        self.seg_valid = batch.get("seg_valid")
        self.cls_valid = batch["cls_valid"]
        self.image_ids = [str(it.get("image_id", i)) for i, it in enumerate(items)]

    def __len__(self) -> int:
        return len(self.images)

    def select_classes(self, indices: Sequence[int]) -> "InMemoryDataset":
        """A view restricted to the classes ``indices`` (in that order); images are shared."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out = copy.copy(self)
        if self.classes is not None:
            out.classes = [self.classes[i] for i in idx.tolist()]
        out.labels, out.cls_valid = self.labels[:, idx], self.cls_valid[:, idx]
        if self.masks is not None:
            out.masks, out.seg_valid = self.masks[:, idx], self.seg_valid[:, idx]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self.images[i], "labels": self.labels[i], "cls_valid": self.cls_valid[i],
                "image_id": self.image_ids[i], "index": i}
        if self.masks is not None:
            item["mask"], item["seg_valid"] = self.masks[i].float(), self.seg_valid[i]
        return item


def decompose(labels: np.ndarray, disease: int, rng: np.random.Generator,
              negatives_per_positive: float = 1.0) -> np.ndarray:
    """Single-label set of ``disease``: all its positives + a random draw of images without it.

    Args:
        labels: (N, C) multi-label matrix.
        disease: class index.
        rng: random generator (the draw of negatives changes from cycle to cycle).
        negatives_per_positive: negatives per positive (capped at the available negatives).

    Returns:
        Sorted dataset indices.
    """
    pos = np.flatnonzero(labels[:, disease] > 0.5)
    neg = np.flatnonzero(labels[:, disease] <= 0.5)
    k = min(len(neg), int(round(negatives_per_positive * len(pos))))
    chosen = rng.choice(neg, size=k, replace=False) if k else np.zeros(0, dtype=int)
    return np.sort(np.concatenate([pos, chosen]).astype(int))


def matched_epochs(labels: np.ndarray, dwarf_epochs: int, negatives_per_positive: float = 1.0) -> int:
    """Multi-label epochs giving a baseline about as many samples as ``dwarf_epochs`` cyclic epochs."""
    c = labels.shape[1]
    pos = (labels > 0.5).sum(0)
    per_disease = pos + np.minimum(len(labels) - pos, np.round(negatives_per_positive * pos))
    total = sum(per_disease[e % c] for e in range(dwarf_epochs))
    return max(1, int(math.ceil(total / max(1, len(labels)))))


# ---- training --------------------------------------------------------------------------------
def trains_experts(method: str, config: TrainConfig) -> bool:
    """Whether ``method`` optimises the expert heads (only ``dwarf`` with ``dwarf_target="experts"``)."""
    return method == "dwarf" and config.dwarf_target == "experts"


def make_loss(method: str, config: TrainConfig) -> DwarfLoss:
    """The loss of ``method``: ``vlm`` classification only; ``gain`` BCE + soft Dice with ``gain_w_fp``
    (plain Dice by default, the paper's GAIN); ``dwarf`` BCE + the FP-weighted soft Dice (``w_fp``)."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(_METHODS)}")
    w_fp = config.gain_w_fp if method == "gain" else config.w_fp
    return DwarfLoss(lam=0.0 if method == "vlm" else config.lam, w_fp=w_fp, smooth=config.smooth)


def _optimizer(model: DwarfModel, config: TrainConfig, method: str = "dwarf") -> torch.optim.Optimizer:
    frozen = set() if model.experts is None or trains_experts(method, config) else \
        {id(p) for p in model.experts.parameters()}
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    enc_ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids and id(p) not in frozen]
    groups = [{"params": rest, "lr": config.lr}]
    if config.encoder_lr_scale > 0:
        groups.append({"params": enc, "lr": config.lr * config.encoder_lr_scale})
    else:
        for p in enc:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _epoch_plan(method: str, epoch: int, labels: np.ndarray, config: TrainConfig, order: list[int]
                ) -> tuple[np.ndarray, int | None]:
    if method != "dwarf":
        return np.arange(len(labels)), None
    disease = order[epoch % len(order)]
    rng = np.random.default_rng([config.seed, epoch])
    return decompose(labels, disease, rng, config.negatives_per_positive), disease


def train_epoch(model: DwarfModel, loader: DataLoader, loss_fn: DwarfLoss, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device, method: str, disease: int | None = None,
                amp: bool = False, desc: str = "train", progress: bool = True, target: str = "experts"
                ) -> dict[str, float]:
    """One pass over ``loader``.

    Args:
        method: ``vlm`` (classification only), ``gain`` (all diseases, seg on raw maps) or ``dwarf``
            (only ``disease``; seg on its refined map, or on its raw map with ``target="attention"``).
        disease: class index trained in a ``dwarf`` epoch.
        target: ``dwarf``'s map under the soft Dice (see :data:`DWARF_TARGETS`).

    Returns:
        Mean ``loss``, ``cls``, ``seg`` over the epoch.
    """
    model.train()
    totals, n = {"loss": 0.0, "cls": 0.0, "seg": 0.0}, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device)
        cls_w = batch["cls_valid"].to(device)
        if method == "dwarf":
            only = torch.zeros_like(cls_w)
            only[:, disease] = 1.0
            cls_w = cls_w * only
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            out = model(images)
        maps = masks = seg_w = None
        if method != "vlm" and "mask" in batch:
            masks = batch["mask"].to(device)
            seg_w = batch["seg_valid"].to(device) * labels.nan_to_num(0.0)  # maps of present findings
            maps = out.refined_maps if method == "dwarf" and target == "experts" else out.raw_maps
            if method == "dwarf":
                seg_w = seg_w * only
        terms = loss_fn(out.logits, labels, maps, masks, cls_weight=cls_w, seg_weight=seg_w)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        for k in totals:
            totals[k] += float(terms[k].detach()) * len(images)
        n += len(images)
    return {k: v / max(1, n) for k, v in totals.items()}


def train(model: DwarfModel, dataset: Dataset, method: str, config: TrainConfig,
          labels: np.ndarray | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place with one of :func:`list_methods`.

    Args:
        model: a :class:`DwarfModel` (``gain`` and ``vlm`` ignore its expert heads' outputs).
        dataset: map-style dataset of items with ``image``, ``labels`` and (for ``gain``/``dwarf``)
            ``mask`` + ``seg_valid`` (see :mod:`training.dwarf.supervision`).
        method: ``vlm``, ``gain`` or ``dwarf``.
        config: :class:`TrainConfig`.
        labels: (N, C) label matrix of ``dataset`` (computed when omitted).
        on_epoch_end: called with ``(epoch, record)`` after each epoch (e.g. to log metrics).

    Returns:
        History: one record per epoch ``{epoch, disease, n, loss, cls, seg}`` (including resumed ones).

    Raises:
        ValueError: unknown ``method``, or an unknown disease in ``config.disease_order``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(_METHODS)}")
    device = resolve_device(config.device)
    amp = bool(config.amp and device.type == "cuda")
    log.info("DWARF training on %s (amp %s)", device, amp)
    seed_everything(config.seed)
    model.to(device)
    labels = label_matrix(dataset) if labels is None else np.asarray(labels)
    classes = model.class_names
    order_names = config.disease_order or classes
    unknown = [d for d in order_names if d not in classes]
    if unknown:
        raise ValueError(f"disease_order names unknown diseases {unknown}; valid: {classes}")
    order = [classes.index(d) for d in order_names]
    loss_fn = make_loss(method, config).to(device)
    optimizer = _optimizer(model, config, method)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    history: list[dict[str, Any]] = []
    start = 0
    ckpt_path = Path(config.checkpoint_dir) / f"{method}.pt" if config.checkpoint_dir else None
    if ckpt_path is not None and config.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["classes"] != classes:
            raise ValueError(f"checkpoint {ckpt_path} was trained on {state['classes']}, not {classes}")
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["epoch"] + 1
        log.info("resumed %s from %s at epoch %d", method, ckpt_path, start)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in tqdm(range(start, config.epochs), desc=method, disable=not config.progress,
                      initial=start, total=config.epochs):
        generator.manual_seed(config.seed * 100_003 + epoch)
        indices, disease = _epoch_plan(method, epoch, labels, config, order)
        if len(indices) == 0:
            log.warning("epoch %d: no images for disease %s; skipped", epoch, classes[disease])
            record = {"epoch": epoch, "disease": classes[disease], "n": 0, "loss": float("nan"),
                      "cls": float("nan"), "seg": float("nan")}
        else:
            loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=config.batch_size, shuffle=True,
                                collate_fn=collate, num_workers=config.num_workers, generator=generator,
                                pin_memory=device.type == "cuda")
            name = f"{method} {epoch + 1}/{config.epochs}" + (f" {classes[disease]}" if disease is not None else "")
            terms = train_epoch(model, loader, loss_fn, optimizer, scaler, device, method, disease, amp, name,
                                config.progress, config.dwarf_target)
            record = {"epoch": epoch, "disease": classes[disease] if disease is not None else None,
                      "n": int(len(indices)), **terms, "w_fp": float(loss_fn.seg.w_fp)}
        history.append(record)
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                        "history": history, "classes": classes, "config": asdict(config)}, tmp)
            tmp.replace(ckpt_path)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return history


# ---- evaluation ------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Predictions and localisation of a model on a dataset."""

    probabilities: np.ndarray  # (N, C)
    labels: np.ndarray  # (N, C)
    max_dice: np.ndarray  # (C,) on refined maps (NaN: no supervised positive)
    max_dice_raw: np.ndarray  # (C,) on raw maps
    dice_thresholds: np.ndarray  # (C,) best threshold of the refined-map sweep
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate(model: DwarfModel, dataset: Dataset, batch_size: int = 32, device: str | None = None,
             progress: bool = True) -> Evaluation:
    """Probabilities for every image and Max Dice of raw and refined maps where masks are known."""
    dev = resolve_device(device)
    model.to(dev).eval()
    c = len(model.class_names)
    acc_ref, acc_raw = MaxDiceAccumulator(c), MaxDiceAccumulator(c)
    probs, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        out = model(batch["image"].to(dev))
        probs.append(out.logits.float().sigmoid().cpu())
        labels.append(batch["labels"])
        if "mask" in batch:
            known = (batch["seg_valid"] > 0.5)[:, :, None, None]
            masks = batch["mask"] * known  # unknown masks count as absent (skipped by Max Dice)
            acc_ref.update(out.refined_maps.cpu(), masks)
            acc_raw.update(out.raw_maps.cpu(), masks)
    md, thr = acc_ref.compute()
    md_raw, _ = acc_raw.compute()
    return Evaluation(torch.cat(probs).numpy(), torch.cat(labels).numpy(), md, md_raw, thr)
