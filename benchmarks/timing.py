"""Side-by-side timing shared by the benchmarks: the reference and the measured call back to back in every
repeat, so that load from other processes hits both alike; ratios are medians of the per-repeat ratios."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def side_by_side(ref: Callable[[], object], fn: Callable[[], object], repeats: int,
                 warmup: bool = True) -> tuple[float, float, float]:
    """Median seconds of ``ref`` and ``fn`` timed back to back per repeat, and the median of ``fn / ref``."""
    if warmup:
        ref(), fn()
    t_ref, t_fn, ratio = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_fn.append(t2 - t1)
        ratio.append((t2 - t1) / (t1 - t0))
    return statistics.median(t_ref), statistics.median(t_fn), statistics.median(ratio)
