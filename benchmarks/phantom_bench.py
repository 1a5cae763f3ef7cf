"""Phantom generation and Dataset pipeline throughput, measured side by side in one run.

Prints one JSON line: images/s of in-memory rendering, of ``generate_phantom`` (render + PNG +
manifest, with the requested workers), and of ``ManifestDataset`` item loading without and with
augmentation (single process), plus their ratios.

    python benchmarks/phantom_bench.py                       # 300 images at 224 px (~10 s)
    python benchmarks/phantom_bench.py --n 2000 --workers 2  # the issue's 2,000-image figure
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="images to generate")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--workers", type=int, default=None, help="generation processes (default: auto)")
    p.add_argument("--dataset-n", type=int, default=200, help="items to load through the Dataset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from training.data.dataset import ManifestDataset
    from training.data.phantom import generate_phantom, render_case

    torch.set_num_threads(1)
    n_render = min(args.n, 100)
    t0 = time.perf_counter()
    for i in range(n_render):
        render_case(args.seed, i, args.size)
    render_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = generate_phantom(tmp, n=args.n, size=args.size, seed=args.seed, workers=args.workers)
        gen_s = time.perf_counter() - t0
        k = min(args.dataset_n, args.n)
        rates = {}
        for name, aug in (("plain", False), ("augment", True)):
            ds = ManifestDataset(manifest, image_size=args.size, augment=aug)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            for i in range(k):
                ds[i]
            rates[name] = k / (time.perf_counter() - t0)

    out = {
        "benchmark": "phantom",
        "n": args.n, "size": args.size, "workers": args.workers, "cpus": os.cpu_count(),
        "render_img_per_s": round(n_render / render_s, 1),
        "generate_img_per_s": round(args.n / gen_s, 1),
        "generate_s": round(gen_s, 2),
        "dataset_img_per_s": round(rates["plain"], 1),
        "dataset_augment_img_per_s": round(rates["augment"], 1),
        "augment_cost_ratio": round(rates["plain"] / rates["augment"], 2),
        "generate_vs_render_ratio": round((args.n / gen_s) / (n_render / render_s), 2),
        "python": platform.python_version(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
