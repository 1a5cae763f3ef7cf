"""The concept section of the audit: concepts mined from reports, unit annotation with a VLM, and
the check that the VLM can see the findings at all (zero-shot AUROC per class, with bootstrap CIs).

What an annotation may claim, stated once:

- **Evidence**: every annotation records how many probing images it rests on (``evidence``); fewer than
  ``min_evidence`` (10) marks it insufficient (``sufficient`` False) and it is not served
  (:func:`interpret.annotation.served_unit_concepts`).
- **VLM-blind classes**: a class is ``vlm_blind`` when the lower bound of the 95 % bootstrap CI of the
  VLM's zero-shot AUROC for it is not above 0.5 (the CI touches or lies below chance, or cannot be
  formed). A class without positives or negatives among the probing images cannot be checked: it is
  listed as ``unchecked``, not as blind.
- **Flagged annotations** (:func:`flag_blind_units`, column ``vlm_blind``): a unit's annotation is flagged
  when (a) one of its selected concepts is related to a blind class (:func:`interpret.audit.sections.related`:
  the class name or one of its signs), or (b) the unit is among a blind class's top units by importance
  (given by the caller, the engine, after :func:`interpret.audit.sections.importance_section`). A VLM that
  cannot tell a finding from its absence cannot vouch for a unit "seeing" it (a), and the concepts shown
  as the reason for such a class's prediction (b) would rest on that VLM. Flagged annotations stay in
  ``concepts.parquet`` but are not served as evidence.
- **cos_vlm, not cos_clip**: the final-layer check scores the annotations with the text encoder of the
  annotating VLM itself, the model scoring its own labels. Under the evaluation protocol
  (:mod:`interpret.evaluation`) that figure is circular, so it is named ``cos_vlm``; ``cos_clip`` is kept
  for a CLIP independent of the annotating one (``concept_benchmark --eval-clip``), which the audit has not.
  Summaries written before the rename are read with ``cos_clip`` mapped to ``cos_vlm``
  (:func:`interpret.audit.diff.upgrade_summary`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from interpret.audit._util import Sections
from interpret.audit.probe import Probe
from interpret.audit.sections import related
from interpret.audit.store import gap, iter_batches
from interpret.devices import model_device, to_numpy

__all__ = ["ConceptResult", "concept_section", "vlm_validity", "flag_blind_units", "final_layer_comparison",
           "VLM_CHANCE_MARGIN", "COMPARED_METHODS", "COS_VLM_NOTE"]

if TYPE_CHECKING:  # pragma: no cover
    from interpret.audit.engine import AuditConfig

log = logging.getLogger(__name__)

#: Why the audit's final-layer cosine is ``cos_vlm`` (recorded in the summary and shown in the report).
COS_VLM_NOTE = ("cos_vlm: the annotating VLM's own text encoder scoring its own labels (circular, not independent "
                "evidence; an independent CLIP's cos_clip is computed by concept_benchmark --eval-clip only)")

@dataclass
class ConceptResult:
    summary: dict
    evaluation: dict
    # DataFrame: layer, unit, method, concepts (list[str]), scores (list[float]), evidence, margin, sufficient,
    # vlm_blind, blind_classes (list[str])
    table: Any
    annotations: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # layer -> unit -> concepts (all)
    # layer -> served_unit_concepts(table, layer, min_evidence): sufficient, not flagged annotations only
    served: dict[str, dict[int, dict]] = field(default_factory=dict)


def _empty_concepts():
    import pandas as pd

    return pd.DataFrame({"layer": pd.Series(dtype=str), "unit": pd.Series(dtype=int),
                         "method": pd.Series(dtype=str), "concepts": pd.Series(dtype=object),
                         "scores": pd.Series(dtype=object), "evidence": pd.Series(dtype="int64"),
                         "margin": pd.Series(dtype=float), "sufficient": pd.Series(dtype=bool),
                         "vlm_blind": pd.Series(dtype=bool), "blind_classes": pd.Series(dtype=object)})


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
COMPARED_METHODS = ("mammi", "mammi_floor")  # measured side by side on the final layer in every audit


def vlm_validity(vlm, image_emb, probe: Probe, *, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict:
    """Can the VLM see the findings it is asked to name? Zero-shot AUROC per class on the probing set.

    Each probing image is scored by ``cos(image, text(prompt))`` with the prompt the annotation methods
    put a concept in (:func:`training.prompts.concept_prompts`, here with the class name), and ranked
    against the image labels. A VLM at chance here (0.5) gives unit annotations that carry no evidence,
    whatever the method reports. Each class's AUROC gets a percentile-bootstrap CI resampled within
    positives and negatives (:func:`interpret.stats.auroc_ci`); a class whose CI's lower bound is not above
    0.5 is ``vlm_blind`` (module docstring).

    Args:
        vlm: an object with ``encode_texts`` (:class:`interpret.vlm.VLMAdapter`).
        image_emb: (N, d) image embeddings of the probing images.
        probe: the probing set (labels (N, C), classes).
        n_resamples, confidence, seed: of the bootstrap.

    Returns:
        ``{"prompt", "per_class": {class: auroc}, "per_class_ci": {class: CI dict}, "auroc_mean",
        "n_classes", "supported", "blind_classes": [...], "unchecked_classes": [...], "blind_rule"}``
        (``per_class`` and the mean over classes with positives and negatives only; ``auroc_mean`` None
        when there are none; ``supported``: the mean reaches :data:`VLM_CHANCE_MARGIN`).
    """
    from interpret.stats import auroc_ci
    from training.clip.train import per_class_auroc
    from training.prompts import TEMPLATE, concept_prompts, prompt_name

    txt = vlm.encode_texts(concept_prompts([prompt_name(c) for c in probe.classes]))  # (C, d)
    scores = to_numpy(image_emb.float() @ txt.float().T)  # (N, C)
    aucs = {c: a for c, a in per_class_auroc(probe.labels, scores, probe.classes).items() if np.isfinite(a)}
    labels = np.asarray(probe.labels) > 0
    cis = {c: auroc_ci(labels[:, probe.classes.index(c)], scores[:, probe.classes.index(c)],
                       n_resamples=n_resamples, confidence=confidence, seed=seed) for c in aucs}
    blind = [c for c, ci in cis.items() if not ci.low > 0.5]  # NaN bounds count as blind
    mean = float(np.mean(list(aucs.values()))) if aucs else None
    return {"prompt": TEMPLATE, "per_class": aucs, "n_classes": len(aucs), "auroc_mean": mean,
            "supported": mean is not None and mean >= VLM_CHANCE_MARGIN,
            "per_class_ci": {c: ci.to_dict() for c, ci in cis.items()},
            "blind_classes": blind, "unchecked_classes": [c for c in probe.classes if c not in aucs],
            "blind_rule": f"lower bound of the {confidence:.0%} bootstrap CI of the zero-shot AUROC <= 0.5"}


def flag_blind_units(table, blind_classes: Sequence[str],
                     per_class_top_units: Mapping[str, Sequence[int]] | None = None,
                     layer: str | None = None):
    """Flag the annotations that rest on a VLM blind to a class (module docstring: rules (a) and (b)).

    Args:
        table: the concept table (``layer, unit, concepts, ...``; :func:`interpret.annotation.annotate`).
        blind_classes: the classes the VLM cannot see (``vlm_validity(...)["blind_classes"]``).
        per_class_top_units: ``{class: [unit, ...]}``, the top units by importance per class (e.g.
            ``{c: [u["unit"] for u in top] for c, top in importance_summary["per_class"].items()}``); None
            applies rule (a) only.
        layer: the layer those units belong to (the feature layer); required with ``per_class_top_units``.

    Returns:
        A copy of ``table`` with ``vlm_blind`` (bool) and ``blind_classes`` (list[str], sorted: the blind
        classes that flag the row). Flags already in ``table`` are kept (the function can be applied again
        with the importance ranking).

    Raises:
        ValueError: ``per_class_top_units`` without ``layer``.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"layer": ["f"] * 3, "unit": [0, 1, 2],
        ...                   "concepts": [["enlarged cardiac silhouette"], ["rib"], ["rib"]]})
        >>> flag_blind_units(t, ["Cardiomegaly"], {"Cardiomegaly": [2]}, layer="f")["vlm_blind"].tolist()
        [True, False, True]
    """
    if per_class_top_units is not None and layer is None:
        raise ValueError("per_class_top_units needs the layer its units belong to (layer=None)")
    out = table.copy()
    blind = [str(c) for c in blind_classes]
    previous = list(out["blind_classes"]) if "blind_classes" in out else [[] for _ in range(len(out))]
    tied: dict[int, set[str]] = {}
    for cls in blind:
        for u in (per_class_top_units or {}).get(cls, []):
            tied.setdefault(int(u), set()).add(cls)
    flags = []
    for lay, unit, names, prev in zip(out["layer"], out["unit"], out["concepts"], previous):
        hit = {cls for cls in blind for n in (names if names is not None else []) if related(str(n), cls)}
        if lay == layer:
            hit |= tied.get(int(unit), set())
        flags.append(sorted(hit | set(prev if prev is not None else [])))
    out["blind_classes"] = flags
    out["vlm_blind"] = [bool(f) for f in flags]
    return out


def final_layer_comparison(logits, img, txt, tem, concepts: Sequence[str], classes: Sequence[str], *,
                           encoders: Mapping[str, Any], beta: float, alpha: float, min_images: int,
                           min_evidence: int, methods: Sequence[str] = COMPARED_METHODS,
                           n_resamples: int = 1000, seed: int = 0) -> dict:
    """The final-layer check (class units vs their class names) for several annotation methods side by side,
    with percentile-bootstrap 95 % CIs over classes.

    Args:
        logits: (N, C) final-layer activations; img (N, d), txt (M, d), tem (d,): the embeddings.
        concepts: the M concept names; classes: the C class names (unit c = class c).
        encoders: ``{short name: text encoder}`` (:func:`interpret.evaluation.resolve_encoders`).
        beta, alpha, min_images, min_evidence: selection and method parameters (``min_images`` for
            ``mammi_floor`` only).
        methods: the methods compared (``mammi``, ``mammi_floor``).
        n_resamples, seed: of the bootstrap.

    Returns:
        ``{"methods": {method: {"figures": {figure: CI dict}, "evidence": evidence_summary,
        "n_annotated"}}, "difference": {figure: CI dict of the per-class difference, second method minus
        first}, "n_classes", "basis"}``.
    """
    from interpret.annotation import annotate, evidence_summary
    from interpret.evaluation import FIGURES, final_layer_cis, per_unit_evaluation
    from interpret.stats import mean_ci

    out: dict[str, Any] = {"methods": {}, "n_classes": len(classes),
                           "basis": f"percentile bootstrap over the {len(classes)} final-layer units (one per "
                                    f"class), {n_resamples} resamples, 95 %"}
    per_unit = {}
    for method in methods:
        params = {"alpha": alpha, **({"min_images": min_images} if method == "mammi_floor" else {})}
        t = annotate(method, logits.float(), img, txt, tem, concepts=concepts, beta=beta, layer="final",
                     min_evidence=min_evidence, **params)
        table = per_unit_evaluation([list(c) for c in t["concepts"]], classes, encoders=encoders)
        per_unit[method] = table
        out["methods"][method] = {"figures": final_layer_cis(table, n_resamples=n_resamples, seed=seed),
                                  "evidence": evidence_summary(t, min_evidence),
                                  "n_annotated": int(table["best"].notna().sum()), "params": params}
    if len(methods) == 2:
        a, b = (per_unit[m] for m in methods)
        cols = [(c, k) for c, k in FIGURES] + [(c, c) for c in a.columns if str(c).startswith("cos_")]
        out["difference"] = {key: mean_ci(np.asarray(b[col], float) - np.asarray(a[col], float),
                                          n_resamples=n_resamples, seed=seed).to_dict() for col, key in cols}
        out["difference_of"] = f"{methods[1]} - {methods[0]} per class"
    return out


def _encode_probe_images(vlm, images, chunk: int = 1024):
    """Image embeddings (N, d) of the probing images: in one call for a tensor, in chunks of ``chunk`` images
    for an on-disk store (each chunk goes through the same preprocessing and batches of the adapter)."""
    import torch

    if isinstance(images, torch.Tensor):
        return vlm.encode_images(images)
    return torch.cat([vlm.encode_images(x) for _, x in iter_batches(images, chunk)])


def concept_section(cfg: "AuditConfig", model, probe: Probe, feats, penult: str, sections: Sections,
                    clip: tuple[Any, str] | None) -> ConceptResult:
    """Annotate feature-layer and penultimate-block units (and, as a check, the final-layer class units).

    Args:
        cfg: the audit configuration (method, alpha, beta, reports, max_concepts, batch_size, seed; and, when
            the configuration has them, ``min_evidence`` (default 10) and ``min_images`` (``mammi_floor``'s
            floor, default 10)).
        model: the classifier (``forward_head`` of its GAP + linear head is used for the final layer).
        probe: the probing set.
        feats: (N, K, h, w) feature-layer activations of the probing images.
        penult: dotted name of the penultimate block.
        sections: section status recorder.
        clip: ``(ClipBundle, description)`` resolved by the caller, or None (section skipped).

    Returns:
        A :class:`ConceptResult`: ``table`` with evidence, margin, sufficiency and the VLM flags (rule (a);
        the engine may add rule (b) with :func:`flag_blind_units`), ``served`` per layer, and in ``summary``:
        per layer the evidence distribution (``evidence_min``, ``evidence_median``, ``below_min_evidence``,
        ``n_distinct_scores``, ...), ``vlm_check`` with per-class CIs and blind classes, ``n_flagged`` and
        ``final_layer_comparison`` (:func:`final_layer_comparison` for ``mammi`` and ``mammi_floor``).
    """
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader

    from interpret.activations import collect_activations
    from interpret.annotation import DEFAULT_MIN_EVIDENCE, annotate, evidence_summary, served_unit_concepts
    from interpret.concepts import BASE_TEMPLATE, concept_prompts
    from interpret.evaluation import SENTENCE_ENCODERS, evaluate_final_layer, resolve_encoders
    from interpret.vlm import VLMAdapter

    min_evidence = int(getattr(cfg, "min_evidence", DEFAULT_MIN_EVIDENCE))
    min_images = int(getattr(cfg, "min_images", DEFAULT_MIN_EVIDENCE))
    seed = int(getattr(cfg, "seed", 0))
    empty = ConceptResult({"method": cfg.method, "layers": {}}, {}, _empty_concepts())
    reports, source = read_reports(cfg.reports, probe)
    empty.summary["source"] = source
    if not reports:
        sections.skip("concepts", "no reports: pass --reports FILE or use a manifest with a report column")
        return empty
    concepts = _mine_concepts(reports, cfg.max_concepts)
    if not concepts:
        sections.skip("concepts", f"no concepts could be mined from {source}")
        return empty
    if clip is None:
        sections.skip("concepts", "no CLIP model given")
        return empty
    bundle, clip_desc = clip
    vlm = VLMAdapter(bundle, batch_size=cfg.batch_size)
    img = _encode_probe_images(vlm, probe.images)  # (N, d)
    txt = vlm.encode_texts(concept_prompts(concepts))  # (M, d)
    tem = vlm.encode_texts([BASE_TEMPLATE])[0]  # (d,)
    vlm_check = vlm_validity(vlm, img, probe, seed=seed)
    if not vlm_check["supported"]:
        log.warning("the VLM (%s) does not tell the findings apart on this probing set (mean zero-shot AUROC %s): "
                    "its concept annotations are not supported by evidence", clip_desc, vlm_check["auroc_mean"])
    if vlm_check["blind_classes"]:
        log.warning("the VLM (%s) cannot be shown to see %s (zero-shot AUROC CI touches 0.5): annotations "
                    "related to them are flagged and not served", clip_desc, ", ".join(vlm_check["blind_classes"]))

    # the mean only: the unit maxima and minima collected with it were two more (N, K) arrays held to the end
    pen_mean = collect_activations(model, DataLoader(probe.images, batch_size=cfg.batch_size), penult,
                                   progress=False).mean
    layers = {model.feature_layer: gap(feats), penult: pen_mean}
    dev = model_device(model)
    with torch.no_grad():  # the head on the stored maps, in batches (they may be on disk); logits kept on the CPU
        logits = torch.cat([model.forward_head(f.to(dev)).cpu() for _, f in iter_batches(feats, cfg.batch_size)])
    params: dict[str, Any] = {"alpha": cfg.alpha} if cfg.method in ("mammi", "mammi_floor") else {}
    if cfg.method == "mammi_floor":
        params["min_images"] = min_images

    beta = cfg.beta if cfg.method in ("mammi", "mammi_floor", "www") else None
    tables, annotations, layer_info = [], {}, {}
    for layer, acts in list(layers.items()) + [("final", logits)]:
        t = annotate(cfg.method, acts.float(), img, txt, tem, concepts=concepts, beta=beta, layer=layer,
                     min_evidence=min_evidence, **params)
        tables.append(t.drop(columns="indices"))
        annotations[layer] = {int(u): list(c) for u, c in zip(t["unit"], t["concepts"])}
        if layer != "final":
            ev = evidence_summary(t, min_evidence)
            layer_info[layer] = {"units": int(acts.shape[1]),
                                 "annotated_fraction": float(np.mean([bool(c) for c in t["concepts"]])),
                                 **{k: v for k, v in ev.items() if k != "n_units"}}
    # the annotating VLM's own text encoder: named cos_vlm (circular; COS_VLM_NOTE), never cos_clip
    own = (("vlm", vlm.encode_texts), *SENTENCE_ENCODERS)
    encoders = resolve_encoders(sentence_encoders=own)
    evaluation = dict(evaluate_final_layer([annotations["final"].get(i, []) for i in range(len(probe.classes))],
                                           probe.classes, sentence_encoders=own))
    hits = [any(related(c, cls) for c in annotations["final"].get(i, [])[:1]) for i, cls in enumerate(probe.classes)]
    evaluation.setdefault("top1_related_rate", float(np.mean(hits)))
    comparison = final_layer_comparison(logits, img, txt, tem, concepts, probe.classes, encoders=encoders,
                                        beta=cfg.beta, alpha=cfg.alpha, min_images=min_images,
                                        min_evidence=min_evidence, seed=seed)
    table = flag_blind_units(pd.concat(tables, ignore_index=True), vlm_check["blind_classes"])
    served = {layer: served_unit_concepts(table, layer, min_evidence) for layer in layers}
    sections.ok("concepts")
    summary = {"method": cfg.method, "n_concepts": len(concepts), "source": source, "clip": clip_desc,
               "layers": layer_info, "params": {"beta": cfg.beta, "min_evidence": min_evidence, **params},
               "vlm_check": vlm_check, "n_flagged": int(table["vlm_blind"].sum()),
               "n_served": {layer: len(v) for layer, v in served.items()},
               "final_layer_comparison": comparison, "cos_vlm_note": COS_VLM_NOTE}
    return ConceptResult(summary, evaluation, table, annotations, served)
