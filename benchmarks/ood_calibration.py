"""Out-of-distribution detector (:mod:`interpret.ood`): held-out false alarms and flagged foreign images.

Setup (all offline, deterministic on a fixed thread count):

1. a classifier (default ``test_resnet`` at 64 px) trained with :func:`training.train.fit` on a phantom
   data set (seed 0); ``--epochs 0`` keeps random weights;
2. its feature-layer GAP features on a *probing* phantom set (seed 1, other patients) fit and calibrate
   the detector (:func:`interpret.ood.fit_ood`, half each, split by patient);
3. the false-alarm rate is measured on a *held-out* phantom set (seed 1000, never used for fitting or
   calibration), with a Clopper-Pearson 95% interval; because the conformal bound is an average over
   calibration draws, the same is repeated on ``--probe-sets`` independent probing sets (seeds 1, 2,
   ...): mean rate with a 95% interval over sets, for the marginal rule (split by patient and by
   image) and the training-conditional rule (``confidence``);
4. foreign images go through the service's own input path (PNG bytes ->
   ``mlflow_projects.serving.images.decode_upload`` -> ``preprocess`` to the model's side): natural
   photos (scikit-image's astronaut, coffee, camera), blank images (all 0, all 1, constant grey), a CT
   slice (the Shepp-Logan phantom), and, for information only, an inverted (negative) phantom radiograph.

Prints one JSON line.

    .venv/bin/python benchmarks/ood_calibration.py                  # ~1 min on 2 cores
    .venv/bin/python benchmarks/ood_calibration.py --n-probe 40     # a small probing set
    .venv/bin/python benchmarks/ood_calibration.py --model resnet18 --epochs 0 --n-probe 40   # K = 512
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("ood_calibration")


@dataclass
class Config:
    model: str = "test_resnet"   # a training.models name
    image_size: int = 64
    n_train: int = 600           # phantom images (seed 0) for the classifier (its train/val splits)
    epochs: int = 4              # 0 = random weights
    n_probe: int = 200           # probing images per probing set (phantom seeds 1, 2, ...): fit + calibration
    probe_sets: int = 20         # independent probing sets (the conformal bound is an average over them)
    n_heldout: int = 2000        # held-out in-distribution images (phantom seed 1000)
    target: float = 0.05         # target false-alarm rate
    confidence: float = 0.9      # for the training-conditional variant also reported
    threads: int = 1
    seed: int = 0


# ---------------------------------------------------------------------------------- inputs
def _png_bytes(img: np.ndarray) -> bytes:
    """8-bit PNG bytes of a (H, W) grey or (H, W, 3) RGB image (uint8, or float in [0, 1])."""
    from PIL import Image

    if img.dtype != np.uint8:
        img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def service_input(png: bytes, size: int) -> np.ndarray:
    """(1, S, S) float32 [0, 1] exactly as the service feeds the model: decode, grey, resize."""
    from mlflow_projects.serving.images import decode_upload, preprocess

    return preprocess(decode_upload(png, max_pixels=50_000_000).pixels, size)


def ood_cases(size: int, phantom_image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Foreign images as model inputs ``{name: (1, S, S)}`` through :func:`service_input`.

    ``phantom_image`` (H, W) in [0, 1], when given, adds its negative as ``inverted_phantom``.
    """
    from skimage import data

    raw = {"natural_astronaut": data.astronaut(), "natural_coffee": data.coffee(),
           "natural_camera": data.camera(), "blank_zeros": np.zeros((256, 256), np.uint8),
           "blank_ones": np.full((256, 256), 255, np.uint8), "blank_grey": np.full((256, 256), 128, np.uint8),
           "ct_shepp_logan": data.shepp_logan_phantom()}
    if phantom_image is not None:
        raw["inverted_phantom"] = 1.0 - phantom_image
    return {k: service_input(_png_bytes(v), size) for k, v in raw.items()}


def phantom_images(folder: Path, n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``(images (n, 1, S, S), patient ids)`` of a phantom set written to disk and read back as the
    audit's probe reads them."""
    from torch.utils.data import DataLoader

    from training.data.dataset import ManifestDataset, collate
    from training.data.manifest import read_manifest
    from training.data.phantom import generate_phantom

    manifest = generate_phantom(folder / f"seed{seed}", n=n, size=size, seed=seed, workers=1)
    ds = ManifestDataset(manifest, image_size=size)
    patient = read_manifest(manifest).set_index("image_id")["patient_id"]
    batches = list(DataLoader(ds, batch_size=128, collate_fn=collate))
    ids = [str(i) for b in batches for i in b["image_id"]]
    return torch.cat([b["image"] for b in batches]), [str(patient[i]) for i in ids]


def train_classifier(cfg: Config, folder: Path):
    """``(model, seconds)``: the classifier, trained on phantom seed 0 (or random when epochs == 0)."""
    from training.data.phantom import generate_phantom
    from training.models import create_model
    from training.train import TrainConfig, fit, load_splits

    t0 = time.perf_counter()
    manifest = generate_phantom(folder / "train", n=cfg.n_train, size=cfg.image_size, seed=0, workers=1)
    train_ds, val_ds, _, classes = load_splits(manifest, cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, classes=classes)
    if cfg.epochs > 0:
        model = fit(model, train_ds, val_ds, TrainConfig(epochs=cfg.epochs, seed=cfg.seed, progress=False,
                                                         device="cpu")).model
    return model.eval(), time.perf_counter() - t0


def pooled_of(model, images: torch.Tensor) -> np.ndarray:
    """(N, K) GAP features through the audit's inference call."""
    from interpret.audit.sections import infer
    from interpret.ood import pooled_features

    return pooled_features(infer(model, images, batch_size=128)[1])


# ---------------------------------------------------------------------------------- statistics
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def _rates(flag_rates: list[float], target: float) -> dict:
    r = np.asarray(flag_rates)
    half = 1.96 * r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else float("nan")
    return {"mean": float(r.mean()), "mean_ci95": [float(r.mean() - half), float(r.mean() + half)],
            "sd": float(r.std(ddof=1)) if len(r) > 1 else 0.0, "max": float(r.max()),
            "share_at_or_below_target": float((r <= target).mean())}


def measure(cfg: Config) -> dict:
    from interpret.ood import fit_ood
    from training.runtime import deterministic

    with deterministic(cfg.seed, threads=cfg.threads), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, train_s = train_classifier(cfg, tmp)
        held, _ = phantom_images(tmp, cfg.n_heldout, cfg.image_size, seed=1000)
        probes = []  # independent probing sets: phantom seeds 1..probe_sets (other patients each)
        for s in range(1, cfg.probe_sets + 1):
            im, patients = phantom_images(tmp, cfg.n_probe, cfg.image_size, seed=s)
            probes.append((pooled_of(model, im), patients))
        cases = ood_cases(cfg.image_size, phantom_image=held[0, 0].numpy())
        f_held = pooled_of(model, held)
        f_cases = pooled_of(model, torch.from_numpy(np.stack(list(cases.values()))))
    layer = model.feature_layer

    # the detector the audit would store: first probing set, split by patient, marginal guarantee
    f_probe, patients = probes[0]
    det = fit_ood(f_probe, layer=layer, target_false_alarm=cfg.target, seed=cfg.seed, groups=patients)
    held_flags = det.flags(f_held)
    k, n = int(held_flags.sum()), len(held_flags)
    case_scores = det.score(f_cases)

    # the guarantee is over calibration draws: one detector per independent probing set
    rules = {"marginal_by_patient": dict(groups=True), "marginal_by_image": dict(groups=False),
             f"conditional_c{cfg.confidence:g}_by_patient": dict(groups=True, confidence=cfg.confidence)}
    over_sets = {}
    for name, kw in rules.items():
        rates, all_flagged, ratios = [], [], []
        for fp, pats in probes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # too few calibration images for c: reported as calibrated
                d = fit_ood(fp, layer=layer, target_false_alarm=cfg.target, seed=cfg.seed,
                            groups=pats if kw["groups"] else None, confidence=kw.get("confidence"))
            rates.append(float(d.flags(f_held).mean()))
            all_flagged.append(bool(d.flags(f_cases).all()))
            ratios.append(float((d.score(f_cases) / d.threshold).min()))
        over_sets[name] = {**_rates(rates, cfg.target), "calibrated": d.calibrated,
                           "share_sets_all_cases_flagged": float(np.mean(all_flagged)),
                           "min_case_score_over_threshold": float(np.min(ratios))}

    one = f_held[:1]
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        det.score(one)
    score_us = (time.perf_counter() - t0) / reps * 1e6
    held_scores = det.score(f_held)

    return {
        "config": asdict(cfg), "model": cfg.model, "trained": cfg.epochs > 0, "train_s": round(train_s, 1),
        "num_features": det.num_features, "detector": det.to_dict(),
        "heldout_false_alarm": k / n, "heldout_false_alarm_ci95": clopper_pearson(k, n), "heldout_n": n,
        "heldout_flagged": k,
        "heldout_score_quantiles": {q: float(np.quantile(held_scores, float(q))) for q in ("0.5", "0.95", "1.0")},
        "over_probe_sets": {"n_sets": cfg.probe_sets, **over_sets},
        "cases": {name: {"score": float(s), "flagged": bool(s > det.threshold),
                         "score_over_threshold": float(s / det.threshold)}
                  for name, s in zip(cases, case_scores)},
        "score_one_image_us": round(score_us, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f, v in asdict(Config()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    cfg = Config(**vars(p.parse_args(argv)))
    logging.basicConfig(level=logging.WARNING)
    out = measure(cfg)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
