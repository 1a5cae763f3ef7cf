"""A locked Hugging Face text tower during CLIP training (LiT-style): pooled features once, a whitened projection.

When the text encoder is frozen, :func:`training.clip.train.train_clip` computes its pooled features once
per distinct text (:func:`pooled_text_features`) and trains only the projection, which it may first
initialise from the data (:func:`whiten_projection_`, PCA whitening). This module owns those two and
``_hf_text_tower`` (the model's HF text tower, or None); the public names stay importable from
:mod:`training.clip.train`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from training.clip.bundle import ClipBundle


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
