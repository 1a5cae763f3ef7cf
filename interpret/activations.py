"""Streaming activation collection with an on-disk cache keyed by content.

:func:`collect_activations` runs a model over a probing set once and keeps, for every image and unit
(channel) of one layer, the spatial **mean** and **max** (and min) of the activation map: (N, C) each,
never N x C x h x w. Spatial maps are kept only where a method needs them: for a chosen subset of
images (``map_indices``) and/or the ``top_k`` images of every unit (kept by a streaming top-k merge,
so memory is C x k x h x w).

Results are cached on disk under a key made of the model fingerprint (class + every state-dict
tensor's bytes), the data fingerprint (image ids + file sizes + modification times + image size for a
manifest-backed dataset, otherwise a hash of the image tensors), the layer and the parameters; a
renamed file with the same content hits the cache, a changed weight or image misses it.

Example:
    >>> res = collect_activations(model, "phantom/manifest.parquet", "features",
    ...                           top_k=20, cache_dir=".cache/acts")          # doctest: +SKIP
    >>> res.mean.shape, res.top_maps.shape                                    # doctest: +SKIP
    (torch.Size([2000, 64]), torch.Size([64, 20, 7, 7]))
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from interpret.attention.base import model_state
from interpret.devices import model_device, to_numpy
from interpret.hooks import capture, resolve_layer

logger = logging.getLogger(__name__)

__all__ = ["ActivationResult", "collect_activations", "model_fingerprint", "data_fingerprint",
           "make_loader", "iter_batches", "iter_layer"]

CACHE_VERSION = 1


@dataclass
class ActivationResult:
    """Pooled activations of one layer over a probing set.

    Attributes:
        layer: dotted layer name.
        image_ids: N ids, in data order.
        mean: (N, C) spatial mean per image and unit.
        max: (N, C) spatial max.
        min: (N, C) spatial min.
        map_indices: (S,) data positions whose full maps are kept (may be empty).
        maps: (S, C, h, w) maps of those images, or None.
        top_indices: (C, k) per unit, data positions of the k images with the highest ``top_by``
            score, best first (-1 where fewer than k images were seen), or None.
        top_scores: (C, k) their scores.
        top_maps: (C, k, h, w) their maps.
        key: cache key (hex).
        params: parameters the result was computed with.
    """

    layer: str
    image_ids: list[str]
    mean: torch.Tensor
    max: torch.Tensor
    min: torch.Tensor
    map_indices: torch.Tensor
    maps: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None
    top_scores: torch.Tensor | None = None
    top_maps: torch.Tensor | None = None
    key: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model class and every state-dict entry (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(to_numpy(t.view(torch.uint8)).tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(data: Any) -> str | None:
    """Fingerprint of a manifest-backed dataset (or a loader over one) without reading images:
    image ids, file sizes and modification times, image size and classes. ``None`` when ``data``
    has no such metadata (the caller then hashes image content) or augments randomly."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    paths, ids = getattr(ds, "paths", None), getattr(ds, "image_ids", None)
    if paths is None or ids is None:
        return None
    if getattr(ds, "augment", None):
        logger.warning("data_fingerprint: the dataset augments randomly; activations are not cached")
        return None
    h = hashlib.sha256(type(ds).__qualname__.encode())
    h.update(json.dumps({"image_size": getattr(ds, "image_size", None),
                         "classes": list(getattr(ds, "classes", []) or [])}).encode())
    for iid, p in zip(ids, paths):
        st = os.stat(p)
        h.update(f"{iid}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- data access
def make_loader(data: Any, batch_size: int = 32, image_size: int | None = None,
                num_workers: int = 0, masks: bool = False) -> DataLoader:
    """A sequential DataLoader over ``data``: a DataLoader (returned as is), a Dataset, or a
    manifest path (wrapped in ``training.data.ManifestDataset`` with its ``collate``).

    Raises:
        ValueError: ``data`` is none of these.
    """
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, (str, os.PathLike)):
        from training.data.dataset import ManifestDataset, collate

        ds = ManifestDataset(data, image_size=image_size or 224, masks=masks)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate)
    if isinstance(data, Dataset):
        from training.data.dataset import ManifestDataset, collate

        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate if isinstance(data, ManifestDataset) else None)
    raise ValueError(f"data must be a DataLoader, a Dataset or a manifest path, got "
                     f"{type(data).__name__}")


def _batch_images(batch: Any) -> tuple[torch.Tensor, list[str] | None]:
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"batch dict has no 'image' key; keys: {sorted(batch)}")
        ids = batch.get("image_id")
        return batch["image"], ([str(i) for i in ids] if ids is not None else None)
    if isinstance(batch, (tuple, list)):
        return batch[0], None
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise ValueError(f"cannot find images in a batch of type {type(batch).__name__}")


def iter_batches(loader: Iterable, progress: bool = True, desc: str = "batches"
                 ) -> Iterator[tuple[int, torch.Tensor, list[str], Any]]:
    """Yield ``(start, images, image_ids, batch)`` with running data positions; ids default to the
    position as a string."""
    start = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, disable=not progress, leave=False):
        images, ids = _batch_images(batch)
        B = images.shape[0]
        yield start, images, ids or [str(start + i) for i in range(B)], batch
        start += B


def iter_layer(model: nn.Module, loader: Iterable, layer: str, progress: bool = True,
               desc: str = "activations") -> Iterator[tuple[int, torch.Tensor, list[str], Any]]:
    """Run ``model`` (eval mode, no grad, state restored) over ``loader``; yield ``(start, acts,
    image_ids, batch)`` with ``acts`` the layer's output for the batch (cloned, on the model's
    device)."""
    resolve_layer(model, layer)
    dev = model_device(model)
    with model_state(model, freeze=False), torch.no_grad(), capture(model, layer) as cap:
        for start, images, ids, batch in iter_batches(loader, progress, desc):
            model(images.to(dev))
            yield start, cap.activations.pop(layer), ids, batch


def _pool(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor | None]:
    """(mean, max, min) per unit (B, C) and the maps (B, C, h, w) or None."""
    if acts.dim() == 4:                                                    # (B, C, h, w)
        flat = acts.flatten(2)
        return flat.mean(-1), flat.amax(-1), flat.amin(-1), acts
    if acts.dim() == 3:                                                    # (B, tokens, C)
        return acts.mean(1), acts.amax(1), acts.amin(1), None
    if acts.dim() == 2:                                                    # (B, C)
        return acts, acts, acts, None
    raise ValueError(f"cannot pool a layer output of shape {tuple(acts.shape)}")


def _content_fingerprint(loader: Iterable, progress: bool) -> str:
    h = hashlib.sha256()
    for _, images, ids, _ in iter_batches(loader, progress, "hashing data"):
        x = images.detach().cpu().contiguous()
        h.update(f"{tuple(x.shape)}|{'|'.join(ids)}".encode())
        h.update(to_numpy(x).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- main entry
def collect_activations(model: nn.Module, data: Any, layer: str | None = None, *,
                        batch_size: int = 32, image_size: int | None = None,
                        map_indices: Sequence[int] | None = None, top_k: int = 0,
                        top_by: str = "max", cache_dir: str | os.PathLike | None = None,
                        num_workers: int = 0, progress: bool = True) -> ActivationResult:
    """Stream a probing set through ``model`` and pool one layer's activations per unit.

    Memory: O(N C) for the pooled values, O(S C h w) for ``map_indices`` and O(C k h w) for the
    top-k maps; one batch of activations at a time otherwise.

    Args:
        model: the network (left on its device; its train/eval state is restored).
        data: a sequential DataLoader (batches: dicts with ``image`` and optionally ``image_id``, or
            ``(images, ...)`` tuples, or tensors), a Dataset, or a manifest path.
        layer: dotted layer name; default ``model.feature_layer``.
        batch_size: batch size when ``data`` is not already a DataLoader.
        image_size: image side when ``data`` is a manifest path (default: ``model.input_spec["size"]``
            or 224).
        map_indices: data positions whose full maps to keep.
        top_k: keep the maps of each unit's ``top_k`` images (0 = none).
        top_by: score ranking images for the top-k: ``"max"`` or ``"mean"``.
        cache_dir: folder of the on-disk cache (None = no cache).
        num_workers: DataLoader workers when one is built here.
        progress: show a tqdm bar.

    Returns:
        An :class:`ActivationResult`.

    Raises:
        ValueError: unknown layer (valid ones listed), bad ``top_by`` / ``top_k`` / indices, or a
            model without ``feature_layer`` and no ``layer``.
    """
    if layer is None:
        layer = getattr(model, "feature_layer", None)
        if not layer:
            raise ValueError(f"{type(model).__name__} has no 'feature_layer'; pass layer=")
    resolve_layer(model, layer)
    if top_by not in ("max", "mean"):
        raise ValueError(f"top_by must be 'max' or 'mean', got {top_by!r}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if image_size is None:
        image_size = (getattr(model, "input_spec", None) or {}).get("size")
    loader = make_loader(data, batch_size, image_size, num_workers)
    wanted = sorted({int(i) for i in (map_indices or [])})
    if wanted and wanted[0] < 0:
        raise ValueError(f"map_indices must be non-negative data positions, got {wanted[0]}")
    params = {"layer": layer, "map_indices": wanted, "top_k": int(top_k), "top_by": top_by,
              "version": CACHE_VERSION}

    path = None
    key = ""
    if cache_dir is not None:
        dfp = data_fingerprint(loader) or _content_fingerprint(loader, progress)
        key = hashlib.sha256(json.dumps({"model": model_fingerprint(model), "data": dfp,
                                         **params}, sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"activations-{key[:40]}.pt"
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                logger.info("activations: cache hit %s", path)
                return ActivationResult(**stored)
            except Exception as e:  # a truncated or foreign file: recompute and overwrite
                logger.warning("activations: unreadable cache file %s (%s); recomputing", path, e)

    means, maxs, mins, ids_all = [], [], [], []
    kept_maps: list[torch.Tensor] = []
    kept_pos: list[int] = []
    wanted_set = set(wanted)
    top_scores = top_idx = top_maps = None
    k = int(top_k)
    for start, acts, ids, _ in iter_layer(model, loader, layer, progress):
        acts = acts.float()
        mean, mx, mn, maps = _pool(acts)
        means.append(mean.cpu()), maxs.append(mx.cpu()), mins.append(mn.cpu())
        ids_all.extend(ids)
        B = acts.shape[0]
        if wanted_set and maps is not None:
            hit = [i for i in range(B) if start + i in wanted_set]
            if hit:
                kept_maps.append(maps[hit].cpu())
                kept_pos.extend(start + i for i in hit)
        if k and maps is not None:
            score = (mx if top_by == "max" else mean).t()                  # (C, B)
            pos = torch.arange(start, start + B, device=score.device).expand_as(score)
            bmaps = maps.transpose(0, 1)                                    # (C, B, h, w)
            if top_scores is None:
                C, (h, w) = score.shape[0], maps.shape[-2:]
                top_scores = torch.full((C, k), float("-inf"), device=score.device)
                top_idx = torch.full((C, k), -1, dtype=torch.long, device=score.device)
                top_maps = torch.zeros(C, k, h, w, device=score.device)
            cand_s = torch.cat([top_scores, score], 1)                      # (C, k + B)
            cand_i = torch.cat([top_idx, pos], 1)
            cand_m = torch.cat([top_maps, bmaps], 1)                        # (C, k + B, h, w)
            top_scores, sel = cand_s.topk(k, dim=1)                         # (C, k)
            top_idx = cand_i.gather(1, sel)
            top_maps = cand_m[torch.arange(cand_m.shape[0], device=sel.device)[:, None], sel]
    if not means:
        raise ValueError("the probing set is empty")
    missing = wanted_set - set(kept_pos)
    if missing:
        logger.warning("activations: %d map_indices beyond the data or without spatial maps "
                       "(first: %d)", len(missing), min(missing))
    res = ActivationResult(
        layer=layer, image_ids=ids_all, mean=torch.cat(means), max=torch.cat(maxs),
        min=torch.cat(mins), map_indices=torch.tensor(kept_pos, dtype=torch.long),
        maps=torch.cat(kept_maps) if kept_maps else None,
        top_indices=top_idx.cpu() if top_idx is not None else None,
        top_scores=top_scores.cpu() if top_scores is not None else None,
        top_maps=top_maps.cpu() if top_maps is not None else None, key=key, params=params)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(res.to_dict(), tmp)
        os.replace(tmp, path)
    return res
