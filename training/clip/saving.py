"""Saving a CLIP bundle as a ``local-dir:`` folder, the format :func:`training.clip.load_clip` reads back.

The folder format is open_clip's own: :data:`OPEN_CLIP_CONFIG` (``{"model_cfg": ..., "preprocess_cfg": ...}``)
beside the weights (:data:`WEIGHTS_FILE`, safetensors) and, for an HF text tower, its tokenizer files.
"""
from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path

from training.clip.bundle import ClipBundle

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


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
