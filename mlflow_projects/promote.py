"""MLflow entry point ``promote``: move alias ``champion`` to a model version whose latest audit passed.

The gates are a YAML file (default :file:`mlflow_projects/gates.yaml`, the platform's promotion policy)
of thresholds on the figures of the audit's ``audit/summary.json`` ("metrics"). The latest audit of a
version is the run named by its ``audit.run_id`` tag (each audit overwrites it). The gates are evaluated
again here (:mod:`interpret.audit.gates`) against that audit's figures, so a stricter gates file than the
one used at audit time is honoured.

On success the alias moves and the version description becomes a short audit summary; otherwise the
command refuses (exit status 1) and lists the failed gates (the description records the refusal). An
unknown name or version, or a malformed ``--version``, exits with status 2 and a one-line message.

    python -m mlflow_projects.promote --name cxr-classifier --version 3 --gates mlflow_projects/gates.yaml
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import mlflow
from mlflow import MlflowClient

from interpret.audit.gates import GateResult, evaluate_gates, gates_passed, load_gates, short_summary
from mlflow_projects.common import (AuditNotFound, CANDIDATE, CHAMPION, DEFAULT_GATES, DEFAULT_TRACKING_URI,
                                    entry_parser, existing_file, get_version, keep_card_line, latest_audit,
                                    parse_version)

log = logging.getLogger(__name__)


def resolve_version(client, name: str, version: str | None) -> str:
    """The version number named by ``version`` (a number or an alias), ``@candidate``'s when empty.

    Raises:
        ValueError: a malformed version; RegistryError: unknown name, version or alias (valid ones listed).
    """
    number, alias = parse_version(version)
    if number is None and alias is None:
        alias = CANDIDATE
    return str(get_version(name, version=number, alias=alias, client=client).version)


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
    alias = alias or CHAMPION
    gate_list = load_gates(gates)
    client = MlflowClient()
    version = resolve_version(client, name, version)
    try:
        run_id, summary = latest_audit(client, name, version)
    except AuditNotFound as exc:
        return PromotionResult(name, version, None, False, [], str(exc))
    results = evaluate_gates(summary.get("metrics", {}), gate_list)
    summary.setdefault("mlflow", {})["run_id"] = run_id
    text = short_summary(summary, results)
    ok = gates_passed(results)
    old = client.get_model_version(name, version).description  # its model card line is kept
    if ok:
        client.set_registered_model_alias(name, alias, version)
        client.update_model_version(name, version, description=keep_card_line(text, old))
        client.set_model_version_tag(name, version, "promotion.status", "promoted")
        msg = f"{name} version {version} is now @{alias} (audit run {run_id})"
    else:
        client.update_model_version(name, version,
                                    description=keep_card_line(f"Promotion to @{alias} refused.\n{text}", old))
        client.set_model_version_tag(name, version, "promotion.status", "refused")
        failed = "\n  ".join(r.line() for r in results if not r.passed)
        msg = f"refusing to promote {name} version {version} to @{alias}; failed gates:\n  {failed}"
    return PromotionResult(name, version, run_id, ok, results, msg)


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = entry_parser("promote", __doc__)
    p.add_argument("--name", default="cxr-classifier", help="registered model name")
    p.add_argument("--version", default="", help="version number or @alias (default: the @candidate version)")
    p.add_argument("--gates", type=existing_file, default=DEFAULT_GATES, help="gates YAML file")
    p.add_argument("--alias", default="", help="alias to move (default: champion)")
    args = p.parse_args(argv)
    try:
        parse_version(args.version)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the entry point; returns the exit status (0 promoted, 1 refused, 2 bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    try:
        result = promote(args.name, args.version or None, args.gates, args.alias or None)
    except ValueError as exc:  # RegistryError: unknown name / version / alias; a malformed gates file
        print(f"promote: error: {exc}", file=sys.stderr)
        return 2
    for r in result.results:
        log.info("gate %s", r.line())
    if result.promoted:
        log.info("%s", result.message)
        return 0
    log.error("%s", result.message)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
