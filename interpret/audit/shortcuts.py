"""Shortcut estimates: attention outside a lung-field template or on burned-in text markers."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from interpret.audit._util import _nanmean
from interpret.audit.probe import Probe
from interpret.audit.store import gap
from interpret.devices import to_numpy

if TYPE_CHECKING:  # pragma: no cover
    from interpret.audit.sections import AttentionPass

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
        sat = to_numpy(F.max_pool2d(t, 2 * grow + 1, stride=1, padding=grow)[:, 0]) > 0
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


def shortcut_section(probe: Probe, probs: np.ndarray, ap: "AttentionPass", feats, unit_table: Mapping[str, list[dict]],
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
    if feats is not None:  # unit activation maps (a DWARF model has no feature-layer units)
        pooled = gap(feats)  # (N, K)
        for cls, units in unit_table.items():
            for u in units:
                unit = int(u["unit"])
                if unit in seen:
                    continue
                seen.add(unit)
                top = torch.argsort(pooled[:, unit], descending=True)[:top_images]
                m = F.interpolate(F.relu(feats[top, unit:unit + 1]), size=(probe.size, probe.size), mode="bilinear",
                                  align_corners=False)  # (n, 1, S, S)
                o, k = attention_shares(to_numpy(m), field_mask, ap.markers[to_numpy(top)])
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
