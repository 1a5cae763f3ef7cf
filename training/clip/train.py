"""Train a small CLIP from scratch on image-report pairs, and evaluate it (retrieval, zero-shot AUROC).

The model is an open_clip model class trained with a symmetric contrastive loss on the ``train`` split of
a manifest (rows with a ``report``); grey images are repeated to three channels by the bundle's
preprocessing. The default, ``cxr-minilm-rn``, is a small open_clip ``ModifiedResNet`` image tower trained
from scratch against the fixed text space of the offline all-MiniLM-L6-v2 (locked tower and projection,
LiT-style), with a cosine-alignment term and augmentation: the recipe measured to carry held-out signal
on the phantom (README, "CLIP on the phantom"). Also shipped: ``cxr-tiny-vit`` (both towers from
scratch), ``cxr-minilm-vit`` and ``cxr-minilm-convvit`` (ViT image towers, which DWARF needs for its
patch tokens); on the phantom the ViTs memorise their training images instead of the findings.

Options of the loop (measured figures in the README's CLIP section):

* locked pretrained text tower (``lock_text``): its pooled features are computed once per distinct
  text and only the projection is trained (no text encoder forward per step);
* the text projection is initialised from the data (``whiten_text_init``, when it trains): PCA
  whitening of the pooled training-report features with their mean direction removed;
* identical texts in a batch are all positives of each other (:func:`multi_positive_clip_loss`), so
  repeated sentences ("No pneumothorax.") do not make the contrastive target contradictory;
* ``sentence_prob``: with that probability a pair's text is one random sentence of its report instead
  of the whole report;
* ``augment``: small random affine and contrast jitter of the grey images;
* ``lock_text_proj``: freeze the text projection too, so the text space stays the pretrained tower's
  (where class-name prompts work: an oracle that embeds each image as its own report scores val
  zero-shot AUROC ~0.8 on the phantom); default: on for locked HF towers;
* ``align_weight``: add ``weight * mean(1 - cos(image, its text))``, a regression of each image onto
  its text embedding, to the contrastive loss; default 1 when the text space is fixed, else 0.

Evaluation on the ``val`` split after each epoch (or only the last): retrieval recall@1/5 both ways and
zero-shot AUROC per finding, defined in :mod:`training.clip.evaluation`.

No mlflow here: :func:`train_clip` reports per-epoch metrics through ``callback(epoch, metrics)``;
:mod:`mlflow_projects.train_clip` logs and registers.

This module owns the loop (:class:`ClipTrainConfig`, :func:`train_clip`, :class:`ClipTrainResult`) and its
setup of the bundle and optimiser. Its neighbours own the rest, and their names stay importable from here:
:mod:`training.clip.pairs` (:class:`PairSplit`, :func:`load_pairs`), :mod:`training.clip.evaluation`
(:func:`retrieval_recall`, :func:`zero_shot_scores`, :func:`per_class_auroc`, :func:`evaluate_clip`),
:mod:`training.clip.objectives` (:func:`multi_positive_clip_loss`), :mod:`training.clip.augment`
(:func:`split_sentences`, :func:`augment_images`) and :mod:`training.clip.locked_text`
(:func:`pooled_text_features`, :func:`whiten_projection_`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.clip.augment import augment_images, split_sentences
from training.clip.embedding import VLMAdapter
from training.clip.evaluation import ZERO_SHOT_MODES, evaluate_clip, per_class_auroc, retrieval_recall, zero_shot_scores
from training.clip.loading import ClipBundle, load_clip
from training.clip.locked_text import _hf_text_tower, pooled_text_features, whiten_projection_
from training.clip.objectives import multi_positive_clip_loss
from training.clip.pairs import PairSplit, load_pairs
from training.prompts import NEGATIVE_TEMPLATE, PROMPT_TEMPLATE, class_prompts, prompt_name
from training.runtime import seed_everything, warmup_cosine

__all__ = [
    # this module: the loop
    "ClipTrainConfig", "ClipTrainResult", "train_clip", "config_dict", "LOADER_INTERPOLATION",
    # re-exported from their homes (import paths kept)
    "PairSplit", "load_pairs",
    "ZERO_SHOT_MODES", "retrieval_recall", "zero_shot_scores", "per_class_auroc", "evaluate_clip",
    "multi_positive_clip_loss", "split_sentences", "augment_images", "pooled_text_features", "whiten_projection_",
    "ClipBundle", "VLMAdapter", "load_clip", "NEGATIVE_TEMPLATE", "PROMPT_TEMPLATE", "class_prompts", "prompt_name",
    "seed_everything", "warmup_cosine",
]

log = logging.getLogger(__name__)


@dataclass
class ClipTrainConfig:
    """Small-CLIP training configuration (logged as is by the MLflow glue)."""

    # Defaults: the recipe measured to learn on the phantom (README "CLIP on the phantom"): a small ResNet image
    # tower from scratch against the fixed text space of the offline MiniLM, 60 epochs of batch 64 with augmentation
    # and the cosine-alignment term.
    model: str = "cxr-minilm-rn"  # load_clip spec (e.g. cxr-tiny-vit); open_clip names are built for image_size
    pretrained: str | None = None  # local checkpoint file to start from (None: from scratch)
    epochs: int = 60
    batch_size: int = 64  # pairs per contrastive batch (negatives = batch_size - 1)
    lr: float = 1e-3
    weight_decay: float = 0.1  # on matrices only; biases, norms, embeddings, logit_scale are exempt
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0 (training.runtime.warmup_cosine)
    image_size: int = 64
    seed: int = 0
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale), as in open_clip training
    prompt_template: str = PROMPT_TEMPLATE
    negative_template: str = NEGATIVE_TEMPLATE
    zero_shot: str = "contrast"  # contrast | similarity
    eval_every_epoch: bool = True
    classes: list[str] | None = None  # default: the dataset's classes (PHANTOM_CLASSES on the phantom)
    lock_text: bool | None = None  # freeze the text encoder (not its projection); None: lock pretrained HF towers
    whiten_text_init: bool = True  # data-dependent init of a locked HF tower's linear projection (PCA whitening)
    lock_text_proj: bool | None = None  # also freeze the text projection (None: when the text tower is locked HF)
    align_weight: float | None = None  # + weight * mean(1 - cos(image, its text)); None: 1 when the text space is
    # fixed (locked HF tower and projection), else 0
    sentence_prob: float = 0.0  # probability that a pair's text is one random sentence of its report
    augment: bool = True  # random affine (+-7 deg, +-10 % scale, +-6 % shift) and contrast/brightness jitter
    progress: bool = True  # tqdm bars (loading the splits, each epoch); glue passes False when stderr is a log


@dataclass
class ClipTrainResult:
    """What :func:`train_clip` returns."""

    bundle: ClipBundle
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    metrics: dict[str, float] = field(default_factory=dict)  # final val metrics
    n_train: int = 0
    n_val: int = 0



LOADER_INTERPOLATION = "bilinear"  # training.data.transforms.resize: bilinear, antialiased when shrinking


def _match_loader_resampling(bundle: ClipBundle) -> None:
    """Make the bundle resample inputs the way the training pixels were made.

    :func:`load_pairs` resizes with :func:`training.data.transforms.resize` (bilinear, antialiased), so the
    trained weights fit bilinear pixels; a bundle that kept open_clip's default ``bicubic`` would feed the
    audit and the service (whose images arrive at the classifier's size and are resized inside the
    adapter) slightly different pixels than training did. Measured on the demo CLIP (cxr-minilm-rn, 64 px,
    test split of the demo phantom, 128 px probing images): zero-shot AUROC 0.555 with bicubic resizing
    against 0.624 with the images resized as in training; with bilinear both give 0.624 exactly. The
    choice is written to the saved config (``preprocess_cfg``), so a registered model keeps it.
    """
    import dataclasses

    if bundle.preprocess.interpolation == LOADER_INTERPOLATION:
        return
    log.info("train_clip: %s resized inputs with %s; switching to %s, the resampling of the training pixels",
             bundle.spec, bundle.preprocess.interpolation, LOADER_INTERPOLATION)
    bundle.preprocess = dataclasses.replace(bundle.preprocess, interpolation=LOADER_INTERPOLATION)
    if bundle.config:
        bundle.config.setdefault("preprocess_cfg", {})["interpolation"] = LOADER_INTERPOLATION
    pp = getattr(getattr(bundle.model, "visual", None), "preprocess_cfg", None)
    if isinstance(pp, dict):
        pp["interpolation"] = LOADER_INTERPOLATION


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]



def train_clip(manifest: str | os.PathLike, config: ClipTrainConfig | None = None,
               callback: Callable[[int, dict[str, float]], None] | None = None,
               device: str | torch.device = "cpu") -> ClipTrainResult:
    """Train a CLIP on the manifest's ``train`` image-report pairs; evaluate on ``val``.

    Args:
        manifest: manifest Parquet with a ``report`` column (e.g. the phantom's).
        config: :class:`ClipTrainConfig` (default values when ``None``).
        callback: called after every epoch with ``(epoch, metrics)``; metrics hold ``loss``, ``lr``,
            ``logit_scale`` and, when evaluated, those of :func:`evaluate_clip` (prefixed ``val.``).
        device: training device.

    Returns:
        :class:`ClipTrainResult` with the trained bundle (eval mode), history and final val metrics.

    Raises:
        ValueError: bad configuration values, no train pairs, or fewer than 2 train pairs.

    Example:
        >>> result = train_clip("outputs/phantom/manifest.parquet", ClipTrainConfig(epochs=1))  # doctest: +SKIP
        >>> result.metrics["i2t_recall_at_5"]  # doctest: +SKIP
    """
    cfg = config or ClipTrainConfig()
    for name in ("epochs", "batch_size", "image_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)!r}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {cfg.batch_size}")
    if cfg.zero_shot not in ZERO_SHOT_MODES:
        raise ValueError(f"unknown zero-shot mode {cfg.zero_shot!r}; valid: {', '.join(ZERO_SHOT_MODES)}")
    if cfg.align_weight is not None and not float(cfg.align_weight) >= 0.0:
        raise ValueError(f"align_weight must be >= 0 (or None: automatic), got {cfg.align_weight!r}")
    if not 0.0 <= float(cfg.sentence_prob) <= 1.0:
        raise ValueError(f"sentence_prob must be in [0, 1], got {cfg.sentence_prob!r}")

    seed_everything(cfg.seed)
    import open_clip

    named = str(cfg.model) in open_clip.list_models()
    bundle = load_clip(cfg.model, device=device, pretrained=cfg.pretrained,
                       image_size=cfg.image_size if named else None)
    _match_loader_resampling(bundle)
    train = load_pairs(manifest, "train", cfg.image_size, cfg.classes, progress=cfg.progress)
    classes = train.classes
    try:
        val = load_pairs(manifest, "val", cfg.image_size, classes, progress=cfg.progress)
    except ValueError:
        log.warning("no val pairs in %s: evaluating on the train split", manifest)
        val = train
    n = len(train.reports)
    if n < 2:
        raise ValueError(f"need at least 2 train image-report pairs, got {n}")
    batch_size = min(cfg.batch_size, n)
    model = bundle.model.to(device)

    # texts: every distinct report (and sentence); a pair's text is an index into this list
    texts: list[str] = []
    text_id: dict[str, int] = {}

    def _id(t: str) -> int:
        if t not in text_id:
            text_id[t] = len(texts)
            texts.append(t)
        return text_id[t]

    report_ids = torch.tensor([_id(r) for r in train.reports])  # (n,)
    sentence_ids = ([torch.tensor([_id(t) for t in split_sentences(r)]) for r in train.reports]
                    if cfg.sentence_prob > 0 else [])

    hf_tower = _hf_text_tower(model)
    lock = cfg.lock_text if cfg.lock_text is not None else hf_tower is not None
    if lock:
        model.lock_text_tower(0, True)
    lock_proj = cfg.lock_text_proj if cfg.lock_text_proj is not None else (hf_tower is not None and lock)
    align_weight = float(cfg.align_weight) if cfg.align_weight is not None else (1.0 if lock_proj else 0.0)
    if lock_proj:
        if hf_tower is None or not lock:
            raise ValueError("lock_text_proj needs a locked HF text tower (lock_text true or None with e.g. "
                             f"cxr-minilm-convvit); got model {cfg.model!r}, lock_text={cfg.lock_text!r}")
        for p in hf_tower.proj.parameters():
            p.requires_grad_(False)
    cached = hf_tower is not None and not any(p.requires_grad for p in hf_tower.transformer.parameters())
    if cached:  # the encoder is frozen: its pooled features once per distinct text, only the projection trains
        features = pooled_text_features(bundle, texts)  # (T, W)
        if cfg.whiten_text_init and not lock_proj and cfg.pretrained is None and isinstance(hf_tower.proj, torch.nn.Linear) \
                and hf_tower.proj.bias is None:
            whiten_projection_(hf_tower.proj, features[report_ids])
        tokens = None
    else:
        features = None
        tokens = bundle.tokenizer(texts)  # tokenised once: tensor or BatchEncoding
    log.info("clip training: %d pairs, %d distinct texts, text tower %s%s", n, len(texts),
             "locked" if lock else "trained", " (cached features)" if cached else "")

    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = n // batch_size  # drop the ragged last batch: equal-size contrastive batches
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    max_log_scale = math.log(cfg.max_logit_scale)
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"clip epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress)
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            lr = cfg.lr * warmup_cosine(step, total, cfg.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            keys = report_ids[idx].clone()  # (B,) text of each pair
            if cfg.sentence_prob > 0:
                use_sentence = torch.rand(len(idx), generator=gen) < cfg.sentence_prob
                for j in use_sentence.nonzero().flatten().tolist():
                    options = sentence_ids[int(idx[j])]
                    keys[j] = options[int(torch.randint(len(options), (1,), generator=gen))]
            images = train.images[idx]
            if cfg.augment:
                images = augment_images(images, gen)
            pixels = bundle.preprocess(images.to(device))  # (B, 3, S, S)
            img = F.normalize(model.encode_image(pixels), dim=-1)  # (B, d)
            if cached:
                txt = F.normalize(hf_tower.proj(features[keys.to(features.device)]), dim=-1)  # (B, d)
            else:
                txt = F.normalize(model.encode_text(_select(tokens, keys, device)), dim=-1)  # (B, d)
            loss = multi_positive_clip_loss(img, txt, model.logit_scale.exp(), keys.to(device))
            if align_weight > 0:  # pull each image onto its own text embedding (cosine regression)
                loss = loss + align_weight * (1 - (img * txt).sum(-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_log_scale)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            step += 1
        row = {"loss": float(np.mean(losses)), "lr": float(lr), "logit_scale": model.logit_scale.detach().exp().item()}
        model.eval()
        if cfg.eval_every_epoch or epoch == cfg.epochs - 1:
            row.update({f"val.{k}": v for k, v in evaluate_clip(
                bundle, val, prompt_template=cfg.prompt_template, negative_template=cfg.negative_template,
                zero_shot=cfg.zero_shot).items()})
        history.append(row)
        log.info("clip epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if callback is not None:
            callback(epoch, row)
    model.eval()
    final = {k[4:]: v for k, v in history[-1].items() if k.startswith("val.")}
    return ClipTrainResult(bundle=bundle, classes=classes, history=history, metrics=final, n_train=n,
                           n_val=len(val.reports))


def _select(tokens: Any, idx: torch.Tensor, device: str | torch.device) -> Any:
    """Rows ``idx`` of a token tensor or of a ``BatchEncoding``/mapping of tensors, moved to ``device``."""
    if isinstance(tokens, torch.Tensor):
        return tokens[idx].to(device)
    return {k: v[idx].to(device) for k, v in tokens.items() if isinstance(v, torch.Tensor)}


def config_dict(cfg: ClipTrainConfig) -> dict[str, Any]:
    """The configuration as a plain dict."""
    return asdict(cfg)
