"""The bootstrap's memory does not grow with N: resamples are handed to the statistic in sub-blocks of at most
``_CHUNK_ELEMENTS`` indices, with exactly the resamples (and the generator state) of whole draw blocks."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import interpret.stats as stats


def _whole_blocks(n, n_resamples, seed, strata):
    """The draws as made before sub-blocks existed: one call per stratum per draw block."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    groups = [g for g in stats._groups(strata, n) if len(g)]
    block = max(1, min(n_resamples, stats._BLOCK_ELEMENTS // max(n, 1)))
    out, done = [], 0
    while done < n_resamples:
        r = min(block, n_resamples - done)
        parts = [g[rng.integers(0, len(g), size=(r, len(g)))] for g in groups]
        out.append(np.concatenate(parts, axis=1) if parts else np.zeros((r, 0), dtype=np.int64))
        done += r
    return np.concatenate(out), rng


@pytest.mark.parametrize("n", [1, 2, 57, 2500])
@pytest.mark.parametrize("kind", ["none", "binary", "four"])
@pytest.mark.parametrize("max_elements", [1, 100, 5000, None])
def test_sub_blocks_are_the_same_resamples(n, kind, max_elements):
    rng = np.random.default_rng(n)
    strata = None if kind == "none" else rng.integers(0, 2 if kind == "binary" else 4, n)
    want, want_rng = _whole_blocks(n, 1000, np.random.default_rng(7), strata)
    gen = np.random.default_rng(7)
    blocks = list(stats.resample_indices(n, 1000, gen, strata, max_elements))
    got = np.concatenate(blocks)
    assert got.shape == (1000, n) and np.array_equal(got, want)
    assert gen.bit_generator.state == want_rng.bit_generator.state  # a caller's generator ends where it did
    if max_elements is not None:
        assert max(b.size for b in blocks) <= max(n, max_elements)


def test_the_statistic_sees_bounded_blocks_and_the_interval_is_unchanged(monkeypatch):
    rng = np.random.default_rng(0)
    n = 3000
    y, s = rng.integers(0, 2, n), rng.random(n)
    s[:200] = 0.5  # ties
    seen = []

    def rows(yy, ss):
        seen.append(yy.size)
        return stats._auroc_rows(yy, ss)

    got = stats.bootstrap_ci(rows, y, s, strata=y, vectorized=True, seed=3)
    assert max(seen[1:]) <= stats._CHUNK_ELEMENTS  # seen[0] is the point estimate on all rows
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1 << 40)  # whole draw blocks, as before
    assert stats.bootstrap_ci(stats._auroc_rows, y, s, strata=y, vectorized=True, seed=3) == got
    for f in (stats.auroc_ci, stats.ap_ci):
        chunked = f(y, s, seed=1)
        monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1 << 17)
        assert f(y, s, seed=1) == chunked
        monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1 << 40)


def test_peak_memory_of_a_ci_does_not_grow_with_n():
    rng = np.random.default_rng(1)
    peaks = {}
    for n in (1000, 10000):
        y, s = rng.integers(0, 2, n), rng.random(n)
        tracemalloc.start()
        try:
            stats.auroc_ci(y, s, n_resamples=1000)
            stats.ap_ci(y, s, n_resamples=1000)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # whole blocks: 93 MB at 1,000 rows, 194 MB at 10,000 (a few (r, N) float64 arrays of 1-2 M entries)
    assert peaks[10000] < 32 * 2**20, peaks
    assert peaks[10000] - peaks[1000] < 4 * 2**20, peaks


def test_max_elements_must_be_positive():
    with pytest.raises(ValueError, match="max_elements"):
        list(stats.resample_indices(10, 5, 0, None, 0))
