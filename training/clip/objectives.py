"""The small CLIP's training objective: a symmetric contrastive loss in which equal texts are all positives.

This module owns :func:`multi_positive_clip_loss` (open_clip's ``ClipLoss`` when every text in the batch
is distinct); the cosine-alignment term that :func:`training.clip.train.train_clip` may add stays inline
in the loop. The name stays importable from :mod:`training.clip.train`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
