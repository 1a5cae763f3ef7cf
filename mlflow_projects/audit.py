"""MLflow entry point ``audit``: the interpretation suite on a probing set, logged as one audit run.

    python -m mlflow_projects.audit --model-uri models:/cxr-classifier/3 --data MANIFEST [--reports FILE]
    python -m mlflow_projects.audit --resume FOLDER      # log an audit computed while the server was down

Sections (each recorded as ``ok`` or ``skipped`` with a reason in ``summary.json``):

1. performance per class (AUROC, AP, F1, MCC) at the thresholds stored with the model;
2. localisation on images with boxes: soft IoBB, soft IoR, pointing game per class from CAM-family
   maps, and a gallery of the best and worst cases per class (``heatmaps/*.png``);
3. dissection counts (Disjoint, Unique per class) on the feature layer;
4. neuron concept annotation (MAMMI by default, ``--method`` selects) of the feature layer and the
   penultimate block, concepts mined from the reports, scored with a CLIP model; plus the final-layer
   concept-label metrics (the class neurons against their class names);
5. class-wise neuron importance (top units per class with their concepts);
6. shortcut warnings: classes and important units whose attention mass lies mostly outside a lung-field
   estimate or on text markers (see :func:`chest_field` and :func:`marker_mask`: simple image-based
   estimates, documented as such, not segmentations);
7. the promotion gates (:mod:`mlflow_projects.promote`) evaluated on the flat figures.

Everything is first written to a local folder (``--out``, default ``outputs/audits/<stamp>-<model>``):
``audit/summary.json``, ``concepts.parquet``, ``neuron_importance.parquet``, ``localization.parquet``,
``dissection.json``, ``report.html``, ``heatmaps/*.png`` and ``audit_state.json`` (what to log and
where). Then one MLflow run logs params, metrics and the ``audit/`` folder; the run is tagged with the
model name/version and the model version gets tags ``audit.run_id``, ``audit.status`` and
``audit.summary``. If the tracking server cannot be reached at that point, the folder stays, the
command says where and exits with status 75 (EX_TEMPFAIL); ``--resume FOLDER`` logs it later without
recomputing anything.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_DATA = "outputs/phantom/manifest.parquet"
DEFAULT_MODEL_URI = "models:/cxr-classifier@candidate"
DEFAULT_CLIP = "models:/cxr-clip@candidate"
FALLBACK_CLIP = "cxr-tiny-vit"
EXPERIMENT = "cxr-audit"
ARTIFACT_DIR = "audit"
STATE_FILE = "audit_state.json"
EX_TEMPFAIL = 75
SCHEMA_VERSION = 1
ATTENTION_METHODS = ("cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad")
ANNOTATION_METHODS = ("mammi", "www", "clip_dissect")

# Words that make a concept "related" to a class (stems, matched as substrings of the concept).
RELATED_TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelecta", "collapse", "volume loss", "band", "plate"),
    "Cardiomegaly": ("cardiomegal", "heart", "cardiac", "silhouette", "enlarge"),
    "Effusion": ("effusion", "fluid", "costophrenic", "meniscus", "pleural"),
    "Infiltration": ("infiltrat", "haz", "interstitial", "reticul", "ground-glass", "ground glass", "opacit"),
    "Mass": ("mass", "lesion", "tumo", "opacit"),
    "Nodule": ("nodul", "opacit", "lesion"),
    "Pneumonia": ("pneumonia", "consolidat", "airspace", "opacit"),
    "Pneumothorax": ("pneumothora", "pleural line", "lucen", "apex", "apical"),
    "Consolidation": ("consolidat", "airspace", "bronchogram", "opacit"),
    "Edema": ("edema", "oedema", "vascular", "congest", "kerley"),
    "Emphysema": ("emphysema", "hyperinflat", "bulla", "hyperlucen"),
    "Fibrosis": ("fibros", "scar", "reticul", "interstitial"),
    "Pleural_Thickening": ("pleural", "thicken"),
    "Hernia": ("hernia", "hiatal", "retrocardiac", "bubble"),
}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached while logging."""


# ---- configuration ---------------------------------------------------------------------------
@dataclass
class AuditConfig:
    model_uri: str = DEFAULT_MODEL_URI
    data: str = DEFAULT_DATA
    reports: str = ""  # text file, one report a line; empty = the manifest's report column
    clip: str = DEFAULT_CLIP  # models:/ URI of a registered cxr-clip, an open_clip spec, or "scratch"
    method: str = "mammi"  # concept annotation method
    gates: str = "mlflow_projects/gates.yaml"
    split: str = "test"  # probing set: a manifest split, or "all"
    max_images: int = 400
    image_size: int = 0  # 0 = the model's input size
    batch_size: int = 32
    attention: str = "cam"  # attention-map method for localisation and shortcuts
    pointing_tolerance: float | None = None  # px; None = Zhang et al.'s 15 px at 224 px, scaled to the probe
    penultimate_layer: str = ""  # default: the block before the feature layer
    dissection_quantile: float = 0.0  # 0 = by architecture (0.01 DenseNet family, 0.04 otherwise)
    alpha: float = 0.93  # MAMMI adaptive threshold
    beta: float = 0.95  # concept selection
    top_units: int = 5  # units per class in the importance table / concept coverage
    gallery_n: int = 2  # best and worst cases per class in the gallery
    max_concepts: int = 200
    outside_threshold: float = 0.5  # attention share outside the lung field that flags a shortcut
    marker_threshold: float = 0.2  # attention share on text markers that flags a shortcut
    out: str = ""  # local folder; default outputs/audits/<stamp>-<model>
    experiment: str = EXPERIMENT
    seed: int = 0


# ---- model and data --------------------------------------------------------------------------
@dataclass
class ModelRef:
    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def resolve_model(uri: str):
    """Registry identity of ``uri`` (``models:/name/3``, ``models:/name@alias``, ``runs:/``, a folder)."""
    from mlflow import MlflowClient

    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w\-]+))", uri)
    if not m:
        return ModelRef(uri)
    client = MlflowClient()
    name, version, alias = m.group(1), m.group(2), m.group(3)
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return ModelRef(f"models:/{name}/{mv.version}", name, str(mv.version), mv.run_id)


def load_model(ref: ModelRef, dst: Path):
    """Download the registered classifier and rebuild it with :func:`training.models.load_checkpoint`.

    Returns:
        ``(model, meta)``: the eval-mode model and ``artifacts/meta.json`` (empty dict if absent).
    """
    from training.models import load_checkpoint

    src = Path(ref.uri)
    if not src.exists():
        import mlflow

        src = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(dst)))
    ckpt = src / "artifacts" / "checkpoint.pt"
    if not ckpt.is_file():
        found = sorted(src.rglob("checkpoint.pt"))
        if not found:
            raise FileNotFoundError(f"{ref.uri} holds no artifacts/checkpoint.pt (is it a cxr-classifier model?)")
        ckpt = found[0]
    meta_path = ckpt.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return load_checkpoint(ckpt).eval(), meta


@dataclass
class Probe:
    """The probing set in memory."""

    images: Any  # (N, 1, S, S) float32 tensor in [0, 1]
    labels: np.ndarray  # (N, C)
    boxes: list[np.ndarray]  # per image (K, 4) xyxy in S px
    box_labels: list[np.ndarray]  # per image (K,)
    image_ids: list[str]
    reports: list[str]
    classes: list[str]
    artefacts: np.ndarray | None = None  # (N, S, S) bool ground-truth markers/tags (phantom_meta.parquet)

    @property
    def n(self) -> int:
        return len(self.image_ids)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def load_probe(manifest: Path, classes: Sequence[str], image_size: int, split: str, max_images: int,
               seed: int = 0) -> Probe:
    """Read the probing set (``split`` or all rows, at most ``max_images`` drawn with ``seed``)."""
    import torch
    from tqdm.auto import tqdm

    from training.data.dataset import ManifestDataset
    from training.data.schema import read_manifest

    ds = ManifestDataset(manifest, classes=list(classes), image_size=image_size,
                         split=None if split == "all" else split)
    if len(ds) == 0:
        raise ValueError(f"no images in split {split!r} of {manifest}; valid splits: all, train, val, test")
    idx = np.arange(len(ds))
    if len(ds) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_images, replace=False))
    df = read_manifest(manifest)
    report_of = dict(zip(df["image_id"], df["report"])) if "report" in df else {}
    items = [ds[int(i)] for i in tqdm(idx, desc="audit: probing set", unit="img", leave=False)]
    artefacts = phantom_artefacts(manifest, df, [str(it["image_id"]) for it in items], image_size)
    return Probe(artefacts=artefacts, images=torch.stack([it["image"] for it in items]),
                 labels=np.stack([it["labels"].numpy() for it in items]).astype(np.float32),
                 boxes=[it["boxes"].numpy().reshape(-1, 4) for it in items],
                 box_labels=[it["box_labels"].numpy().reshape(-1) for it in items],
                 image_ids=[str(it["image_id"]) for it in items],
                 reports=[str(report_of.get(it["image_id"]) or "") for it in items],
                 classes=list(classes))


def phantom_artefacts(manifest: Path, df, image_ids: Sequence[str], size: int) -> np.ndarray | None:
    """Ground-truth text markers and planted shortcut tags from the phantom's ``phantom_meta.parquet``
    (boxes ``[x, y, w, h]`` in original pixels, scaled to ``size``) as (N, S, S) bool; None without it."""
    import pandas as pd

    side = manifest.parent / "phantom_meta.parquet"
    if not side.is_file():
        return None
    meta = pd.read_parquet(side).set_index("image_id")
    width = dict(zip(df["image_id"], df["width"]))
    c = np.arange(size) + 0.5
    out = np.zeros((len(image_ids), size, size), dtype=bool)
    for i, iid in enumerate(image_ids):
        if iid not in meta.index:
            continue
        scale = size / float(width.get(iid) or size)
        for col in ("marker_box", "shortcut_box"):
            box = meta.at[iid, col] if col in meta.columns else None
            if box is None or len(box) != 4:
                continue
            x, y, w, h = (float(v) * scale for v in box)
            out[i] |= ((c[:, None] >= y) & (c[:, None] < y + h)) & ((c[None, :] >= x) & (c[None, :] < x + w))
    return out


def penultimate_layer(model) -> str:
    """The block before the feature layer: the second-to-last child of ``model.features`` (up to the
    feature layer) that contains a convolution (ResNet: ``features.layer3``; DenseNet121:
    ``features.transition3``)."""
    import torch.nn as nn

    top = model.feature_layer.split(".")
    parent = model.get_submodule(".".join(top[:-1])) if len(top) > 1 else model
    prefix = ".".join(top[:-1])
    conv_children = []
    for name, child in parent.named_children():
        if any(isinstance(m, nn.Conv2d) for m in child.modules()):
            conv_children.append(name)
        if name == top[-1]:
            break
    if len(conv_children) < 2:
        raise ValueError(f"cannot find a block before {model.feature_layer!r}; pass --penultimate-layer")
    return f"{prefix}.{conv_children[-2]}" if prefix else conv_children[-2]


# ---- shortcut estimates ----------------------------------------------------------------------
def chest_field(size: int, rx: float = 0.42, ry: float = 0.42, cy: float = 0.5) -> np.ndarray:
    """A simple lung-field (thorax) estimate: an ellipse centred on a PA chest film covering both lungs,
    heart and mediastinum (about 55 % of the image). It is a fixed template, not a segmentation; a
    frontal film that is strongly off-centre makes it wrong. Returns (S, S) bool."""
    c = (np.arange(size) + 0.5) / size
    return ((c[None, :] - 0.5) / rx) ** 2 + ((c[:, None] - cy) / ry) ** 2 <= 1.0


def marker_mask(images: np.ndarray, level: float = 0.98, band: float = 0.22, grow: int = 2) -> np.ndarray:
    """Burned-in text markers estimated as saturated pixels (>= ``level``) in the border band (outer
    ``band`` of the side), grown by ``grow`` pixels. Radiograph tissue does not saturate; letters and
    annotations burned in by the scanner do (the phantom's L/R marker is drawn at full white).

    Args:
        images: (N, S, S) in [0, 1].

    Returns:
        (N, S, S) bool.
    """
    n, s, _ = images.shape
    c = np.arange(s)
    edge = np.minimum(c, s - 1 - c) < band * s
    border = edge[None, :] | edge[:, None]
    sat = (images >= level) & border[None]
    if grow > 0 and sat.any():
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(sat[:, None].astype(np.float32))
        sat = F.max_pool2d(t, 2 * grow + 1, stride=1, padding=grow)[:, 0].numpy() > 0
    return sat


def attention_shares(maps: np.ndarray, field_mask: np.ndarray, markers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of attention mass outside ``field_mask`` and on ``markers``.

    Args:
        maps: (N, T, S, S) non-negative; field_mask: (S, S) bool; markers: (N, S, S) bool.

    Returns:
        ``(outside (N, T), on_marker (N, T))``; NaN for an all-zero map.
    """
    total = maps.sum(axis=(2, 3))
    inside = (maps * field_mask[None, None]).sum(axis=(2, 3))
    on_marker = (maps * markers[:, None]).sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - inside / total, np.nan), np.where(total > 0, on_marker / total, np.nan)


# ---- helpers ---------------------------------------------------------------------------------
def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _nanmean(values) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def related(concept: str, cls: str) -> bool:
    """Whether ``concept`` names ``cls`` or a sign of it (:data:`RELATED_TERMS`, else the class name)."""
    text = concept.lower()
    terms = RELATED_TERMS.get(cls, (cls.lower().replace("_", " "),))
    return any(t in text for t in terms)


class _Sections:
    """Records the status of each section."""

    def __init__(self) -> None:
        self.status: dict[str, dict[str, str]] = {}

    def ok(self, name: str, note: str = "") -> None:
        self.status[name] = {"status": "ok", **({"reason": note} if note else {})}

    def skip(self, name: str, reason: str) -> None:
        log.warning("audit: section %s skipped: %s", name, reason)
        self.status[name] = {"status": "skipped", "reason": reason}


# ---- analyses --------------------------------------------------------------------------------
def infer(model, images, batch_size: int, task: str = "multilabel"):
    """Probabilities (N, C) and feature maps (N, K, h, w) in batches."""
    import torch
    from tqdm.auto import tqdm

    probs, feats = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="audit: inference", leave=False):
            logits, f = model.forward_all(images[start:start + batch_size])
            probs.append((logits.softmax(-1) if task == "multiclass" else logits.sigmoid()).numpy())
            feats.append(f.float())
    return np.concatenate(probs), torch.cat(feats)


def performance_section(probe: Probe, probs: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """Per-class AUROC / AP / F1 / MCC at the stored thresholds (``training.metrics``)."""
    from training.metrics import classification_metrics

    table = classification_metrics(probe.labels, probs, thresholds, probe.classes)
    rows = []
    for cls, r in table.iterrows():
        rows.append({"class": str(cls), "n_pos": int(r["n_pos"]), "n_neg": int(r["n_neg"]),
                     "auroc": _finite(r["auroc"]), "ap": _finite(r["ap"]), "f1": _finite(r["f1"]),
                     "mcc": _finite(r["mcc"]), "threshold": float(r["threshold"])})
    return rows


@dataclass
class AttentionPass:
    """What one pass of attention maps over the probing set yields."""

    localization: Any  # DataFrame: one row per (image, class with a box)
    outside: np.ndarray  # (N, C) attention share outside the lung-field estimate
    on_marker: np.ndarray  # (N, C) attention share on marker pixels
    markers: np.ndarray  # (N, S, S) bool marker estimate


def _map_params(method: str) -> dict:
    """Layer methods run without the ReLU before min-max normalisation: a weakly trained class whose evidence
    is negative everywhere would otherwise get an all-zero map (IoBB 0 by construction, not by behaviour);
    without it the map still shows where the evidence is highest."""
    return {"relu": False} if method in ("cam", "gradcam", "gradcampp") else {}


def attention_pass(model, probe: Probe, method: str, batch_size: int, pointing_tolerance: float = 0.0
                   ) -> AttentionPass:
    """Maps for every class on every probing image (batched); localisation rows (pointing game within
    ``pointing_tolerance`` pixels) and shortcut shares."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from interpret import attention_maps
    from interpret.localization import localization_table, masks_from_boxes

    n, c, s = probe.n, len(probe.classes), probe.size
    field_mask = chest_field(s)
    markers = probe.artefacts if probe.artefacts is not None else marker_mask(probe.images[:, 0].numpy())
    outside, on_marker = np.full((n, c), np.nan), np.full((n, c), np.nan)
    tables = []
    for start in tqdm(range(0, n, batch_size), desc=f"audit: {method} maps", leave=False):
        sl = slice(start, min(start + batch_size, n))
        x = probe.images[sl]
        targets = torch.arange(c).expand(len(x), c)
        maps = attention_maps(model, x, targets, method=method, **_map_params(method)).float().numpy()  # (B, C, S, S)
        outside[sl], on_marker[sl] = attention_shares(maps, field_mask, markers[sl])
        boxed = [i for i in range(len(x)) if len(probe.boxes[start + i])]
        if boxed:
            idx = [start + i for i in boxed]
            masks = masks_from_boxes([probe.boxes[i] for i in idx], [probe.box_labels[i] for i in idx],
                                     targets[boxed], s)
            t = localization_table(maps[boxed], masks, targets[boxed], probe.classes,
                                   [probe.image_ids[i] for i in idx], pointing_tolerance=pointing_tolerance)
            tables.append(t[t["has_mask"]].drop(columns="has_mask"))
    loc = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return AttentionPass(loc, outside, on_marker, markers)


def localization_summary(loc, classes: Sequence[str]) -> list[dict]:
    rows = []
    for cls in classes:
        part = loc[loc["class"] == cls] if len(loc) else loc
        if len(part) == 0:
            continue
        rows.append({"class": cls, "n_images": int(part["image_id"].nunique()),
                     "iobb": _finite(part["iobb"].mean()), "ior": _finite(part["ior"].mean()),
                     "pointing": _finite(part["pointing"].mean()),
                     "pointing_chance": _finite(part["pointing_chance"].mean())
                     if "pointing_chance" in part else None})
    return rows


def save_gallery(model, probe: Probe, loc, method: str, out: Path, n: int) -> list[str]:
    """``out/<class>_best.png`` and ``<class>_worst.png``: image, map overlay and boxes of the ``n``
    highest and lowest soft-IoBB cases of each class. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from interpret import attention_maps

    out.mkdir(parents=True, exist_ok=True)
    index = {iid: i for i, iid in enumerate(probe.image_ids)}
    written = []
    if n <= 0 or len(loc) == 0:
        return written
    for cls, part in loc.groupby("class", sort=False):
        c = probe.classes.index(cls)
        part = part.sort_values("iobb", ascending=False)
        picks = {"best": part.head(n), "worst": part.tail(n).iloc[::-1]}
        for kind, rows in picks.items():
            ids = [index[i] for i in rows["image_id"]]
            maps = attention_maps(model, probe.images[ids], c, method=method, **_map_params(method))[:, 0].numpy()
            fig, axes = plt.subplots(1, len(ids), figsize=(2.6 * len(ids), 2.9), dpi=90, squeeze=False)
            try:
                for ax, i, m, (_, r) in zip(axes[0], ids, maps, rows.iterrows()):
                    ax.imshow(probe.images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
                    ax.imshow(m, cmap="jet", alpha=0.4, vmin=0, vmax=1)
                    for b in probe.boxes[i][probe.box_labels[i] == c]:
                        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                               edgecolor="lime", linewidth=1.2))
                    ax.set_title(f"{probe.image_ids[i]}\nIoBB {r['iobb']:.2f}  IoR {r['ior']:.2f}", fontsize=7)
                    ax.axis("off")
                fig.suptitle(f"{cls}: {kind} {len(ids)} ({method})", fontsize=9)
                fig.tight_layout()
                name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cls)}_{kind}.png"
                fig.savefig(out / name)
                written.append(name)
            finally:
                plt.close(fig)
    return written


def shortcut_section(probe: Probe, probs: np.ndarray, ap: AttentionPass, feats, unit_table: Mapping[str, list[dict]],
                     outside_threshold: float, marker_threshold: float, top_images: int = 5) -> dict:
    """Classes and important units whose attention lies mostly outside the lung field or on markers.

    Class shares are averaged over the class's positive images (the ``top_images`` most confidently
    predicted ones when the probing set has no positive). Unit shares use the unit's upsampled
    activation maps on its ``top_images`` most activating images.
    """
    import torch
    import torch.nn.functional as F

    warnings_, per_class = [], []
    for c, cls in enumerate(probe.classes):
        pos = np.flatnonzero(probe.labels[:, c] > 0)
        basis = "positive images"
        if pos.size == 0:
            pos, basis = np.argsort(-probs[:, c])[:top_images], "top-predicted images"
        out_c, mk_c = _nanmean(ap.outside[pos, c]), _nanmean(ap.on_marker[pos, c])
        flagged = []
        if out_c is not None and out_c > outside_threshold:
            flagged.append(f"{out_c:.0%} of its attention lies outside the lung field (> {outside_threshold:.0%})")
        if mk_c is not None and mk_c > marker_threshold:
            flagged.append(f"{mk_c:.0%} of its attention lies on text markers (> {marker_threshold:.0%})")
        per_class.append({"class": cls, "images": int(pos.size), "basis": basis, "outside_lung": out_c,
                          "on_marker": mk_c, "flagged": bool(flagged)})
        if flagged:
            warnings_.append({"kind": "class", "target": cls, "reason": "; ".join(flagged),
                              "outside_lung": out_c, "on_marker": mk_c})
    field_mask = chest_field(probe.size)
    seen = set()
    pooled = feats.mean(dim=(2, 3))  # (N, K)
    for cls, units in unit_table.items():
        for u in units:
            unit = int(u["unit"])
            if unit in seen:
                continue
            seen.add(unit)
            top = torch.argsort(pooled[:, unit], descending=True)[:top_images]
            m = F.interpolate(F.relu(feats[top, unit:unit + 1]), size=(probe.size, probe.size), mode="bilinear",
                              align_corners=False).numpy()  # (n, 1, S, S)
            o, k = attention_shares(m, field_mask, ap.markers[top.numpy()])
            out_u, mk_u = _nanmean(o[:, 0]), _nanmean(k[:, 0])
            reasons = []
            if out_u is not None and out_u > outside_threshold:
                reasons.append(f"{out_u:.0%} of its activation lies outside the lung field")
            if mk_u is not None and mk_u > marker_threshold:
                reasons.append(f"{mk_u:.0%} of its activation lies on text markers")
            if reasons:
                warnings_.append({"kind": "unit", "target": f"{unit} (important for {cls})",
                                  "reason": "; ".join(reasons), "outside_lung": out_u, "on_marker": mk_u})
    n_flagged = sum(r["flagged"] for r in per_class)
    markers_from = ("the phantom's ground truth (phantom_meta.parquet: marker and planted tag boxes)"
                    if probe.artefacts is not None else "saturated pixels near the border (marker_mask)")
    return {"method": ("Lung field = a fixed elliptical template over the thorax of a centred frontal film "
                       f"(chest_field); text markers and tags = {markers_from}. A class is "
                       f"flagged when more than {outside_threshold:.0%} of its attention lies outside the lung field "
                       f"or more than {marker_threshold:.0%} on markers; the same for the top units per class "
                       f"(activation maps). These are simple image-based estimates, not segmentations."),
            "per_class": per_class, "warnings": warnings_,
            "class_fraction": n_flagged / max(1, len(per_class))}


def flat_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The figures the gates and MLflow metrics use (only finite values)."""
    m: dict[str, float | None] = {}
    perf = summary.get("performance", [])
    for key in ("auroc", "ap", "f1", "mcc"):
        m[f"{key}_mean"] = _nanmean(r.get(key) for r in perf)
    loc = summary.get("localization", {}).get("per_class", [])
    for key in ("iobb", "ior", "pointing", "pointing_chance"):
        m[f"{key}_mean"] = _nanmean(r.get(key) for r in loc)
    # how far the pointing game clears a map pointing at random, averaged over classes
    m["pointing_lift_mean"] = _nanmean(r["pointing"] - r["pointing_chance"] for r in loc
                                       if _finite(r.get("pointing")) is not None
                                       and _finite(r.get("pointing_chance")) is not None)
    dis = summary.get("dissection", {}).get("per_class", [])
    for key in ("disjoint", "unique"):
        m[f"{key}_mean"] = _nanmean(r.get(key) for r in dis)
    imp = summary.get("importance", {})
    m["concept_coverage"] = imp.get("concept_coverage")
    m["concept_vlm_auroc_mean"] = summary.get("concepts", {}).get("vlm_check", {}).get("auroc_mean")
    for layer, info in summary.get("concepts", {}).get("layers", {}).items():
        m[f"annotated_fraction.{layer}"] = info.get("annotated_fraction")
    for key, value in summary.get("evaluation", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m[f"final_layer.{key}"] = value
    sc = summary.get("shortcuts", {})
    if sc.get("per_class") is not None:
        m["shortcut_class_fraction"] = sc.get("class_fraction")
        m["shortcut_warnings"] = float(len(sc.get("warnings", [])))
    for r in perf:
        for key in ("auroc", "ap", "f1", "mcc"):
            m[f"{key}.{r['class']}"] = r.get(key)
    for r in loc:
        for key in ("iobb", "ior", "pointing"):
            m[f"{key}.{r['class']}"] = r.get(key)
    return {k: float(v) for k, v in m.items() if _finite(v) is not None}


def reproduce_command(cfg: AuditConfig, model_uri: str) -> str:
    args = ["python", "-m", "mlflow_projects.audit", "--model-uri", model_uri, "--data", cfg.data,
            "--clip", cfg.clip, "--method", cfg.method, "--gates", cfg.gates, "--split", cfg.split,
            "--max-images", str(cfg.max_images), "--attention", cfg.attention, "--seed", str(cfg.seed)]
    if cfg.reports:
        args += ["--reports", cfg.reports]
    if cfg.image_size:
        args += ["--image-size", str(cfg.image_size)]
    if cfg.pointing_tolerance is not None:
        args += ["--pointing-tolerance", str(cfg.pointing_tolerance)]
    return " ".join(shlex.quote(a) for a in args)


def champion_comparison(ref: ModelRef, summary: Mapping[str, Any]) -> tuple[dict | None, str]:
    """Comparison with the registered model's ``champion`` (when it exists, differs from this version and
    has an audit); returns ``(comparison or None, reason)``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlflow_projects.common import CHAMPION
    from mlflow_projects.compare import compare_summaries, load_version_audit

    if not ref.name:
        return None, "the audited model is not a registered version"
    try:
        champ = MlflowClient().get_model_version_by_alias(ref.name, CHAMPION)
    except MlflowException:
        return None, f"{ref.name} has no @{CHAMPION} yet"
    if str(champ.version) == str(ref.version):
        return None, f"this version is the current @{CHAMPION}"
    try:
        other = load_version_audit(ref.name, str(champ.version))
    except (MlflowException, ValueError, OSError) as exc:
        return None, f"the @{CHAMPION} (version {champ.version}) has no readable audit: {exc}"
    return compare_summaries(other, summary, label_a=f"@{CHAMPION} v{champ.version}",
                             label_b=f"this audit v{ref.version}"), ""


# ---- the audit -------------------------------------------------------------------------------
def _default_out(ref: ModelRef) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"{ref.name}-v{ref.version}" if ref.name else "model"
    return Path("outputs") / "audits" / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}"


def compute_audit(cfg: AuditConfig) -> Path:
    """Run every section and write the audit folder (nothing is logged to MLflow here).

    Returns:
        The folder; its ``audit/`` subfolder holds the artifacts, ``audit_state.json`` what to log.
    """
    import mlflow
    import torch
    from tqdm.auto import tqdm

    from mlflow_projects.audit_report import build_report
    from mlflow_projects.promote import evaluate_gates, gates_passed, load_gates

    torch.manual_seed(cfg.seed)
    gates = load_gates(cfg.gates)  # fail early on a bad gates file
    manifest = Path(cfg.data)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest.resolve()}")
    if cfg.reports and not Path(cfg.reports).is_file():
        raise FileNotFoundError(f"reports file not found: {Path(cfg.reports).resolve()}")
    ref = resolve_model(cfg.model_uri)
    folder = Path(cfg.out) if cfg.out else _default_out(ref)
    art = folder / ARTIFACT_DIR
    art.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=8, desc="audit", unit="section")
    sections = _Sections()
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = load_model(ref, Path(tmp))
    size = cfg.image_size or int(model.input_spec.get("size") or 224)
    probe = load_probe(manifest, model.class_names, size, cfg.split, cfg.max_images, cfg.seed)
    penult = cfg.penultimate_layer or penultimate_layer(model)
    clip_desc = None
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"uri": ref.uri, "requested_uri": cfg.model_uri, "name": ref.name, "version": ref.version,
                  "run_id": ref.run_id, "arch": model.arch, "classes": list(model.class_names),
                  "thresholds": [float(t) for t in model.thresholds], "feature_layer": model.feature_layer,
                  "penultimate_layer": penult, "input": model.input_spec, "task": meta.get("task", "multilabel")},
        "data": {"manifest": str(manifest.resolve()), "fingerprint": file_fingerprint(manifest),
                 "split": cfg.split, "n_images": probe.n, "image_size": size,
                 "n_with_boxes": int(sum(len(b) > 0 for b in probe.boxes)),
                 "positives": {c: int(probe.labels[:, i].sum()) for i, c in enumerate(probe.classes)}},
        "config": asdict(cfg),
        "reproduce": reproduce_command(cfg, ref.uri),
    }
    steps.set_postfix_str("inference")
    probs, feats = infer(model, probe.images, cfg.batch_size, summary["model"]["task"])
    summary["performance"] = performance_section(probe, probs, model.thresholds)
    sections.ok("performance")
    steps.update()

    steps.set_postfix_str("attention")
    from interpret.localization import pointing_tolerance

    tol = pointing_tolerance(probe.size) if cfg.pointing_tolerance is None else float(cfg.pointing_tolerance)
    ap = attention_pass(model, probe, cfg.attention, cfg.batch_size, tol)
    loc_rows = localization_summary(ap.localization, probe.classes)
    summary["localization"] = {"method": cfg.attention, "per_class": loc_rows,
                               "n_pairs": int(len(ap.localization)), "pointing_tolerance_px": tol}
    if len(ap.localization):
        ap.localization.to_parquet(art / "localization.parquet", index=False)
        gallery = save_gallery(model, probe, ap.localization, cfg.attention, art / "heatmaps", cfg.gallery_n)
        summary["localization"]["gallery"] = gallery
        sections.ok("localization")
    else:
        import pandas as pd

        pd.DataFrame(columns=["image_id", "class", "iobb", "ior", "pointing", "pointing_chance"]).to_parquet(
            art / "localization.parquet", index=False)
        sections.skip("localization", "no probing image has boxes of the model's classes")
    steps.update()

    steps.set_postfix_str("dissection")
    q = cfg.dissection_quantile or (0.01 if "densenet" in model.arch else 0.04)
    dis = dissection_section(feats, probe, q)
    summary["dissection"] = {k: v for k, v in dis.items() if k != "detail"}
    (art / "dissection.json").write_text(json.dumps(dis, indent=1, default=_json_default))
    if dis.get("per_class"):
        sections.ok("dissection")
    else:
        sections.skip("dissection", dis.get("reason", "no probing image has boxes"))
    steps.update()

    steps.set_postfix_str("concepts")
    concepts = concept_section(cfg, model, probe, feats, penult, sections)
    summary["concepts"] = concepts.summary
    summary["evaluation"] = concepts.evaluation
    clip_desc = concepts.summary.get("clip")
    summary["data"]["clip"] = clip_desc
    summary["data"]["concept_source"] = concepts.summary.get("source")
    concepts.table.to_parquet(art / "concepts.parquet", index=False)
    steps.update()

    steps.set_postfix_str("importance")
    imp_table, imp_summary = importance_section(model, probe, feats, concepts, cfg.top_units)
    imp_table.to_parquet(art / "neuron_importance.parquet", index=False)
    summary["importance"] = imp_summary
    sections.ok("importance")
    steps.update()

    steps.set_postfix_str("shortcuts")
    summary["shortcuts"] = shortcut_section(probe, probs, ap, feats, imp_summary["per_class"],
                                            cfg.outside_threshold, cfg.marker_threshold)
    sections.ok("shortcuts")
    steps.update()

    steps.set_postfix_str("gates")
    summary["sections"] = sections.status
    summary["metrics"] = flat_metrics(summary)
    results = evaluate_gates(summary["metrics"], gates)
    summary["gates"] = {"file": str(Path(cfg.gates)), "results": [asdict(r) for r in results],
                        "passed": gates_passed(results)}
    summary["status"] = "passed" if gates_passed(results) else "failed"
    try:
        cmp, why = champion_comparison(ref, summary)
    except Exception as exc:  # noqa: BLE001 - the comparison is informative only
        cmp, why = None, f"comparison failed: {exc}"
    summary["comparison"] = cmp
    if cmp is None:
        summary["comparison_note"] = why
    steps.update()

    steps.set_postfix_str("report")
    (art / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    (art / "report.html").write_text(build_report(summary, art), encoding="utf-8")
    state = {"schema_version": SCHEMA_VERSION, "tracking_uri": mlflow.get_tracking_uri(),
             "experiment": cfg.experiment, "model": asdict(ref), "run_id": None, "logged": False}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    steps.update()
    steps.close()
    log.info("audit of %s: %s (%s); files in %s", ref.uri, summary["status"],
             ", ".join(f"{r.name} {r.status}" for r in results), folder.resolve())
    return folder


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---- logging to MLflow -----------------------------------------------------------------------
def tracking_reachable() -> bool:
    """Whether the current tracking store answers a trivial query."""
    from mlflow import MlflowClient

    try:
        MlflowClient().search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def publish_audit(folder: str | Path) -> str:
    """Log an audit folder as one MLflow run and tag the model version (idempotent: a run created by an
    earlier, interrupted attempt is reused).

    Returns:
        The audit run id.

    Raises:
        TrackingUnavailable: the tracking server could not be reached (the folder is left as is).
    """
    import mlflow
    from mlflow import MlflowClient

    from mlflow_projects.common import setup_tracking, to_tag
    from mlflow_projects.promote import GateResult, short_summary

    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} is not an audit folder ({STATE_FILE} missing)")
    state = json.loads(state_path.read_text())
    summary = json.loads((folder / ARTIFACT_DIR / "summary.json").read_text())
    if state.get("logged"):
        log.info("audit in %s was already logged as run %s", folder, state["run_id"])
        return state["run_id"]
    if not os.environ.get("MLFLOW_TRACKING_URI") and state.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = state["tracking_uri"]
    try:
        exp_id = setup_tracking(state.get("experiment") or EXPERIMENT)
        client = MlflowClient()
        run_id = state.get("run_id")
        if run_id:
            try:
                client.get_run(run_id)
            except Exception:  # noqa: BLE001 - the earlier run vanished: start a new one
                run_id = None
        model = state["model"]
        results = [GateResult(**r) for r in summary["gates"]["results"]]
        text = short_summary(summary, results)
        name = f"audit {model['name']} v{model['version']}" if model.get("name") else "audit"
        with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                              run_name=None if run_id else name) as run:
            run_id = run.info.run_id
            state["run_id"] = run_id
            state_path.write_text(json.dumps(state, indent=1))
            cfg = summary.get("config", {})
            mlflow.log_params({k: ("" if v is None else str(v))[:500] for k, v in cfg.items()})
            mlflow.log_metrics(summary.get("metrics", {}))
            tags = {"audit.status": summary["status"], "model.uri": model["uri"],
                    "data.manifest": summary["data"]["manifest"], "data.fingerprint": summary["data"]["fingerprint"],
                    "mlflow.note.content": text}
            if model.get("name"):
                tags.update({"model.name": model["name"], "model.version": str(model["version"])})
            mlflow.set_tags(tags)
            mlflow.log_artifacts(str(folder / ARTIFACT_DIR), ARTIFACT_DIR)
        if model.get("name"):
            for key, value in {"audit.run_id": run_id, "audit.status": summary["status"],
                               "audit.summary": text}.items():
                client.set_model_version_tag(model["name"], model["version"], key, to_tag(value))
    except Exception as exc:
        if isinstance(exc, (FileNotFoundError, KeyError)) or tracking_reachable():
            raise
        raise TrackingUnavailable(f"could not reach the MLflow tracking server at {mlflow.get_tracking_uri()}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    state["logged"] = True
    state_path.write_text(json.dumps(state, indent=1))
    log.info("audit logged as run %s%s", run_id,
             f"; {model['name']} version {model['version']} tagged audit.status={summary['status']}"
             if model.get("name") else "")
    return run_id


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[AuditConfig, str]:
    from mlflow_projects.common import choice_of, nonneg_float, nonneg_int, positive_int, unit_float

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resume", default="", metavar="FOLDER",
                   help="log an audit folder written while the tracking server was unreachable; nothing is recomputed")
    p.add_argument("--model-uri", default=DEFAULT_MODEL_URI)
    p.add_argument("--data", default=DEFAULT_DATA, help="manifest of the probing set")
    p.add_argument("--reports", default="", help="text file of reports, one a line (default: the manifest's)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="models:/ URI of a cxr-clip, an open_clip spec, or 'scratch'")
    p.add_argument("--method", type=choice_of(ANNOTATION_METHODS, "annotation method"), default="mammi")
    p.add_argument("--gates", default="mlflow_projects/gates.yaml")
    p.add_argument("--split", type=choice_of(("all", "train", "val", "test"), "split"), default="test")
    p.add_argument("--max-images", type=positive_int, default=400)
    p.add_argument("--image-size", type=nonneg_int, default=0, help="0 = the model's input size")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--attention", type=choice_of(ATTENTION_METHODS, "attention method"), default="cam")
    p.add_argument("--pointing-tolerance", type=nonneg_float, default=None, metavar="PX",
                   help="pointing-game tolerance in probe pixels (default: 15 px at 224 px, scaled)")
    p.add_argument("--penultimate-layer", default="")
    p.add_argument("--dissection-quantile", type=unit_float, default=0.0, help="0 = by architecture")
    p.add_argument("--alpha", type=unit_float, default=0.93)
    p.add_argument("--beta", type=unit_float, default=0.95)
    p.add_argument("--top-units", type=positive_int, default=5)
    p.add_argument("--gallery-n", type=nonneg_int, default=2)
    p.add_argument("--max-concepts", type=positive_int, default=200)
    p.add_argument("--outside-threshold", type=unit_float, default=0.5)
    p.add_argument("--marker-threshold", type=unit_float, default=0.2)
    p.add_argument("--out", default="", help="local audit folder (default outputs/audits/<stamp>-<model>)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--seed", type=nonneg_int, default=0)
    a = vars(p.parse_args(argv))
    resume = a.pop("resume")
    a = {k: v for k, v in a.items()}
    cfg = AuditConfig(**{k: v for k, v in a.items()})
    return cfg, resume


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) an audit; returns the exit status: 0 logged, 75 computed but not logged."""
    import mlflow

    from mlflow_projects.common import DEFAULT_TRACKING_URI

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, resume = parse_args(argv)
    if resume:
        folder = Path(resume)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    else:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
        folder = compute_audit(cfg)
    try:
        run_id = publish_audit(folder)
    except TrackingUnavailable as exc:
        log.error("%s\nThe audit is complete and saved in %s (report: %s).\nLog it later with:\n"
                  "  python -m mlflow_projects.audit --resume %s", exc, folder.resolve(),
                  (folder / ARTIFACT_DIR / "report.html").resolve(), shlex.quote(str(folder.resolve())))
        return EX_TEMPFAIL
    log.info("audit run %s; report %s", run_id, (folder / ARTIFACT_DIR / "report.html").resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- dissection, concepts, importance (interpret library) ------------------------------------
def dissection_section(feats, probe: Probe, quantile: float) -> dict:
    """Disjoint / Unique counts per class on the feature layer (:func:`interpret.dissection.dissect_activations`).

    Returns:
        ``dissection.json`` content: ``quantile``, ``per_class`` rows (class, n_images, disjoint, unique,
        ...), ``overall``, per-unit TSI concepts (``detail``); or a ``reason`` when nothing has boxes.
    """
    from interpret.dissection import dissect_activations

    if not any(len(b) for b in probe.boxes):
        return {"quantile": quantile, "per_class": [], "reason": "no probing image has boxes"}
    res = dissect_activations(feats, probe.boxes, probe.box_labels, probe.classes, probe.size, q=quantile,
                              image_ids=probe.image_ids)
    full = res.to_json()
    rows = []
    for r in full["per_class"]:
        if int(r.get("n_images", 0)) > 0:
            rows.append({"class": r["class"], **{k: (_finite(v) if isinstance(v, float) else v)
                                                for k, v in r.items() if k != "class"}})
    return {"quantile": quantile, "per_class": rows, "overall": full["overall"],
            "detail": {"units": full["units"], "params": full["params"],
                       "threshold_error_max": full["threshold_error_max"]}}


@dataclass
class ConceptResult:
    summary: dict
    evaluation: dict
    table: Any  # DataFrame: layer, unit, method, concepts (list[str]), scores (list[float])
    annotations: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # layer -> unit -> concepts


def _empty_concepts():
    import pandas as pd

    return pd.DataFrame({"layer": pd.Series(dtype=str), "unit": pd.Series(dtype=int),
                         "method": pd.Series(dtype=str), "concepts": pd.Series(dtype=object),
                         "scores": pd.Series(dtype=object)})


def resolve_clip(spec: str):
    """The CLIP bundle for ``spec`` and a description; an untrained ``cxr-tiny-vit`` (with a warning) when a
    ``models:/`` URI cannot be loaded."""
    from training.clip import load_clip

    if spec.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        try:
            from mlflow_projects.pyfunc_clip import load_registered_clip

            return load_registered_clip(spec), spec
        except (MlflowException, OSError, ValueError, KeyError, ImportError) as exc:
            log.warning("could not load CLIP %s (%s); falling back to an UNTRAINED %s: concept annotations will be "
                        "meaningless", spec, exc, FALLBACK_CLIP)
            return load_clip(FALLBACK_CLIP), f"scratch:{FALLBACK_CLIP} (untrained fallback; {spec} unavailable)"
    if spec == "scratch":
        return load_clip(FALLBACK_CLIP), f"scratch:{FALLBACK_CLIP} (untrained)"
    return load_clip(spec), spec


def read_reports(path: str, probe: Probe) -> tuple[list[str], str]:
    if path:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines, f"{Path(path).resolve()} ({len(lines)} reports)"
    reps = [r for r in probe.reports if r.strip()]
    return reps, f"manifest report column ({len(reps)} reports)"


def _mine_concepts(reports: Sequence[str], max_concepts: int) -> list[str]:
    from interpret.concepts import mine_concepts

    return [str(c) for c in mine_concepts(reports, max_concepts=max_concepts)["concept"]]


VLM_CHANCE_MARGIN = 0.55  # below this mean zero-shot AUROC the VLM's annotations are called unsupported


def vlm_validity(vlm, image_emb, probe: Probe) -> dict:
    """Can the VLM see the findings it is asked to name? Zero-shot AUROC per class on the probing set.

    Each probing image is scored by ``cos(image, text(prompt))`` with the prompt the annotation methods
    put a concept in (:func:`interpret.concepts.concept_prompts`, here with the class name), and ranked
    against the image labels. A VLM at chance here (0.5) gives unit annotations that carry no evidence,
    whatever the method reports.

    Returns:
        ``{"prompt", "per_class": {class: auroc}, "auroc_mean", "n_classes", "supported"}`` (classes with
        positives and negatives only; ``auroc_mean`` None when there are none; ``supported``: the mean
        reaches :data:`VLM_CHANCE_MARGIN`).
    """
    from interpret.concepts import TEMPLATE, concept_prompts
    from training.clip.train import per_class_auroc, prompt_name

    txt = vlm.encode_texts(concept_prompts([prompt_name(c) for c in probe.classes]))  # (C, d)
    scores = (image_emb.float() @ txt.float().T).numpy()  # (N, C)
    aucs = {c: a for c, a in per_class_auroc(probe.labels, scores, probe.classes).items() if np.isfinite(a)}
    mean = float(np.mean(list(aucs.values()))) if aucs else None
    return {"prompt": TEMPLATE, "per_class": aucs, "n_classes": len(aucs), "auroc_mean": mean,
            "supported": mean is not None and mean >= VLM_CHANCE_MARGIN}


def concept_section(cfg: AuditConfig, model, probe: Probe, feats, penult: str, sections: _Sections) -> ConceptResult:
    """Annotate feature-layer and penultimate-block units (and, as a check, the final-layer class units)."""
    import pandas as pd
    import torch

    empty = ConceptResult({"method": cfg.method, "layers": {}}, {}, _empty_concepts())
    try:
        from interpret import concept_scores, select_concepts
        from interpret.activations import collect_activations
        from interpret.concepts import BASE_TEMPLATE, concept_prompts
        from interpret.vlm import VLMAdapter
    except ImportError as exc:
        sections.skip("concepts", f"concept annotation unavailable in this installation ({exc})")
        return empty
    reports, source = read_reports(cfg.reports, probe)
    empty.summary["source"] = source
    if not reports:
        sections.skip("concepts", "no reports: pass --reports FILE or use a manifest with a report column")
        return empty
    concepts = _mine_concepts(reports, cfg.max_concepts)
    if not concepts:
        sections.skip("concepts", f"no concepts could be mined from {source}")
        return empty
    bundle, clip_desc = resolve_clip(cfg.clip)
    vlm = VLMAdapter(bundle, batch_size=cfg.batch_size)
    img = vlm.encode_images(probe.images)  # (N, d)
    txt = vlm.encode_texts(concept_prompts(concepts))  # (M, d)
    tem = vlm.encode_texts([BASE_TEMPLATE])[0]  # (d,)
    vlm_check = vlm_validity(vlm, img, probe)
    if not vlm_check["supported"]:
        log.warning("the VLM (%s) does not tell the findings apart on this probing set (mean zero-shot AUROC %s): "
                    "its concept annotations are not supported by evidence", cfg.clip, vlm_check["auroc_mean"])
    from torch.utils.data import DataLoader

    pen = collect_activations(model, DataLoader(probe.images, batch_size=cfg.batch_size), penult, progress=False)
    layers = {model.feature_layer: feats.mean(dim=(2, 3)), penult: pen.mean}
    with torch.no_grad():
        logits = model.forward_head(feats)
    params = {"alpha": cfg.alpha} if cfg.method == "mammi" else {}
    from interpret.annotation import annotate

    beta = cfg.beta if cfg.method in ("mammi", "www") else None
    tables, annotations, layer_info = [], {}, {}
    for layer, acts in list(layers.items()) + [("final", logits)]:
        t = annotate(cfg.method, acts.float(), img, txt, tem, concepts=concepts, beta=beta, layer=layer, **params)
        tables.append(t.drop(columns="indices"))
        annotations[layer] = {int(u): list(c) for u, c in zip(t["unit"], t["concepts"])}
        if layer != "final":
            layer_info[layer] = {"units": int(acts.shape[1]),
                                 "annotated_fraction": float(np.mean([bool(c) for c in t["concepts"]]))}
    evaluation = {}
    try:
        from interpret.evaluation import evaluate_final_layer

        evaluation = dict(evaluate_final_layer([annotations["final"].get(i, []) for i in range(len(probe.classes))],
                                               probe.classes, vlm=vlm))
    except ImportError as exc:
        log.warning("final-layer concept evaluation unavailable (%s)", exc)
    hits = [any(related(c, cls) for c in annotations["final"].get(i, [])[:1]) for i, cls in enumerate(probe.classes)]
    evaluation.setdefault("top1_related_rate", float(np.mean(hits)))
    table = pd.concat(tables, ignore_index=True)
    sections.ok("concepts")
    summary = {"method": cfg.method, "n_concepts": len(concepts), "source": source, "clip": clip_desc,
               "layers": layer_info, "params": {"beta": cfg.beta, **params}, "vlm_check": vlm_check}
    return ConceptResult(summary, evaluation, table, annotations)


def importance_section(model, probe: Probe, feats, concepts: ConceptResult, top_units: int):
    """Class-wise unit importance of the GAP + linear head: ``W_cu * mean_n a_nu`` over the class's positive
    images (exact for these heads), top units per class with their concepts.

    Returns:
        ``(table, summary)``: DataFrame ``class, unit, importance, rank, concepts, related`` (every class x
        unit) and ``{"per_class": {class: [top units]}, "concept_coverage": float | None}``.
    """
    import pandas as pd

    pooled = feats.mean(dim=(2, 3)).numpy()  # (N, K)
    w = model.head.weight.detach().numpy()  # (C, K)
    ann = concepts.annotations.get(model.feature_layer, {})
    rows, per_class, covered, eligible = [], {}, 0, 0
    for c, cls in enumerate(probe.classes):
        pos = probe.labels[:, c] > 0
        basis = pooled[pos] if pos.any() else pooled
        contrib = w[c] * basis.mean(0)  # (K,)
        order = np.argsort(-contrib)
        ranks = np.empty_like(order)
        ranks[order] = np.arange(len(order))
        for u in range(len(contrib)):
            names = ann.get(u, [])
            rows.append({"class": cls, "unit": u, "importance": float(contrib[u]), "rank": int(ranks[u]) + 1,
                         "concepts": list(names), "related": any(related(n, cls) for n in names)})
        top = [{"unit": int(u), "score": float(contrib[u]), "concepts": list(ann.get(int(u), [])),
                "related": any(related(n, cls) for n in ann.get(int(u), []))} for u in order[:top_units]]
        per_class[cls] = top
        if pos.any():
            eligible += 1
            covered += any(t["related"] for t in top)
    coverage = covered / eligible if (ann and eligible) else None
    return pd.DataFrame(rows), {"per_class": per_class, "concept_coverage": coverage,
                                "basis": "positive images of the class (all images when it has none)"}
