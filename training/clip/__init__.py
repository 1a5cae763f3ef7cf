"""training.clip: load CLIP-style vision-language models from any source, and train a small one.

Importing this package registers the shipped open_clip configs (``cxr-tiny-vit``) with open_clip.

Modules: :mod:`~training.clip.loading` (:func:`load_clip` and its routes), :mod:`~training.clip.bundle`
(:class:`ClipBundle`, :class:`ImagePreprocess`), :mod:`~training.clip.registry` (shipped configs),
:mod:`~training.clip.towers` (conv stem, patch tokens, HF text towers), :mod:`~training.clip.hf_clip`
(transformers CLIP), :mod:`~training.clip.saving` (:func:`save_clip`), :mod:`~training.clip.embedding`
(the VLM adapter), :mod:`~training.clip.train` (the contrastive training loop), :mod:`~training.clip.pairs`
(image-report pairs), :mod:`~training.clip.evaluation` (retrieval and zero-shot metrics),
:mod:`~training.clip.objectives` (the contrastive loss), :mod:`~training.clip.augment` (sentence and image
augmentation) and :mod:`~training.clip.locked_text` (a locked HF text tower's cached features and projection
init).
"""
from training.clip.bundle import ClipBundle, ImagePreprocess
from training.clip.hf_clip import HFClipTokenizer, HFClipWrapper
from training.clip.loading import load_clip
from training.clip.registry import list_configs
from training.clip.saving import save_clip
from training.clip.towers import encode_image_tokens

__all__ = ["ClipBundle", "HFClipTokenizer", "HFClipWrapper", "ImagePreprocess", "encode_image_tokens",
           "list_configs", "load_clip", "save_clip"]
