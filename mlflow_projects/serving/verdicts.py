"""What the service takes from the served version's latest passing audit, and how it shows it.

- **Concepts**: only the annotations :func:`interpret.annotation.served_unit_concepts` serves (enough
  representative images, ``evidence >= min_evidence`` of the audit's ``config``, and not VLM-blind); the
  library decides, the service has no rule of its own.
- **Verdicts** (``summary.json`` ``verdicts``): per class ``fit`` / ``unfit`` with reasons and the key
  figures behind them (:func:`verdict_entry`). ``/explain`` returns each target's verdict; an unfit target
  still gets its maps, plus a warning (:func:`unfit_warning`) in the response and on the overlay.
- **Out-of-distribution score** (``ood.npz``, :class:`interpret.ood.FeatureOOD`): the squared Mahalanobis
  distance of the request's pooled feature-layer activations (the GAP vector the head sees, which every
  forward pass already returns) to the probing set's, against the audit's calibrated threshold
  (:func:`ood_entry`). One (K,) x (K, K) product per image.

An audit written before ``summary.json`` verdicts or ``ood.npz`` existed (or no passing audit at all) is
served without them: ``verdict`` / ``ood`` are null with the reason, said once in the log at load time.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["attach_audit", "verdict_entry", "key_figures", "unfit_warning", "banner_text", "ood_scores", "ood_entry",
           "NO_VERDICT", "NO_DETECTOR_FOR_KIND"]

NO_VERDICT = "no audit verdict for this version"
NO_VERDICT_FOR_CLASS = "no audit verdict for this class"
NO_DETECTOR_FOR_KIND = "no detector for this model kind"
NO_DETECTOR = "no OOD detector in the audit of this version"
CI_KEYS = ("estimate", "low", "high", "n", "confidence")


def attach_audit(model, run_id: str | None, concepts=None, summary: Mapping[str, Any] | None = None,
                 ood_path: str | os.PathLike | None = None) -> None:
    """Give ``model`` its audit: served unit concepts, verdicts and OOD detector (each logged once).

    Args:
        model: the :class:`~mlflow_projects.serving.runtime.LoadedModel` (its fields ``audit_run_id``,
            ``concepts``, ``unit_concepts``, ``min_evidence``, ``verdicts``, ``verdict_reason``,
            ``audited_method``, ``ood``, ``ood_reason`` are set).
        run_id: the audit run (None: no passing audit).
        concepts: the audit's ``concepts.parquet`` table, or None.
        summary: its ``summary.json``, or None (an audit written without one).
        ood_path: its ``ood.npz``, or None.
    """
    from interpret.annotation import DEFAULT_MIN_EVIDENCE, served_unit_concepts

    summary = summary or {}
    config = summary.get("config") or {}
    model.audit_run_id, model.concepts = run_id, concepts
    model.min_evidence = int(config.get("min_evidence") or DEFAULT_MIN_EVIDENCE)
    model.unit_concepts = served_unit_concepts(concepts, model.feature_layer, model.min_evidence)
    model.audited_method = config.get("attention")
    model.audit_status = summary.get("status")  # "passed", or "failed" when no passing audit exists
    where = f"audit run {run_id}" if run_id else "no passing audit"
    if run_id is None:
        log.info("no passing audit with concepts for %s: serving without concepts, verdicts or OOD scores",
                 model.identity.uri)
    elif concepts is not None:
        log.info("concepts from %s: %d of %d annotated units of %s served (evidence >= %d, not VLM-blind)",
                 where, len(model.unit_concepts), _n_units(concepts, model.feature_layer), model.feature_layer,
                 model.min_evidence)
    verdicts = summary.get("verdicts")
    if verdicts:
        model.verdicts = {str(v["class"]): dict(v) for v in verdicts}
        # a served class the audit did not check (its probing set has no case of it) is never served as if it
        # had passed: it is unfit, with the audit's reason, so its maps carry the warning and the UNFIT band
        for cls, why in ((summary.get("model") or {}).get("not_audited") or {}).items():
            model.verdicts.setdefault(str(cls), {"class": str(cls), "verdict": "unfit", "criteria": {},
                                                 "reasons": [f"not audited: {why}"]})
        model.verdict_reason = None
        unfit = [c for c, v in model.verdicts.items() if v.get("verdict") != "fit"]
        log.info("verdicts from %s: unfit classes %s", where, ", ".join(unfit) or "none")
    else:
        model.verdicts, model.verdict_reason = {}, NO_VERDICT
        if run_id is not None:
            log.warning("%s has no verdicts (summary.json missing or written before verdicts existed): "
                        "explanations are served with verdict null", where)
    model.ood, model.ood_reason = None, None
    if model.kind != "classifier":
        model.ood_reason = NO_DETECTOR_FOR_KIND
    elif ood_path is None:
        model.ood_reason = NO_DETECTOR
        if run_id is not None:
            log.warning("%s has no ood.npz: responses carry no OOD score", where)
    else:
        model.ood, model.ood_reason = _load_detector(model, ood_path, where)


def _n_units(table, layer) -> int:
    if table is None or not len(table) or "layer" not in table:
        return 0
    return int(table.loc[table["layer"] == layer, "unit"].nunique())


def _load_detector(model, path, where: str):
    from interpret.ood import FeatureOOD

    try:
        det = FeatureOOD.load(path)
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read its OOD detector (%s); no OOD scores", where, exc)
        return None, f"the audit's OOD detector cannot be read: {type(exc).__name__}"
    if det.layer != model.feature_layer:
        reason = (f"the audit's OOD detector models layer {det.layer!r}, the model serves {model.feature_layer!r}")
        log.warning("%s: %s; no OOD scores", where, reason)
        return None, reason
    k = None if model.head_weight is None else int(model.head_weight.shape[1])
    if k is not None and det.num_features != k:
        reason = f"the audit's OOD detector models {det.num_features} features, the model's layer has {k}"
        log.warning("%s: %s; no OOD scores", where, reason)
        return None, reason
    log.info("OOD detector from %s: layer %s, threshold %.4g (%s)", where, det.layer, det.threshold,
             "calibrated" if det.calibrated else "NOT calibrated")
    return det, None


def _ci(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    return {k: value[k] for k in CI_KEYS if k in value}


def key_figures(row: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """The figures a verdict rests on, each a bootstrap CI ``{estimate, low, high, n, confidence}`` (None
    where the criterion was not measured).

    Args:
        row: one entry of ``summary.json`` ``verdicts``.
        method: the audited attention method (picks its sanity Spearman; None: the only one, else all).

    Returns:
        ``{"n_positives", "pointing_lift", "pointing", "pointing_chance", "deletion_gain", "insertion_gain",
        "sanity_final_spearman"}``: pointing lift = hit - chance over boxed images; gains = AUC gain over a
        random pixel order (> 0: more faithful than random); final Spearman = rank correlation between the
        maps and those with every block randomised (low: the maps depend on the weights).
    """
    crit = row.get("criteria") or {}
    loc, faith, sanity = crit.get("localisation") or {}, crit.get("faithfulness") or {}, crit.get("sanity") or {}
    metrics = faith.get("metrics") or {}
    spearman = sanity.get("final_spearman") or {}
    if method in spearman:
        final = _ci(spearman[method])
    elif len(spearman) == 1:
        final = _ci(next(iter(spearman.values())))
    else:
        final = {m: _ci(v) for m, v in spearman.items()} or None
    return {"n_positives": row.get("n_positives"), "pointing_lift": _ci(loc.get("lift")),
            "pointing": loc.get("pointing"), "pointing_chance": loc.get("chance"),
            "deletion_gain": _ci((metrics.get("deletion") or {}).get("gain")),
            "insertion_gain": _ci((metrics.get("insertion") or {}).get("gain")),
            "sanity_final_spearman": final}


def verdict_entry(model, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """The ``verdict`` of target ``name`` in ``/explain`` and, when there is none, why.

    Returns:
        ``({"status": "fit" | "unfit", "reasons", "criteria": {name: status}, "figures": key_figures,
        "audited_method", "audit_run_id", "audit_status"}, None)`` or ``(None, reason)``.
    """
    if not model.verdicts:
        return None, model.verdict_reason or NO_VERDICT
    row = model.verdicts.get(name)
    if row is None:
        return None, NO_VERDICT_FOR_CLASS
    crit = row.get("criteria") or {}
    return {"status": "fit" if row.get("verdict") == "fit" else "unfit",
            "reasons": [str(r) for r in row.get("reasons") or []],
            "criteria": {k: (v or {}).get("status") for k, v in crit.items()},
            "figures": key_figures(row, model.audited_method),
            "audited_method": model.audited_method, "audit_run_id": model.audit_run_id,
            "audit_status": getattr(model, "audit_status", None)}, None


def unfit_warning(name: str, verdict: Mapping[str, Any]) -> str:
    """The response's warning for an unfit target: the class, and the audit's first reason (+ how many more)."""
    reasons = list(verdict.get("reasons") or [])
    first = reasons[0] if reasons else "no reason recorded"
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"{name}: the audit found this explanation unfit: {first}{more}"


def banner_text(verdict: Mapping[str, Any]) -> str:
    """What the overlay of an unfit target says: ``UNFIT: <first reason>``."""
    reasons = list(verdict.get("reasons") or [])
    return f"UNFIT: {reasons[0] if reasons else 'see the audit'}"


def ood_scores(model, outs) -> None:
    """Set ``out["ood_score"]`` on every forward-pass output of a batch (one (N, K) x (K, K) product).

    A detector that cannot score them (non-finite activations) leaves ``ood_score`` None and an
    ``ood_error``, never an exception.
    """
    det = getattr(model, "ood", None)
    if det is None or not outs:
        return
    pooled = np.stack([np.asarray(o["pooled"], dtype=np.float64) for o in outs])  # (N, K)
    try:
        scores = det.score(pooled)  # (N,)
    except ValueError as exc:
        log.warning("OOD score not computable: %s", exc)
        for o in outs:
            o["ood_score"], o["ood_error"] = None, "OOD score not computable: non-finite feature activations"
        return
    for o, s in zip(outs, scores.tolist()):
        o["ood_score"] = float(s)


def ood_entry(model, out: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The ``ood`` of a ``/predict`` or ``/explain`` response and, when there is none, why.

    Returns:
        ``({"score", "threshold", "flagged", "warning", "layer", "calibrated"}, None)`` (``warning`` is a
        sentence when flagged, else None) or ``(None, reason)``.
    """
    det = getattr(model, "ood", None)
    if det is None:
        return None, model.ood_reason or NO_DETECTOR
    score = out.get("ood_score")
    if score is None:
        return None, out.get("ood_error") or "OOD score not computed"
    flagged = bool(score > det.threshold)
    warning = (f"this image is unlike the images the model was audited on (OOD score {score:.4g} > threshold "
               f"{det.threshold:.4g}): its findings and explanations may not be reliable") if flagged else None
    return {"score": float(score), "threshold": float(det.threshold), "flagged": flagged, "warning": warning,
            "layer": det.layer, "calibrated": bool(det.calibrated)}, None
