"""Random views of an image-report pair for CLIP training: one sentence of the report, a jittered image.

This module owns :func:`split_sentences` (the texts drawn with ``ClipTrainConfig.sentence_prob``) and
:func:`augment_images` (the random affine and contrast/brightness jitter of ``ClipTrainConfig.augment``),
both seeded through the caller's generator by :func:`training.clip.train.train_clip`. The names stay
importable from :mod:`training.clip.train`.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(report: str) -> list[str]:
    """Sentences of a report (split after ``.``/``!``/``?`` and at line breaks); the whole text if none.

    Example:
        >>> split_sentences("PA view.\\nNo effusion. A 3 cm mass in the left upper lobe.")
        ['PA view.', 'No effusion.', 'A 3 cm mass in the left upper lobe.']
    """
    parts = [t.strip() for t in _SENTENCE_END.split(report) if t and t.strip()]
    return parts or [report.strip()]



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
