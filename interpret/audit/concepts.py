"""The concept section of the audit: concepts mined from reports, unit annotation with a VLM, and
the check that the VLM can see the findings at all (zero-shot AUROC per class)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from interpret.audit._util import Sections
from interpret.audit.probe import Probe
from interpret.audit.sections import related

if TYPE_CHECKING:  # pragma: no cover
    from interpret.audit.engine import AuditConfig

log = logging.getLogger(__name__)

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
    put a concept in (:func:`training.prompts.concept_prompts`, here with the class name), and ranked
    against the image labels. A VLM at chance here (0.5) gives unit annotations that carry no evidence,
    whatever the method reports.

    Returns:
        ``{"prompt", "per_class": {class: auroc}, "auroc_mean", "n_classes", "supported"}`` (classes with
        positives and negatives only; ``auroc_mean`` None when there are none; ``supported``: the mean
        reaches :data:`VLM_CHANCE_MARGIN`).
    """
    from training.clip.train import per_class_auroc
    from training.prompts import TEMPLATE, concept_prompts, prompt_name

    txt = vlm.encode_texts(concept_prompts([prompt_name(c) for c in probe.classes]))  # (C, d)
    scores = (image_emb.float() @ txt.float().T).numpy()  # (N, C)
    aucs = {c: a for c, a in per_class_auroc(probe.labels, scores, probe.classes).items() if np.isfinite(a)}
    mean = float(np.mean(list(aucs.values()))) if aucs else None
    return {"prompt": TEMPLATE, "per_class": aucs, "n_classes": len(aucs), "auroc_mean": mean,
            "supported": mean is not None and mean >= VLM_CHANCE_MARGIN}


def concept_section(cfg: "AuditConfig", model, probe: Probe, feats, penult: str, sections: Sections,
                    clip: tuple[Any, str] | None) -> ConceptResult:
    """Annotate feature-layer and penultimate-block units (and, as a check, the final-layer class units).

    Args:
        cfg: the audit configuration (method, alpha, beta, reports, max_concepts, batch_size).
        model: the classifier (``forward_head`` of its GAP + linear head is used for the final layer).
        probe: the probing set.
        feats: (N, K, h, w) feature-layer activations of the probing images.
        penult: dotted name of the penultimate block.
        sections: section status recorder.
        clip: ``(ClipBundle, description)`` resolved by the caller, or None (section skipped).

    Returns:
        A :class:`ConceptResult`.
    """
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader

    from interpret.activations import collect_activations
    from interpret.annotation import annotate
    from interpret.concepts import BASE_TEMPLATE, concept_prompts
    from interpret.evaluation import evaluate_final_layer
    from interpret.vlm import VLMAdapter

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
    img = vlm.encode_images(probe.images)  # (N, d)
    txt = vlm.encode_texts(concept_prompts(concepts))  # (M, d)
    tem = vlm.encode_texts([BASE_TEMPLATE])[0]  # (d,)
    vlm_check = vlm_validity(vlm, img, probe)
    if not vlm_check["supported"]:
        log.warning("the VLM (%s) does not tell the findings apart on this probing set (mean zero-shot AUROC %s): "
                    "its concept annotations are not supported by evidence", clip_desc, vlm_check["auroc_mean"])

    pen = collect_activations(model, DataLoader(probe.images, batch_size=cfg.batch_size), penult, progress=False)
    layers = {model.feature_layer: feats.mean(dim=(2, 3)), penult: pen.mean}
    with torch.no_grad():
        logits = model.forward_head(feats)
    params = {"alpha": cfg.alpha} if cfg.method == "mammi" else {}

    beta = cfg.beta if cfg.method in ("mammi", "www") else None
    tables, annotations, layer_info = [], {}, {}
    for layer, acts in list(layers.items()) + [("final", logits)]:
        t = annotate(cfg.method, acts.float(), img, txt, tem, concepts=concepts, beta=beta, layer=layer, **params)
        tables.append(t.drop(columns="indices"))
        annotations[layer] = {int(u): list(c) for u, c in zip(t["unit"], t["concepts"])}
        if layer != "final":
            layer_info[layer] = {"units": int(acts.shape[1]),
                                 "annotated_fraction": float(np.mean([bool(c) for c in t["concepts"]]))}
    evaluation = dict(evaluate_final_layer([annotations["final"].get(i, []) for i in range(len(probe.classes))],
                                           probe.classes, vlm=vlm))
    hits = [any(related(c, cls) for c in annotations["final"].get(i, [])[:1]) for i, cls in enumerate(probe.classes)]
    evaluation.setdefault("top1_related_rate", float(np.mean(hits)))
    table = pd.concat(tables, ignore_index=True)
    sections.ok("concepts")
    summary = {"method": cfg.method, "n_concepts": len(concepts), "source": source, "clip": clip_desc,
               "layers": layer_info, "params": {"beta": cfg.beta, **params}, "vlm_check": vlm_check}
    return ConceptResult(summary, evaluation, table, annotations)
