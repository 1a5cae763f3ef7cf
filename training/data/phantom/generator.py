"""The phantom generator: what each case holds (labels, patient, split), rendering it, and writing a data set.

Image ``i`` depends only on ``(seed, i)``: every part draws from its own stream
``numpy.random.SeedSequence([seed, i, stream])`` (pose/exposure 2, textures 3, findings 4, devices 5,
report 6, shortcut 7; the patient's anatomy from the patient key, stream 1), so findings never change
anatomy noise, generation can run in parallel and any subset can be re-rendered.
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.phantom.anatomy import _anatomy_layers, _compose, _heart, _sample_anatomy
from training.data.phantom.artefacts import (SHORTCUT_P_NEG, SHORTCUT_P_POS, _draw_marker_and_devices,
                                             _draw_shortcut_tag)
from training.data.phantom.canvas import _Canvas, _rng
from training.data.phantom.findings import draw_findings as _draw_findings
from training.data.reports_phantom import Finding, write_report
from training.data.schema import PHANTOM_CLASSES

logger = logging.getLogger("training.data.phantom")

__all__ = ["PhantomCase", "render_case", "generate_phantom", "PREVALENCE", "MIN_SIZE", "MAX_SIZE",
           "case_row"]

MIN_SIZE, MAX_SIZE = 64, 1024

# Target marginal prevalence per class (NIH ChestX-ray14 is the model: Infiltration most common,
# Hernia rare); about half of the images have no finding.
PREVALENCE: dict[str, float] = {
    "Infiltration": 0.18,
    "Effusion": 0.12,
    "Atelectasis": 0.10,
    "Nodule": 0.06,
    "Mass": 0.05,
    "Pneumothorax": 0.05,
    "Consolidation": 0.045,
    "Cardiomegaly": 0.035,
    "Hernia": 0.005,
}
P_NO_FINDING = 0.5
_MASK_LEVEL = 0.5 / 255.0  # a finding "drew" a pixel where it changes it by >= half an 8-bit level
_PATIENT_PAIR_P = 0.2
_SPLIT_TABLE = ["train"] * 14 + ["val"] * 3 + ["test"] * 3



def _abnormal_rates() -> np.ndarray:
    """Per-class Bernoulli rates q for abnormal images (redrawn until one is positive) such that the
    marginal prevalence is ``PREVALENCE``: ``P_abn * q_c / P(any | q) = target_c`` (fixed point)."""
    t = np.array([PREVALENCE[c] for c in PHANTOM_CLASSES])
    q = t / (1 - P_NO_FINDING)
    for _ in range(200):
        p_any = 1 - np.prod(1 - q)
        q = np.clip(t * p_any / (1 - P_NO_FINDING), 0, 0.95)
    return q


_Q = _abnormal_rates()


@dataclass
class PhantomCase:
    """One rendered phantom radiograph and everything known about it.

    Attributes:
        image: (S, S) float32 in [0, 1], bright = dense.
        labels: positive classes, unique, in ``PHANTOM_CLASSES`` order (empty = no finding).
        boxes: one dict per finding instance ``{label, x, y, w, h}`` in pixels; the box covers pixel
            columns ``x .. x + w - 1`` and rows ``y .. y + h - 1`` and equals the bounding box of
            the instance mask.
        instance_masks: (S, S) bool per box, the pixels that instance changed.
        masks: class name -> (S, S) bool union of its instance masks.
        findings: structured description of each instance (side, zone, size) used by the report.
        report: free-text report.
        meta: non-finding variation (view, patient scale/rotation, exposure, noise, devices,
            marker letter/corner/box, cardiothoracic ratio, gastric bubble) for shortcut audits.
        image_id, patient_id, split, view: manifest fields.
    """

    image: np.ndarray
    labels: list[str]
    boxes: list[dict]
    instance_masks: list[np.ndarray]
    masks: dict[str, np.ndarray]
    findings: list[Finding]
    report: str
    meta: dict
    image_id: str
    patient_id: str
    split: str
    view: str



# ---- what a case holds --------------------------------------------------------------------------
def _split_of(seed: int, group: int) -> str:
    perm = _rng(seed, 0xFFFF).permutation(20)
    return _SPLIT_TABLE[perm[group % 20]]


def _patient_of(seed: int, index: int) -> tuple[str, int]:
    """Patient id and the patient-level key for image ``index`` (pairs 2g, 2g+1 share 20 % of the time)."""
    g = index // 2
    paired = _rng(seed, g, 7).random() < _PATIENT_PAIR_P
    if paired:
        return f"phantom_p{g:06d}", g * 2
    return f"phantom_p{g:06d}_{index % 2}", index * 2 + 1


def _sample_labels(rng) -> list[str]:
    if rng.random() < P_NO_FINDING:
        return []
    while True:
        hits = rng.random(len(PHANTOM_CLASSES)) < _Q
        if hits.any():
            return [c for c, h in zip(PHANTOM_CLASSES, hits) if h]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    return int(size)


def _check_shortcut(shortcut: str | None) -> str | None:
    from training.data.schema import PHANTOM_CLASSES as classes

    if shortcut is not None and shortcut not in classes:
        raise ValueError(f"unknown shortcut class {shortcut!r}; valid: {', '.join(classes)}")
    return shortcut



# ---- rendering and writing ----------------------------------------------------------------------
def _render(seed: int, index: int, size: int, draw_findings: bool = True,
            shortcut: str | None = None) -> PhantomCase:
    size = _check_size(size)
    shortcut = _check_shortcut(shortcut)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    patient_id, pkey = _patient_of(seed, index)
    an = _sample_anatomy(_rng(seed, pkey, 1))
    r_img = _rng(seed, index, 2)      # pose, exposure, view
    r_tex = _rng(seed, index, 3)      # textures and noise
    r_find = _rng(seed, index, 4)     # labels and finding geometry
    r_dev = _rng(seed, index, 5)      # devices and marker
    r_txt = _rng(seed, index, 6)      # report wording

    view = "AP" if r_img.random() < 0.2 else "PA"
    scale = float(r_img.uniform(0.86, 1.04))
    angle = float(r_img.uniform(-5, 5))
    shift = (float(r_img.uniform(-0.03, 0.03)), float(r_img.uniform(-0.03, 0.03)))
    contrast, bright, gamma = (float(r_img.uniform(0.8, 1.25)), float(r_img.uniform(-0.06, 0.06)),
                               float(r_img.uniform(0.8, 1.2)))
    noise_sd = float(r_img.uniform(0.006, 0.022))
    cv = _Canvas(size, scale, angle, shift)
    lungs, markings = _anatomy_layers(cv, an, r_tex)
    noise = (noise_sd * r_tex.standard_normal((size, size))).astype(np.float32)

    labels = _sample_labels(r_find)
    found, ctr, _ = _draw_findings(r_find, cv, an, labels, lungs, markings)  # lift: drawn by the atelectasis layer
    if not draw_findings:
        found, ctr = [], an.ctr
    heart_n = _heart(cv, an, an.ctr)
    heart = _heart(cv, an, ctr) if ctr != an.ctr else heart_n
    # the atelectasis layer already accounts for the lung lost to the raised dome, so compose with
    # the unlifted lungs; cardiomegaly replaces the heart layer
    base = _compose(cv, an, lungs, markings, heart)

    boxes, inst, kept = [], [], []
    density = base
    for f, layer in found:
        if layer is None:  # cardiomegaly: drawn = the enlarged heart shadow
            mask = heart > 0
        else:
            density = density + layer
            mask = np.abs(layer) * contrast >= _MASK_LEVEL
        bb = _bbox(mask)
        if bb is None:  # pragma: no cover - nothing visible (should not happen at >= 64 px)
            continue
        boxes.append({"label": f.label, "x": float(bb[0]), "y": float(bb[1]),
                      "w": float(bb[2]), "h": float(bb[3])})
        inst.append(mask)
        kept.append(f)

    overlay, dmeta = _draw_marker_and_devices(r_dev, cv, view)
    img = np.clip(density, 0, 1) ** gamma
    img = (img - 0.5) * contrast + 0.5 + bright + noise
    img = np.maximum(img, overlay)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    labels_out = [c for c in PHANTOM_CLASSES if any(f.label == c for f in kept)]
    tag_box = None
    if shortcut is not None:
        # planted shortcut: a tag that co-occurs with `shortcut` (90%) and rarely without it (5%)
        p_tag = SHORTCUT_P_POS if shortcut in labels_out else SHORTCUT_P_NEG
        if _rng(seed, index, 7).random() < p_tag:
            tag, tag_box = _draw_shortcut_tag(size)
            img = np.maximum(img, tag)
    masks = {}
    for f, m in zip(kept, inst):
        masks[f.label] = masks[f.label] | m if f.label in masks else m.copy()
    report = write_report(kept, dmeta["devices"], view, r_txt)
    thw = 2 * an.lx + an.lrx * 1.94
    meta = {
        "view": view, "scale": scale, "rotation_deg": angle, "shift": list(shift),
        "contrast": contrast, "brightness": bright, "gamma": gamma, "noise_sd": noise_sd,
        "ctr": float(ctr), "thoracic_width_px": float(thw * scale * size),
        "gastric_bubble": an.bubble, **dmeta,
        "shortcut": {"class": shortcut, "box": tag_box},
    }
    return PhantomCase(
        image=img, labels=labels_out, boxes=boxes, instance_masks=inst, masks=masks, findings=kept,
        report=report, meta=meta, image_id=f"phantom_{index:06d}", patient_id=patient_id,
        split=_split_of(seed, index // 2), view=view,
    )


def render_case(seed: int = 0, index: int = 0, size: int = 224,
                shortcut: str | None = None) -> PhantomCase:
    """Render one phantom case in memory.

    The case depends only on ``(seed, index, size)``; the anatomy of the patient is shared with the
    paired image when the pair ``(2g, 2g + 1)`` belongs to one patient.

    Args:
        seed: data-set seed.
        index: image index within the data set (>= 0).
        size: image side in pixels, 64 to 1024.
        shortcut: a class name to plant a shortcut for: a bright square tag at the right edge
            (outside the thorax) drawn on 90% of the images positive for that class and 5% of the
            others; ``meta["shortcut"]["box"]`` gives its box. ``None`` (default) plants nothing.

    Returns:
        A :class:`PhantomCase` (image (S, S) float32 in [0, 1], labels, tight boxes, masks, report,
        meta).

    Raises:
        ValueError: ``size`` outside [64, 1024], a negative ``index`` or an unknown ``shortcut``.

    Example:
        >>> c = render_case(0, 5, 64)
        >>> c.image.shape
        (64, 64)
    """
    return _render(seed, index, size, shortcut=shortcut)


def case_row(case: PhantomCase, path: str) -> dict:
    """The manifest row (DESIGN.md schema) of a rendered case stored at ``path``."""
    size = case.image.shape[0]
    return {
        "image_id": case.image_id, "path": path, "patient_id": case.patient_id, "split": case.split,
        "view": case.view, "labels": list(case.labels), "boxes": [dict(b) for b in case.boxes],
        "width": size, "height": size, "report": case.report, "source": "phantom",
    }


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_one(args) -> dict:
    seed, index, size, out_dir, masks, shortcut = args
    case = _render(seed, index, size, shortcut=shortcut)
    out = Path(out_dir)
    rel = f"images/{case.image_id}.png"
    (out / rel).write_bytes(_png_bytes(np.round(case.image * 255).astype(np.uint8)))
    row = case_row(case, rel)
    if masks:
        paths = {}
        for label, m in case.masks.items():
            mrel = f"masks/{case.image_id}__{label}.png"
            (out / mrel).write_bytes(_png_bytes(m.astype(np.uint8) * 255))
            paths[label] = mrel
        row["_mask_paths"] = paths
    m = case.meta
    row["_meta"] = {"image_id": case.image_id, "marker_box": m["marker"]["box"],
                    "marker_letter": m["marker"]["letter"],
                    "devices": [d["kind"] for d in m["devices"]],
                    "shortcut_box": m["shortcut"]["box"]}
    return row


def generate_phantom(out_dir: str | os.PathLike, n: int = 2000, size: int = 224, seed: int = 0,
                     masks: bool = False, workers: int | None = None,
                     shortcut: str | None = None) -> Path:
    """Generate a phantom data set on disk.

    Writes ``out_dir/images/{image_id}.png`` (8-bit grey), optionally ``out_dir/masks/
    {image_id}__{label}.png`` (per-class union masks, 0/255) and ``out_dir/manifest.parquet`` through
    :func:`training.data.schema.write_manifest` (source ``phantom``, relative image paths, patient-wise
    train/val/test split, view, labels, boxes in pixels, width/height, report).

    Args:
        out_dir: output folder (created).
        n: number of images (>= 1).
        size: image side in pixels, 64 to 1024.
        seed: data-set seed; the same seed gives identical pixels and manifest.
        masks: also write per-class masks.
        workers: processes to render with; ``None`` uses ``min(os.cpu_count(), 8)`` for ``n >= 200``
            and 1 below; 1 renders in this process.
        shortcut: plant a shortcut tag correlated with this class (see :func:`render_case`).

    Also writes ``out_dir/phantom_meta.parquet`` (image_id, marker_box, marker_letter, devices,
    shortcut_box; boxes as [x, y, w, h] pixels): the non-finding content, for shortcut audits.

    Returns:
        Path of the written manifest.

    Raises:
        ValueError: bad ``n``, ``size`` or ``workers``.
    """
    from tqdm.auto import tqdm

    from training.data.schema import write_manifest

    size = _check_size(size)
    shortcut = _check_shortcut(shortcut)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 200 else 1
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    jobs = [(int(seed), i, size, str(out), bool(masks), shortcut) for i in range(int(n))]
    bar = tqdm(total=n, desc="phantom", unit="img", disable=n < 200)
    rows: list[dict] = []
    try:
        if workers == 1:
            for job in jobs:
                rows.append(_write_one(job))
                bar.update()
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for row in pool.map(_write_one, jobs, chunksize=max(1, min(64, n // (workers * 8)))):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    import pandas as pd

    mask_paths = [r.pop("_mask_paths", None) for r in rows]
    pd.DataFrame([r.pop("_meta") for r in rows]).to_parquet(out / "phantom_meta.parquet", index=False)
    df = pd.DataFrame(rows)
    path = out / "manifest.parquet"
    write_manifest(df, path)
    if masks:
        # masks are not part of the manifest schema: a side table keyed by image_id
        mt = pd.DataFrame([{"image_id": r["image_id"], "label": lab, "path": p}
                           for r, mp_ in zip(rows, mask_paths) for lab, p in (mp_ or {}).items()],
                          columns=["image_id", "label", "path"])
        mt.to_parquet(out / "masks.parquet", index=False)
    logger.info("phantom: %d images of %d px (seed %d) -> %s", n, size, seed, path)
    return path
