"""DWARF speed: training steps/s and inference images/s against the bare VLM image forward pass.

Measured side by side in one process on the same CLIP image tower and batch: (a) the bare VLM
forward (``bundle.preprocess`` + ``clip_model.encode_image``), (b) DWARF inference (tower + query decoder + experts + maps at
image size), (c) one cyclic DWARF training step (forward, FP soft Dice + BCE, backward, AdamW).
Prints one JSON line with the figures and the ratios.

    python benchmarks/dwarf_bench.py                   # tiny ViT, 64 px, ~1 minute on 2 cores
    python benchmarks/dwarf_bench.py --clip ViT-B-16 --image-size 224 --batch-size 32 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.clip import load_clip  # noqa: E402
from training.dwarf.losses import DwarfLoss  # noqa: E402
from training.dwarf.model import build_dwarf  # noqa: E402

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax"]


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", default="cxr-tiny-vit", help="any spec of training.clip.load_clip")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bundle = load_clip(a.clip)
    bundle.model.to(dev).eval()
    model = build_dwarf(bundle, CLASSES).to(dev)
    size = model.encoder.native_size if a.image_size <= 0 else a.image_size
    x = torch.rand(a.batch_size, 1, size, size, device=dev)
    labels = (torch.rand(a.batch_size, len(CLASSES), device=dev) < 0.3).float()
    masks = (torch.rand(a.batch_size, len(CLASSES), size, size, device=dev) < 0.1).float()
    amp = dev.type == "cuda"

    @torch.no_grad()
    def vlm_forward():
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            bundle.model.encode_image(bundle.preprocess(x))  # same preprocessing as DWARF's encoder

    @torch.no_grad()
    def dwarf_infer():
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            model(x)

    loss_fn = DwarfLoss(lam=0.5).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    only = torch.zeros_like(labels)
    only[:, 0] = 1

    def dwarf_step():
        model.train()
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            out = model(x)
        loss = loss_fn(out.logits, labels, out.refined_maps, masks, cls_weight=only, seg_weight=only * labels)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.eval()

    model.eval()
    t_vlm = timed(vlm_forward, a.repeats, sync)
    t_inf = timed(dwarf_infer, a.repeats, sync)
    t_step = timed(dwarf_step, a.repeats, sync)
    figures = {
        "bench": "dwarf", "device": str(dev), "clip": a.clip, "image_size": size, "batch_size": a.batch_size,
        "classes": len(CLASSES),
        "vlm_forward_images_per_s": round(a.batch_size / t_vlm, 2),
        "dwarf_infer_images_per_s": round(a.batch_size / t_inf, 2),
        "dwarf_train_steps_per_s": round(1 / t_step, 3),
        "dwarf_train_images_per_s": round(a.batch_size / t_step, 2),
        "infer_ratio_dwarf_over_vlm": round(t_inf / t_vlm, 3),  # time ratio: >1 = DWARF slower
        "train_step_over_vlm_forward": round(t_step / t_vlm, 3),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
