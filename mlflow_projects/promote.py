"""MLflow entry point ``promote``: move alias ``champion`` to a model version whose latest audit passed.

The gates are a YAML file (default :file:`mlflow_projects/gates.yaml`) of thresholds on the figures of
the audit's ``audit/summary.json`` ("metrics"), e.g. minimum mean AUROC, minimum soft IoBB, minimum
fraction of finding classes with a unit annotated with a related concept. The latest audit of a version
is the run named by its ``audit.run_id`` tag (each audit overwrites it). The gates are evaluated again
here against that audit's figures, so a stricter gates file than the one used at audit time is honoured.

On success the alias moves and the version description becomes a short audit summary; otherwise the
command refuses (exit status 1) and lists the failed gates (the description records the refusal).

    python -m mlflow_projects.promote --name cxr-classifier --version 3 --gates mlflow_projects/gates.yaml
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

DEFAULT_GATES = Path(__file__).resolve().parent / "gates.yaml"
SUMMARY_ARTIFACT = "audit/summary.json"


class PromotionRefused(RuntimeError):
    """The version cannot be promoted (no audit, or failed gates); the message says why."""


# ---- gates -----------------------------------------------------------------------------------
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


def load_gates(path: str | Path = DEFAULT_GATES) -> list[Gate]:
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


# ---- registry --------------------------------------------------------------------------------
def resolve_version(client, name: str, version: str | None) -> str:
    """``version`` itself, or the version holding alias ``candidate`` when empty."""
    from mlflow_projects.common import CANDIDATE

    if version:
        if not str(version).isdigit():
            raise ValueError(f"version must be a positive integer (or empty for @{CANDIDATE}), got {version!r}")
        client.get_model_version(name, str(version))  # raises when missing
        return str(version)
    return str(client.get_model_version_by_alias(name, CANDIDATE).version)


def latest_audit(client, name: str, version: str) -> tuple[str, dict]:
    """The run id and ``summary.json`` of the latest audit of ``name`` version ``version``.

    Raises:
        PromotionRefused: the version carries no ``audit.run_id`` tag or its summary cannot be read.
    """
    import mlflow

    mv = client.get_model_version(name, version)
    run_id = (mv.tags or {}).get("audit.run_id")
    if not run_id:
        raise PromotionRefused(f"{name} version {version} has no audit (tag audit.run_id missing); run the "
                               f"audit entry point first")
    try:
        summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/{SUMMARY_ARTIFACT}")
    except Exception as exc:  # noqa: BLE001 - any store error means the audit is unusable
        raise PromotionRefused(f"cannot read {SUMMARY_ARTIFACT} of audit run {run_id}: {exc}") from exc
    return run_id, summary


@dataclass
class PromotionResult:
    name: str
    version: str
    audit_run_id: str | None
    promoted: bool
    results: list[GateResult] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [asdict(r) for r in self.results]
        return d


def promote(name: str, version: str | None = None, gates: str | Path = DEFAULT_GATES,
            alias: str | None = None) -> PromotionResult:
    """Move ``alias`` (default ``champion``) to ``name``/``version`` if its latest audit passes ``gates``.

    Args:
        name: registered model name.
        version: version number; empty/None = the version holding alias ``candidate``.
        gates: gates YAML file.
        alias: alias to move (default ``champion``).

    Returns:
        A :class:`PromotionResult`; ``promoted`` is False when gates failed or no audit exists (the
        alias is then left untouched).
    """
    from mlflow import MlflowClient

    from mlflow_projects.common import CHAMPION

    alias = alias or CHAMPION
    gate_list = load_gates(gates)
    client = MlflowClient()
    version = resolve_version(client, name, version)
    try:
        run_id, summary = latest_audit(client, name, version)
    except PromotionRefused as exc:
        return PromotionResult(name, version, None, False, [], str(exc))
    results = evaluate_gates(summary.get("metrics", {}), gate_list)
    summary.setdefault("mlflow", {})["run_id"] = run_id
    text = short_summary(summary, results)
    ok = gates_passed(results)
    if ok:
        client.set_registered_model_alias(name, alias, version)
        client.update_model_version(name, version, description=text)
        client.set_model_version_tag(name, version, "promotion.status", "promoted")
        msg = f"{name} version {version} is now @{alias} (audit run {run_id})"
    else:
        client.update_model_version(name, version, description=f"Promotion to @{alias} refused.\n{text}")
        client.set_model_version_tag(name, version, "promotion.status", "refused")
        failed = "\n  ".join(r.line() for r in results if not r.passed)
        msg = f"refusing to promote {name} version {version} to @{alias}; failed gates:\n  {failed}"
    return PromotionResult(name, version, run_id, ok, results, msg)


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from mlflow_projects.common import existing_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="cxr-classifier", help="registered model name")
    p.add_argument("--version", default="", help="version number (default: the @candidate version)")
    p.add_argument("--gates", type=existing_file, default=DEFAULT_GATES, help="gates YAML file")
    p.add_argument("--alias", default="", help="alias to move (default: champion)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the entry point; returns the exit status (0 promoted, 1 refused)."""
    import os

    import mlflow

    from mlflow_projects.common import DEFAULT_TRACKING_URI

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    result = promote(args.name, args.version or None, args.gates, args.alias or None)
    for r in result.results:
        log.info("gate %s", r.line())
    if result.promoted:
        log.info("%s", result.message)
        return 0
    log.error("%s", result.message)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
