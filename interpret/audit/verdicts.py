"""Per-class verdicts: is each class's explanation fit to be shown, and if not, why.

A class is **fit** when every criterion that applies to it passed; otherwise **unfit**, with one reason
per failed criterion (the figure, its bootstrap 95% CI and the bound it missed). Criteria:

- ``localisation`` (classes with boxes in the probing set): the pointing game must beat its chance
  level. The per-image lift ``hit - chance`` (``chance`` = the share of the image the tolerance-dilated
  box covers: a map pointing at random hits that often) is averaged over the class's boxed images;
  passed when the lower bound of its CI is above 0. Classes without boxes: ``not_applicable`` (their
  maps are not checked against a location, and the verdict says so).
- ``faithfulness``: on the class's positive probing images, deleting the pixels the map ranks first
  must lower the class probability faster than deleting pixels in a random order, and inserting them
  first must raise it faster (:func:`interpret.faithfulness.faithfulness`, ``gain`` > 0 means more
  faithful than random). Passed when the lower CI bound of the mean gain is above ``min_gain`` (0.01) for
  deletion **and** insertion. ROAD (MoRF/LeRF) is reported beside it, not gated.
- ``sanity``: the model-parameter randomisation test (:func:`interpret.sanity.model_randomisation`,
  cascading) on the class's maps: with every block randomised the maps must have changed
  (:func:`sanity_criterion`; the intermediate steps are reported).
- ``concepts`` (reported, never makes a class unfit: maps are still useful without names): how many of the
  class's top units carry a concept that rests on enough images and on a VLM that can see the class.

A criterion with fewer than ``min_cases`` images to rest on is ``insufficient`` and counts as failed: an
explanation that could not be checked is not called fit. A class with no positive probing image is
therefore unfit ("not audited: no positive probing image").

    verdicts = class_verdicts(classes, localization=loc, faithfulness=faith, sanity=table, policy=VerdictPolicy())
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["VerdictPolicy", "class_verdicts", "localization_cis", "performance_cis", "GATED_FAITHFULNESS",
           "unfit_classes"]

#: Faithfulness metrics whose gain over the random order decides the verdict (ROAD is reported only).
GATED_FAITHFULNESS = ("deletion", "insertion")


@dataclass(frozen=True)
class VerdictPolicy:
    """How verdicts are reached (recorded in ``summary.json``)."""

    min_cases: int = 5  # images a criterion needs (positives for faithfulness, boxed images for pointing)
    # the lower CI bound of a faithfulness AUC gain over the random order must exceed this (probability-AUC units:
    # 0.01 = the curve lies on average one point of probability beyond random); a gain that is merely
    # non-zero (e.g. 1e-5 on a model whose probability does not move) is not evidence of a faithful map
    min_gain: float = 0.01
    n_resamples: int = 1000  # bootstrap resamples of every CI
    confidence: float = 0.95
    seed: int = 0


def _ci(values, policy: VerdictPolicy) -> dict[str, Any]:
    from interpret.stats import mean_ci

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return mean_ci(v, policy.n_resamples, policy.confidence, policy.seed).to_dict()


def _fmt(ci: Mapping[str, Any]) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"
    return f"{f(ci.get('estimate'))} [{f(ci.get('low'))}, {f(ci.get('high'))}]"


def _positive_lower_bound(ci: Mapping[str, Any], margin: float = 0.0) -> bool:
    low = ci.get("low")
    return low is not None and math.isfinite(low) and low > margin


def localisation_criterion(rows, policy: VerdictPolicy) -> dict[str, Any]:
    """``rows``: the class's localisation rows (``pointing``, ``pointing_chance`` per boxed image)."""
    n = int(len(rows))
    if n == 0:
        return {"status": "not_applicable", "reason": "no probing image has a box of this class", "n": 0}
    lift = (rows["pointing"].astype(float) - rows["pointing_chance"].astype(float)).to_numpy()
    ci = _ci(lift, policy)
    out = {"n": n, "pointing": float(rows["pointing"].mean()), "chance": float(rows["pointing_chance"].mean()),
           "lift": ci, "rule": "lower 95% CI bound of (pointing hit - chance) > 0"}
    if n < policy.min_cases:
        return {**out, "status": "insufficient",
                "reason": f"localisation rests on {n} boxed image(s) (< {policy.min_cases})"}
    if _positive_lower_bound(ci):
        return {**out, "status": "passed"}
    return {**out, "status": "failed",
            "reason": f"pointing game does not beat chance: lift {_fmt(ci)} over chance {out['chance']:.3f} "
                      f"({n} boxed images)"}


def faithfulness_criterion(rows, policy: VerdictPolicy) -> dict[str, Any]:
    """``rows``: the class's faithfulness rows (``metric``, ``image_id``, ``gain``, ``auc``, ``random_auc``)."""
    if rows is None or len(rows) == 0:
        return {"status": "insufficient", "n": 0,
                "reason": "faithfulness not measured: no positive probing image of this class"}
    metrics: dict[str, Any] = {}
    for metric, part in rows.groupby("metric", sort=False):
        metrics[str(metric)] = {"n": int(len(part)), "gain": _ci(part["gain"], policy),
                                "auc": _ci(part["auc"], policy), "random_auc": _ci(part["random_auc"], policy)}
    if "road_morf" in metrics and "road_lerf" in metrics:  # ROAD's own comparison: LeRF keeps the score higher
        pair = rows[rows["metric"] == "road_lerf"].merge(rows[rows["metric"] == "road_morf"], on="image_id",
                                                        suffixes=("_lerf", "_morf"))
        metrics["road"] = {"n": int(len(pair)), "lerf_minus_morf": _ci(pair["auc_lerf"] - pair["auc_morf"], policy),
                           "rule": "reported, not gated: > 0 when removing the least relevant pixels first keeps "
                                   "the class probability higher than removing the most relevant first"}
    n = min((metrics[m]["n"] for m in GATED_FAITHFULNESS if m in metrics), default=0)
    out = {"n": n, "metrics": metrics,
           "rule": f"lower 95% CI bound of the AUC gain over a random pixel order > {policy.min_gain:g} for "
                   + " and ".join(GATED_FAITHFULNESS)}
    missing = [m for m in GATED_FAITHFULNESS if m not in metrics]
    if missing:
        return {**out, "status": "insufficient", "reason": f"faithfulness metrics not measured: {missing}"}
    if n < policy.min_cases:
        return {**out, "status": "insufficient",
                "reason": f"faithfulness rests on {n} positive image(s) (< {policy.min_cases})"}
    failed = [m for m in GATED_FAITHFULNESS if not _positive_lower_bound(metrics[m]["gain"], policy.min_gain)]
    if not failed:
        return {**out, "status": "passed"}
    parts = [f"{m} gain over random order {_fmt(metrics[m]['gain'])} (needs lower bound > {policy.min_gain:g})"
             for m in failed]
    return {**out, "status": "failed", "reason": "map no more faithful than a random order: " + "; ".join(parts)}


def sanity_criterion(table, policy: VerdictPolicy) -> dict[str, Any]:
    """``table``: the class's rows of :func:`interpret.sanity.model_randomisation`.

    Passed when, with every block randomised (the last cascading step), the class's maps changed
    (:func:`interpret.sanity.sanity_summary`: mean Spearman and SSIM under their bounds). The steps in between
    are reported (``unchanged_steps``), not gated: on a handful of images one intermediate block can leave a
    class's maps close to the original while the model as a whole still drives them; a map that survives the
    randomisation of *all* the weights it claims to explain is not explaining them (Adebayo et al. 2018).
    """
    from interpret.sanity import sanity_summary

    if table is None or len(table) == 0:
        return {"status": "insufficient", "n": 0, "reason": "randomisation test not run for this class"}
    casc = table[table["mode"] == "cascading"]
    if len(casc) == 0:
        return {"status": "insufficient", "n": 0, "reason": "no cascading randomisation rows"}
    s = sanity_summary(casc, n_resamples=policy.n_resamples, confidence=policy.confidence, seed=policy.seed)
    n = int(casc["image_index"].nunique())
    last = {m: v["cascading"]["steps"][-1] for m, v in s["methods"].items() if v["cascading"]["steps"]}
    out = {"n": n, "thresholds": s["thresholds"],
           "rule": "maps changed after randomising every block (last cascading step)",
           "final_spearman": {m: st["spearman"] for m, st in last.items()},
           "final_ssim": {m: st["ssim"] for m, st in last.items()},
           "unchanged_steps": {m: v["cascading"]["failed_layers"] for m, v in s["methods"].items()}}
    failed = [m for m, st in last.items() if not st["changed"]]
    if not failed:
        return {**out, "status": "passed"}
    parts = [f"{m}: maps unchanged with every block randomised (Spearman {_fmt(last[m]['spearman'])}, "
             f"SSIM {_fmt(last[m]['ssim'])})" for m in failed]
    return {**out, "status": "failed", "reason": "fails the randomisation test: " + "; ".join(parts)}


def concept_criterion(top_units: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Reported only: of the class's top units, how many have a concept that may be served."""
    if top_units is None:
        return {"status": "not_applicable", "reason": "no unit importance for this model"}
    served = [u for u in top_units if u.get("concepts") and u.get("served", True)]
    withheld = [{"unit": u.get("unit"), "why": u.get("withheld")} for u in top_units
                if u.get("concepts") and not u.get("served", True)]
    status = "passed" if served else "failed"
    out = {"status": status, "n_top_units": len(top_units), "served": len(served), "withheld": withheld}
    if not served:
        out["reason"] = ("no top unit has a concept with enough evidence" if top_units else "no top units")
    return out


def class_verdicts(classes: Sequence[str], *, positives: Mapping[str, int], localization=None,
                   faithfulness=None, sanity=None, importance: Mapping[str, Sequence[Mapping]] | None = None,
                   thresholds: Mapping[str, Mapping[str, Any]] | None = None,
                   policy: VerdictPolicy = VerdictPolicy()) -> list[dict[str, Any]]:
    """One verdict per class.

    Args:
        classes: the model's classes (verdict order).
        positives: positive probing images per class.
        localization: the localisation table (``image_id, class, pointing, pointing_chance, ...``) or None.
        faithfulness: the faithfulness table (``class, metric, gain, auc, random_auc, ...``) or None.
        sanity: the randomisation table with a ``class`` column, or None.
        importance: ``{class: [top unit dicts with concepts, served, withheld]}`` or None.
        thresholds: ``{class: {"threshold", "reliable", "reason"}}`` (reported with the verdict).
        policy: :class:`VerdictPolicy`.

    Returns:
        ``[{"class", "verdict": "fit" | "unfit", "reasons": [str], "criteria": {name: {...}},
        "threshold": {...}}]``.
    """
    import pandas as pd

    empty = pd.DataFrame()
    out = []
    for cls in classes:
        crit: dict[str, dict[str, Any]] = {}
        n_pos = int(positives.get(cls, 0))
        loc = localization[localization["class"] == cls] if localization is not None and len(localization) else empty
        crit["localisation"] = localisation_criterion(loc, policy)
        fa = faithfulness[faithfulness["class"] == cls] if faithfulness is not None and len(faithfulness) else empty
        crit["faithfulness"] = faithfulness_criterion(fa, policy)
        sa = sanity[sanity["class"] == cls] if sanity is not None and len(sanity) else empty
        crit["sanity"] = sanity_criterion(sa, policy)
        crit["concepts"] = concept_criterion(None if importance is None else importance.get(cls, []))
        reasons = []
        if n_pos == 0:
            reasons.append("not audited: no positive probing image of this class")
        for name in ("localisation", "faithfulness", "sanity"):
            c = crit[name]
            if c["status"] in ("failed", "insufficient") and c.get("reason") and c["reason"] not in reasons:
                reasons.append(c["reason"])
        row = {"class": cls, "verdict": "unfit" if reasons else "fit", "reasons": reasons, "n_positives": n_pos,
               "criteria": crit}
        if thresholds is not None and cls in thresholds:
            row["threshold"] = dict(thresholds[cls])
        out.append(row)
    return out


def unfit_classes(verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    return [v["class"] for v in verdicts if v.get("verdict") != "fit"]


def performance_cis(probe_labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    policy: VerdictPolicy = VerdictPolicy()) -> dict[str, dict[str, Any]]:
    """Stratified bootstrap CIs of AUROC and AP per class (:func:`interpret.stats.auroc_ci`, ``ap_ci``)."""
    from interpret.stats import ap_ci, auroc_ci

    out = {}
    for c, cls in enumerate(classes):
        y = probe_labels[:, c]
        known = ~np.isnan(y)
        y, p = y[known], probs[known, c]
        out[cls] = {"auroc": auroc_ci(y, p, policy.n_resamples, policy.confidence, policy.seed).to_dict(),
                    "ap": ap_ci(y, p, policy.n_resamples, policy.confidence, policy.seed).to_dict()}
    return out


def localization_cis(loc, policy: VerdictPolicy = VerdictPolicy()) -> dict[str, dict[str, Any]]:
    """Bootstrap CIs over images of the mean IoBB, IoR, pointing and pointing lift per class."""
    out: dict[str, dict[str, Any]] = {}
    if loc is None or len(loc) == 0:
        return out
    for cls, part in loc.groupby("class", sort=False):
        out[str(cls)] = {k: _ci(part[k], policy) for k in ("iobb", "ior", "pointing")}
        out[str(cls)]["pointing_lift"] = _ci(part["pointing"] - part["pointing_chance"], policy)
    return out


def policy_dict(policy: VerdictPolicy) -> dict[str, Any]:
    return asdict(policy)
