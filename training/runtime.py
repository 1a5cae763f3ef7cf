"""What every training loop needs, written once: device choice, seeding, the learning-rate schedule,
label matrices and batch collation.

Used by the classifier loop (:mod:`training.train`), the CLIP loop (:mod:`training.clip.train`) and
DWARF (:mod:`training.dwarf.train`).

Example:
    >>> seed_everything(0)
    >>> [round(warmup_cosine(s, total_steps=10, warmup_steps=2), 3) for s in range(4)]
    [0.333, 0.667, 1.0, 0.962]
    >>> multi_hot([["Effusion"], [], ["Nodule", "Effusion"]], ["Nodule", "Effusion"]).tolist()
    [[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

__all__ = ["resolve_device", "seed_everything", "deterministic", "warmup_cosine", "multi_hot", "label_matrix",
           "collate", "LIST_KEYS"]

# Item fields whose length differs from image to image: collated as lists, never stacked.
LIST_KEYS = ("boxes", "box_labels", "image_id")
_FLOAT_KEYS = ("image", "labels", "mask", "seg_valid", "cls_valid")


# ---- devices and randomness ------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` when given, else ``cuda`` when available, else ``cpu``.

    Args:
        device: a device name (``"cpu"``, ``"cuda:1"``), a :class:`torch.device`, or ``None``/``""``.

    Returns:
        The :class:`torch.device`.
    """
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def onnx_providers() -> list[str]:
    """ONNX Runtime execution providers to ask for: CUDA first when the installed onnxruntime has it (the
    ``gpu`` extra, ``onnxruntime-gpu``), then CPU (always there, and ORT's fallback for unsupported nodes).

    Returns:
        e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` or ``["CPUExecutionProvider"]``.
    """
    import onnxruntime as ort

    have = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []) + ["CPUExecutionProvider"]


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA) with ``seed``.

    Args:
        seed: any integer (NumPy gets ``seed mod 2**32``).
        threads: also fix torch's intra-op thread count. Float sums split over a different number of
            threads round differently, so a run is only reproducible on another machine with the thread
            count fixed. ``None`` leaves it as it is.

    Raises:
        ValueError: ``threads`` < 1.
    """
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def deterministic(seed: int = 0, threads: int = 1) -> Iterator[None]:
    """Run a block seeded and on a fixed number of threads; restore the previous state afterwards.

    Restores torch's thread count and the states of ``random``, NumPy's global generator and torch's
    CPU generator in ``finally``, so a test that trains a model leaves no trace on the next one.

    Args:
        seed: passed to :func:`seed_everything`.
        threads: torch intra-op threads inside the block.

    Example:
        >>> with deterministic(0):
        ...     a = torch.rand(2)
        >>> with deterministic(0):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    saved = (torch.get_num_threads(), random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        seed_everything(seed, threads)
        yield
    finally:
        torch.set_num_threads(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
        torch.set_rng_state(saved[3])


# ---- schedule --------------------------------------------------------------------------------
def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then half a cosine down to ``floor``.

    ``m(s) = (s + 1) / (W + 1)`` for ``s < W``, then ``floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with
    ``p = min(1, (s - W) / max(1, T - W))``. The ramp is the straight line from 0 (one step before the
    first) to 1 at step ``W``, where the cosine starts: the base rate is reached exactly once, at the
    first cosine step, and no step runs at rate 0. (The CLIP loop used to ramp ``(s + 1) / W``, which
    reaches 1 one step early and then holds it for two steps; this formula is the one kept.)

    Args:
        step: optimiser step, 0-based (the multiplier of the rate that step uses).
        total_steps: ``T``; the multiplier is ``floor`` from here on.
        warmup_steps: ``W`` >= 0 (0: start the cosine at once).
        floor: final multiplier in [0, 1].

    Returns:
        The multiplier in [floor, 1] (warm-up values may be below ``floor``).

    Raises:
        ValueError: ``floor`` outside [0, 1] or a negative ``warmup_steps``.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- labels and batches ------------------------------------------------------------------------
def multi_hot(labels: Iterable[Iterable[str] | None], classes: Sequence[str]) -> np.ndarray:
    """(N, C) float32 multi-hot matrix from per-image label lists.

    Args:
        labels: one iterable of class names per image (``None`` or empty = no finding); names not in
            ``classes`` are ignored (a manifest may hold more findings than a model predicts).
        classes: the C column names, unique.

    Returns:
        (N, C) float32 with 1.0 where image n has class c.

    Raises:
        ValueError: duplicate names in ``classes``.
    """
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError(f"classes must be unique, got {list(classes)}")
    rows = [list(labs) if labs is not None else [] for labs in labels]
    out = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for r, labs in enumerate(rows):
        for lab in labs:
            if lab in index:
                out[r, index[lab]] = 1.0
    return out


def label_matrix(dataset: Any) -> np.ndarray:
    """(N, C) float32 labels of a dataset.

    Read from its ``label_matrix`` or ``labels`` attribute when that is an (N, C) array or tensor
    (:class:`training.data.dataset.ManifestDataset`, the in-memory datasets of the loops), else item by
    item from ``dataset[i]["labels"]`` (e.g. a ``Subset``). NaN (unknown) labels are kept.

    Args:
        dataset: a map-style dataset of dicts with ``labels`` (C,).

    Returns:
        (N, C) float32.
    """
    for attr in ("label_matrix", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value):
            arr = value.numpy() if torch.is_tensor(value) else np.asarray(value)
            if arr.ndim == 2 and len(arr) == len(dataset):
                return arr.astype(np.float32)
    return np.stack([np.asarray(dataset[i]["labels"], dtype=np.float32) for i in range(len(dataset))])


def collate(batch: Sequence[Mapping[str, Any]], defaults: Mapping[str, torch.Tensor] | None = None
            ) -> dict[str, Any]:
    """Batch dataset items: stack the tensors, keep ragged fields as lists.

    ``image``, ``labels``, ``mask``, ``seg_valid`` and ``cls_valid`` are stacked as float32; ``index``
    becomes an int64 tensor (an item's position in the batch when it has none); :data:`LIST_KEYS`
    (``boxes``, ``box_labels``, ``image_id``) stay lists (their lengths differ per image); any other
    field is stacked when every item has a tensor or array of one shape, else kept as a list. A field
    is in the batch only when every item has it (or ``defaults`` supplies it).

    Args:
        batch: items (dicts), at least one.
        defaults: value for items that lack a field (e.g. ``cls_valid`` = ones).

    Returns:
        ``image`` (B, 1, S, S), ``labels`` (B, C), ``index`` (B,), ``mask`` (B, C, S, S) when present,
        ``boxes`` list of (K_b, 4), ``box_labels`` list of (K_b,), ``image_id`` list of str, ...

    Raises:
        ValueError: an empty batch.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    defaults = dict(defaults or {})
    keys = list(batch[0]) + [k for k in defaults if k not in batch[0]]
    out: dict[str, Any] = {}
    for key in keys:
        if key == "index":
            continue
        if not all((b.get(key) is not None) or key in defaults for b in batch):
            continue
        values = [b[key] if b.get(key) is not None else defaults[key] for b in batch]
        if key in LIST_KEYS:
            out[key] = values
        elif key in _FLOAT_KEYS:
            out[key] = torch.stack([torch.as_tensor(v).float() for v in values])
        elif all(torch.is_tensor(v) or isinstance(v, np.ndarray) for v in values) and \
                len({tuple(np.shape(v)) for v in values}) == 1:
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            out[key] = values
    out["index"] = torch.tensor([int(b.get("index", i)) for i, b in enumerate(batch)], dtype=torch.long)
    return out
