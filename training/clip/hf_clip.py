"""The Hugging Face ``transformers`` CLIP route: a ``CLIPModel`` folder -> :class:`ClipBundle`.

:func:`load_hf_clip_dir` reads a transformers CLIP directory (``config.json`` of a ``CLIPModel``, its
tokenizer and, optionally, ``preprocessor_config.json``); :class:`HFClipWrapper` and
:class:`HFClipTokenizer` give it open_clip's ``encode_image`` / ``encode_text`` / ``tokenizer(list[str])``
interface, so code downstream of :func:`training.clip.load_clip` does not care which library built it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.clip.bundle import OPENAI_MEAN, OPENAI_STD, ClipBundle, ImagePreprocess


class HFClipWrapper(nn.Module):
    """A ``transformers.CLIPModel`` with open_clip's ``encode_image`` / ``encode_text`` interface."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.logit_scale = clip.logit_scale

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``pixels`` (B, 3, S, S) normalised -> (B, D) image embeddings."""
        z = self._features(self.clip.get_image_features(pixel_values=pixels))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: Any, normalize: bool = False) -> torch.Tensor:
        """``tokens`` a mapping (``input_ids``, ``attention_mask``) or an id tensor -> (M, D)."""
        if isinstance(tokens, Mapping):
            kw = {k: tokens[k] for k in ("input_ids", "attention_mask") if k in tokens}
        else:
            kw = {"input_ids": tokens}
        z = self._features(self.clip.get_text_features(**kw))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, pixels: torch.Tensor, tokens: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.encode_image(pixels, normalize=True), self.encode_text(tokens, normalize=True),
                self.logit_scale.exp())


class HFClipTokenizer:
    """``list[str]`` -> ``BatchEncoding`` (input_ids, attention_mask) padded to the longest, truncated."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: str | Sequence[str]) -> Any:
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                              return_tensors="pt")

    def save_pretrained(self, dest: str | Path) -> None:
        self.tokenizer.save_pretrained(dest)


def load_hf_clip_dir(folder: Path, pretrained: str | None = None) -> ClipBundle:
    """Load a Hugging Face ``transformers`` CLIP directory (what :func:`training.clip.load_clip` does for one).

    Args:
        folder: a folder with ``config.json`` of a ``CLIPModel``, its weights and tokenizer and,
            optionally, ``preprocessor_config.json`` (image size, mean/std, resampling).
        pretrained: must be None (the weights are the folder's own); accepted so every route has
            one signature.

    Returns:
        :class:`ClipBundle` of kind ``hf_clip`` (model not yet moved or put in eval mode).

    Raises:
        ValueError: ``pretrained`` given, or the folder holds another transformers model type.
    """
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    if pretrained is not None:
        raise ValueError(f"pretrained={pretrained!r} is not used with an HF CLIP directory: the weights are its own")
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    if cfg.model_type != "clip":
        raise ValueError(f"{folder} holds a transformers {cfg.model_type!r} model; valid: 'clip' (CLIPModel)")
    clip = CLIPModel.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    size = int(cfg.vision_config.image_size)
    mean, std, interp = OPENAI_MEAN, OPENAI_STD, "bicubic"
    pp_path = folder / "preprocessor_config.json"
    if pp_path.is_file():
        pp = json.loads(pp_path.read_text())
        mean = tuple(pp.get("image_mean", mean))
        std = tuple(pp.get("image_std", std))
        interp = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(pp.get("resample", 3), "bicubic")
        crop = pp.get("crop_size", size)
        size = int(crop["height"] if isinstance(crop, dict) else crop)
    wrapper = HFClipWrapper(clip)
    tokenizer = HFClipTokenizer(tok, cfg.text_config.max_position_embeddings)
    return ClipBundle(model=wrapper, tokenizer=tokenizer, preprocess=ImagePreprocess(size, mean, std, interp),
                      spec=str(folder), image_size=size, embed_dim=int(cfg.projection_dim), kind="hf_clip")
