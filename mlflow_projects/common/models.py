"""Models the entry points load: a registered classifier, the model an audit audits (a classifier or a DWARF
seen as one), and a CLIP by one rule (no silent fallback)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow

from mlflow_projects.common.registry import RegistryError, _first_line, resolve_model_uri  # noqa: F401
from mlflow_projects.common.settings import SCRATCH_CLIP

log = logging.getLogger("mlflow_projects.common")


# ---- models the entry points load --------------------------------------------------------------
def load_classifier(uri: str, dst: str | Path):
    """Download a registered classifier (or read a local model folder) and rebuild it with
    :func:`training.models.load_checkpoint`.

    Args:
        uri: a pinned model URI (``models:/name/3``, ``runs:/...``) or a local model folder.
        dst: folder the artifacts are downloaded to.

    Returns:
        ``(model, meta)``: the eval-mode model and ``artifacts/meta.json`` (empty dict if absent).

    Raises:
        FileNotFoundError: the model holds no ``checkpoint.pt`` (not a cxr-classifier model).
    """
    from training.models import load_checkpoint

    src = Path(uri)
    if not src.exists():
        src = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    ckpt = src / "artifacts" / "checkpoint.pt"
    if not ckpt.is_file():
        found = sorted(src.rglob("checkpoint.pt"))
        if not found:
            raise FileNotFoundError(f"{uri} holds no artifacts/checkpoint.pt (is it a cxr-classifier model?)")
        ckpt = found[0]
    meta_path = ckpt.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return load_checkpoint(ckpt).eval(), meta


def load_audit_model(uri: str, dst: str | Path):
    """The model an audit audits: a registered classifier, or a registered DWARF seen as a classifier.

    One loader for the audit glue. A ``cxr-dwarf`` version (``meta.json`` with ``kind: "dwarf"``, written by
    :mod:`mlflow_projects.pyfunc_dwarf`) is rebuilt with :func:`training.dwarf.model.load_dwarf` and wrapped
    in :class:`interpret.models.DwarfClassifierView` (``model(x) -> logits``, ``model.maps(x)``, maps with
    ``interpret.attention_maps(..., method="dwarf")``, ``model.kind == "dwarf"``); anything else goes through
    :func:`load_classifier`, unchanged.

    Args:
        uri: a pinned model URI (``models:/name/3``, ``runs:/...``) or a local model folder.
        dst: folder the artifacts are downloaded to.

    Returns:
        ``(model, meta)``: the eval-mode model (a classifier, or a ``DwarfClassifierView``) and
        ``artifacts/meta.json`` (empty dict if a classifier has none).

    Raises:
        FileNotFoundError: the folder holds neither a classifier (``artifacts/checkpoint.pt``) nor a DWARF
            model (``artifacts/meta.json`` with ``kind: "dwarf"`` beside ``checkpoint.pt``); the message
            names the folder and what was expected.
        ValueError: a maps-returning pyfunc that is not a DWARF model (it cannot be audited).
    """
    src = Path(uri)
    if not src.exists():
        src = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    expected = ("a cxr-classifier model (artifacts/checkpoint.pt, artifacts/meta.json) or a cxr-dwarf model "
                "(artifacts/meta.json with kind 'dwarf', artifacts/checkpoint.pt)")
    metas = [p for p in (src / "artifacts" / "meta.json", *sorted(src.rglob("meta.json"))) if p.is_file()] \
        if src.is_dir() else []
    meta = json.loads(metas[0].read_text()) if metas else {}
    if meta.get("kind") == "dwarf":
        from interpret.models import DwarfClassifierView
        from training.dwarf.model import load_dwarf

        ckpt = metas[0].parent / "checkpoint.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{uri} ({src}): {metas[0]} says kind 'dwarf' but {ckpt} is missing; expected "
                                    f"{expected}")
        view = DwarfClassifierView(load_dwarf(str(ckpt), map_location="cpu")).eval()
        view.threshold_positives = meta.get("threshold_positives")  # in meta.json only (train_dwarf sets them)
        view.min_val_positives = meta.get("min_val_positives")
        return view, meta
    if meta.get("kind") not in (None, "classifier") or "maps" in (meta.get("outputs") or []):
        raise ValueError(f"{uri} ({src}) is a {meta.get('kind') or 'maps-returning'} pyfunc the audit cannot load; "
                         f"expected {expected}")
    try:
        return load_classifier(str(src), dst)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} ({src}) holds no model the audit can load; expected {expected}") from None


CLIP_SPECS = ("models:/NAME/VERSION", "models:/NAME@ALIAS", "an open_clip model name", "local-dir:PATH",
              "hf-hub:ORG/NAME", "a config .json or HF CLIP folder", "scratch", "scratch:<config>")


def resolve_clip(spec: str, image_size: int | None = None, require_vit: bool = False) -> tuple[Any, str]:
    """The CLIP bundle named by ``spec`` and a description of what was loaded.

    One rule for every entry point: a registered CLIP (``models:/...``) or a loadable spec
    (:func:`training.clip.load_clip`: an open_clip name, ``local-dir:``, ``hf-hub:``, a folder) is loaded
    as asked; an untrained CLIP only when asked for by name, ``scratch`` (an untrained
    ``cxr-tiny-vit``) or ``scratch:<config>``. Anything that cannot be loaded is an error, never a silent
    fallback.

    Args:
        spec: see above.
        image_size: input side an untrained (``scratch``) CLIP is built for (default: its config's).
        require_vit: refuse a CLIP whose image tower is not a ViT (DWARF cross-attends to patch tokens).

    Returns:
        ``(ClipBundle, description)``; the description is ``scratch:<config> (untrained)``, the pinned
        ``models:/name/version`` (with the alias asked for), or ``spec``.

    Raises:
        RegistryError: a ``models:/`` URI naming an unknown model, version or alias, or whose
            artifacts hold no loadable CLIP.
        ValueError: an unknown spec (lists the valid forms), or a non-ViT CLIP with ``require_vit``.
    """
    from training.clip import list_configs, load_clip

    text = str(spec).strip()
    if text == "scratch" or text.startswith("scratch:"):
        config = text.partition(":")[2].strip() or SCRATCH_CLIP
        try:
            bundle = load_clip(config, image_size=image_size)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"bad CLIP {spec!r}: {_first_line(exc)}; scratch:<config> takes an open_clip "
                             f"config name, e.g. {', '.join(list_configs())}") from None
        described = f"scratch:{config} (untrained)"
    elif text.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        from mlflow_projects.pyfunc_clip import load_registered_clip

        ident = resolve_model_uri(text)
        try:
            bundle = load_registered_clip(ident.uri)
        except (MlflowException, OSError, ValueError, KeyError) as exc:
            raise RegistryError(f"cannot load the CLIP {text} ({ident.uri}): {_first_line(exc)}") from None
        bundle.spec = text
        described = text if ident.version and text.endswith(f"/{ident.version}") else \
            f"{text} (version {ident.version})" if ident.version else text
    else:
        try:
            bundle = load_clip(text)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"cannot load CLIP {spec!r}: {str(exc).rstrip('; ')}; valid forms: "
                             f"{', '.join(CLIP_SPECS)}") from None
        described = text
    if require_vit:
        from open_clip.transformer import VisionTransformer

        visual = getattr(bundle.model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"CLIP {spec!r} has a {type(visual).__name__} image tower; DWARF needs a ViT (patch "
                             f"tokens): pass 'scratch' (an untrained {SCRATCH_CLIP}), 'scratch:<ViT config>' or a "
                             f"ViT CLIP, e.g. one registered by train_clip --model cxr-minilm-vit")
    return bundle, described


