"""Neuron concept annotation: one module per method, one signature.

``concept_scores(method, activations (N, U), image_embeddings (N, d), concept_embeddings (M, d),
template_embedding (d,) | None, **params) -> scores (U, M)`` and ``select_concepts(scores, beta)``
(DESIGN.md). Methods (``list_methods()``):

- ``mammi`` (:mod:`.mammi`): adaptive representatives (``alpha`` 0.93), template-adjusted mean cosine.
- ``mammi_floor`` (:mod:`.mammi`): not the paper's; MAMMI's adaptive set united with the top
  ``min_images`` (10) images, so no varying unit rests on fewer images. Same score.
- ``www`` (:mod:`.www`): fixed top-k (40) representatives, same score.
- ``clip_dissect`` (:mod:`.clip_dissect`): soft-WPMI (``top_k`` 100, ``a`` 10, ``lam`` 1, p .998 -> .97).
- ``falcon`` (:mod:`.falcon`): FALCON with reports as captions: crops of the top images around the unit's
  activation, nearest captions, caption-word scores, contrast with the lowest images (needs
  ``crop_embeddings``, ``caption_embeddings``, ``caption_concepts``).
- ``falcon_simplified`` (:mod:`.falcon_simplified`): not the paper's FALCON (whole images, one nearest
  report, no caption-word scoring): top images -> nearest reports -> their concepts (needs
  ``report_embeddings``, ``report_concepts``).
- ``tsi`` (:mod:`.tsi`): dissection IoU table (``iou``), best concept above 0.04.

:func:`annotate` returns the table the audit stores, with the evidence behind each annotation;
:func:`served_unit_concepts` (:mod:`.evidence`) picks from it what the service may show.

Example:
    >>> import torch, torch.nn.functional as F
    >>> acts = torch.rand(50, 4); v = F.normalize(torch.randn(50, 8), dim=1)
    >>> t = F.normalize(torch.randn(3, 8), dim=1); tem = F.normalize(torch.randn(8), dim=0)
    >>> concept_scores("mammi", acts, v, t, tem).shape
    torch.Size([4, 3])
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch

from interpret.annotation import clip_dissect, falcon, falcon_simplified, mammi, tsi, www  # noqa: F401  (registers methods)
from interpret.annotation.base import get_annotator, list_methods, score_margin, select_concepts
from interpret.annotation.evidence import DEFAULT_MIN_EVIDENCE, evidence_summary, served_unit_concepts

__all__ = ["concept_scores", "select_concepts", "list_methods", "annotate", "get_annotator", "score_margin",
           "DEFAULT_MIN_EVIDENCE", "evidence_summary", "served_unit_concepts", "ANNOTATION_COLUMNS"]

#: Columns of :func:`annotate`'s table, in order.
ANNOTATION_COLUMNS = ("layer", "unit", "method", "concepts", "indices", "scores", "evidence", "margin",
                      "sufficient")


def concept_scores(method: str, activations: Any, image_embeddings: Any, concept_embeddings: Any,
                   template_embedding: Any = None, **params: Any) -> torch.Tensor:
    """Unit-concept scores of one annotation method.

    Args:
        method: one of :func:`list_methods` (``mammi``, ``www``, ``clip_dissect``, ``falcon_simplified``, ``tsi``).
        activations: (N, U) activations pooled per unit over N probing images.
        image_embeddings: (N, d) image embeddings of the same probing images (L2-normalised; they are
            re-normalised here so the scores are exact cosines). Unused by ``tsi`` (may be None).
        concept_embeddings: (M, d) concept text embeddings (for MAMMI/WWW the concept in the template
            "A chest x-ray image of a {concept}"). For ``tsi`` may be None.
        template_embedding: (d,) base template embedding ("A chest x-ray image of a") subtracted by
            ``mammi``/``www``; None scores the plain mean cosine. Ignored by the other methods.
        **params: method parameters (``alpha``, ``top_k``, ``a``, ``lam``, ``report_embeddings``, ``iou``,
            ``unit_chunk``, ...; see each module).

    Returns:
        (U, M) float32 scores; higher is a better description. Rows of units that never vary over the
        probing set are NaN for ``mammi``/``www``.

    Raises:
        ValueError: unknown method (valid ones listed), bad parameter values, mismatched shapes.
    """
    return get_annotator(method, **params)(activations, image_embeddings, concept_embeddings, template_embedding)


def annotate(method: str, activations: Any, image_embeddings: Any, concept_embeddings: Any,
             template_embedding: Any = None, *, concepts: Sequence[str] | None = None,
             beta: float | None = None, layer: str | None = None,
             min_evidence: int = DEFAULT_MIN_EVIDENCE, **params: Any) -> pd.DataFrame:
    """Scores and selection in one call, as the table the audit stores (``concepts.parquet``).

    Args:
        method, activations, image_embeddings, concept_embeddings, template_embedding, **params: as in
            :func:`concept_scores`.
        concepts: the M concept names (indices are reported when None).
        beta: relative threshold; default per method (0.95 for ``mammi``/``www``/``falcon_simplified``, 1.0, i.e. the
            best concept only, for ``clip_dissect`` and ``tsi``).
        layer: layer name written into the ``layer`` column.
        min_evidence: an annotation resting on fewer probing images is marked insufficient (10).

    Returns:
        DataFrame with one row per unit (:data:`ANNOTATION_COLUMNS`): ``layer``, ``unit``, ``method``,
        ``concepts`` (list of names or indices, best first), ``indices`` (list[int]), ``scores``
        (list[float]); ``evidence`` (int: how many probing images the unit's scores rest on: MAMMI's
        adaptive set, ``mammi_floor``'s united set, WWW's top-k, CLIP-Dissect's and FALCON's
        ``min(top_k, N)`` top images, TSI's N; 0 for a unit that never varies), ``margin`` (float: best
        concept score minus the second best over all M concepts, selected or not; NaN with fewer than two
        finite scores) and ``sufficient`` (bool: ``evidence >= min_evidence``).

    Raises:
        ValueError: as :func:`concept_scores`; a concept-name count that differs from M; ``min_evidence``
            below 1.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> acts = torch.tensor([[0.0], [1.0], [9.5], [10.0]])  # the adaptive set is images 2 and 3
        >>> v = F.normalize(torch.randn(4, 8), dim=1); t = F.normalize(torch.randn(3, 8), dim=1)
        >>> row = annotate("mammi", acts, v, t).iloc[0]
        >>> int(row["evidence"]), bool(row["sufficient"])
        (2, False)
    """
    if int(min_evidence) != min_evidence or min_evidence < 1:
        raise ValueError(f"min_evidence must be a positive integer, got {min_evidence!r}")
    ann = get_annotator(method, **params)
    scores, evidence = ann.scores_and_evidence(activations, image_embeddings, concept_embeddings, template_embedding)
    if concepts is not None and len(concepts) != scores.shape[1]:
        raise ValueError(f"{len(concepts)} concept names for {scores.shape[1]} concept columns")
    picked = select_concepts(scores, ann.default_beta if beta is None else beta, ann.on_nonpositive)
    s = scores.detach().cpu()
    ev = evidence.detach().cpu().numpy().astype("int64")  # (U,)
    return pd.DataFrame({
        "layer": [layer] * len(picked),
        "unit": list(range(len(picked))),
        "method": [method] * len(picked),
        "concepts": [[concepts[i] for i in idx] if concepts is not None else list(idx) for idx in picked],
        "indices": [list(idx) for idx in picked],
        "scores": [[float(s[u, i]) for i in idx] for u, idx in enumerate(picked)],
        "evidence": ev,
        "margin": score_margin(s).numpy(),
        "sufficient": ev >= int(min_evidence),
    })
