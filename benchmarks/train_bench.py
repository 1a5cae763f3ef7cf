"""Training and inference throughput of the classifier stack, measured side by side in one run.

Prints one JSON line:
- ``train_ratio``: images/s of :func:`training.train.fit` (train phase only, its own per-epoch timer)
  over a plain PyTorch loop (Adam + BCE, same model init, data, batch size, epochs); >= 0.9 expected;
- ``onnx_ratio``: ONNX Runtime images/s over eager PyTorch (no_grad, eval) on the same batches.

    .venv/bin/python benchmarks/train_bench.py                     # small default, ~1 min on 2 cores
    .venv/bin/python benchmarks/train_bench.py --arch resnet18 --size 128 --n 512 --epochs 2
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
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.export import export_onnx, onnx_session  # noqa: E402
from training.models import create_model  # noqa: E402
from training.train import TrainConfig, fit  # noqa: E402


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "labels": self.labels[i]}


def plain_loop(model, images, labels, batch_size: int, epochs: int, seed: int) -> float:
    """Images/s of a textbook loop (shuffled DataLoader, Adam, BCE-with-logits)."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, generator=g,
                        drop_last=len(images) > batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4, weight_decay=1e-6)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            seen += len(x)
    return seen / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="test_resnet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=256, help="training images")
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--infer-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    g = torch.Generator().manual_seed(a.seed)
    images = torch.rand(a.n, 1, a.size, a.size, generator=g)
    labels = (torch.rand(a.n, a.classes, generator=g) < 0.2).float()
    val_images, val_labels = images[: max(16, a.n // 8)], labels[: max(16, a.n // 8)]
    classes = [f"c{i}" for i in range(a.classes)]

    torch.manual_seed(a.seed)
    init = create_model(a.arch, classes=classes, image_size=a.size).state_dict()

    def fresh():
        m = create_model(a.arch, classes=classes, image_size=a.size)
        m.load_state_dict(init)
        return m

    plain_ips = plain_loop(fresh(), images, labels, a.batch_size, a.epochs, a.seed)
    result = fit(fresh(), _Tensors(images, labels), _Tensors(val_images, val_labels),
                 TrainConfig(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, progress=False, device="cpu"))
    ours_ips = float(np.mean([h["train_images_per_s"] for h in result.history]))
    plain_ips_after = plain_loop(fresh(), images, labels, a.batch_size, a.epochs, a.seed)  # load drift check
    plain = (plain_ips + plain_ips_after) / 2

    model = result.model.eval()
    batch = torch.rand(a.batch_size, 1, a.size, a.size, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        sess = onnx_session(export_onnx(model, Path(tmp) / "m.onnx", image_size=a.size),
                            threads=torch.get_num_threads())
        feed = {"images": batch.numpy()}
        sess.run(None, feed)
        with torch.no_grad():
            model(batch)
            t0 = time.perf_counter()
            for _ in range(a.infer_batches):
                model.forward_all(batch)
            eager = a.infer_batches * a.batch_size / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(a.infer_batches):
            sess.run(None, feed)
        onnx_ips = a.infer_batches * a.batch_size / (time.perf_counter() - t0)

    out = {"bench": "train", "arch": a.arch, "size": a.size, "n": a.n, "epochs": a.epochs,
           "batch_size": a.batch_size, "threads": torch.get_num_threads(),
           "ours_train_images_per_s": round(ours_ips, 1), "plain_train_images_per_s": round(plain, 1),
           "train_ratio": round(ours_ips / plain, 3),
           "eager_images_per_s": round(eager, 1), "onnx_images_per_s": round(onnx_ips, 1),
           "onnx_ratio": round(onnx_ips / eager, 3)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
