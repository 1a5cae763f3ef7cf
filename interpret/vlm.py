"""One interface over every CLIP-style model: L2-normalised image and text embeddings, cached by content.

The implementation lives in :mod:`training.clip.embedding` (training evaluates its CLIP with it, and
``training`` never imports ``interpret``); this module is the interpretation library's name for it.
See :class:`training.clip.embedding.VLMAdapter` for the interface and the cache key.

Example:
    >>> from training.clip import load_clip
    >>> vlm = VLMAdapter(load_clip("cxr-tiny-vit"), batch_size=16)
    >>> vlm.encode_texts(["A chest x-ray image of a Nodule"]).shape
    torch.Size([1, 128])
"""
from __future__ import annotations

from training.clip.embedding import (CACHE_VERSION, VLMAdapter, files_fingerprint, model_fingerprint,
                                     tensor_fingerprint, texts_fingerprint)

__all__ = ["VLMAdapter", "model_fingerprint", "tensor_fingerprint", "files_fingerprint", "texts_fingerprint",
           "CACHE_VERSION"]
