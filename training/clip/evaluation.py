"""Evaluation of a CLIP on image-report pairs: retrieval recall and zero-shot AUROC per finding.

This module owns the metrics (:func:`retrieval_recall`, :func:`zero_shot_scores`, :func:`per_class_auroc`,
pure functions) and :func:`evaluate_clip`, which embeds a :class:`~training.clip.pairs.PairSplit` and its
class prompts and computes them all; the names stay importable from :mod:`training.clip.train`, whose
loop evaluates on the ``val`` split after each epoch.

* retrieval recall@k, image -> text and text -> image: the fraction of pairs whose partner ranks in the
  top k of the cosine similarities among all val pairs (chance: k / N);
* zero-shot AUROC per finding: each image is scored by
  ``cos(v, t("A chest x-ray image of a {class}")) - cos(v, t("A chest x-ray image of no {class}"))``
  (``zero_shot="contrast"``, default) or by the first term alone (``"similarity"``), and ranked against
  the manifest labels.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from training.clip.bundle import ClipBundle
from training.clip.embedding import VLMAdapter
from training.clip.pairs import PairSplit
from training.prompts import NEGATIVE_TEMPLATE, PROMPT_TEMPLATE, class_prompts

ZERO_SHOT_MODES = ("contrast", "similarity")


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
