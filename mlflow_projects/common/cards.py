"""Glue of the model card (:mod:`interpret.audit.model_card`): gather what the registry and the training run
know about a version, write the card next to its audit, link it from the version's description.

- :func:`data_tags`: the training data facts a training run records (manifest SHA-256, images per source).
- :func:`card_facts`: the :class:`~interpret.audit.model_card.CardFacts` of a registered version: its
  training run's parameters, manifest and class distribution, the stated use (version tags
  ``intended_use``, ``intended_users``, ``provider``), the service's input limits and record-keeping.
- :func:`write_card`: ``model_card.md`` and ``model_card.html`` in an audit's ``audit/`` folder.
- :func:`link_card`: one line in the version's description pointing at the card (replaced, not repeated).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = ["data_tags", "card_facts", "training_facts", "write_card", "link_card", "keep_card_line", "CARD_FILES", "USE_TAGS"]

CARD_FILES = ("model_card.md", "model_card.html")
USE_TAGS = ("intended_use", "intended_users", "provider")  # version tags (stated by the provider)
_LINK = re.compile(r"\n?Model card: .*$", re.MULTILINE)


def manifest_sources(manifest: str | os.PathLike) -> dict[str, int]:
    """Images per ``source`` of a manifest ({} when it has no such column)."""
    import pandas as pd

    try:
        col = pd.read_parquet(manifest, columns=["source"])["source"]
    except Exception:  # noqa: BLE001 - a manifest without the column: sources not known
        return {}
    return {str(k): int(v) for k, v in col.fillna("unknown").value_counts().items()}


def data_tags(manifest: str | os.PathLike) -> dict[str, str]:
    """``data.manifest_sha256`` and ``data.sources`` (JSON: images per ``source``) of a training manifest."""
    from interpret.audit.probe import file_fingerprint

    return {"data.manifest_sha256": file_fingerprint(Path(manifest), length=None),
            "data.sources": json.dumps(manifest_sources(manifest), sort_keys=True)}


def _sources_of(manifest: str | None) -> dict[str, int] | None:
    if not manifest or not Path(manifest).is_file():
        return None
    return manifest_sources(manifest) or None


def training_facts(client, run_id: str | None) -> dict[str, Any]:
    """What the training run recorded: ``{run_id, params, manifest, manifest_sha256, sources, splits}``
    (keys it did not record are absent: not known)."""
    if not run_id:
        return {}
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a deleted run: nothing known
        log.warning("training run %s cannot be read: %s", run_id, exc)
        return {}
    tags = run.data.tags or {}
    facts: dict[str, Any] = {"run_id": run_id, "params": dict(run.data.params or {})}
    if tags.get("manifest"):
        facts["manifest"] = tags["manifest"]
    if tags.get("data.manifest_sha256"):
        facts["manifest_sha256"] = tags["data.manifest_sha256"]
    if tags.get("data.sources"):
        facts["sources"] = json.loads(tags["data.sources"])
    try:
        import mlflow

        facts["splits"] = mlflow.artifacts.load_dict(f"runs:/{run_id}/data/class_distribution.json")
    except Exception:  # noqa: BLE001 - not logged by this run
        pass
    return facts


def _service_facts(kind: str) -> dict[str, Any]:
    from interpret.attention import list_methods
    from mlflow_projects.serving.settings import ServeConfig

    cfg = ServeConfig.from_env()
    return {"formats": ["PNG (8/16-bit)", "JPEG", "DICOM (MONOCHROME1/2)"], "min_image_side": cfg.min_image_side,
            "max_pixels": cfg.max_pixels,
            "methods": ["dwarf"] if kind == "dwarf" else list_methods(),
            "runtime": "ONNX Runtime for predictions and CAM (CUDA when onnxruntime-gpu and a GPU are present, "
                       "else CPU); PyTorch for gradient methods",
            "records_dir": os.environ.get("CXR_RECORDS_DIR") or "records/ beside the service (CXR_RECORDS_DIR)",
            "retention_days": cfg.records_retention_days}


def card_facts(summary: Mapping[str, Any], audit_run_id: str | None, client=None,
               stated: Mapping[str, str] | None = None):
    """The :class:`~interpret.audit.model_card.CardFacts` of the audited version of ``summary``.

    Args:
        summary: the audit's ``summary.json``.
        audit_run_id: the audit's run (None before it is logged).
        client: an ``MlflowClient`` (default a new one).
        stated: ``intended_use`` / ``intended_users`` / ``provider`` given now; they win over the version tags.
    """
    from mlflow import MlflowClient

    from interpret.audit.model_card import CardFacts

    client = client or MlflowClient()
    m = summary.get("model", {})
    tags: dict[str, str] = {}
    train_run = m.get("run_id")
    if m.get("name") and m.get("version"):
        try:
            mv = client.get_model_version(m["name"], str(m["version"]))
            tags = dict(mv.tags or {})
            train_run = tags.get("train_run_id") or mv.run_id or train_run
        except Exception as exc:  # noqa: BLE001 - the card is still written, with less known
            log.warning("model version %s/%s cannot be read: %s", m["name"], m["version"], exc)
    use = {k: (stated or {}).get(k) or tags.get(k) for k in USE_TAGS}
    return CardFacts(provider=use["provider"], intended_use=use["intended_use"], intended_users=use["intended_users"],
                     training=training_facts(client, train_run), audit_run_id=audit_run_id,
                     service=_service_facts(m.get("kind", "classifier")),
                     probe_sources=_sources_of(summary.get("data", {}).get("manifest")))


def write_card(summary: Mapping[str, Any], folder: str | os.PathLike, facts) -> list[Path]:
    """Write ``model_card.md`` and ``model_card.html`` into ``folder``; returns their paths."""
    from interpret.audit.model_card import build_model_card

    card = build_model_card(summary, facts)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, page = folder / CARD_FILES[0], folder / CARD_FILES[1]
    md.write_text(card.markdown, encoding="utf-8")
    page.write_text(card.html, encoding="utf-8")
    return [md, page]


def link_card(client, name: str, version: str, audit_run_id: str, artifact_dir: str = "audit") -> str:
    """Point the version's description at its card (the previous card line is replaced); returns the line."""
    mv = client.get_model_version(name, str(version))
    line = (f"Model card: runs:/{audit_run_id}/{artifact_dir}/{CARD_FILES[0]} (HTML: "
            f"runs:/{audit_run_id}/{artifact_dir}/{CARD_FILES[1]}), from audit run {audit_run_id}")
    client.update_model_version(name, str(version), description=keep_card_line(_LINK.sub("", mv.description or ""),
                                                                              line))
    return line


def keep_card_line(text: str, old_description: str | None) -> str:
    """``text`` followed by the card line of ``old_description`` (if it has one): a description rewritten
    elsewhere (``promote``) keeps pointing at the card."""
    m = _LINK.search(old_description or "")
    text = (text or "").rstrip()
    if not m:
        return text
    return (text + "\n\n" if text else "") + m.group(0).strip()
