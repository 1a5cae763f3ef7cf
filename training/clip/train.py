"""Train a small CLIP from scratch on image-report pairs, and evaluate it (retrieval, zero-shot AUROC).

The model is an open_clip model class (default the shipped ``cxr-tiny-vit``) trained with open_clip's
symmetric contrastive :class:`open_clip.loss.ClipLoss` on the ``train`` split of a manifest (rows with a
``report``); grey images are repeated to three channels by the bundle's preprocessing. Evaluation on the
``val`` split:

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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.clip.loading import ClipBundle, load_clip

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "A chest x-ray image of a {}"
NEGATIVE_TEMPLATE = "A chest x-ray image of no {}"
ZERO_SHOT_MODES = ("contrast", "similarity")


@dataclass
class ClipTrainConfig:
    """Small-CLIP training configuration (logged as is by the MLflow glue)."""

    model: str = "cxr-tiny-vit"  # load_clip spec; open_clip names are built for image_size
    pretrained: str | None = None  # local checkpoint file to start from (None: from scratch)
    epochs: int = 5
    batch_size: int = 32  # pairs per contrastive batch (negatives = batch_size - 1)
    lr: float = 5e-4
    weight_decay: float = 0.1  # on matrices only; biases, norms, embeddings, logit_scale are exempt
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0
    image_size: int = 64
    seed: int = 0
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale), as in open_clip training
    prompt_template: str = PROMPT_TEMPLATE
    negative_template: str = NEGATIVE_TEMPLATE
    zero_shot: str = "contrast"  # contrast | similarity
    eval_every_epoch: bool = True
    classes: list[str] | None = None  # default: the dataset's classes (PHANTOM_CLASSES on the phantom)


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
               classes: Sequence[str] | None = None) -> PairSplit:
    """Read the image-report pairs of one split into memory (rows without a report are skipped).

    Args:
        manifest: manifest Parquet path.
        split: ``train``, ``val`` or ``test``.
        image_size: output side S.
        classes: label columns (default: the dataset's own default classes).

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
    images = torch.stack([ds[i]["image"] for i in tqdm(range(len(ds)), desc=f"load {split}", leave=False)])
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


def prompt_name(cls: str) -> str:
    """Class name as written in a prompt: ``Pleural_Thickening`` -> ``pleural thickening``."""
    return cls.replace("_", " ").lower()


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
    from interpret.vlm import VLMAdapter

    vlm = VLMAdapter(bundle, batch_size=batch_size, progress=False)
    img = vlm.encode_images(data.images)  # (N, d)
    txt = vlm.encode_texts(data.reports)  # (N, d)
    out = retrieval_recall(img, txt, ks=(1, 5))
    names = [prompt_name(c) for c in data.classes]
    pos = vlm.encode_texts([prompt_template.format(n) for n in names])  # (C, d)
    neg = vlm.encode_texts([negative_template.format(n) for n in names]) if zero_shot == "contrast" else None
    scores = zero_shot_scores(img, pos, neg, zero_shot).numpy()
    aucs = per_class_auroc(data.labels, scores, data.classes)
    valid = {c: a for c, a in aucs.items() if not math.isnan(a)}
    out.update({f"zs_auroc.{c}": a for c, a in valid.items()})
    out["zs_auroc_mean"] = float(np.mean(list(valid.values()))) if valid else float("nan")
    out["n_eval"] = float(len(data.reports))
    return out


# ---- training -----------------------------------------------------------------------------------
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


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
    from open_clip.loss import ClipLoss

    cfg = config or ClipTrainConfig()
    for name in ("epochs", "batch_size", "image_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)!r}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {cfg.batch_size}")
    if cfg.zero_shot not in ZERO_SHOT_MODES:
        raise ValueError(f"unknown zero-shot mode {cfg.zero_shot!r}; valid: {', '.join(ZERO_SHOT_MODES)}")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    import open_clip

    named = str(cfg.model) in open_clip.list_models()
    bundle = load_clip(cfg.model, device=device, pretrained=cfg.pretrained,
                       image_size=cfg.image_size if named else None)
    train = load_pairs(manifest, "train", cfg.image_size, cfg.classes)
    classes = train.classes
    try:
        val = load_pairs(manifest, "val", cfg.image_size, classes)
    except ValueError:
        log.warning("no val pairs in %s: evaluating on the train split", manifest)
        val = train
    n = len(train.reports)
    if n < 2:
        raise ValueError(f"need at least 2 train image-report pairs, got {n}")
    batch_size = min(cfg.batch_size, n)
    tokens = bundle.tokenizer(train.reports)  # tokenised once: tensor or BatchEncoding
    model = bundle.model.to(device)
    loss_fn = ClipLoss()
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
        bar = tqdm(range(steps_per_epoch), desc=f"clip epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            lr = _lr_at(step, total, cfg.warmup_steps, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            pixels = bundle.preprocess(train.images[idx].to(device))  # (B, 3, S, S)
            text = _select(tokens, idx, device)
            img = F.normalize(model.encode_image(pixels), dim=-1)  # (B, d)
            txt = F.normalize(model.encode_text(text), dim=-1)  # (B, d)
            loss = loss_fn(img, txt, model.logit_scale.exp())
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
