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

Evaluation on the ``val`` split:

* retrieval recall@k, image -> text and text -> image: the fraction of pairs whose partner ranks in the
  top k of the cosine similarities among all val pairs (chance: k / N);
* zero-shot AUROC per finding: each image is scored by
  ``cos(v, t("A chest x-ray image of a {class}")) - cos(v, t("A chest x-ray image of no {class}"))``
  (``zero_shot="contrast"``, default) or by the first term alone (``"similarity"``), and ranked against
  the manifest labels.

No mlflow here: :func:`train_clip` reports per-epoch metrics through ``callback(epoch, metrics)``;
:mod:`mlflow_projects.train_clip` logs and registers.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.clip.embedding import VLMAdapter
from training.clip.loading import ClipBundle, load_clip
from training.prompts import NEGATIVE_TEMPLATE, PROMPT_TEMPLATE, class_prompts, prompt_name  # noqa: F401
from training.runtime import seed_everything, warmup_cosine

log = logging.getLogger(__name__)

ZERO_SHOT_MODES = ("contrast", "similarity")


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


@dataclass
class PairSplit:
    """Images (N, 1, S, S) in [0, 1], their reports and labels (N, C) of one split, in memory."""

    images: torch.Tensor
    reports: list[str]
    labels: np.ndarray
    classes: list[str]
    image_ids: list[str]


def load_pairs(manifest: str | os.PathLike, split: str, image_size: int,
               classes: Sequence[str] | None = None, progress: bool = True) -> PairSplit:
    """Read the image-report pairs of one split into memory (rows without a report are skipped).

    Args:
        manifest: manifest Parquet path.
        split: ``train``, ``val`` or ``test``.
        image_size: output side S.
        classes: label columns (default: the dataset's own default classes).
        progress: tqdm bar while the images are read.

    Returns:
        :class:`PairSplit`.

    Raises:
        ValueError: the split has no rows with a report.
    """
    from training.data.dataset import ManifestDataset, _default_classes
    from training.data.schema import read_manifest

    df = read_manifest(manifest)
    classes = list(classes) if classes is not None else _default_classes(df)
    part = df[(df["split"] == split) & df["report"].notna() & df["path"].notna()]
    part = part[part["report"].str.strip().str.len() > 0].reset_index(drop=True)
    if part.empty:
        raise ValueError(f"no image-report pairs in split {split!r} of {manifest} "
                         f"(splits present: {sorted(df['split'].unique())})")
    ds = ManifestDataset(part, classes=classes, image_size=image_size, split=None)
    images = torch.stack([ds[i]["image"] for i in tqdm(range(len(ds)), desc=f"load {split}", leave=False,
                                                     disable=not progress)])
    return PairSplit(images=images, reports=[str(r) for r in part["report"]], labels=ds.label_matrix.copy(),
                     classes=list(ds.classes), image_ids=list(ds.image_ids))


# ---- metrics ------------------------------------------------------------------------------------
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of paired retrieval in both directions.

    Args:
        image_emb: (N, d) L2-normalised; row i pairs with ``text_emb`` row i.
        text_emb: (N, d) L2-normalised.
        ks: cut-offs.

    Returns:
        ``{"i2t_recall_at_{k}": ..., "t2i_recall_at_{k}": ...}``: fraction of queries whose partner's
        similarity is among the k largest (ties counted against the query: rank = 1 + #strictly greater).
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must match")
    sim = image_emb.float() @ text_emb.float().T  # (N, N) image x text
    diag = sim.diagonal()
    rank_i2t = 1 + (sim > diag[:, None]).sum(1)  # (N,) rank of the true report per image
    rank_t2i = 1 + (sim > diag[None, :]).sum(0)  # (N,) rank of the true image per report
    out = {}
    for k in ks:
        out[f"i2t_recall_at_{k}"] = float((rank_i2t <= k).float().mean())
        out[f"t2i_recall_at_{k}"] = float((rank_t2i <= k).float().mean())
    return out


def zero_shot_scores(image_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor | None = None,
                     mode: str = "contrast") -> torch.Tensor:
    """Zero-shot scores (N, C) from prompt embeddings.

    Args:
        image_emb: (N, d) L2-normalised image embeddings.
        pos_emb: (C, d) L2-normalised "a {class}" prompt embeddings.
        neg_emb: (C, d) L2-normalised "no {class}" prompt embeddings (``contrast`` mode).
        mode: ``contrast`` (pos - neg similarity) or ``similarity`` (pos similarity).

    Returns:
        (N, C) scores; higher means "finding present".
    """
    if mode not in ZERO_SHOT_MODES:
        raise ValueError(f"unknown zero-shot mode {mode!r}; valid: {', '.join(ZERO_SHOT_MODES)}")
    scores = image_emb.float() @ pos_emb.float().T  # (N, C)
    if mode == "contrast":
        if neg_emb is None:
            raise ValueError("mode 'contrast' needs neg_emb")
        scores = scores - image_emb.float() @ neg_emb.float().T
    return scores


def per_class_auroc(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """AUROC per class; NaN where a class has only positives or only negatives."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for c, name in enumerate(classes):
        y = labels[:, c]
        out[name] = float(roc_auc_score(y, scores[:, c])) if 0 < y.sum() < len(y) else float("nan")
    return out


@torch.no_grad()
def evaluate_clip(bundle: ClipBundle, data: PairSplit, batch_size: int = 64,
                  prompt_template: str = PROMPT_TEMPLATE, negative_template: str = NEGATIVE_TEMPLATE,
                  zero_shot: str = "contrast") -> dict[str, float]:
    """Retrieval recall@1/5 and zero-shot AUROC per class on one split.

    Args:
        bundle: the CLIP to evaluate.
        data: :class:`PairSplit` (e.g. the val split).
        batch_size: encoding batch size.
        prompt_template, negative_template: zero-shot prompts (``{}`` = class name).
        zero_shot: ``contrast`` or ``similarity`` (see :func:`zero_shot_scores`).

    Returns:
        ``i2t_recall_at_1/5``, ``t2i_recall_at_1/5``, ``zs_auroc.{class}`` (classes with both label
        values), ``zs_auroc_mean`` over those, ``n_eval``.
    """
    vlm = VLMAdapter(bundle, batch_size=batch_size, progress=False)
    img = vlm.encode_images(data.images)  # (N, d)
    txt = vlm.encode_texts(data.reports)  # (N, d)
    out = retrieval_recall(img, txt, ks=(1, 5))
    pos = vlm.encode_texts(class_prompts(data.classes, prompt_template))  # (C, d)
    neg = vlm.encode_texts(class_prompts(data.classes, negative_template)) if zero_shot == "contrast" else None
    scores = zero_shot_scores(img, pos, neg, zero_shot).numpy()
    aucs = per_class_auroc(data.labels, scores, data.classes)
    valid = {c: a for c, a in aucs.items() if not math.isnan(a)}
    out.update({f"zs_auroc.{c}": a for c, a in valid.items()})
    out["zs_auroc_mean"] = float(np.mean(list(valid.values()))) if valid else float("nan")
    out["n_eval"] = float(len(data.reports))
    return out


# ---- training -----------------------------------------------------------------------------------
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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(report: str) -> list[str]:
    """Sentences of a report (split after ``.``/``!``/``?`` and at line breaks); the whole text if none.

    Example:
        >>> split_sentences("PA view.\\nNo effusion. A 3 cm mass in the left upper lobe.")
        ['PA view.', 'No effusion.', 'A 3 cm mass in the left upper lobe.']
    """
    parts = [t.strip() for t in _SENTENCE_END.split(report) if t and t.strip()]
    return parts or [report.strip()]


def multi_positive_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                             keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric contrastive (InfoNCE) loss in which pairs with the same text key are all positives.

    With all keys distinct (or ``keys=None``) this is open_clip's ``ClipLoss``: the mean of the image ->
    text and text -> image cross-entropies with the diagonal as target (Radford et al. 2021). Identical
    texts in one batch (e.g. the sentence "No pneumothorax." drawn for several images) would otherwise
    be contradictory targets; here each row's target spreads uniformly over the columns that share its
    key (the matrix is symmetric, so the same target serves both directions).

    Args:
        image_emb: (B, d) L2-normalised image embeddings.
        text_emb: (B, d) L2-normalised text embeddings; row i pairs with image i.
        logit_scale: scalar temperature (already exponentiated).
        keys: (B,) int64 text identity per pair, or None.

    Returns:
        Scalar loss.

    Raises:
        ValueError: shapes that do not pair up.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must be equal (B, d)")
    logits = logit_scale * image_emb @ text_emb.T  # (B, B) image x text
    if keys is None:
        target = torch.eye(len(logits), device=logits.device, dtype=logits.dtype)
    else:
        if keys.shape != (len(logits),):
            raise ValueError(f"keys must have shape ({len(logits)},), got {tuple(keys.shape)}")
        same = (keys[:, None] == keys[None, :]).to(logits.dtype)  # (B, B) symmetric
        target = same / same.sum(1, keepdim=True)
    loss_i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def augment_images(images: torch.Tensor, generator: torch.Generator, max_rotate_deg: float = 7.0,
                   max_scale: float = 0.1, max_shift: float = 0.06, max_contrast: float = 0.15,
                   max_brightness: float = 0.05) -> torch.Tensor:
    """Random affine and intensity jitter of grey images in [0, 1] (one draw per image).

    Args:
        images: (B, C, H, W) in [0, 1].
        generator: the random source (training stays seeded).
        max_rotate_deg, max_scale, max_shift: rotation (degrees), relative zoom, shift (fraction of the side).
        max_contrast, max_brightness: multiplicative contrast and additive brightness jitter.

    Returns:
        (B, C, H, W) in [0, 1]; border pixels are repeated where the image moves in.
    """
    b = images.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1  # U(-1, 1)

    angle = uniform(b) * math.radians(max_rotate_deg)
    scale = 1 + uniform(b) * max_scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = uniform(b, 2) * 2 * max_shift  # grid units span 2 per side
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, padding_mode="border", align_corners=False)
    contrast = (1 + uniform(b, 1, 1, 1) * max_contrast).to(out)
    brightness = (uniform(b, 1, 1, 1) * max_brightness).to(out)
    return ((out - 0.5) * contrast + 0.5 + brightness).clamp(0, 1)


def _hf_text_tower(model: torch.nn.Module) -> Any:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    return text if isinstance(text, HFTextEncoder) else None


@torch.no_grad()
def pooled_text_features(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Pooled (not projected) features of a bundle's HF text tower, texts batched by length.

    Args:
        bundle: an open_clip bundle whose model has an HF text tower (``model.text``).
        texts: M strings.
        batch_size: encoding batch size.

    Returns:
        (M, W) pooled features (W the tower's width), in the order of ``texts``.

    Raises:
        ValueError: the model has no HF text tower.
    """
    tower = _hf_text_tower(bundle.model)
    if tower is None:
        raise ValueError(f"{type(bundle.model).__name__} has no HF text tower (model.text); valid: open_clip models "
                         "whose text_cfg names hf_model_name (e.g. cxr-minilm-vit)")
    was_training = tower.training
    tower.eval()
    device = bundle.device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    out: torch.Tensor | None = None
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids = bundle.tokenizer([texts[i] for i in idx]).to(device)  # (b, L)
            mask = (ids != tower.config.pad_token_id).long()
            pooled = tower.pooler(tower.transformer(input_ids=ids, attention_mask=mask), mask)  # (b, W)
            if out is None:
                out = torch.zeros(len(texts), pooled.shape[1], device=device)
            out[torch.as_tensor(idx, device=device)] = pooled.float()
    finally:
        tower.train(was_training)
    return out if out is not None else torch.zeros(0, 0)


@torch.no_grad()
def whiten_projection_(proj: torch.nn.Linear, features: torch.Tensor) -> None:
    """Initialise a bias-free linear text projection as PCA whitening of ``features`` (in place).

    Rows are the top principal directions of the centred features, scaled by the inverse of their
    standard deviations; the features' mean direction u is then projected out (``W <- W (I - u u^T)``),
    so the shared component of all reports (cosine ~0.6 between MiniLM report features) maps to zero and
    the projected embeddings start spread out. Rows beyond the features' rank keep their random init.

    Args:
        proj: ``nn.Linear(W, d, bias=False)``.
        features: (N, W) pooled features of the training texts, N >= 2.
    """
    x = features.float().to(proj.weight.device)
    mean = x.mean(0)
    _, sv, vh = torch.linalg.svd(x - mean, full_matrices=False)  # vh (r, W) principal directions
    k = min(proj.out_features, int((sv > sv[0] * 1e-6).sum()))
    w = vh[:k] * (math.sqrt(len(x)) / sv[:k, None])  # (k, W): unit variance per output
    u = mean / mean.norm().clamp_min(1e-12)
    w = w - (w @ u)[:, None] * u[None, :]
    proj.weight[:k] = w.to(proj.weight.dtype)


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
