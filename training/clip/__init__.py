"""training.clip: load CLIP-style vision-language models from any source, and train a small one.

Importing this package registers the shipped open_clip configs (``cxr-tiny-vit``) with open_clip.
"""
from training.clip.loading import (ClipBundle, HFClipTokenizer, HFClipWrapper, ImagePreprocess, encode_image_tokens,
                                   list_configs, load_clip, save_clip)

__all__ = ["ClipBundle", "HFClipTokenizer", "HFClipWrapper", "ImagePreprocess", "encode_image_tokens",
           "list_configs", "load_clip", "save_clip"]
