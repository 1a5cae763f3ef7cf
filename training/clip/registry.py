"""The open_clip model configs shipped with this package, and their registration with open_clip.

The configs are JSON files in ``training/clip/configs/`` (``cxr-tiny-vit``, ``cxr-minilm-vit``, ...).
Importing this module (which importing :mod:`training.clip` does) adds that folder to open_clip's
config search path once, so ``open_clip.create_model("cxr-tiny-vit")`` and
:func:`training.clip.load_clip` know the names; :func:`list_configs` lists them.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _register_configs() -> None:
    import open_clip

    if CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:  # idempotent on re-import
        open_clip.add_model_config(CONFIG_DIR)


_register_configs()


def list_configs() -> list[str]:
    """Names of the open_clip model configs shipped with this package (registered with open_clip)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))

