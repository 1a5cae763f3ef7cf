"""Adaptive micro-batching (:class:`MicroBatcher`) and the bounded explanation cache (:class:`LRUCache`).

Why our own batcher rather than BentoML's ``batchable=True``: the latter batches the *API arguments*
(multipart file paths), so one bad upload fails the whole batch and per-request validation errors
cannot be a 4xx for one caller only. Here every request is decoded and validated on its own first;
only the preprocessed tensors are batched.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Callable, Hashable, Sequence

import numpy as np

__all__ = ["LRUCache", "MicroBatcher"]


class LRUCache:
    """A thread-safe bounded LRU mapping with hit and miss counters.

    Args:
        capacity: entries kept; ``0`` disables the cache (``put`` stores nothing).

    Example:
        >>> c = LRUCache(1); c.put("a", 1); c.put("b", 2)
        >>> c.get("a") is None, c.get("b")
        (True, 2)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        """The value of ``key`` (now the most recently used) or None."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value``, evicting the least recently used entries beyond the capacity."""
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class MicroBatcher:
    """Adaptive micro-batching of single items into one call of ``fn(stacked) -> list of results``.

    A consumer task takes the first queued item, then everything else already queued (up to
    ``max_batch``, waiting at most ``wait_ms`` for more), runs ``fn`` on the stack in a worker thread
    and resolves each caller's future. No wait when idle; batches form under concurrency. Up to
    ``inflight`` batches run at once (``fn`` must then be thread-safe, as ONNX Runtime's ``run`` is): the
    next batch is formed and started while the previous one is still running, so the cores the first one
    leaves idle (a graph's serial parts) do work.

    Args:
        fn: ``(N, ...) array -> sequence of N results``.
        max_batch: largest batch (``CXR_MAX_BATCH``).
        wait_ms: extra time to wait for a batch to fill (``CXR_BATCH_WAIT_MS``; 0: dispatch what is queued).
        inflight: batches running at once (``CXR_BATCH_INFLIGHT``; >= 1).
    """

    def __init__(self, fn: Callable[[np.ndarray], Sequence[Any]], max_batch: int = 16, wait_ms: float = 0.0,
                 inflight: int = 1) -> None:
        self.fn, self.max_batch, self.wait_s = fn, int(max_batch), float(wait_ms) / 1000
        if int(inflight) < 1:
            raise ValueError(f"inflight must be >= 1, got {inflight}")
        self.inflight = int(inflight)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.items = 0
        self.sizes: collections.Counter = collections.Counter()

    async def submit(self, item: np.ndarray) -> Any:
        """Queue one item (shape without the batch axis) and await its result.

        Raises:
            Exception: whatever ``fn`` raised for the batch this item was in.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _run(self) -> None:
        queue = self._queue
        slots = asyncio.Semaphore(self.inflight)
        running: set[asyncio.Task] = set()
        while True:
            await slots.acquire()  # a batch forms only when it can start
            first = await queue.get()
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), left))
                    except asyncio.TimeoutError:
                        break
            batch = [(x, f) for x, f in batch if not f.cancelled()]
            if not batch:
                slots.release()
                continue
            self.batches += 1
            self.items += len(batch)
            self.sizes[len(batch)] += 1
            task = asyncio.get_running_loop().create_task(self._dispatch(batch, slots))
            running.add(task)  # a reference until done (the loop keeps only weak ones)
            task.add_done_callback(running.discard)

    async def _dispatch(self, batch: list, slots: asyncio.Semaphore) -> None:
        try:
            results = await asyncio.to_thread(self.fn, np.stack([x for x, _ in batch]))
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            slots.release()
