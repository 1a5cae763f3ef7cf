"""The audit engine: every section on a probing set, written to a folder (no MLflow, no BentoML).

    summary = run_audit(cfg, model, manifest, folder / "audit", model_info={...}, clip=(bundle, "desc"),
                        gates=load_gates("gates.yaml"))

Sections (each recorded as ``ok`` or ``skipped`` with a reason in ``summary.json``):

1. performance per class (AUROC, AP, F1, MCC) at the thresholds stored with the model;
2. localisation on images with boxes: soft IoBB, soft IoR, pointing game per class, from the maps the
   service serves (:func:`interpret.attention.finalize_maps`: ReLU, upsampling, min-max), and a gallery
   of the best and worst cases per class (``heatmaps/*.png``) whose maps and top units are stored exactly
   in ``explanations.parquet`` (so what the report shows can be checked against ``/explain``);
3. dissection counts (Disjoint, Unique per class) on the feature layer;
4. neuron concept annotation (MAMMI by default) of the feature layer and the penultimate block, plus the
   final-layer concept-label metrics;
5. class-wise neuron importance (top units per class with their concepts);
6. shortcut warnings (attention outside a lung-field template or on text markers);
7. the promotion gates evaluated on the flat figures (:mod:`interpret.audit.gates`).

Files written to ``out``: ``summary.json``, ``concepts.parquet``, ``neuron_importance.parquet``,
``localization.parquet``, ``explanations.parquet``, ``dissection.json``, ``report.html``,
``heatmaps/*.png``.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from interpret.audit._util import Sections, _json_default
from interpret.audit.concepts import concept_section
from interpret.audit.gates import Gate, evaluate_gates, flat_metrics, gates_passed
from interpret.audit.probe import Probe, file_fingerprint, load_probe, penultimate_layer
from interpret.audit.sections import (attention_pass, dissection_section, gallery_cases, importance_section,
                                      infer, localization_summary, performance_section, save_gallery)
from interpret.audit.shortcuts import shortcut_section

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ATTENTION_METHODS = ("cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad")
ANNOTATION_METHODS = ("mammi", "www", "clip_dissect")

__all__ = ["AuditConfig", "run_audit", "explanation_rows", "SCHEMA_VERSION", "ATTENTION_METHODS",
           "ANNOTATION_METHODS"]


@dataclass
class AuditConfig:
    """What to audit and how. The string fields naming a model, data, CLIP and gates describe the request
    (they are recorded in ``summary.json``); the caller resolves them into objects."""

    model_uri: str = "models:/cxr-classifier@candidate"
    data: str = "outputs/phantom/manifest.parquet"
    reports: str = ""  # text file, one report a line; empty = the manifest's report column
    clip: str = "models:/cxr-clip@candidate"  # registered cxr-clip, an open_clip spec, or "scratch"
    method: str = "mammi"  # concept annotation method (ANNOTATION_METHODS)
    gates: str = "mlflow_projects/gates.yaml"
    split: str = "test"  # probing set: a manifest split, or "all"
    max_images: int = 400
    image_size: int = 0  # 0 = the model's input size
    batch_size: int = 32
    attention: str = "cam"  # attention-map method for localisation and shortcuts (ATTENTION_METHODS)
    pointing_tolerance: float | None = None  # px; None = Zhang et al.'s 15 px at 224 px, scaled to the probe
    penultimate_layer: str = ""  # default: the block before the feature layer
    dissection_quantile: float = 0.0  # 0 = by architecture (0.01 DenseNet family, 0.04 otherwise)
    alpha: float = 0.93  # MAMMI adaptive threshold
    beta: float = 0.95  # concept selection
    top_units: int = 5  # units per class in the importance table / concept coverage / explanations
    gallery_n: int = 2  # best and worst cases per class in the gallery
    max_concepts: int = 200
    outside_threshold: float = 0.5  # attention share outside the lung field that flags a shortcut
    marker_threshold: float = 0.2  # attention share on text markers that flags a shortcut
    out: str = ""  # local folder; default outputs/audits/<stamp>-<model>
    experiment: str = "cxr-audit"
    seed: int = 0


def _png_u8(arr: np.ndarray) -> bytes:
    """An (H, W) map in [0, 1] as an 8-bit grey PNG (round to nearest)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def explanation_rows(model, probe: Probe, cases: Sequence[tuple[str, str]], method: str, top_k: int,
                     annotations: Mapping[int, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Per (image, class) the map and top units exactly as the library computes them for ``/explain``.

    Maps come from :func:`interpret.attention_maps` (ReLU, bilinear upsampling, min-max through
    :func:`interpret.attention.finalize_maps`), unit contributions from
    :func:`interpret.importance.unit_contributions` (exact ``a_k W_ck`` for a GAP + linear head).

    Args:
        model: the classifier; probe: the probing set.
        cases: ``(image_id, class)`` pairs.
        method: attention method; top_k: units per case; annotations: ``unit -> concepts``.

    Returns:
        Rows ``image_id, class, class_index, method, map_png`` (8-bit grey PNG of the (S, S) map),
        ``raw`` (flattened raw map), ``raw_shape``, ``top_units``, ``contributions``, ``concepts``, and
        ``map`` (the (S, S) float map, for the gallery; not stored).
    """
    from interpret import attention_maps
    from interpret.importance import top_units, unit_contributions

    index = {iid: i for i, iid in enumerate(probe.image_ids)}
    rows = []
    for iid, cls in cases:
        i, c = index[iid], probe.classes.index(cls)
        x = probe.images[i:i + 1]
        maps, raw = attention_maps(model, x, [[c]], method=method, return_raw=True)  # (1, 1, S, S), (1, 1, h, w)
        contrib = unit_contributions(model, x, [[c]]).contributions[0, 0]  # (K,)
        units = top_units(contrib, top_k, {int(k): list(v) for k, v in (annotations or {}).items()})
        r = raw[0, 0].detach().float().numpy()
        shown = maps[0, 0].detach().float().numpy()  # (S, S)
        rows.append({"image_id": iid, "class": cls, "class_index": c, "method": method, "map": shown,
                     "map_png": _png_u8(shown),
                     "raw": r.ravel().tolist(), "raw_shape": list(r.shape),
                     "top_units": [u["unit"] for u in units],
                     "contributions": [u["contribution"] for u in units],
                     "concepts": [u["concepts"] for u in units]})
    return rows


def run_audit(cfg: AuditConfig, model, manifest: Path, out: Path, *, model_info: Mapping[str, Any],
              meta: Mapping[str, Any] | None = None, clip: tuple[Any, str] | None = None,
              gates: Sequence[Gate] = (), baseline: tuple[Mapping[str, Any], str] | None = None,
              baseline_note: str = "", reproduce: str = "") -> dict[str, Any]:
    """Run every section on the probing set of ``manifest`` and write the artifacts to ``out``.

    Args:
        cfg: the audit configuration.
        model: an eval-mode classifier of :mod:`training.models` (``class_names``, ``thresholds``,
            ``input_spec``, ``feature_layer``, GAP + linear ``head``).
        manifest: the probing manifest (must exist).
        out: the artifact folder (created).
        model_info: identity of the audited model (``uri``, ``requested_uri``, ``name``, ``version``,
            ``run_id``), recorded as is.
        meta: the registered model's ``meta.json`` (``task``).
        clip: ``(ClipBundle, description)`` for the concept section, or None (section skipped).
        gates: the promotion gates to evaluate.
        baseline: ``(summary, label)`` of another audit to compare with (the champion's), or None.
        baseline_note: why there is no baseline (shown in the report).
        reproduce: the command that reproduces this audit (shown in the report).

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        FileNotFoundError: the manifest or the reports file does not exist.
        ValueError: an unknown attention or annotation method (valid ones listed).
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from interpret.audit.diff import compare_summaries
    from interpret.audit.report import build_report
    from interpret.localization import pointing_tolerance

    if cfg.attention not in ATTENTION_METHODS:
        raise ValueError(f"unknown attention method {cfg.attention!r}; valid: {', '.join(ATTENTION_METHODS)}")
    if cfg.method not in ANNOTATION_METHODS:
        raise ValueError(f"unknown annotation method {cfg.method!r}; valid: {', '.join(ANNOTATION_METHODS)}")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest.resolve()}")
    if cfg.reports and not Path(cfg.reports).is_file():
        raise FileNotFoundError(f"reports file not found: {Path(cfg.reports).resolve()}")
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    steps = tqdm(total=8, desc="audit", unit="section")
    sections = Sections()
    size = cfg.image_size or int(model.input_spec.get("size") or 224)
    probe = load_probe(manifest, model.class_names, size, cfg.split, cfg.max_images, cfg.seed)
    penult = cfg.penultimate_layer or penultimate_layer(model)
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**{k: model_info.get(k) for k in ("uri", "requested_uri", "name", "version", "run_id")},
                  "arch": model.arch, "classes": list(model.class_names),
                  "thresholds": [float(t) for t in model.thresholds], "feature_layer": model.feature_layer,
                  "penultimate_layer": penult, "input": model.input_spec, "task": meta.get("task", "multilabel")},
        "data": {"manifest": str(manifest.resolve()), "fingerprint": file_fingerprint(manifest),
                 "split": cfg.split, "n_images": probe.n, "image_size": size,
                 "n_with_boxes": int(sum(len(b) > 0 for b in probe.boxes)),
                 "positives": {c: int(probe.labels[:, i].sum()) for i, c in enumerate(probe.classes)}},
        "config": asdict(cfg),
        "reproduce": reproduce,
    }
    steps.set_postfix_str("inference")
    probs, feats = infer(model, probe.images, cfg.batch_size)
    summary["performance"] = performance_section(probe, probs, model.thresholds)
    sections.ok("performance")
    steps.update()

    steps.set_postfix_str("attention")
    tol = pointing_tolerance(probe.size) if cfg.pointing_tolerance is None else float(cfg.pointing_tolerance)
    ap = attention_pass(model, probe, cfg.attention, cfg.batch_size, tol)
    summary["localization"] = {"method": cfg.attention, "per_class": localization_summary(ap.localization, probe.classes),
                               "n_pairs": int(len(ap.localization)), "pointing_tolerance_px": tol,
                               "maps": "ReLU -> bilinear upsampling -> min-max (interpret.attention.finalize_maps), "
                                       "the maps /explain serves"}
    picks = gallery_cases(ap.localization, cfg.gallery_n)
    if len(ap.localization):
        ap.localization.to_parquet(out / "localization.parquet", index=False)
        sections.ok("localization")
    else:
        pd.DataFrame(columns=["image_id", "class", "iobb", "ior", "pointing", "pointing_chance"]).to_parquet(
            out / "localization.parquet", index=False)
        sections.skip("localization", "no probing image has boxes of the model's classes")
    steps.update()

    steps.set_postfix_str("dissection")
    q = cfg.dissection_quantile or (0.01 if "densenet" in model.arch else 0.04)
    dis = dissection_section(feats, probe, q)
    summary["dissection"] = {k: v for k, v in dis.items() if k != "detail"}
    (out / "dissection.json").write_text(json.dumps(dis, indent=1, default=_json_default))
    if dis.get("per_class"):
        sections.ok("dissection")
    else:
        sections.skip("dissection", dis.get("reason", "no probing image has boxes"))
    steps.update()

    steps.set_postfix_str("concepts")
    concepts = concept_section(cfg, model, probe, feats, penult, sections, clip)
    summary["concepts"] = concepts.summary
    summary["evaluation"] = concepts.evaluation
    summary["data"]["clip"] = concepts.summary.get("clip")
    summary["data"]["concept_source"] = concepts.summary.get("source")
    concepts.table.to_parquet(out / "concepts.parquet", index=False)
    steps.update()

    steps.set_postfix_str("importance")
    unit_concepts = concepts.annotations.get(model.feature_layer, {})
    imp_table, imp_summary = importance_section(model, probe, feats, unit_concepts, cfg.top_units)
    imp_table.to_parquet(out / "neuron_importance.parquet", index=False)
    summary["importance"] = imp_summary
    sections.ok("importance")
    cases = list(dict.fromkeys((iid, cls) for cls, kinds in picks.items() for iids in kinds.values()
                               for iid in iids))
    rows = explanation_rows(model, probe, cases, cfg.attention, cfg.top_units, unit_concepts)
    shown = {(r["image_id"], r["class"]): r.pop("map") for r in rows}
    pd.DataFrame(rows, columns=["image_id", "class", "class_index", "method", "map_png", "raw", "raw_shape",
                                "top_units", "contributions", "concepts"]).to_parquet(out / "explanations.parquet",
                                                                                      index=False)
    if picks:  # the gallery draws the stored maps: what the report shows is what was stored and is served
        summary["localization"]["gallery"] = save_gallery(probe, ap.localization, picks, shown, cfg.attention,
                                                          out / "heatmaps")
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
    summary["gates"] = {"file": str(cfg.gates), "results": [asdict(r) for r in results],
                        "passed": gates_passed(results)}
    summary["status"] = "passed" if gates_passed(results) else "failed"
    if baseline is not None:
        other, label = baseline
        summary["comparison"] = compare_summaries(other, summary, label_a=label,
                                                  label_b=f"this audit v{model_info.get('version')}")
    else:
        summary["comparison"] = None
        summary["comparison_note"] = baseline_note
    steps.update()

    steps.set_postfix_str("report")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    (out / "report.html").write_text(build_report(summary, out), encoding="utf-8")
    steps.update()
    steps.close()
    log.info("audit of %s: %s (%s)", model_info.get("uri"), summary["status"],
             ", ".join(f"{r.name} {r.status}" for r in results))
    return summary
