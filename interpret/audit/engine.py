"""The audit engine: every section on a probing set, written to a folder (no MLflow, no BentoML).

    summary = run_audit(cfg, model, manifest, folder / "audit", model_info={...}, clip=(bundle, "desc"),
                        gates=load_gates("gates.yaml"))

Sections (each recorded as ``ok`` or ``skipped`` with a reason in ``summary.json``):

1. performance per class (AUROC, AP with stratified bootstrap 95% CIs, F1, MCC) at the thresholds stored
   with the model (a class without a reliable threshold has none, and is listed);
2. localisation on images with boxes: soft IoBB, soft IoR, pointing game per class (with CIs), from the maps
   the service serves (:func:`interpret.attention.finalize_maps`: ReLU, upsampling, min-max), and a gallery
   of the best and worst cases per class (``heatmaps/*.png``) whose maps and top units are stored exactly
   in ``explanations.parquet`` (so what the report shows can be checked against ``/explain``);
3. faithfulness of the served maps (deletion, insertion, ROAD MoRF/LeRF against a random pixel order) on
   every class's positive probing images (:mod:`interpret.audit.checks`);
4. the model-parameter randomisation sanity test (cascading and independent);
5. dissection counts (Disjoint, Unique per class) on the feature layer, where its maps are large enough;
6. neuron concept annotation (MAMMI by default) of the feature layer and the penultimate block, with the
   evidence each annotation rests on, the VLM's per-class check, and the final-layer concept-label metrics;
7. class-wise neuron importance (top units per class with the concepts that may be served);
8. shortcut warnings (attention outside a lung-field template or on text markers);
9. the out-of-distribution detector of the served feature statistics (``ood.npz``);
10. per-class verdicts (:mod:`interpret.audit.verdicts`) and the promotion gates (:mod:`interpret.audit.gates`).

Device: the model (and the CLIP of the concept section) is moved once to ``cfg.device`` (``auto``: CUDA when torch
sees one, else the CPU; ``$CXR_TORCH_DEVICE`` overrides auto, as in the service:
:func:`interpret.devices.resolve_torch_device`); one log line and ``summary.json`` ``device`` say where torch ran.
Every batch is moved to the model's device before its forward/backward pass; what is kept (feature maps on disk,
tables, figures) is on the CPU. On the CPU the results are those of earlier versions bit for bit.

A DWARF model (:class:`interpret.models.DwarfClassifierView`) is audited by the same engine with its
refined maps (method ``dwarf``); the sections that need a GAP + linear head (dissection, concepts,
importance, unit shortcuts, OOD on pooled features) are skipped with that reason.

Files written to ``out``: ``summary.json``, ``concepts.parquet``, ``neuron_importance.parquet``,
``localization.parquet``, ``faithfulness.parquet``, ``sanity.parquet``, ``explanations.parquet``,
``dissection.json``, ``ood.npz`` (classifiers), ``report.html``, ``heatmaps/*.png``.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from interpret.audit._util import Sections, _json_default
from interpret.audit.concepts import concept_section
from interpret.audit.gates import Gate, evaluate_gates, flat_metrics, gates_passed
from interpret.audit.probe import (Probe, file_fingerprint, labelled_classes, load_probe, penultimate_layer,
                                   probe_patients)
from interpret.audit.sections import (attention_pass, dissection_section, gallery_cases, importance_section,
                                      infer, localization_summary, performance_section, save_gallery)
from interpret.audit.shortcuts import shortcut_section
from interpret.audit.store import bound_heap, gap
from interpret.devices import DEVICE_ENV, describe_device, model_device, resolve_torch_device, to_numpy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
NOT_GAP_LINEAR = ("not applicable: the head is not global average pooling + linear (e.g. a ViT's class token), so "
                  "unit contributions and final-layer concepts are not exact; maps by Grad-CAM")
ATTENTION_METHODS = ("auto", "cam", "gradcam", "gradcampp", "integrated_gradients", "smoothgrad", "dwarf")
ANNOTATION_METHODS = ("mammi", "mammi_floor", "www", "clip_dissect")

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
    attention: str = "auto"  # attention-map method audited (ATTENTION_METHODS); auto = cam, dwarf for DWARF
    pointing_tolerance: float | None = None  # px; None = Zhang et al.'s 15 px at 224 px, scaled to the probe
    penultimate_layer: str = ""  # default: the block before the feature layer
    dissection_quantile: float = 0.0  # 0 = by architecture (0.01 DenseNet family, 0.04 otherwise)
    dissection_min_cells: int = 7  # dissection needs feature maps of at least this many cells a side
    alpha: float = 0.93  # MAMMI adaptive threshold
    beta: float = 0.95  # concept selection
    top_units: int = 5  # units per class in the importance table / concept coverage / explanations
    gallery_n: int = 2  # best and worst cases per class in the gallery
    max_concepts: int = 200
    outside_threshold: float = 0.5  # attention share outside the lung field that flags a shortcut
    marker_threshold: float = 0.2  # attention share on text markers that flags a shortcut
    min_evidence: int = 10  # representative images an annotation needs to be served
    min_images: int = 10  # mammi_floor: representatives per unit at least
    # the gated metrics; add road_morf,road_lerf for ROAD (reported, not gated: a linear solve per image and step)
    faithfulness_metrics: str = "deletion,insertion"
    faithfulness_steps: int = 10  # perturbation steps per curve
    faithfulness_baseline: str = "blur"  # deletion/insertion baseline image: blur, mean or zero
    faithfulness_max_per_class: int = 20  # positive images per class scored (0 = all)
    road_max_per_class: int = 5  # ... for ROAD (reported, not gated; its imputation is a linear solve per image)
    faithfulness_batch_size: int = 128  # perturbed images per forward pass (CPU throughput grows with the batch)
    sanity_images: int = 16  # probing images of the randomisation test (images with findings first)
    min_cases: int = 5  # images a verdict criterion needs (fewer: insufficient, class unfit)
    min_faithfulness_gain: float = 0.01  # lower CI bound of deletion/insertion AUC gains over random must exceed it
    n_bootstrap: int = 1000  # resamples of every bootstrap CI
    ood_false_alarm: float = 0.05  # target false-alarm rate of the OOD detector on in-distribution images
    out: str = ""  # local folder; default outputs/audits/<stamp>-<model>
    experiment: str = "cxr-audit"
    seed: int = 0
    device: str = "auto"  # torch device: auto (CUDA when present; $CXR_TORCH_DEVICE overrides), cpu, cuda, cuda:N


def _png_u8(arr: np.ndarray) -> bytes:
    """An (H, W) map in [0, 1] as an 8-bit grey PNG (round to nearest)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def explanation_rows(model, probe: Probe, cases: Sequence[tuple[str, str]], method: str, top_k: int,
                     served: Mapping[int, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per (image, class) the map and top units exactly as the library computes them for ``/explain``.

    Maps come from :func:`interpret.attention_maps` (ReLU, bilinear upsampling, min-max through
    :func:`interpret.attention.finalize_maps`), unit contributions from
    :func:`interpret.importance.unit_contributions` (exact ``a_k W_ck`` for a GAP + linear head; none for a
    DWARF model).

    Args:
        model: the classifier (or DWARF view); probe: the probing set.
        cases: ``(image_id, class)`` pairs.
        method: attention method; top_k: units per case.
        served: the unit annotations that may be served
            (:func:`interpret.annotation.served_unit_concepts`: ``unit -> {concepts, evidence, ...}``).

    Returns:
        Rows ``image_id, class, class_index, method, map_png`` (8-bit grey PNG of the (S, S) map),
        ``raw`` (flattened raw map), ``raw_shape``, ``top_units``, ``contributions``, ``concepts``,
        ``evidence`` (images each unit's served concepts rest on; None for a unit served without
        concepts), and ``map`` (the (S, S) float map, for the gallery; not stored).
    """
    from interpret import attention_maps
    from interpret.importance import is_gap_linear, top_units, unit_contributions

    served = dict(served or {})
    index = {iid: i for i, iid in enumerate(probe.image_ids)}
    rows = []
    for iid, cls in cases:
        i, c = index[iid], probe.classes.index(cls)
        x = probe.images[i:i + 1]
        maps, raw = attention_maps(model, x, [[c]], method=method, return_raw=True)  # (1, 1, S, S), (1, 1, h, w)
        units = []
        if is_gap_linear(model):  # exact unit contributions only through a GAP + linear head
            contrib = unit_contributions(model, x, [[c]]).contributions[0, 0]  # (K,)
            units = top_units(contrib, top_k, {int(k): list(v["concepts"]) for k, v in served.items()})
        r = to_numpy(raw[0, 0].float())
        shown = to_numpy(maps[0, 0].float())  # (S, S)
        rows.append({"image_id": iid, "class": cls, "class_index": c, "method": method, "map": shown,
                     "map_png": _png_u8(shown),
                     "raw": r.ravel().tolist(), "raw_shape": list(r.shape),
                     "top_units": [u["unit"] for u in units],
                     "contributions": [u["contribution"] for u in units],
                     "concepts": [u["concepts"] for u in units],
                     "evidence": [served[u["unit"]]["evidence"] if u["unit"] in served else None for u in units]})
    return rows


class _Stages:
    """Names the current section on the progress bar and records each section's wall time (``timings``)."""

    def __init__(self, bar) -> None:
        self.bar, self.name, self.start, self.times = bar, None, 0.0, {}

    def __call__(self, name: str) -> None:
        self.close()
        self.name, self.start = name, time.perf_counter()
        self.bar.set_postfix_str(name)

    def close(self) -> dict[str, float]:
        if self.name is not None:
            self.times[self.name] = round(time.perf_counter() - self.start, 3)
            self.name = None
        return self.times


def _resolve_attention(cfg: AuditConfig, model) -> str:
    from interpret.models import explained_with

    only = explained_with(model)
    if cfg.attention not in ATTENTION_METHODS:
        raise ValueError(f"unknown attention method {cfg.attention!r}; valid: {', '.join(ATTENTION_METHODS)}")
    from interpret.importance import is_gap_linear

    linear = only is not None or is_gap_linear(model)
    if cfg.attention == "auto":
        return only[0] if only else ("cam" if linear else "gradcam")
    if cfg.attention == "cam" and not linear:
        raise ValueError(f"attention method 'cam' is exact only for a global-average-pool + linear head; this "
                         f"{model.arch} has another head (e.g. a ViT's class token): use gradcam (auto picks it)")
    if only and cfg.attention not in only:
        raise ValueError(f"attention method {cfg.attention!r} does not apply to a {model.arch} model; valid: "
                         f"{', '.join(('auto',) + tuple(only))}")
    if not only and cfg.attention == "dwarf":
        raise ValueError("attention method 'dwarf' explains DWARF models; for this classifier use one of "
                         + ", ".join(m for m in ATTENTION_METHODS if m != "dwarf"))
    return cfg.attention


def _faithfulness_metrics(cfg: AuditConfig) -> list[str]:
    from interpret.faithfulness import BASELINES, FAITHFULNESS_METRICS

    names = [m.strip() for m in str(cfg.faithfulness_metrics).split(",") if m.strip()]
    bad = [m for m in names if m not in FAITHFULNESS_METRICS]
    if bad:
        raise ValueError(f"unknown faithfulness metric(s) {bad}; valid: {', '.join(FAITHFULNESS_METRICS)}")
    if cfg.faithfulness_baseline not in BASELINES:
        raise ValueError(f"unknown faithfulness baseline {cfg.faithfulness_baseline!r}; valid: {', '.join(BASELINES)}")
    return names


def _threshold_info(model) -> dict[str, dict[str, Any]]:
    """Per class: the stored threshold, whether it is reliable, and why not."""
    counts = getattr(model, "threshold_positives", None)
    floor = getattr(model, "min_val_positives", None)
    out = {}
    for i, (cls, t) in enumerate(zip(model.class_names, model.thresholds)):
        t = None if t is None or not np.isfinite(float(t)) else float(t)
        n = None if not counts else int(counts[i])
        info: dict[str, Any] = {"threshold": t, "reliable": t is not None, "validation_positives": n}
        if t is None:
            info["reason"] = (f"no reliable threshold: {n} validation positive(s) (< {floor})" if n is not None and floor
                              else "no reliable threshold stored with the model")
        out[cls] = info
    return out


def _infer(model, images, batch_size: int, dwarf: bool):
    """Probabilities (N, C) and, for classifiers, the feature maps (N, K, h, w) (None for DWARF)."""
    import torch

    from training.models import probabilities

    if not dwarf:
        return infer(model, images, batch_size)
    dev = model_device(model)
    with torch.no_grad():
        logits = torch.cat([model(images[s:s + batch_size].to(dev)).float().cpu()
                            for s in range(0, len(images), batch_size)])
    return to_numpy(probabilities(logits)), None


def run_audit(cfg: AuditConfig, model, manifest: Path, out: Path, *, model_info: Mapping[str, Any],
              meta: Mapping[str, Any] | None = None, clip: tuple[Any, str] | None = None,
              gates: Sequence[Gate] = (), baseline: tuple[Mapping[str, Any], str] | None = None,
              baseline_note: str = "", reproduce: str = "") -> dict[str, Any]:
    """Run every section on the probing set of ``manifest`` and write the artifacts to ``out``.

    Args:
        cfg: the audit configuration.
        model: an eval-mode classifier of :mod:`training.models` (``class_names``, ``thresholds``,
            ``input_spec``, ``feature_layer``, GAP + linear ``head``), or a DWARF model seen as a classifier
            (:class:`interpret.models.DwarfClassifierView`).
        manifest: the probing manifest (must exist).
        out: the artifact folder (created).
        model_info: identity of the audited model (``uri``, ``requested_uri``, ``name``, ``version``,
            ``run_id``), recorded as is.
        meta: the registered model's ``meta.json`` (``task``, ``kind``).
        clip: ``(ClipBundle, description)`` for the concept section, or None (section skipped).
        gates: the promotion gates to evaluate.
        baseline: ``(summary, label)`` of another audit to compare with (the champion's), or None.
        baseline_note: why there is no baseline (shown in the report).
        reproduce: the command that reproduces this audit (shown in the report).

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        FileNotFoundError: the manifest or the reports file does not exist.
        ValueError: an unknown attention, annotation or faithfulness method (valid ones listed), or one that
            does not apply to the model; an unknown device (valid forms listed) or CUDA asked for where torch
            sees none.

    The model (and the CLIP's model) is moved to the device in place (``nn.Module.to``).
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from interpret.audit.checks import (curve_plot_png, faithfulness_section, randomisation_examples,
                                        randomisation_plot_png, sanity_section)
    from interpret.audit.diff import compare_summaries
    from interpret.audit.report import build_report
    from interpret.audit.verdicts import (VerdictPolicy, class_verdicts, localization_cis, performance_cis,
                                          unfit_classes)
    from interpret.localization import pointing_tolerance
    from interpret.models import is_dwarf
    from interpret.sanity import sanity_summary

    dwarf = is_dwarf(model)
    if dwarf:
        from interpret.models import as_dwarf_view

        model = as_dwarf_view(model)
    method = _resolve_attention(cfg, model)
    metrics_f = _faithfulness_metrics(cfg)
    if cfg.method not in ANNOTATION_METHODS:
        raise ValueError(f"unknown annotation method {cfg.method!r}; valid: {', '.join(ANNOTATION_METHODS)}")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest.resolve()}")
    if cfg.reports and not Path(cfg.reports).is_file():
        raise FileNotFoundError(f"reports file not found: {Path(cfg.reports).resolve()}")
    device = resolve_torch_device(cfg.device)
    torch.manual_seed(cfg.seed)
    bound_heap()  # freed per-batch maps go back to the system: peak memory does not creep up with N
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    policy = VerdictPolicy(min_cases=cfg.min_cases, min_gain=cfg.min_faithfulness_gain, n_resamples=cfg.n_bootstrap,
                           seed=cfg.seed)
    steps = tqdm(total=11, desc="audit", unit="section")
    stage = _Stages(steps)
    sections = Sections()
    size = cfg.image_size or int(model.input_spec.get("size") or 224)
    all_classes = list(model.class_names)
    labelled = labelled_classes(manifest)
    not_audited = {c: "the probing manifest has no positive label or box of it" for c in all_classes if c not in labelled}
    if not_audited and hasattr(model, "select_classes"):
        audited = [c for c in all_classes if c in labelled]
        if not audited:
            raise ValueError(f"the probing manifest labels none of the model's classes {all_classes}; its labels: "
                             f"{sorted(labelled) or 'none'} (class names are canonical NIH spellings)")
        log.warning("not audited (the probing set does not label them): %s", ", ".join(not_audited))
        model = model.select_classes(audited)  # outputs, head rows and thresholds of the shared classes
    else:
        not_audited = {}
    model.to(device)  # once; every section moves its batches to the model's device
    moved = ["the model"]
    clip_model = getattr(clip[0], "model", None) if clip is not None else None
    if isinstance(clip_model, torch.nn.Module):
        clip_model.to(device)
        moved.append("the CLIP")
    ran_on = {**describe_device(model_device(model)), "requested": cfg.device,
              "chosen_by": ("the configuration" if cfg.device != "auto" else
                            DEVICE_ENV if os.environ.get(DEVICE_ENV, "").strip() else
                            "auto: CUDA when torch sees one, else the CPU")}
    log.info("audit runs torch on %s%s (%s; %s)", ran_on["device"], f" ({ran_on['name']})" if ran_on["name"] else "",
             " and ".join(moved), ran_on["chosen_by"])
    from interpret.importance import is_gap_linear

    linear = not dwarf and is_gap_linear(model)
    probe = load_probe(manifest, model.class_names, size, cfg.split, cfg.max_images, cfg.seed, on_disk=True)
    penult = "" if not linear else (cfg.penultimate_layer or penultimate_layer(model))
    thresholds = _threshold_info(model)
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**{k: model_info.get(k) for k in ("uri", "requested_uri", "name", "version", "run_id")},
                  "kind": "dwarf" if dwarf else "classifier",
                  "arch": model.arch, "classes": list(model.class_names), "all_classes": all_classes,
                  "not_audited": not_audited, "head": "gap_linear" if linear else ("dwarf" if dwarf else "other"),
                  "thresholds": [thresholds[c]["threshold"] for c in model.class_names],
                  "unreliable_thresholds": {c: v["reason"] for c, v in thresholds.items() if not v["reliable"]},
                  "feature_layer": model.feature_layer,
                  "penultimate_layer": penult or None, "input": model.input_spec,
                  "task": meta.get("task", "multilabel")},
        "data": {"manifest": str(manifest.resolve()), "fingerprint": file_fingerprint(manifest),
                 "split": cfg.split, "n_images": probe.n, "image_size": size,
                 "n_with_boxes": int(sum(len(b) > 0 for b in probe.boxes)),
                 "positives": {c: int(probe.labels[:, i].sum()) for i, c in enumerate(probe.classes)}},
        "config": {**asdict(cfg), "attention": method},
        "device": ran_on,
        "verdict_policy": asdict(policy),
        "reproduce": reproduce,
    }
    stage("inference")
    probs, feats = _infer(model, probe.images, cfg.batch_size, dwarf)
    perf = performance_section(probe, probs, [t if t is not None else float("nan")
                                              for t in summary["model"]["thresholds"]])
    cis = performance_cis(probe.labels, probs, probe.classes, policy)
    for row in perf:
        row["auroc_ci"] = cis[row["class"]]["auroc"]
        row["ap_ci"] = cis[row["class"]]["ap"]
        row["threshold_reliable"] = thresholds[row["class"]]["reliable"]
    summary["performance"] = perf
    sections.ok("performance")
    steps.update()

    stage("attention")
    tol = pointing_tolerance(probe.size) if cfg.pointing_tolerance is None else float(cfg.pointing_tolerance)
    ap = attention_pass(model, probe, method, cfg.batch_size, tol)
    loc_cis = localization_cis(ap.localization, policy)
    loc_rows = localization_summary(ap.localization, probe.classes)
    for row in loc_rows:
        row.update({f"{k}_ci": v for k, v in loc_cis.get(row["class"], {}).items()})
    summary["localization"] = {"method": method, "per_class": loc_rows,
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

    stage("faithfulness")
    faith, _ = faithfulness_section(model, probe, method, metrics=metrics_f, steps=cfg.faithfulness_steps,
                                    baseline=cfg.faithfulness_baseline, max_per_class=cfg.faithfulness_max_per_class,
                                    batch_size=cfg.faithfulness_batch_size, seed=cfg.seed,
                                    road_max_per_class=cfg.road_max_per_class)
    faith.to_parquet(out / "faithfulness.parquet", index=False)
    summary["faithfulness"] = {
        "method": method, "metrics": metrics_f, "steps": cfg.faithfulness_steps,
        "baseline": cfg.faithfulness_baseline, "score": "class probability (sigmoid of the logit)",
        "cases": f"positive probing images of each class (at most {cfg.faithfulness_max_per_class or 'all'}; "
                 f"ROAD at most {cfg.road_max_per_class or 'all'})",
        "n_pairs": int(faith[["image_id", "class"]].drop_duplicates().shape[0]) if len(faith) else 0,
        "plots": {}}
    if len(faith):
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        for metric in metrics_f:
            png = curve_plot_png(faith, metric, probe.classes)
            if png is not None:
                (out / "heatmaps" / f"faithfulness_{metric}.png").write_bytes(png)
                summary["faithfulness"]["plots"][metric] = f"faithfulness_{metric}.png"
        sections.ok("faithfulness")
    else:
        sections.skip("faithfulness", "no faithfulness metric asked for" if not metrics_f
                      else "no probing image is positive for any class")
    steps.update()

    stage("sanity")
    layers = None
    note = ""
    if dwarf:
        layers = [n for n in model.randomisation_layers if n not in model.logit_only_layers]
        note = (f"blocks the refined maps do not depend on by construction ({', '.join(model.logit_only_layers)}: "
                "the maps are cross-attention weights computed before the classification head) are not randomised")
    if cfg.sanity_images <= 0:
        import pandas as pd  # noqa: F811

        sanity = pd.DataFrame(columns=["method", "mode", "step", "layer", "image_index", "target", "spearman", "ssim",
                                       "class", "image_id"])
        sanity.to_parquet(out / "sanity.parquet", index=False)
        summary["sanity"] = {"passed": None, "methods": {}, "n_images": 0, "note": "not run (sanity_images = 0)"}
        sections.skip("sanity", "not run (sanity_images = 0)")
    else:
        sanity = sanity_section(model, probe, method, n_images=min(cfg.sanity_images, probe.n),
                                batch_size=cfg.batch_size, seed=cfg.seed, layers=layers)
        sanity.to_parquet(out / "sanity.parquet", index=False)
        summary["sanity"] = {**sanity_summary(sanity, n_resamples=cfg.n_bootstrap, seed=cfg.seed),
                             "n_images": int(sanity["image_index"].nunique()), "note": note}
        try:
            cls_i = int(np.argmax(probe.labels.sum(0)))
            img_i = int(np.flatnonzero(probe.labels[:, cls_i] > 0)[0]) if probe.labels[:, cls_i].any() else 0
            order = list(dict.fromkeys(sanity.sort_values("step")["layer"]))
            ex = randomisation_examples(model, probe.images[img_i], cls_i, method, order, cfg.seed)
            (out / "heatmaps").mkdir(parents=True, exist_ok=True)
            (out / "heatmaps" / "sanity_cascading.png").write_bytes(randomisation_plot_png(
                to_numpy(probe.images[img_i, 0]), ex,
                f"{probe.classes[cls_i]} on {probe.image_ids[img_i]}: cascading randomisation ({method})"))
            summary["sanity"]["plot"] = "sanity_cascading.png"
        except Exception as exc:  # noqa: BLE001 - a picture must not sink the audit
            log.warning("randomisation example plot failed: %s", exc)
        sections.ok("sanity")
    steps.update()

    stage("dissection")
    if dwarf:
        dis = {"per_class": [], "reason": "not applicable to a DWARF model (no GAP + linear feature layer)"}
    else:
        q = cfg.dissection_quantile or (0.01 if "densenet" in model.arch else 0.04)
        dis = dissection_section(feats, probe, q, min_cells_side=cfg.dissection_min_cells)
    summary["dissection"] = {k: v for k, v in dis.items() if k != "detail"}
    (out / "dissection.json").write_text(json.dumps(dis, indent=1, default=_json_default))
    if dis.get("per_class"):
        sections.ok("dissection")
    else:
        sections.skip("dissection", dis.get("reason", "no probing image has boxes"))
    steps.update()

    stage("concepts")
    if not linear:
        from interpret.audit.concepts import ConceptResult, _empty_concepts

        concepts = ConceptResult({"method": cfg.method, "layers": {}}, {}, _empty_concepts())
        sections.skip("concepts", "not applicable to a DWARF model (no feature-layer units to annotate)" if dwarf
                      else NOT_GAP_LINEAR)
    else:
        concepts = concept_section(cfg, model, probe, feats, penult, sections, clip)
    summary["evaluation"] = concepts.evaluation
    summary["data"]["clip"] = concepts.summary.get("clip")
    summary["data"]["concept_source"] = concepts.summary.get("source")
    steps.update()

    stage("importance")
    served: dict[int, dict] = {}
    imp_summary: dict[str, Any] = {"per_class": {}, "concept_coverage": None}
    if not linear:
        pd.DataFrame(columns=["class", "unit", "importance", "rank", "concepts", "related"]).to_parquet(
            out / "neuron_importance.parquet", index=False)
        sections.skip("importance", "not applicable to a DWARF model (no GAP + linear head)" if dwarf
                      else NOT_GAP_LINEAR)
    else:
        from interpret.annotation import served_unit_concepts
        from interpret.audit.concepts import flag_blind_units

        _, ranking = importance_section(model, probe, feats, {}, cfg.top_units)
        blind = concepts.summary.get("vlm_check", {}).get("blind_classes", []) or []
        if len(concepts.table):
            concepts.table = flag_blind_units(concepts.table, blind,
                                              {c: [u["unit"] for u in top] for c, top in ranking["per_class"].items()},
                                              layer=model.feature_layer)
            served = served_unit_concepts(concepts.table, model.feature_layer, cfg.min_evidence)
            concepts.summary["n_flagged"] = int(concepts.table["vlm_blind"].sum())
            concepts.summary.setdefault("n_served", {})[model.feature_layer] = len(served)
        imp_table, imp_summary = importance_section(model, probe, feats,
                                                    {u: v["concepts"] for u, v in served.items()}, cfg.top_units)
        evidence = {(int(u), str(m)): int(e) for u, m, e, lay in zip(concepts.table.get("unit", []),
                                                                     concepts.table.get("method", []),
                                                                     concepts.table.get("evidence", []),
                                                                     concepts.table.get("layer", []))
                    if lay == model.feature_layer}
        for cls, top in imp_summary["per_class"].items():
            for u in top:
                s = served.get(u["unit"])
                u["evidence"] = s["evidence"] if s else evidence.get((u["unit"], cfg.method))
                u["served"] = s is not None
                if s is None:
                    row = concepts.table[(concepts.table["layer"] == model.feature_layer)
                                         & (concepts.table["unit"] == u["unit"])] if len(concepts.table) else None
                    if row is None or not len(row) or not len(row.iloc[0]["concepts"]):
                        u["withheld"] = "no concept annotation"
                    elif bool(row.iloc[0].get("vlm_blind", False)):
                        u["withheld"] = f"the VLM cannot see {', '.join(row.iloc[0]['blind_classes'])}"
                    else:
                        u["withheld"] = f"rests on {int(row.iloc[0]['evidence'])} image(s) (< {cfg.min_evidence})"
                    u["annotated_concepts"] = list(row.iloc[0]["concepts"]) if row is not None and len(row) else []
        imp_table.to_parquet(out / "neuron_importance.parquet", index=False)
        sections.ok("importance")
    summary["importance"] = imp_summary
    summary["concepts"] = concepts.summary
    concepts.table.to_parquet(out / "concepts.parquet", index=False)
    cases = list(dict.fromkeys((iid, cls) for cls, kinds in picks.items() for iids in kinds.values()
                               for iid in iids))
    rows = explanation_rows(model, probe, cases, method, cfg.top_units, served)
    shown = {(r["image_id"], r["class"]): r.pop("map") for r in rows}
    pd.DataFrame(rows, columns=["image_id", "class", "class_index", "method", "map_png", "raw", "raw_shape",
                                "top_units", "contributions", "concepts", "evidence"]).to_parquet(
        out / "explanations.parquet", index=False)
    if picks:  # the gallery draws the stored maps: what the report shows is what was stored and is served
        summary["localization"]["gallery"] = save_gallery(probe, ap.localization, picks, shown, method,
                                                          out / "heatmaps")
    steps.update()

    stage("shortcuts")
    summary["shortcuts"] = shortcut_section(probe, probs, ap, feats, imp_summary["per_class"],
                                            cfg.outside_threshold, cfg.marker_threshold)
    sections.ok("shortcuts")
    steps.update()

    stage("ood")
    if dwarf:
        summary["ood"] = {"fitted": False, "reason": "not applicable to a DWARF model (no pooled feature layer)"}
        sections.skip("ood", summary["ood"]["reason"])
    else:
        from interpret.ood import fit_ood, min_calibration

        patients = probe_patients(manifest, probe.image_ids)
        # training-conditional (<= a with probability 0.9 over the calibration draw) when the calibration half
        # is large enough; else the marginal split-conformal rule (<= a on average), said in threshold_rule
        conf = 0.9 if probe.n // 2 >= min_calibration(cfg.ood_false_alarm, 0.9) else None
        try:
            det = fit_ood(gap(feats), layer=model.feature_layer, target_false_alarm=cfg.ood_false_alarm, seed=cfg.seed,
                          groups=patients, confidence=conf)
            det.save(out / "ood.npz")
            summary["ood"] = {"fitted": True, "file": "ood.npz", **det.to_dict()}
            sections.ok("ood")
        except ValueError as exc:
            summary["ood"] = {"fitted": False, "reason": str(exc)}
            sections.skip("ood", str(exc))
    steps.update()

    stage("verdicts")
    verdicts = class_verdicts(probe.classes, positives=summary["data"]["positives"], localization=ap.localization,
                              faithfulness=faith, sanity=sanity,
                              importance=imp_summary["per_class"] if linear else None, thresholds=thresholds,
                              policy=policy)
    summary["verdicts"] = verdicts
    summary["unfit_classes"] = unfit_classes(verdicts)
    steps.update()

    stage("gates")
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

    stage("report")
    summary["timings"] = dict(stage.times)  # seconds per section (the report's own time is not included)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    (out / "report.html").write_text(build_report(summary, out), encoding="utf-8")
    steps.update()
    steps.close()
    log.info("audit of %s: %s (%s); unfit classes: %s", model_info.get("uri"), summary["status"],
             ", ".join(f"{r.name} {r.status}" for r in results), ", ".join(summary["unfit_classes"]) or "none")
    return summary
