"""MAMMI annotation at scale: vectorised ``interpret.annotation`` vs a straightforward per-unit loop.

Cached embeddings are emulated by random L2-normalised image (N, d) and concept (M, d) embeddings written
to and memory-mapped back from ``.npy`` files; pooled activations (N, U) are Gaussian, so MAMMI's
adaptive threshold selects the far tail (a few to a few dozen images per unit), as for real units.
Both implementations use the same inputs; scores must agree to 1e-5 and the selected concepts exactly.

The floor is what scoring cannot avoid: the two matrix products ``(U x N) . (N x d)`` (the selection,
as a float matrix precomputed outside the timing, times the image embeddings) and ``(U x d) . (d x M)``
(the mean embeddings times the concept embeddings), timed alone. Scoring and floor are timed back to
back in every repeat; ``scoring_vs_floor`` is the median over ``--repeats`` (>= 5) of the per-repeat
ratios (target <= 1.5).

Prints one JSON line: seconds for each, the ratios, the speed-up over the loop (timed once), max
|difference|, peak resident memory of each phase (VmHWM, reset between phases where the kernel allows it). ``--loop-units K`` runs the loop on K
units only (``loop_s`` is then scaled to all units).

    python benchmarks/concept_bench.py                 # reduced default, 512 x 2,000 x 20,000 (2 cores)
    python benchmarks/concept_bench.py --full          # 1,024 units x 5,000 concepts x 50,000 images
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from interpret.annotation import concept_scores, select_concepts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import side_by_side  # noqa: E402


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loop_mammi(acts: torch.Tensor, v: torch.Tensor, t: torch.Tensor, tem: torch.Tensor,
               alpha: float = 0.93) -> torch.Tensor:
    """The formula written per unit: select, cosines to every concept and the template, mean."""
    out = torch.empty(acts.shape[1], t.shape[0])
    for i in range(acts.shape[1]):
        a = acts[:, i]
        hi, lo = a.max(), a.min()
        tau = hi - (1 - alpha) * (hi - lo)
        sel = (a > tau) | (a == hi)
        vo = v[sel]  # (n_i, d)
        out[i] = (vo @ t.T - (vo @ tem)[:, None]).mean(0)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--concepts", type=int, default=2000)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--alpha", type=float, default=0.93)
    p.add_argument("--full", action="store_true", help="the issue's size: 1024 x 5000 x 50000")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=5, help="side-by-side repeats (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    p.add_argument("--loop-units", type=int, default=0,
                   help="run the per-unit loop reference on the first K units only (0: all; speedup extrapolated)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.full:
        args.units, args.concepts, args.images = 1024, 5000, 50000
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "images.npy", F.normalize(torch.randn(args.images, args.dim, generator=g), dim=1).numpy())
        np.save(Path(tmp) / "concepts.npy", F.normalize(torch.randn(args.concepts, args.dim, generator=g), dim=1).numpy())
        v = torch.from_numpy(np.array(np.load(Path(tmp) / "images.npy", mmap_mode="r")))
        t = torch.from_numpy(np.array(np.load(Path(tmp) / "concepts.npy", mmap_mode="r")))
    tem = F.normalize(torch.randn(args.dim, generator=g), dim=0)
    acts = torch.randn(args.images, args.units, generator=g)
    cpu = (v, t, tem, acts)
    v, t, tem, acts = (x.to(args.device) for x in cpu)
    sync = torch.cuda.synchronize if v.is_cuda else (lambda: None)
    base = _peak_mib()

    from interpret.annotation.mammi import adaptive_representatives

    sel = adaptive_representatives(acts, args.alpha).float()                      # (U, N), not timed

    def floor():
        out = (sel @ v) @ t.T                                                       # (U, d) . (d, M)
        sync()
        return out

    def scoring():
        out = concept_scores("mammi", acts, v, t, tem, alpha=args.alpha)
        sync()
        return out

    resettable = _reset_peak()
    fast = scoring()
    peak_fast = _peak_mib()
    floor()
    t_floor, t_fast, ratio = side_by_side(floor, scoring, args.repeats, warmup=False)
    fast = fast.cpu()
    v, t, tem, acts = cpu                                                           # the loop on the CPU

    _reset_peak()
    t0 = time.perf_counter()
    k = args.loop_units if 0 < args.loop_units < args.units else args.units
    slow = loop_mammi(acts[:, :k], F.normalize(v, dim=1),
                      F.normalize(t, dim=1), tem, args.alpha)
    t_slow = (time.perf_counter() - t0) * args.units / k
    peak_loop = _peak_mib()
    fast = fast[:k]

    diff = float((fast - slow).abs().max())
    same_sel = select_concepts(fast) == select_concepts(slow)
    sizes = acts.numel() * 4 + v.numel() * 4 + t.numel() * 4
    out = {
        "bench": "concept_bench", "units": args.units, "concepts": args.concepts, "images": args.images,
        "dim": args.dim, "alpha": args.alpha, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "vectorised_s": round(t_fast, 3),
        "floor_s": round(t_floor, 3),
        "scoring_vs_floor": round(ratio, 3),
        "scoring_within_1.5x_floor": ratio <= 1.5,
        "loop_units": k, "loop_s": round(t_slow, 3), "speedup": round(t_slow / t_fast, 1),
        "max_abs_diff": diff, "allclose_1e-5": bool(torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)),
        "same_selection": bool(same_sel),
        "mean_representatives": float(((acts > acts.amax(0) - (1 - args.alpha) * (acts.amax(0) - acts.amin(0)))
                                       | (acts == acts.amax(0))).sum(0).float().mean()),
        "inputs_mib": round(sizes / 2 ** 20, 1), "rss_before_mib": round(base, 1),
        "peak_rss_vectorised_mib": round(peak_fast, 1), "peak_rss_loop_mib": round(peak_loop, 1),
        "peak_reset_between_phases": resettable,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
