"""MLflow entry point ``model_card``: the model card of a registered version from its latest audit.

    python -m mlflow_projects.model_card --model-uri models:/cxr-classifier/3 \\
        --intended-use "Second reader for adult frontal chest films; not for diagnosis" \\
        --intended-users "Radiologists" --provider "Hospital X imaging AI team, ai@hospital-x.example"

The audit writes the card itself (``audit/model_card.md`` and ``.html`` in its run); this command rebuilds
it for an existing audit, e.g. once the provider has stated the intended use: the statements given here
are stored as version tags (``intended_use``, ``intended_users``, ``provider``) so later audits keep them,
the card is written to ``--out`` (default ``outputs/model_cards/<name>-v<version>``), added to the audit
run's artifacts (replacing the card there) and linked from the version's description. What neither the
audit nor the training run knows is written as "not known". An unknown model, version or alias, or a
version without an audit, exits with status 2 and one line saying what is wrong.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from mlflow_projects.common import (AuditNotFound, PROJECT_ROOT, card_facts, entry_parser, latest_audit, link_card,
                                    resolve_model_uri, run_cli, write_card)

log = logging.getLogger(__name__)


def build_parser():
    p = entry_parser("model_card", __doc__)
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--intended-use", default="", help="the intended purpose, as the provider states it")
    p.add_argument("--intended-users", default="", help="who is meant to use the model")
    p.add_argument("--provider", default="", help="provider name and contact details")
    p.add_argument("--out", default="", help="folder for model_card.md/.html (default outputs/model_cards/...)")
    p.add_argument("--no-log", action="store_true", help="write the files only: do not touch the audit run, the "
                                                         "version's tags or its description")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from mlflow import MlflowClient

    ident = resolve_model_uri(a.model_uri, fallback=False)
    client = MlflowClient()
    try:
        run_id, summary = latest_audit(client, ident.name, ident.version)
    except AuditNotFound as exc:
        raise ValueError(str(exc)) from None
    stated = {"intended_use": a.intended_use.strip(), "intended_users": a.intended_users.strip(),
              "provider": a.provider.strip()}
    stated = {k: v for k, v in stated.items() if v}
    if stated and not a.no_log:
        for key, value in stated.items():
            client.set_model_version_tag(ident.name, ident.version, key, value)
    out = Path(a.out) if a.out else PROJECT_ROOT / "outputs" / "model_cards" / f"{ident.name}-v{ident.version}"
    paths = write_card(summary, out, card_facts(summary, run_id, client, stated))
    if not a.no_log:
        for path in paths:
            client.log_artifact(run_id, str(path), "audit")
        link_card(client, ident.name, ident.version, run_id)
    for path in paths:
        print(path.resolve())
    print(f"model card of {ident.name} version {ident.version} from audit run {run_id}"
          + ("" if a.no_log else "; logged to that run and linked from the version's description"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "model_card"))
