"""Audit sections on a probing set: performance, attention maps and localisation, the gallery,
dissection and class-wise unit importance. Each returns plain rows / dicts for ``summary.json``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from interpret.audit._util import _finite
from interpret.audit.probe import Probe
from interpret.audit.shortcuts import attention_shares, chest_field, marker_mask
from interpret.audit.store import gap
from interpret.devices import model_device, to_numpy
from training.prompts import prompt_name

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


def related(concept: str, cls: str) -> bool:
    """Whether ``concept`` names ``cls`` or a sign of it (:data:`RELATED_TERMS`, else the class name)."""
    text = concept.lower()
    terms = RELATED_TERMS.get(cls, (prompt_name(cls),))
    return any(t in text for t in terms)


def infer(model, images, batch_size: int):
    """Probabilities (N, C) (:func:`training.models.probabilities`, as served) and feature maps (N, K, h, w)
    in batches on the model's device; the maps go to a :class:`~interpret.audit.store.SpillArray` on disk
    that keeps their GAP in memory (``feats.pooled``), so memory does not grow with N by the maps' size."""
    import torch
    from tqdm.auto import tqdm

    from interpret.audit.store import SpillArray
    from training.models import probabilities

    probs, feats = [], None
    dev = model_device(model)
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="audit: inference", leave=False):
            logits, f = model.forward_all(images[start:start + batch_size].to(dev))
            probs.append(to_numpy(probabilities(logits)))
            if feats is None:
                feats = SpillArray(tuple(f.shape[1:]), pool=True)
            feats.append(f.float())
    if feats is None:
        raise ValueError("no probing images to run inference on")
    return np.concatenate(probs), feats


def performance_section(probe: Probe, probs: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """Per-class AUROC / AP / F1 / MCC at the stored thresholds (``training.metrics``)."""
    from training.metrics import classification_metrics

    table = classification_metrics(probe.labels, probs, thresholds, probe.classes)
    rows = []
    for cls, r in table.iterrows():
        rows.append({"class": str(cls), "n_pos": int(r["n_pos"]), "n_neg": int(r["n_neg"]),
                     "auroc": _finite(r["auroc"]), "ap": _finite(r["ap"]), "f1": _finite(r["f1"]),
                     "mcc": _finite(r["mcc"]), "threshold": _finite(r["threshold"])})
    return rows


@dataclass
class AttentionPass:
    """What one pass of attention maps over the probing set yields."""

    localization: Any  # DataFrame: one row per (image, class with a box)
    outside: np.ndarray  # (N, C) attention share outside the lung-field estimate
    on_marker: np.ndarray  # (N, C) attention share on marker pixels
    markers: np.ndarray  # (N, S, S) bool marker estimate


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
    markers = probe.artefacts if probe.artefacts is not None else _marker_store(probe, batch_size)
    outside, on_marker = np.full((n, c), np.nan), np.full((n, c), np.nan)
    tables = []
    for start in tqdm(range(0, n, batch_size), desc=f"audit: {method} maps", leave=False):
        sl = slice(start, min(start + batch_size, n))
        x = probe.images[sl]
        targets = torch.arange(c).expand(len(x), c)
        maps = to_numpy(attention_maps(model, x, targets, method=method).float())  # (B, C, S, S)
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


def _marker_store(probe: Probe, batch_size: int):
    """:func:`marker_mask` of every probing image, computed in batches into a bool store on disk."""
    from interpret.audit.store import SpillArray, iter_batches

    store = SpillArray((probe.size, probe.size), dtype=bool, as_tensor=False)
    for _, x in iter_batches(probe.images, batch_size):
        store.append(marker_mask(to_numpy(x[:, 0])))
    return store


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


def gallery_cases(loc, n: int) -> dict[str, dict[str, list[str]]]:
    """The ``n`` highest and lowest soft-IoBB cases of each class: ``{class: {"best": ids, "worst": ids}}``."""
    picks: dict[str, dict[str, list[str]]] = {}
    if n <= 0 or len(loc) == 0:
        return picks
    for cls, part in loc.groupby("class", sort=False):
        part = part.sort_values("iobb", ascending=False)
        picks[str(cls)] = {"best": [str(i) for i in part["image_id"].head(n)],
                           "worst": [str(i) for i in part["image_id"].tail(n).iloc[::-1]]}
    return picks


def save_gallery(probe: Probe, loc, picks: dict[str, dict[str, list[str]]], maps, method: str,
                 out: Path) -> list[str]:
    """``out/<class>_best.png`` and ``<class>_worst.png``: image, map overlay and boxes of each pick.

    Args:
        probe: the probing set; loc: the localisation table (IoBB / IoR of each case).
        picks: :func:`gallery_cases`.
        maps: ``{(image_id, class): (S, S) map}``: the maps stored in ``explanations.parquet``, so the
            pictures show exactly what is stored (and served).
        method: the attention method (titles); out: the folder.

    Returns:
        The file names written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    out.mkdir(parents=True, exist_ok=True)
    index = {iid: i for i, iid in enumerate(probe.image_ids)}
    scores = loc.set_index(["image_id", "class"])
    written: list[str] = []
    for cls, kinds in picks.items():
        c = probe.classes.index(cls)
        for kind, iids in kinds.items():
            fig, axes = plt.subplots(1, len(iids), figsize=(2.6 * len(iids), 2.9), dpi=90, squeeze=False)
            try:
                for ax, iid in zip(axes[0], iids):
                    i, r = index[iid], scores.loc[(iid, cls)]
                    ax.imshow(to_numpy(probe.images[i, 0]), cmap="gray", vmin=0, vmax=1)
                    ax.imshow(maps[(iid, cls)], cmap="jet", alpha=0.4, vmin=0, vmax=1)
                    for b in probe.boxes[i][probe.box_labels[i] == c]:
                        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                               edgecolor="lime", linewidth=1.2))
                    ax.set_title(f"{iid}\nIoBB {r['iobb']:.2f}  IoR {r['ior']:.2f}", fontsize=7)
                    ax.axis("off")
                fig.suptitle(f"{cls}: {kind} {len(iids)} ({method})", fontsize=9)
                fig.tight_layout()
                name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cls)}_{kind}.png"
                fig.savefig(out / name)
                written.append(name)
            finally:
                plt.close(fig)
    return written


DISSECTION_MIN_CELLS_SIDE = 7  # feature-map side below which dissection's components say nothing
DISSECTION_EXACT_BUDGET = 256 << 20  # bytes of maps held for exact quantiles; beyond: streaming histogram


def dissection_section(feats, probe: Probe, quantile: float, min_cells_side: int = DISSECTION_MIN_CELLS_SIDE,
                       exact_budget_bytes: int = DISSECTION_EXACT_BUDGET) -> dict:
    """Disjoint / Unique counts per class on the feature layer (:func:`interpret.dissection.dissect_activations`).

    Dissection counts connected components of each unit's thresholded, upsampled map that overlap a box.
    On a coarse map that count means nothing: a 4x4 map upsampled bilinearly is a few smooth blobs,
    any cell above the threshold spans a sixteenth of the image and overlaps most boxes, so almost every
    unit "detects" almost every finding (the demo reported 37-110 unique detectors per image on 4x4 maps).
    The paper's T-DenseNet dissects 28x28 maps; ResNet50/DenseNet121 at 224 px give 7x7, the coarsest
    where components can still separate regions. Below ``min_cells_side`` cells a side the section is
    not run.

    Args:
        feats: (N, K, h, w) feature-layer activations of the probing images.
        probe: the probing set (boxes, labels, image size).
        quantile: q, the per-unit activation quantile ``1 - q`` that thresholds the maps.
        min_cells_side: the smallest feature-map side (cells) dissection is run on (7).
        exact_budget_bytes: the maps' size up to which the per-unit quantiles are exact (held in memory);
            above it they come from a streaming histogram over the maps on disk (bounded memory).

    Returns:
        ``dissection.json`` content: ``quantile``, ``per_class`` rows (class, n_images, disjoint, unique,
        ...), ``overall``, per-unit TSI concepts (``detail``); or empty ``per_class`` with a ``reason`` when
        the maps are too coarse (``"not applicable at this resolution: ..."``, with ``feature_map``
        ``[h, w]`` and ``min_cells_side``) or nothing has boxes.

    Raises:
        ValueError: ``feats`` not 4-D or ``min_cells_side`` below 1.
    """
    if getattr(feats, "ndim", 0) != 4:
        raise ValueError(f"feats must be (N, K, h, w), got shape {tuple(getattr(feats, 'shape', ()))}")
    if int(min_cells_side) != min_cells_side or min_cells_side < 1:
        raise ValueError(f"min_cells_side must be a positive integer, got {min_cells_side!r}")
    h, w = (int(x) for x in feats.shape[-2:])
    if min(h, w) < min_cells_side:
        m = int(min_cells_side)
        return {"quantile": quantile, "per_class": [], "feature_map": [h, w], "min_cells_side": m,
                "reason": (f"not applicable at this resolution: feature maps are {h}x{w} (< {m}x{m}): each "
                           f"cell covers 1/{h * w} of the image, so the thresholded, upsampled map of a unit is a "
                           "few coarse blobs that overlap most boxes, and connected components on so few cells "
                           "cannot separate detectors (Disjoint/Unique would count nearly every unit on every "
                           "finding)")}
    from interpret.dissection import dissect_activations

    if not any(len(b) for b in probe.boxes):
        return {"quantile": quantile, "per_class": [], "reason": "no probing image has boxes"}
    # exact per-unit quantiles while the maps fit exact_budget_bytes, else the streaming histogram
    # (threshold never below the exact one; its bound is in threshold_error_max)
    res = dissect_activations(feats, probe.boxes, probe.box_labels, probe.classes, probe.size, q=quantile,
                              image_ids=probe.image_ids, quantile="auto", exact_budget_bytes=exact_budget_bytes)
    full = res.to_json()
    rows = []
    for r in full["per_class"]:
        if int(r.get("n_images", 0)) > 0:
            rows.append({"class": r["class"], **{k: (_finite(v) if isinstance(v, float) else v)
                                                for k, v in r.items() if k != "class"}})
    return {"quantile": quantile, "per_class": rows, "overall": full["overall"],
            "detail": {"units": full["units"], "params": full["params"],
                       "threshold_error_max": full["threshold_error_max"]}}


def importance_section(model, probe: Probe, feats, annotations: dict[int, list[str]], top_units: int):
    """Class-wise unit importance of the GAP + linear head: the mean exact contribution ``a_u W_cu`` over the
    class's positive images (:func:`interpret.importance.linear_contributions` and
    :func:`~interpret.importance.class_importance`; all images for a class without positives), top units
    per class with their concepts.

    Args:
        model: classifier with an ``nn.Linear`` ``head`` after global average pooling.
        probe: the probing set; feats: (N, K, h, w) feature-layer activations.
        annotations: ``unit -> concepts`` of the feature layer (empty when not annotated).
        top_units: units per class in the summary.

    Returns:
        ``(table, summary)``: DataFrame ``class, unit, importance, rank, concepts, related`` (every class x
        unit) and ``{"per_class": {class: [top units]}, "concept_coverage": float | None}``.
    """
    import pandas as pd
    import torch

    from interpret.importance import class_importance, linear_contributions

    pooled = gap(feats)  # (N, K)
    weight = model.head.weight.detach().float().cpu()  # (C, K), on the CPU
    # one class at a time: the (N, C, K) contributions of every class at once were C K floats per probing image
    # (18 kB for 9 classes x 512 units), the audit's largest allocation growing with N; same products and sums
    per_cls, fallback = [], []
    for c in range(weight.shape[0]):
        contrib = linear_contributions(pooled, weight[c:c + 1])  # (N, 1, K)
        per_cls.append(class_importance(contrib, probe.labels[:, c:c + 1])[0])  # (K,), NaN without positives
        fallback.append(contrib.mean(0)[0])  # (K,) over all images
    per_cls, fallback = torch.stack(per_cls), torch.stack(fallback)  # (C, K)
    per_cls = to_numpy(torch.where(torch.isnan(per_cls), fallback, per_cls))
    ann = annotations
    rows, per_class, covered, eligible = [], {}, 0, 0
    for c, cls in enumerate(probe.classes):
        contrib = per_cls[c]  # (K,)
        order = np.argsort(-contrib, kind="stable")
        ranks = np.empty_like(order)
        ranks[order] = np.arange(len(order))
        for u in range(len(contrib)):
            names = ann.get(u, [])
            rows.append({"class": cls, "unit": u, "importance": float(contrib[u]), "rank": int(ranks[u]) + 1,
                         "concepts": list(names), "related": any(related(n, cls) for n in names)})
        top = [{"unit": int(u), "score": float(contrib[u]), "concepts": list(ann.get(int(u), [])),
                "related": any(related(n, cls) for n in ann.get(int(u), []))} for u in order[:top_units]]
        per_class[cls] = top
        if (probe.labels[:, c] > 0).any():
            eligible += 1
            covered += any(t["related"] for t in top)
    coverage = covered / eligible if (ann and eligible) else None
    return pd.DataFrame(rows), {"per_class": per_class, "concept_coverage": coverage,
                                "basis": "positive images of the class (all images when it has none)"}
