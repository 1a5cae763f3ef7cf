"""Compare the latest audits of two model versions: metrics side by side, concepts gained and lost per
class, localisation change.

    python -m mlflow_projects.compare 1 2                                   # versions of cxr-classifier
    python -m mlflow_projects.compare cxr-classifier/2 cxr-classifier@champion --json out.json

A version reference is ``VERSION`` or ``@ALIAS`` (of ``--name``, default ``cxr-classifier``),
``NAME/VERSION``, ``NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; the audit used is the
run named by the version's ``audit.run_id`` tag. Thin glue: the comparison itself is
:func:`interpret.audit.diff.compare_summaries` (the audit report uses it too). An unknown name, version
or alias, or a version without an audit, exits with status 2 and a one-line message.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

import mlflow

from interpret.audit.diff import compare_summaries, comparison_text
from mlflow_projects.common import DEFAULT_TRACKING_URI, entry_parser, parse_model_uri, parse_version, version_audit

log = logging.getLogger(__name__)

DEFAULT_NAME = "cxr-classifier"


def parse_ref(ref: str, name: str = DEFAULT_NAME) -> tuple[str, str | None, str | None]:
    """``(name, version, alias)`` of a version reference (see the module docstring).

    Raises:
        ValueError: none of the accepted forms (listed in the message).
    """
    text = str(ref).strip()
    if text.isdigit() or text.startswith("@"):
        try:
            version, alias = parse_version(text)
            if version or alias:
                return name, version, alias
        except ValueError:
            pass
    else:
        try:
            return parse_model_uri(text)
        except ValueError:
            pass
    raise ValueError(f"bad model version reference {ref!r}; valid forms: VERSION, @ALIAS (of --name), "
                     f"NAME/VERSION, NAME@ALIAS, models:/NAME/VERSION, models:/NAME@ALIAS")


def compare_versions(ref_a: str, ref_b: str, name: str = DEFAULT_NAME) -> dict:
    """Load both versions' latest audits and compare them (:func:`compare_summaries`).

    Raises:
        RegistryError: unknown name, version or alias, or a version without an audit.
    """
    sa = version_audit(*parse_ref(ref_a, name))
    sb = version_audit(*parse_ref(ref_b, name))
    return compare_summaries(sa, sb, label_a=ref_a, label_b=ref_b)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison of two versions; ``--json FILE`` also writes it. Returns 0, or 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = entry_parser("compare", __doc__)
    p.add_argument("a", help="first version: VERSION, @ALIAS, NAME/VERSION, NAME@ALIAS or models:/...")
    p.add_argument("b", help="second version (same forms)")
    p.add_argument("--name", default=DEFAULT_NAME, help="registered model of bare versions and aliases")
    p.add_argument("--json", default="", help="also write the comparison to this JSON file")
    args = p.parse_args(argv)
    for ref in (args.a, args.b):
        try:
            parse_ref(ref, args.name)
        except ValueError as exc:
            p.error(str(exc))
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    try:
        cmp = compare_versions(args.a, args.b, args.name)
    except ValueError as exc:  # RegistryError / AuditNotFound
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(comparison_text(cmp) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(cmp, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
