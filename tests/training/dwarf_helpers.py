"""Tiny CLIP bundle and synthetic localisation data shared by the DWARF tests."""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset

CLASSES = ["Nodule", "Effusion", "Mass"]
# where each class's square sits in a 32-px image (x0, y0, size)
PLACES = {0: (2, 2, 10), 1: (18, 18, 12), 2: (18, 2, 10)}


@functools.lru_cache(maxsize=4)
def tiny_bundle(image_size: int = 32, seed: int = 0):
    """A :class:`training.clip.ClipBundle` with a 2-layer, width-32 open_clip ViT (patch 8) and text
    tower (a smaller sibling of ``cxr-tiny-vit``, so the tests build it in milliseconds).

    Cached: ``build_dwarf`` deep-copies the image tower, so models built on it never share weights."""
    import open_clip

    from training.clip import ClipBundle, ImagePreprocess

    torch.manual_seed(seed)
    model_cfg = dict(embed_dim=32,
                     vision_cfg=dict(image_size=image_size, patch_size=8, width=32, layers=2, head_width=16),
                     text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    model = open_clip.CLIP(**model_cfg)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return ClipBundle(model=model.eval(), tokenizer=tokenizer, preprocess=ImagePreprocess(image_size),
                      spec="test-tiny", image_size=image_size, embed_dim=32, kind="open_clip",
                      config={"model_cfg": model_cfg, "preprocess_cfg": {}})


class SquaresDataset(Dataset):
    """Grey images with a bright square per present finding at a class-specific place, with masks."""

    def __init__(self, n: int = 24, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.classes = list(CLASSES)
        self.labels = (torch.rand(n, len(CLASSES), generator=g) < 0.4).float()
        self.images = 0.2 * torch.rand(n, 1, size, size, generator=g)
        self.masks = torch.zeros(n, len(CLASSES), size, size)
        for c, (x, y, s) in PLACES.items():
            on = self.labels[:, c] > 0
            self.masks[on, c, y:y + s, x:x + s] = 1.0
        self.images = (self.images + 0.7 * self.masks.amax(1, keepdim=True)).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "labels": self.labels[i], "mask": self.masks[i],
                "image_id": f"sq{i}", "index": i}
