"""The pure version diff of two audit summaries: metrics side by side, concepts gained and lost per
class, localisation change (used by ``compare`` and by the report's "Comparison with the champion")."""
from __future__ import annotations

import copy
import html
import math
from typing import Any, Mapping

#: Figures shown side by side (summary "metrics" keys), in order.
HEADLINE = ("auroc_mean", "ap_mean", "f1_mean", "mcc_mean", "iobb_mean", "ior_mean", "pointing_mean", "pointing_lift_mean",
            "disjoint_mean", "unique_mean", "concept_coverage", "shortcut_class_fraction", "shortcut_warnings")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


#: Keys renamed in audit summaries: ``old -> new``. The audit's final-layer cosine came from the annotating VLM's
#: own text encoder, so it was never the protocol's independent ``cos_clip`` (:mod:`interpret.audit.concepts`).
RENAMED_FIGURES = {"cos_clip": "cos_vlm", "cos_clip_se": "cos_vlm_se"}


def _renamed(d: Any, prefix: str = "") -> Any:
    if not isinstance(d, dict):
        return d
    out = {}
    for k, v in d.items():
        new = k
        if k.startswith(prefix) and k[len(prefix):] in RENAMED_FIGURES:
            new = prefix + RENAMED_FIGURES[k[len(prefix):]]
            if new in d:  # both present: keep the new one
                continue
        out[new] = v
    return out


def upgrade_summary(summary: Mapping[str, Any]) -> dict:
    """An audit summary as this version writes it, from one written by an older version (a copy).

    Renames :data:`RENAMED_FIGURES` where the audit wrote them: ``evaluation``, the final-layer comparison's
    ``figures`` and ``difference``, and ``metrics`` (``final_layer.cos_clip`` -> ``final_layer.cos_vlm``).
    A current summary comes back equal.
    """
    s = copy.deepcopy(dict(summary))
    if isinstance(s.get("evaluation"), dict):
        s["evaluation"] = _renamed(s["evaluation"])
    if isinstance(s.get("metrics"), dict):
        s["metrics"] = _renamed(s["metrics"], "final_layer.")
    comp = (s.get("concepts") or {}).get("final_layer_comparison") if isinstance(s.get("concepts"), dict) else None
    if isinstance(comp, dict):
        for m in (comp.get("methods") or {}).values():
            if isinstance(m, dict) and isinstance(m.get("figures"), dict):
                m["figures"] = _renamed(m["figures"])
        if isinstance(comp.get("difference"), dict):
            comp["difference"] = _renamed(comp["difference"])
    return s


def _class_concepts(summary: Mapping[str, Any]) -> dict[str, set[str]]:
    """Per class, the concepts of its important units (``summary["importance"]["per_class"]``)."""
    out: dict[str, set[str]] = {}
    for cls, units in summary.get("importance", {}).get("per_class", {}).items():
        out[cls] = {c for u in units for c in u.get("concepts", [])}
    return out


def compare_summaries(a: Mapping[str, Any], b: Mapping[str, Any], label_a: str = "A",
                      label_b: str = "B") -> dict:
    """Compare two audit summaries (pure; no MLflow access).

    Returns:
        ``{"a", "b", "metrics": [{metric, a, b, delta}], "concepts": [{class, gained, lost, kept}],
        "localization": [{class, iobb_a, iobb_b, iobb_delta, ior_..., pointing_...}],
        "status": {a, b}}``; ``gained`` are concepts of B's important units for the class that A's lacked.
        Either summary may be from an older audit (:func:`upgrade_summary`).
    """
    a, b = upgrade_summary(a), upgrade_summary(b)
    ma, mb = a.get("metrics", {}), b.get("metrics", {})
    metrics = []
    keys = [k for k in HEADLINE if k in ma or k in mb]
    keys += sorted(k for k in set(ma) | set(mb) if k.startswith("auroc.") and k not in keys)
    for k in keys:
        va, vb = _num(ma.get(k)), _num(mb.get(k))
        metrics.append({"metric": k, "a": va, "b": vb,
                        "delta": None if va is None or vb is None else vb - va})
    ca, cb = _class_concepts(a), _class_concepts(b)
    concepts = []
    for cls in sorted(set(ca) | set(cb)):
        sa, sb = ca.get(cls, set()), cb.get(cls, set())
        concepts.append({"class": cls, "gained": sorted(sb - sa), "lost": sorted(sa - sb), "kept": sorted(sa & sb)})
    la = {r["class"]: r for r in a.get("localization", {}).get("per_class", [])}
    lb = {r["class"]: r for r in b.get("localization", {}).get("per_class", [])}
    loc = []
    for cls in sorted(set(la) | set(lb)):
        row: dict[str, Any] = {"class": cls}
        for key in ("iobb", "ior", "pointing"):
            va, vb = _num(la.get(cls, {}).get(key)), _num(lb.get(cls, {}).get(key))
            row.update({f"{key}_a": va, f"{key}_b": vb,
                        f"{key}_delta": None if va is None or vb is None else vb - va})
        loc.append(row)

    def ident(s: Mapping[str, Any]) -> dict:
        m = s.get("model", {})
        return {"name": m.get("name"), "version": m.get("version"), "run_id": s.get("mlflow", {}).get("run_id"),
                "status": s.get("status")}

    return {"a": {"label": label_a, **ident(a)}, "b": {"label": label_b, **ident(b)}, "metrics": metrics,
            "concepts": concepts, "localization": loc}


def _fmt(v: Any, signed: bool = False) -> str:
    v = _num(v)
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def comparison_text(cmp: Mapping[str, Any]) -> str:
    """Plain-text rendering for the terminal."""
    a, b = cmp["a"], cmp["b"]
    lines = [f"A = {a['label']} ({a.get('name')} v{a.get('version')}, audit {a.get('status')})",
             f"B = {b['label']} ({b.get('name')} v{b.get('version')}, audit {b.get('status')})", "",
             f"{'metric':<28}{'A':>10}{'B':>10}{'B-A':>10}"]
    for r in cmp["metrics"]:
        lines.append(f"{r['metric']:<28}{_fmt(r['a']):>10}{_fmt(r['b']):>10}{_fmt(r['delta'], True):>10}")
    lines += ["", "Localisation per class (IoBB A -> B, pointing A -> B):"]
    for r in cmp["localization"]:
        lines.append(f"  {r['class']:<20} IoBB {_fmt(r['iobb_a'])} -> {_fmt(r['iobb_b'])} ({_fmt(r['iobb_delta'], True)}),"
                     f" pointing {_fmt(r['pointing_a'])} -> {_fmt(r['pointing_b'])}")
    lines += ["", "Concepts of the important units per class:"]
    for r in cmp["concepts"]:
        lines.append(f"  {r['class']:<20} gained: {', '.join(r['gained']) or '-'}; lost: {', '.join(r['lost']) or '-'}")
    return "\n".join(lines)


def comparison_html(cmp: Mapping[str, Any]) -> str:
    """HTML section for the audit report."""
    e = html.escape
    a, b = cmp["a"], cmp["b"]
    out = [f"<h2>Comparison: {e(str(a['label']))} vs {e(str(b['label']))}</h2>",
           f"<p>A = {e(str(a.get('name')))} v{e(str(a.get('version')))} (audit {e(str(a.get('status')))}), "
           f"B = {e(str(b.get('name')))} v{e(str(b.get('version')))}. Positive deltas mean B is higher.</p>",
           "<table><tr><th>figure</th><th>A</th><th>B</th><th>B - A</th></tr>"]
    for r in cmp["metrics"]:
        out.append(f"<tr><td>{e(r['metric'])}</td><td class='num'>{_fmt(r['a'])}</td><td class='num'>{_fmt(r['b'])}"
                   f"</td><td class='num'>{_fmt(r['delta'], True)}</td></tr>")
    out.append("</table><h3>Localisation change per class</h3><table><tr><th>class</th><th>IoBB A</th>"
               "<th>IoBB B</th><th>&Delta;</th><th>pointing A</th><th>pointing B</th></tr>")
    for r in cmp["localization"]:
        out.append(f"<tr><td>{e(r['class'])}</td><td class='num'>{_fmt(r['iobb_a'])}</td><td class='num'>"
                   f"{_fmt(r['iobb_b'])}</td><td class='num'>{_fmt(r['iobb_delta'], True)}</td><td class='num'>"
                   f"{_fmt(r['pointing_a'])}</td><td class='num'>{_fmt(r['pointing_b'])}</td></tr>")
    out.append("</table><h3>Concepts gained and lost per class (important units)</h3><table><tr><th>class</th>"
               "<th>gained</th><th>lost</th><th>kept</th></tr>")
    for r in cmp["concepts"]:
        out.append(f"<tr><td>{e(r['class'])}</td><td>{e(', '.join(r['gained']))}</td><td>{e(', '.join(r['lost']))}"
                   f"</td><td>{e(', '.join(r['kept']))}</td></tr>")
    out.append("</table>")
    return "".join(out)
