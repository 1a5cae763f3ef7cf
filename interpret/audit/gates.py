"""Promotion gates: thresholds on the flat figures of an audit summary.

A gates file is YAML, ``{"gates": [{name, metric, min | max, optional, per_class, description}, ...]}``; the
default is the platform's policy (``mlflow_projects/gates.yaml``). A ``per_class`` gate applies its bound to
every class that has the figure (the keys ``<metric>.<class>``, e.g. ``localisation_passed.Nodule`` exists for
the classes with boxes): "every class with boxes must beat chance" is one gate, and the classes that fail it
are named. :func:`flat_metrics` turns a ``summary.json`` into the figures the gates
read (and MLflow logs); :func:`evaluate_gates` applies the thresholds. The audit evaluates them when it
runs and ``promote`` evaluates them again against the stored figures, so a stricter file is honoured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from interpret.audit._util import _finite, _nanmean

@dataclass(frozen=True)
class Gate:
    """One threshold on an audit figure.

    Attributes:
        name: short identifier shown in reports.
        metric: key of ``summary["metrics"]``.
        min: the value must be >= ``min`` (if set).
        max: the value must be <= ``max`` (if set).
        optional: a missing / non-finite value passes (reported as skipped) instead of failing.
        per_class: the bound applies to ``<metric>.<class>`` for every class that has it.
        description: what the figure means, for reviewers.
    """

    name: str
    metric: str
    min: float | None = None
    max: float | None = None
    optional: bool = False
    description: str = ""
    per_class: bool = False

    def bound_text(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate: ``status`` is ``passed``, ``failed`` or ``skipped`` (optional, no value). For a
    per-class gate ``value`` is the worst class's and ``failed_classes`` names the classes that missed."""

    name: str
    metric: str
    bound: str
    value: float | None
    status: str
    description: str = ""
    per_class: bool = False
    failed_classes: tuple[str, ...] | list[str] = ()

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        if self.per_class:
            who = f" (failed: {', '.join(self.failed_classes)})" if self.failed_classes else ""
            return (f"{self.name}: {self.metric}.<class> every class {self.bound}; worst {shown}{who} "
                    f"-> {self.status}")
        return f"{self.name}: {self.metric} = {shown} (required {self.bound}) -> {self.status}"


_GATE_KEYS = {"name", "metric", "min", "max", "optional", "per_class", "description"}


def parse_gates(data: Any, source: str = "<gates>") -> list[Gate]:
    """Validate a parsed gates document (``{"gates": [ {name, metric, min|max, ...}, ... ]}``).

    Raises:
        ValueError: malformed document, unknown keys, a gate without a bound, duplicate names.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("gates"), list):
        raise ValueError(f"{source}: expected a mapping with a list under 'gates', got {type(data).__name__}")
    gates, seen = [], set()
    for i, item in enumerate(data["gates"]):
        if not isinstance(item, Mapping):
            raise ValueError(f"{source}: gate #{i} must be a mapping, got {item!r}")
        unknown = set(item) - _GATE_KEYS
        if unknown:
            raise ValueError(f"{source}: gate #{i} has unknown keys {sorted(unknown)}; valid: {sorted(_GATE_KEYS)}")
        if "metric" not in item:
            raise ValueError(f"{source}: gate #{i} has no 'metric'")
        lo, hi = item.get("min"), item.get("max")
        if lo is None and hi is None:
            raise ValueError(f"{source}: gate #{i} ({item['metric']}) needs 'min' or 'max'")
        for key, value in (("min", lo), ("max", hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{source}: gate #{i} {key} must be a number, got {value!r}")
        gate = Gate(name=str(item.get("name", item["metric"])), metric=str(item["metric"]),
                    min=None if lo is None else float(lo), max=None if hi is None else float(hi),
                    optional=bool(item.get("optional", False)), description=str(item.get("description", "")),
                    per_class=bool(item.get("per_class", False)))
        if gate.name in seen:
            raise ValueError(f"{source}: duplicate gate name {gate.name!r}")
        seen.add(gate.name)
        gates.append(gate)
    return gates


def load_gates(path: str | Path) -> list[Gate]:
    """Read and validate a gates YAML file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid gates document.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gates file not found: {path.resolve()}")
    return parse_gates(yaml.safe_load(path.read_text()), str(path))


def _number(raw: Any) -> float | None:
    value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
    return value if value is not None and math.isfinite(value) else None


def _within(g: Gate, value: float) -> bool:
    return (g.min is None or value >= g.min) and (g.max is None or value <= g.max)


def evaluate_gates(metrics: Mapping[str, Any], gates: Sequence[Gate]) -> list[GateResult]:
    """Check ``metrics`` (the audit's flat figures) against every gate.

    A per-class gate reads every ``<metric>.<class>`` key: it passes when each is within the bound, and is
    skipped (optional) or failed when no class has the figure.

    Returns:
        One :class:`GateResult` per gate, in order.
    """
    out = []
    for g in gates:
        if g.per_class:
            prefix = g.metric + "."
            values = {k[len(prefix):]: _number(v) for k, v in metrics.items() if k.startswith(prefix)}
            values = {c: v for c, v in values.items() if v is not None}
            if not values:
                out.append(GateResult(g.name, g.metric, g.bound_text(), None, "skipped" if g.optional else "failed",
                                      g.description, True, ()))
                continue
            failed = tuple(c for c, v in values.items() if not _within(g, v))
            worst = min(values.values()) if g.min is not None else max(values.values())
            out.append(GateResult(g.name, g.metric, g.bound_text(), worst, "failed" if failed else "passed",
                                  g.description, True, failed))
            continue
        value = _number(metrics.get(g.metric))
        if value is None:
            status = "skipped" if g.optional else "failed"
        else:
            status = "passed" if _within(g, value) else "failed"
        out.append(GateResult(g.name, g.metric, g.bound_text(), value, status, g.description))
    return out


def gates_passed(results: Sequence[GateResult]) -> bool:
    return all(r.passed for r in results)


def short_summary(summary: Mapping[str, Any], results: Sequence[GateResult] | None = None) -> str:
    """A few lines a reviewer reads in the registry: verdict, key figures, warnings, failed gates."""
    m = summary.get("metrics", {})
    results = list(results) if results is not None else [GateResult(**r) for r in summary.get("gates", {}).get("results", [])]
    verdict = "passed" if gates_passed(results) else "failed"

    def fmt(key: str) -> str:
        v = m.get(key)
        return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.3f}"

    lines = [f"Audit {verdict} ({sum(r.passed for r in results)}/{len(results)} gates); run "
             f"{summary.get('mlflow', {}).get('run_id') or 'not logged'}.",
             f"AUROC {fmt('auroc_mean')}, IoBB {fmt('iobb_mean')}, pointing {fmt('pointing_mean')} "
             f"(chance {fmt('pointing_chance_mean')}), "
             f"concept coverage {fmt('concept_coverage')}, "
             f"{int(m.get('shortcut_warnings', 0) or 0)} shortcut warning(s)."]
    unfit = summary.get("unfit_classes")
    if unfit is not None:
        lines.append(f"Unfit for explanation: {', '.join(unfit) if unfit else 'none'}.")
    failed = [r.line() for r in results if not r.passed]
    if failed:
        lines.append("Failed gates: " + "; ".join(failed))
    return "\n".join(lines)


def flat_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The figures the gates and MLflow metrics use (only finite values)."""
    m: dict[str, float | None] = {}
    perf = summary.get("performance", [])
    for key in ("auroc", "ap", "f1", "mcc"):
        m[f"{key}_mean"] = _nanmean(r.get(key) for r in perf)
    loc = summary.get("localization", {}).get("per_class", [])
    for key in ("iobb", "ior", "pointing", "pointing_chance"):
        m[f"{key}_mean"] = _nanmean(r.get(key) for r in loc)
    # how far the pointing game clears a map pointing at random, averaged over classes
    m["pointing_lift_mean"] = _nanmean(r["pointing"] - r["pointing_chance"] for r in loc
                                       if _finite(r.get("pointing")) is not None
                                       and _finite(r.get("pointing_chance")) is not None)
    dis = summary.get("dissection", {}).get("per_class", [])
    for key in ("disjoint", "unique"):
        m[f"{key}_mean"] = _nanmean(r.get(key) for r in dis)
    imp = summary.get("importance", {})
    m["concept_coverage"] = imp.get("concept_coverage")
    m["concept_vlm_auroc_mean"] = summary.get("concepts", {}).get("vlm_check", {}).get("auroc_mean")
    for layer, info in summary.get("concepts", {}).get("layers", {}).items():
        m[f"annotated_fraction.{layer}"] = info.get("annotated_fraction")
    for key, value in summary.get("evaluation", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m[f"final_layer.{key}"] = value
    sc = summary.get("shortcuts", {})
    if sc.get("per_class") is not None:
        m["shortcut_class_fraction"] = sc.get("class_fraction")
        m["shortcut_warnings"] = float(len(sc.get("warnings", [])))
    for r in perf:
        for key in ("auroc", "ap", "f1", "mcc"):
            m[f"{key}.{r['class']}"] = r.get(key)
    for r in loc:
        for key in ("iobb", "ior", "pointing"):
            m[f"{key}.{r['class']}"] = r.get(key)
    m.update(verdict_metrics(summary))
    return {k: float(v) for k, v in m.items() if _finite(v) is not None}


def verdict_metrics(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """Figures of the per-class verdicts, faithfulness and sanity sections (flat, for gates and MLflow).

    Per class: ``fit.<class>`` (1 fit, 0 unfit); ``localisation_passed.<class>``, ``faithfulness_passed.<class>``,
    ``sanity_passed.<class>`` (1 passed, 0 failed) only for the classes the check could assess (a class with too
    few cases is unfit and named in ``unfit_classes``, but a per-class gate does not read it),
    ``pointing_lift_low.<class>``, ``<metric>_gain.<class>`` and ``<metric>_gain_low.<class>``. Overall:
    ``fit_class_fraction``, ``unfit_classes``, ``<metric>_gain_mean`` (mean over classes), ``sanity_passed``.
    """
    m: dict[str, float | None] = {}
    verdicts = summary.get("verdicts") or []
    if verdicts:
        m["fit_class_fraction"] = sum(v["verdict"] == "fit" for v in verdicts) / len(verdicts)
        m["unfit_classes"] = float(sum(v["verdict"] != "fit" for v in verdicts))
    gains: dict[str, list[float]] = {}
    for v in verdicts:
        cls, crit = v["class"], v.get("criteria", {})
        m[f"fit.{cls}"] = 1.0 if v["verdict"] == "fit" else 0.0
        loc = crit.get("localisation", {})
        if loc.get("status") in ("passed", "failed"):
            m[f"localisation_passed.{cls}"] = 1.0 if loc["status"] == "passed" else 0.0
        if loc.get("lift"):
            m[f"pointing_lift_low.{cls}"] = loc["lift"].get("low")
        fa = crit.get("faithfulness", {})
        if fa.get("status") in ("passed", "failed"):
            m[f"faithfulness_passed.{cls}"] = 1.0 if fa["status"] == "passed" else 0.0
        for metric, info in (fa.get("metrics") or {}).items():
            g = info.get("gain") or {}
            m[f"{metric}_gain.{cls}"] = g.get("estimate")
            m[f"{metric}_gain_low.{cls}"] = g.get("low")
            if _finite(g.get("estimate")) is not None:
                gains.setdefault(metric, []).append(g["estimate"])
        sa = crit.get("sanity", {})
        if sa.get("status") in ("passed", "failed"):
            m[f"sanity_passed.{cls}"] = 1.0 if sa["status"] == "passed" else 0.0
    for metric, values in gains.items():
        m[f"{metric}_gain_mean"] = _nanmean(values)
    sanity = summary.get("sanity") or {}
    if sanity.get("passed") is not None:
        m["sanity_passed"] = 1.0 if sanity["passed"] else 0.0
    return m
