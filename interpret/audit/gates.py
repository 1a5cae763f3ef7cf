"""Promotion gates: thresholds on the flat figures of an audit summary.

A gates file is YAML, ``{"gates": [{name, metric, min | max, optional, description}, ...]}``; the default
is the platform's policy (``mlflow_projects/gates.yaml``). :func:`flat_metrics` turns a ``summary.json`` into the figures the gates
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
        description: what the figure means, for reviewers.
    """

    name: str
    metric: str
    min: float | None = None
    max: float | None = None
    optional: bool = False
    description: str = ""

    def bound_text(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate: ``status`` is ``passed``, ``failed`` or ``skipped`` (optional, no value)."""

    name: str
    metric: str
    bound: str
    value: float | None
    status: str
    description: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        return f"{self.name}: {self.metric} = {shown} (required {self.bound}) -> {self.status}"


_GATE_KEYS = {"name", "metric", "min", "max", "optional", "description"}


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
                    optional=bool(item.get("optional", False)), description=str(item.get("description", "")))
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


def evaluate_gates(metrics: Mapping[str, Any], gates: Sequence[Gate]) -> list[GateResult]:
    """Check ``metrics`` (the audit's flat figures) against every gate.

    Returns:
        One :class:`GateResult` per gate, in order.
    """
    out = []
    for g in gates:
        raw = metrics.get(g.metric)
        value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
        if value is not None and not math.isfinite(value):
            value = None
        if value is None:
            status = "skipped" if g.optional else "failed"
        else:
            ok = (g.min is None or value >= g.min) and (g.max is None or value <= g.max)
            status = "passed" if ok else "failed"
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
    return {k: float(v) for k, v in m.items() if _finite(v) is not None}
