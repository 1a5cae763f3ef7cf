"""Arrays the audit keeps on disk instead of in memory, so that its peak memory does not grow with the probing set.

The audit needs the probing images (N, 1, S, S) and the feature-layer maps (N, K, h, w) in several sections
(maps, faithfulness, sanity, dissection, concepts, importance, shortcuts). Held as tensors they are the audit's
whole memory: 10,000 probing images at 224 px are 2 GB, a ResNet's 7 x 7 x 512 maps another 1 GB. A
:class:`SpillArray` writes them once, row by row, to an anonymous temporary file (unlinked at creation, so
nothing is left behind, even when the process is killed) and reads back the rows a section asks for with
``pread``. It does not ``mmap`` the file: mapped pages count in the process's resident set, read pages in the
kernel's page cache do not (and the kernel drops them when memory is short).

What stays in memory grows by a few kilobytes per image: the GAP-pooled features (:attr:`SpillArray.pooled`,
K floats), probabilities, labels, boxes, image and report ids, and the image embeddings of the concept
section; ``benchmarks/audit_bench.py --rss`` prints the measured growth per image.

Indexing returns copies, as a tensor (or a NumPy array with ``as_tensor=False``): an int, a slice (any step),
a sequence, NumPy array or tensor of ints (or a boolean mask) on the first axis, optionally followed by
ordinary indices of the remaining axes (``store[i, 0]``, ``store[idx, u:u + 1]``). It is what the sections
used on the in-memory tensor, so they accept either.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["SpillArray", "gap", "iter_batches", "bound_heap"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own ``mmap`` (glibc only), for the process.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so the audit's per-batch
    maps (a few MiB, allocated and freed hundreds of times) come from the heap after the first ones, and the
    freed heap is mostly not returned: measured on a 3,000-image audit, the attention pass alone left 200 MiB
    resident that ``malloc_trim`` gave back, growing with the number of images. A fixed threshold returns such
    blocks to the system on free (at the cost of fresh pages per allocation). Returns whether it was applied
    (False off glibc; nothing else changes).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class SpillArray:
    """An (N, *row_shape) array of fixed ``dtype`` kept in an anonymous temporary file.

    Args:
        row_shape: the shape of one row (e.g. ``(1, S, S)`` for an image).
        dtype: NumPy dtype of the values (float32 by default: exactly what the sections computed on).
        folder: where the temporary file goes (default: ``$TMPDIR``).
        as_tensor: reads return torch tensors (True) or NumPy arrays.
        pool: keep the GAP over the trailing axes of every appended row in memory (:attr:`pooled`), for
            (N, K, h, w) feature maps whose pooled form several sections need.

    Example:
        >>> store = SpillArray((1, 4, 4))
        >>> store.append(np.ones((3, 1, 4, 4), np.float32))
        >>> tuple(store[1:].shape), float(store[0, 0].sum())
        ((2, 1, 4, 4), 16.0)
    """

    def __init__(self, row_shape: Sequence[int], dtype: Any = np.float32, folder: str | None = None,
                 as_tensor: bool = True, pool: bool = False) -> None:
        self.row_shape = tuple(int(s) for s in row_shape)
        if any(s < 0 for s in self.row_shape):
            raise ValueError(f"row_shape must be non-negative, got {self.row_shape}")
        self.dtype = np.dtype(dtype)
        self.as_tensor = bool(as_tensor)
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fh = tempfile.TemporaryFile(prefix="cxr-audit-", dir=folder)
        self._fd = self._fh.fileno()
        self._n = 0
        self._pool = bool(pool)
        self._pooled: list[np.ndarray] = []

    # --- writing -------------------------------------------------------------------------------------------------
    def append(self, rows: Any) -> None:
        """Append rows (B, *row_shape): a tensor or an array (converted to :attr:`dtype`)."""
        arr = rows.detach().cpu().numpy() if hasattr(rows, "detach") else np.asarray(rows)
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.row_shape:
            raise ValueError(f"rows must be (B, {', '.join(map(str, self.row_shape))}), got {arr.shape}")
        view = memoryview(arr).cast("B")
        offset, done = self._n * self._row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        if self._pool:
            import torch

            axes = tuple(range(2, arr.ndim))  # the same float32 torch mean the sections computed before
            self._pooled.append(torch.from_numpy(arr).float().mean(dim=axes).numpy() if axes else arr.copy())
        self._n += len(arr)

    # --- shape ---------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n,) + self.row_shape

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def dim(self) -> int:
        """``ndim`` under the tensor's name."""
        return self.ndim

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self._n * self._row_bytes

    @property
    def pooled(self):
        """(N, K) GAP of every row over its trailing axes (a tensor), when created with ``pool=True``.

        The per-batch rows are joined once, on the first read after an append, and every read returns a tensor
        over that one array (no copy: the sections call :func:`gap` five times, and each copy was K floats per
        image at the audit's peak). It is shared: do not modify it in place."""
        if not self._pool:
            raise AttributeError("this SpillArray was created without pool=True")
        import torch

        if len(self._pooled) != 1:
            k = self.row_shape[0] if self.row_shape else 1
            self._pooled = [np.concatenate(self._pooled) if self._pooled else np.zeros((0, k), np.float32)]
        return torch.from_numpy(self._pooled[0])

    # --- reading -------------------------------------------------------------------------------------------------
    def _read(self, start: int, stop: int, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        offset, done = start * self._row_bytes, 0
        want = (stop - start) * self._row_bytes
        while done < want:
            got = os.preadv(self._fd, [view[done:want]], offset + done)
            if got <= 0:
                raise OSError(f"short read from the audit's temporary file at row {start}")
            done += got

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx),) + self.row_shape, dtype=self.dtype)
        if not len(idx):
            return out
        # coalesce runs of consecutive rows into one read each
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for pos, run in zip(np.concatenate([[0], breaks]), np.split(idx, breaks)):
            self._read(int(run[0]), int(run[-1]) + 1, out[pos:pos + len(run)])
        return out

    def _index(self, key: Any) -> tuple[np.ndarray, bool]:
        """Row positions of ``key`` and whether the first axis is dropped (an int key)."""
        n = self._n
        if isinstance(key, (int, np.integer)) or (hasattr(key, "ndim") and getattr(key, "ndim") == 0
                                                   and not isinstance(key, slice)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} rows")
            return np.array([i % n]), True
        if isinstance(key, slice):
            return np.arange(n)[key], False
        if hasattr(key, "detach"):
            key = key.detach().cpu().numpy()
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"a boolean index must have shape ({n},), got {arr.shape}")
            return np.flatnonzero(arr), False
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(f"rows are indexed by ints, slices or boolean masks, got dtype {arr.dtype}")
        arr = arr.astype(np.int64).reshape(-1)
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise IndexError(f"index out of range for {n} rows: {int(arr.min())}..{int(arr.max())}")
        return arr % n if n else arr, False

    def __getitem__(self, key: Any):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], tuple(key[1:])
        idx, drop = self._index(key)
        order = np.argsort(idx, kind="stable")
        rows = np.empty((len(idx),) + self.row_shape, dtype=self.dtype)
        rows[order] = self._rows(idx[order])
        arr = rows[0] if drop else rows
        if rest:
            arr = arr[rest] if drop else arr[(slice(None),) + rest]
        arr = np.ascontiguousarray(arr)
        if self.as_tensor:
            import torch

            return torch.from_numpy(arr)
        return arr

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._n):
            yield self[i]

    def numpy(self) -> np.ndarray:
        """All rows in memory (for tests and small sets only: this is what the class avoids)."""
        out = self._rows(np.arange(self._n))
        return out

    def close(self) -> None:
        """Drop the temporary file (also done when the object is collected)."""
        fh, self._fh = getattr(self, "_fh", None), None
        if fh is not None:
            fh.close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"SpillArray(shape={self.shape}, dtype={self.dtype}, {self.nbytes / 2**20:.1f} MiB on disk)"


def iter_batches(array: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """``(start, array[start:start + batch_size])`` over the first axis of a tensor, an array or a
    :class:`SpillArray`."""
    n = len(array)
    for start in range(0, n, max(1, int(batch_size))):
        yield start, array[start:start + batch_size]


def gap(feats: Any, batch_size: int = 256):
    """(N, K) global average pooling of (N, K, h, w) feature maps: a :class:`SpillArray`'s kept
    :attr:`~SpillArray.pooled` rows, else the mean over the trailing axes (in batches for a store without them)."""
    import torch

    pooled = getattr(feats, "pooled", None) if isinstance(feats, SpillArray) and feats._pool else None
    if pooled is not None:
        return pooled
    if isinstance(feats, SpillArray):
        parts = [b.float().mean(dim=tuple(range(2, b.ndim))) for _, b in iter_batches(feats, batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, feats.row_shape[0])
    feats = torch.as_tensor(feats)
    return feats.float().mean(dim=tuple(range(2, feats.ndim)))
