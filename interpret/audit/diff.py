"""The pure version diff of two audit summaries: metrics side by side, concepts gained and lost per
class, localisation change (used by ``compare`` and by the report's "Comparison with the champion")."""
from __future__ import annotations

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
    """
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
