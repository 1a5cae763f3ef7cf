"""Benchmark of interpret: attention-map and dissection throughput against a plain forward pass.

Prints one JSON line with figures measured side by side in one run: every repeat times the reference
(a forward pass) and the method back to back, and each ratio is the median over ``repeats`` (>= 5) of
the per-repeat ratios, so load from other processes hits both sides alike:

- ``forward_images_per_s``: ``model(x)`` under ``torch.no_grad`` in eval mode, same batch;
- ``cam|gradcam|gradcampp_maps_per_s`` and ``*_vs_forward`` (time ratio; CAM must be <= 1.1,
  Grad-CAM <= 2.0: one forward, one backward down to the explained layer only);
- dissection, throughput ratios to the forward pass over the same images (>= 0.8 is the target):
  ``dissection_vs_forward_throughput`` counts from the layer's precomputed maps as the audit does
  (``dissect_activations``, exact quantile: upsampling, thresholding, one labelling call per image);
  ``dissection_exact_loader_vs_forward_throughput`` is ``dissect(quantile="exact")`` from a loader (one
  forward pass + counting); ``dissection_streaming_vs_forward_throughput`` is the bounded-memory
  ``quantile="histogram"`` path, three passes over the data (min/max, histogram, counting), so at most
  1/3 by construction;
- memory: the size full upsampled maps (N x C x H x W float32) of a probing set 10x larger than this
  machine's RAM would need, against the peak RSS of the streaming dissection measured in fresh
  processes on ``n`` and ``2n`` images (the streaming path's memory does not grow with N).

Run: ``python benchmarks/interpret_bench.py`` (about a minute on 2 CPU cores);
``--model densenet121 --image-size 224 --batch 16`` for the paper setting.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import side_by_side  # noqa: E402

logger = logging.getLogger("interpret_bench")


@dataclass
class Config:
    model: str = "resnet18"          # a training.models name
    image_size: int = 96
    batch: int = 8
    classes: int = 4
    repeats: int = 5                 # timed repeats per method (median of ratios)
    dissect_images: int = 16         # probing images for the dissection throughput
    rss_images: int = 8              # n for the RSS probe (also run with 2n)
    q: float = 0.01
    threads: int = 2
    seed: int = 0


class Probe(Dataset):
    """Random grey images with 1-3 random boxes each (in memory, no disk)."""

    def __init__(self, n: int, size: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, size, size, generator=g)
        self.boxes, self.labels = [], []
        for _ in range(n):
            k = int(torch.randint(1, 4, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * size * 0.7
            wh = (0.1 + torch.rand(k, 2, generator=g) * 0.2) * size
            self.boxes.append(torch.cat([xy, xy + wh], 1))
            self.labels.append(torch.randint(0, classes, (k,), generator=g))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "boxes": self.boxes[i], "box_labels": self.labels[i],
                "image_id": str(i)}


def collate(batch):
    return {"image": torch.stack([b["image"] for b in batch]),
            "boxes": [b["boxes"] for b in batch], "box_labels": [b["box_labels"] for b in batch],
            "image_id": [b["image_id"] for b in batch]}


def build_model(cfg: Config):
    from training.models import create_model

    model = create_model(cfg.model, num_classes=cfg.classes, image_size=cfg.image_size)
    return model.eval()


def rss_probe(cfg: Config, n: int) -> int:
    """Peak RSS (bytes) of a fresh process running the streaming dissection on ``n`` images."""
    out = subprocess.run([sys.executable, __file__, "--_rss-probe", str(n),
                          "--config", json.dumps(asdict(cfg))],
                         capture_output=True, text=True, check=True, cwd=str(ROOT))
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def _rss_child(cfg: Config, n: int) -> None:
    from interpret.dissection import dissect

    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    loader = DataLoader(Probe(n, cfg.image_size, cfg.classes, cfg.seed), cfg.batch,
                        collate_fn=collate)
    # the probe's images themselves are N x S x S floats: subtract them to see the pipeline's own
    dissect(model, loader, classes=[f"c{i}" for i in range(cfg.classes)], q=cfg.q,
            quantile="histogram", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak - n * cfg.image_size ** 2 * 4}))


def run(cfg: Config) -> dict:
    from interpret.attention import get_method
    from interpret.dissection import dissect, dissect_activations

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    x = torch.rand(cfg.batch, 1, cfg.image_size, cfg.image_size)
    targets = torch.arange(cfg.batch) % cfg.classes

    def forward():
        with torch.no_grad():
            model(x)

    res: dict = {"benchmark": "interpret", "config": asdict(cfg)}
    fwd_times = []
    for name in ("cam", "gradcam", "gradcampp"):
        method = get_method(name, model)
        t_fwd, t, ratio = side_by_side(forward, lambda: method(x, targets), cfg.repeats)
        fwd_times.append(t_fwd)
        res[f"{name}_maps_per_s"] = round(cfg.batch / t, 2)
        res[f"{name}_vs_forward"] = round(ratio, 3)
    res["forward_images_per_s"] = round(cfg.batch / statistics.median(fwd_times), 2)
    res["cam_within_1.1x_forward"] = res["cam_vs_forward"] <= 1.1
    res["gradcam_within_2x_forward"] = res["gradcam_vs_forward"] <= 2.0

    probe = Probe(cfg.dissect_images, cfg.image_size, cfg.classes, cfg.seed)
    loader = DataLoader(probe, cfg.batch, collate_fn=collate)
    names = [f"c{i}" for i in range(cfg.classes)]
    layer = model.feature_layer
    feats = []

    def fwd_all():
        feats.clear()
        with torch.no_grad():
            for b in loader:
                feats.append(model.forward_features(b["image"]))

    fwd_all()
    acts = torch.cat(feats)
    boxes = [probe.boxes[i] for i in range(len(probe))]
    labels = [probe.labels[i] for i in range(len(probe))]
    out = {}

    def count():                                           # the audit's way: maps already computed
        out["dis"] = dissect_activations(acts, boxes, labels, names, cfg.image_size, q=cfg.q,
                                         batch_size=cfg.batch)

    n = cfg.dissect_images
    t_fwd_all, t_dis, ratio = side_by_side(fwd_all, count, cfg.repeats)
    res["dissection_forward_images_per_s"] = round(n / t_fwd_all, 2)
    res["dissection_images_per_s"] = round(n / t_dis, 2)
    res["dissection_vs_forward_throughput"] = round(1 / ratio, 3)
    for mode in ("exact", "histogram"):
        _, t_m, ratio_m = side_by_side(
            fwd_all, lambda: dissect(model, loader, layer=layer, classes=names, q=cfg.q,
                                     quantile=mode, progress=False), cfg.repeats)
        key = "exact_loader" if mode == "exact" else "streaming"
        res[f"dissection_{key}_images_per_s"] = round(n / t_m, 2)
        res[f"dissection_{key}_vs_forward_throughput"] = round(1 / ratio_m, 3)
    dis = out["dis"]
    res["dissection_overall"] = {k: (round(v, 3) if isinstance(v, float) else v)
                                 for k, v in dis.overall.items()}

    # memory: full maps of a set 10x larger than RAM would hold, vs the streaming path's peak RSS
    with torch.no_grad():
        C = model.forward_features(x[:1]).shape[1]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_image = C * cfg.image_size ** 2 * 4
    n_virtual = int(10 * ram // per_image) + 1
    n = cfg.rss_images
    rss1, rss2 = rss_probe(cfg, n), rss_probe(cfg, 2 * n)
    res["memory"] = {
        "ram_bytes": ram, "units": C, "full_maps_bytes_per_image": per_image,
        "probe_images_for_10x_ram": n_virtual,
        "full_maps_bytes_for_that_set": n_virtual * per_image,
        "full_maps_vs_ram": round(n_virtual * per_image / ram, 2),
        "streaming_peak_rss_n": rss1, "streaming_peak_rss_2n": rss2, "n": n,
        "streaming_rss_growth_per_image": round((rss2 - rss1) / n),
        "streaming_peak_rss_vs_ram": round(max(rss1, rss2) / ram, 4),
    }
    return res


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    for f, v in asdict(d).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--_rss-probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._rss_probe is not None:
        _rss_child(Config(**json.loads(args.config)), args._rss_probe)
        return None
    cfg = Config(**{f: getattr(args, f) for f in asdict(d)})
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logger.info("config %s", asdict(cfg))
    res = run(cfg)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
