"""One interface over every CLIP-style model: L2-normalised image and text embeddings, cached by content.

:class:`VLMAdapter` wraps a :class:`training.clip.ClipBundle` (open_clip or HF transformers CLIP, from
any source :func:`training.clip.load_clip` takes) and offers

* ``encode_images(images) -> (N, d)``: a float tensor (N, 1 or 3, H, W) in [0, 1] (grey images are
  repeated to three channels) or a list of image files (PNG/JPEG/DICOM via
  :func:`training.data.imageio.read_image`);
* ``encode_texts(texts) -> (M, d)``,

both batched, under ``torch.no_grad`` with the model in eval mode, L2-normalised, float32 on CPU.

With ``cache_dir`` the results are stored on disk under a key made of the model fingerprint (a hash
of every tensor of its ``state_dict`` plus its kind and tokenizer), the preprocessing parameters
(images) and the fingerprint of the *content* (pixel values, file bytes, or the texts), never a file
name alone: a renamed file hits the cache, an overwritten one misses it.

It lives in :mod:`training.clip` because training needs it too (:func:`training.clip.train.evaluate_clip`
embeds the validation pairs and prompts with it) and ``training`` never imports ``interpret``;
:mod:`interpret.vlm` re-exports it as the interpretation library's VLM interface.

Example:
    >>> from training.clip import load_clip
    >>> vlm = VLMAdapter(load_clip("cxr-tiny-vit"), batch_size=16)
    >>> vlm.encode_texts(["A chest x-ray image of a Nodule"]).shape
    torch.Size([1, 128])
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every ``state_dict`` entry (name, dtype, shape and bytes), in key order.

    Args:
        model: any module.

    Returns:
        A 64-character hex digest; equal for models with identical weights and buffers.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tensor_fingerprint(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


def files_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 over the bytes of each file, in order (names do not enter the key)."""
    h = hashlib.sha256()
    for p in paths:
        file_hash = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                file_hash.update(chunk)
        h.update(file_hash.digest())
    return h.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 of the texts (JSON list, so boundaries between texts count)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def _tokenizer_id(tokenizer: Any) -> dict[str, Any]:
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = getattr(inner, "vocab_size", None) or len(getattr(inner, "encoder", {}) or {}) or None
    return {"type": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
            "inner": type(inner).__qualname__, "context_length": getattr(tokenizer, "context_length", None),
            "vocab_size": vocab}


class VLMAdapter:
    """Batched, cached, L2-normalised image and text embeddings from a CLIP bundle.

    Args:
        bundle: a :class:`training.clip.ClipBundle` (``model`` with ``encode_image``/``encode_text``,
            ``tokenizer``, ``preprocess``).
        batch_size: images or texts per forward pass.
        cache_dir: folder for the on-disk cache (created); ``None`` disables caching.
        progress: show tqdm bars for calls with more than one batch.

    Raises:
        ValueError: ``batch_size`` < 1.
    """

    def __init__(self, bundle: Any, batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.bundle = bundle
        self.model = bundle.model
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._fingerprint: str | None = None

    # ---- identity -----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Model fingerprint: weights (:func:`model_fingerprint`), kind and tokenizer; computed once."""
        if self._fingerprint is None:
            ident = {"weights": model_fingerprint(self.model), "kind": getattr(self.bundle, "kind", None),
                     "tokenizer": _tokenizer_id(self.bundle.tokenizer)}
            self._fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _preprocess_params(self) -> dict[str, Any]:
        pp = self.bundle.preprocess
        return pp.params() if hasattr(pp, "params") else {"repr": repr(pp)}

    # ---- cache --------------------------------------------------------------------------------
    def cache_key(self, what: str, data_fingerprint: str) -> str:
        """Hex key of one cached result: model fingerprint + ``what`` (images/texts) + data + parameters."""
        key = {"v": CACHE_VERSION, "model": self.fingerprint, "what": what, "data": data_fingerprint}
        if what == "images":
            key["preprocess"] = self._preprocess_params()
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _cached(self, key: str, compute) -> torch.Tensor:
        if self.cache_dir is None:
            return compute()
        path = self.cache_dir / f"{key}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError) as exc:  # a torn write: recompute
                log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        out = compute()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, path)  # atomic: readers never see half a file
        return out

    # ---- encoding -----------------------------------------------------------------------------
    def _run(self, chunks, encode, total: int, desc: str) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        outs = []
        try:
            with torch.no_grad():
                bar = tqdm(chunks, total=total, desc=desc, disable=not self.progress or total <= 1, leave=False)
                for chunk in bar:
                    z = encode(chunk)
                    outs.append(F.normalize(z.float(), dim=-1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(outs) if outs else torch.zeros(0, int(self.bundle.embed_dim))

    def encode_images(self, images: torch.Tensor | Sequence[str | os.PathLike]) -> torch.Tensor:
        """Embed images.

        Args:
            images: float tensor (N, 1 or 3, H, W) with values in [0, 1], or a list of image files.

        Returns:
            (N, d) float32 CPU tensor, rows L2-normalised.

        Raises:
            ValueError: wrong shape, values outside [0, 1], or an unreadable image file
                (:class:`training.data.imageio.ImageReadError`).
        """
        if isinstance(images, torch.Tensor):
            return self._encode_tensor(images)
        if isinstance(images, (str, os.PathLike)):
            raise ValueError(f"images must be a tensor or a list of files, got a single path {images!r}")
        paths = [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"image files not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        key = self.cache_key("images", "files:" + files_fingerprint(paths))
        return self._cached(key, lambda: self._encode_files(paths))

    def _encode_tensor(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-4 or hi > 1 + 1e-4:
                raise ValueError(f"images must be in [0, 1] (normalisation happens inside), got range [{lo:.3g}, "
                                 f"{hi:.3g}]")
        key = self.cache_key("images", "tensor:" + tensor_fingerprint(images))
        device, pp = self.device, self.bundle.preprocess
        n = len(images)
        chunks = (images[i:i + self.batch_size] for i in range(0, n, self.batch_size))
        total = -(-n // self.batch_size)
        return self._cached(key, lambda: self._run(
            chunks, lambda x: self.model.encode_image(pp(x.to(device))), total, "encode images"))

    def _encode_files(self, paths: list[Path]) -> torch.Tensor:
        from training.data.imageio import read_image

        device, pp = self.device, self.bundle.preprocess

        def load(batch: list[Path]) -> torch.Tensor:
            # files may differ in size: preprocess each to the model's size, then stack
            return torch.cat([pp(torch.from_numpy(np.ascontiguousarray(read_image(p)))[None, None]) for p in batch])

        chunks = (paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size))
        total = -(-len(paths) // self.batch_size)
        return self._run(chunks, lambda b: self.model.encode_image(load(b).to(device)), total, "encode image files")

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts.

        Args:
            texts: list of strings (a single string is refused to avoid embedding its characters).

        Returns:
            (M, d) float32 CPU tensor, rows L2-normalised.

        Raises:
            ValueError: ``texts`` is a string or holds non-strings.
        """
        if isinstance(texts, str):
            raise ValueError(f"texts must be a list of strings, got a single string {texts!r}")
        texts = list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must all be strings, got {bad[:3]!r}")
        key = self.cache_key("texts", texts_fingerprint(texts))
        device, tok = self.device, self.bundle.tokenizer
        chunks = (texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size))
        total = -(-len(texts) // self.batch_size)
        return self._cached(key, lambda: self._run(
            chunks, lambda b: self.model.encode_text(tok(b).to(device)), total, "encode texts"))
