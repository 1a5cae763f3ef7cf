"""What every CLIP loader returns: :class:`ClipBundle` and its tensor preprocessing :class:`ImagePreprocess`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
KINDS = ("open_clip", "hf_clip")


@dataclass(frozen=True)
class ImagePreprocess:
    """Tensor preprocessing: grey/RGB images in [0, 1] -> normalised ``(B, 3, S, S)`` model pixels.

    Resizes the shorter side to ``size`` and centre-crops (open_clip's and HF CLIP's ``shortest`` mode),
    repeats a grey channel to three, then normalises with ``mean`` / ``std``.

    Args:
        size: side of the square model input.
        mean, std: per-channel normalisation (3 values each).
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
    """

    size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation {self.interpolation!r} not supported; valid: bicubic, bilinear, nearest")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean!r} and {self.std!r}")

    def params(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (part of every embedding cache key)."""
        return {"size": int(self.size), "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std],
                "interpolation": self.interpolation, "resize_mode": "shortest+center_crop"}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 1 or 3, H, W) float in [0, 1] -> (B, 3, size, size) normalised."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            kw = {} if self.interpolation == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, **kw)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


# ---- the bundle --------------------------------------------------------------------------------
@dataclass
class ClipBundle:
    """A loaded CLIP-style model with what it takes to feed it.

    Attributes:
        model: ``nn.Module`` (eval mode) with ``encode_image(pixels (B, 3, S, S)) -> (B, D)`` and
            ``encode_text(tokens) -> (M, D)`` (unnormalised; :class:`training.clip.embedding.VLMAdapter` normalises).
        tokenizer: ``tokenizer(list[str])`` -> token tensor (open_clip) or ``BatchEncoding`` (HF); both
            have ``.to(device)`` and are accepted by ``model.encode_text``.
        preprocess: :class:`ImagePreprocess`, [0, 1] images -> model pixels.
        spec: the spec it was loaded from.
        image_size: S, the model's input side.
        embed_dim: D, the joint embedding size.
        kind: ``open_clip`` or ``hf_clip``.
        config: the open_clip ``{"model_cfg", "preprocess_cfg"}`` (open_clip kinds; ``{}`` for HF), used
            by :func:`save_clip`.
    """

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], Any]
    preprocess: ImagePreprocess
    spec: str
    image_size: int
    embed_dim: int
    kind: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
