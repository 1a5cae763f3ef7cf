"""The registry: registering, model references (``models:/name/3``, ``models:/name@alias``), the
``@champion`` -> ``@candidate`` fallback and the audit of a version. Look-ups fail with
:class:`RegistryError` (a ``ValueError``) whose one-line message lists the valid names, versions or aliases."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow import MlflowClient

from mlflow_projects.common.settings import CANDIDATE, CHAMPION  # noqa: F401

log = logging.getLogger("mlflow_projects.common")


# ---- registry --------------------------------------------------------------------------------
def register_version(model_uri: str, name: str, tags: Mapping[str, Any], alias: str = CANDIDATE,
                     description: str | None = None):
    """Register ``model_uri`` under ``name``, set version tags (non-strings as JSON) and ``alias``.

    Returns:
        The new ``ModelVersion``.
    """
    client = MlflowClient()
    mv = mlflow.register_model(model_uri, name)
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, to_tag(value))
    client.set_registered_model_alias(name, alias, mv.version)
    if description:
        client.update_model_version(name, mv.version, description=description)
    log.info("registered %s version %s with alias %s", name, mv.version, alias)
    return client.get_model_version(name, mv.version)


def to_tag(value: Any) -> str:
    """A version tag's text: strings as they are, anything else as JSON, where a non-finite float (a class
    without a threshold is NaN in memory) is ``null``, never the invalid ``NaN``."""
    return value if isinstance(value, str) else json.dumps(_json_safe(value), sort_keys=True, allow_nan=False)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---- model references and the registry -------------------------------------------------------
FALLBACK_ALIAS = CANDIDATE  # served when no version holds @champion yet
SUMMARY_ARTIFACT = "audit/summary.json"
CONCEPTS_ARTIFACT = "audit/concepts.parquet"
OOD_ARTIFACT = "audit/ood.npz"

_MODELS_URI = re.compile(r"^models:/([^/@\s]+)(?:/(\d+)|@([\w\-]+))/?$")


class RegistryError(ValueError):
    """A registry reference that cannot be resolved; the message names it and lists the valid values."""


class AuditNotFound(RegistryError):
    """The model version exists but has no (readable) audit."""


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, version, alias)`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``.

    Exactly one of ``version`` and ``alias`` is set. The ``models:/`` prefix may be left out
    (``NAME/3``, ``NAME@champion``), as where a CLI takes a version reference.

    Example:
        >>> parse_model_uri("models:/cxr-classifier@champion")
        ('cxr-classifier', None, 'champion')

    Raises:
        ValueError: ``uri`` is none of these forms (the message lists them).
    """
    text = str(uri).strip()
    m = _MODELS_URI.match(text if text.startswith("models:/") else f"models:/{text}")
    if not m:
        raise ValueError(f"bad model reference {uri!r}; valid forms: models:/NAME/VERSION, models:/NAME@ALIAS "
                         f"(or NAME/VERSION, NAME@ALIAS)")
    return m.group(1), m.group(2), m.group(3)


def parse_version(text: str | int | None) -> tuple[str | None, str | None]:
    """``(version, alias)`` of what a CLI takes as a version: ``3``, ``@champion`` or ``champion``.

    Returns:
        ``(None, None)`` for an empty value (the caller's default applies).

    Raises:
        ValueError: neither a positive integer nor an alias name.
    """
    value = "" if text is None else str(text).strip()
    if not value:
        return None, None
    if value.isdigit() and int(value) > 0:
        return str(int(value)), None
    alias = value[1:] if value.startswith("@") else value
    if re.fullmatch(r"[A-Za-z_][\w\-]*", alias):
        return None, alias
    raise ValueError(f"bad version {text!r}; valid: a positive integer (e.g. 3) or an alias (e.g. @champion)")


@dataclass
class ModelIdentity:
    """Which registered model version a URI names (what the service serves, what an audit audits)."""

    name: str | None
    version: str | None
    alias: str | None
    uri: str  # the resolved, pinned URI (models:/name/version when registered)
    requested_uri: str
    run_id: str | None = None
    fallback: bool = False  # True when @champion was missing and @candidate is served

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "alias": self.alias, "uri": self.uri}


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _registered_model(client, name: str):
    """The ``RegisteredModel`` ``name``; an unknown name lists the registered ones."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"cannot read registered model {name!r} from {mlflow.get_tracking_uri()}: "
                                f"{_first_line(exc)}") from None
    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
    except MlflowException:
        names = []
    raise RegistryError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}; registered: "
                        f"{', '.join(names) or 'none (train and register a model first)'}") from None


def _versions(client, name: str) -> list[str]:
    mvs = client.search_model_versions(f"name = '{name}'")
    return sorted({str(mv.version) for mv in mvs}, key=int)


def _aliases(model) -> dict[str, str]:
    aliases = getattr(model, "aliases", None) or {}
    if isinstance(aliases, Mapping):
        return {str(k): str(v) for k, v in aliases.items()}
    return {str(getattr(a, "alias", a)): str(getattr(a, "version", "")) for a in aliases}


def get_version(name: str, version: str | None = None, alias: str | None = None, client=None):
    """The ``ModelVersion`` ``name``/``version`` or ``name@alias``.

    Raises:
        RegistryError: unknown name (lists the registered models), unknown version (lists the
            versions) or unknown alias (lists the aliases and their versions).
    """
    from mlflow.exceptions import MlflowException

    if (version is None) == (alias is None):
        raise ValueError("give exactly one of version and alias")
    client = client or MlflowClient()
    model = _registered_model(client, name)
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"cannot read {name} {version or '@' + str(alias)} from "
                                f"{mlflow.get_tracking_uri()}: {_first_line(exc)}") from None
    if version is not None:
        raise RegistryError(f"{name} has no version {version}; versions: "
                            f"{', '.join(_versions(client, name)) or 'none'}")
    known = _aliases(model)
    listed = ", ".join(f"@{a} (version {v})" for a, v in sorted(known.items())) or "none"
    raise RegistryError(f"{name} has no alias {alias!r}; aliases: {listed}")


def resolve_model_uri(uri: str, client=None, fallback: bool = True) -> ModelIdentity:
    """Resolve ``models:/name@alias``, ``models:/name/version`` or any other MLflow model URI.

    With ``fallback`` (what the service wants), ``@champion`` without a champion version falls back to
    ``@candidate`` with a warning (the identity's ``fallback`` is then True); without it (the audit: a
    version is audited only when named), a missing ``@champion`` is an error like any unknown alias. Any other URI (``runs:/``, ``models:/m-<id>``, a folder) is
    returned unresolved with ``name = version = alias = None``.

    Raises:
        RegistryError: the model, version or alias does not exist (lists the valid ones), or the
            registry cannot be read.
    """
    m = _MODELS_URI.match(str(uri).strip())
    if not m:
        return ModelIdentity(None, None, None, uri, uri)
    client = client or MlflowClient()
    name, version, alias = m.group(1), m.group(2), m.group(3)
    if version:
        mv = get_version(name, version=version, client=client)
        aliases = list(getattr(mv, "aliases", []) or [])
        return ModelIdentity(name, str(mv.version), aliases[0] if aliases else None,
                             f"models:/{name}/{mv.version}", uri, mv.run_id)
    fell_back = False
    try:
        mv = get_version(name, alias=alias, client=client)
    except RegistryError:
        if not fallback or alias != CHAMPION or FALLBACK_ALIAS not in _aliases(_registered_model(client, name)):
            raise
        mv = get_version(name, alias=FALLBACK_ALIAS, client=client)
        log.warning("no version of %s has alias 'champion'; using @%s (version %s) instead", name,
                    FALLBACK_ALIAS, mv.version)
        alias, fell_back = FALLBACK_ALIAS, True
    return ModelIdentity(name, str(mv.version), alias, f"models:/{name}/{mv.version}", uri, mv.run_id, fell_back)


def latest_audit(client, name: str, version: str) -> tuple[str, dict]:
    """The run id and ``summary.json`` of the latest audit of ``name`` version ``version``: the run named
    by the version's ``audit.run_id`` tag (each audit overwrites it).

    Args:
        client: an ``MlflowClient`` (None: a new one on the current tracking URI).
        name: registered model name.
        version: version number.

    Raises:
        AuditNotFound: the version carries no ``audit.run_id`` tag or its summary cannot be read.
        RegistryError: unknown name or version.
    """
    client = client or MlflowClient()
    mv = get_version(name, version=str(version), client=client)
    run_id = (mv.tags or {}).get("audit.run_id")
    if not run_id:
        raise AuditNotFound(f"{name} version {mv.version} has no audit (tag audit.run_id missing); run the "
                            f"audit entry point first")
    try:
        summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/{SUMMARY_ARTIFACT}")
    except Exception as exc:  # noqa: BLE001 - any store error means the audit is unusable
        raise AuditNotFound(f"cannot read {SUMMARY_ARTIFACT} of audit run {run_id}: {_first_line(exc)}") from exc
    return run_id, summary


def version_audit(name: str, version: str | None = None, alias: str | None = None) -> dict:
    """The ``summary.json`` of the latest audit of ``name``/``version`` or ``name@alias``, with
    ``summary["mlflow"]["run_id"]`` filled.

    Raises:
        AuditNotFound: the version has no (readable) audit.
        RegistryError: unknown name, version or alias.
    """
    client = MlflowClient()
    mv = get_version(name, version=version, alias=alias, client=client)
    run_id, summary = latest_audit(client, name, str(mv.version))
    summary.setdefault("mlflow", {})["run_id"] = run_id
    return summary


@dataclass
class PassingAudit:
    """The latest passing audit of a model version, as the service uses it (:func:`find_passing_audit`)."""

    run_id: str
    concepts: Any  # DataFrame: concepts.parquet (layer, unit, method, concepts, scores, evidence, vlm_blind, ...)
    summary: dict | None = None  # summary.json (verdicts, config, ood); None for an audit written without one
    folder: Path | None = None  # the local folder holding the downloaded ``audit/`` files (None: not kept)

    @property
    def ood_path(self) -> Path | None:
        """The audit's OOD detector file (``audit/ood.npz``) when downloaded and present."""
        path = None if self.folder is None else self.folder / OOD_ARTIFACT
        return path if path is not None and path.is_file() else None


def find_passing_audit(name: str | None, version: str | None, client=None,
                       dst: str | os.PathLike | None = None, status: str = "passed") -> PassingAudit | None:
    """The latest passing audit of ``name``/``version``: its concept table, ``summary.json`` and OOD detector.

    Looks for runs tagged ``model.name``, ``model.version`` and ``audit.status = 'passed'`` (the audit
    entry point's tags), newest first, then at the version's own ``audit.run_id`` tag. The first run with a
    readable ``audit/concepts.parquet`` wins; its ``audit/summary.json`` (verdicts, ``config.min_evidence``)
    and ``audit/ood.npz`` are taken when present (an audit written before they existed has neither: the
    caller serves without verdicts and OOD scores).

    Args:
        name: registered model name (None: no audit).
        version: version number (None: no audit).
        client: an ``MlflowClient`` (None: a new one on the current tracking URI).
        status: the ``audit.status`` looked for (``"failed"``: the latest failed audit, whose verdicts and OOD
            detector the service serves when a version has no passing audit).
        dst: where to keep the files: ``dst/<run_id>/audit/{concepts.parquet, summary.json, ood.npz}``
            (one folder per run: files of different audits never mix). None: a temporary folder, removed
            before returning (``folder`` is None then, so no OOD detector file).

    Returns:
        A :class:`PassingAudit`, or ``None`` when no passing audit (or no concept table) exists.
    """
    if not name or not version:
        return None
    client = client or MlflowClient()
    candidates: list[str] = []
    try:
        exps = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        if exps:
            runs = client.search_runs(exps, filter_string=(f"tags.`model.name` = '{name}' and tags.`model.version` = "
                                                           f"'{version}' and tags.`audit.status` = '{status}'"),
                                      order_by=["attributes.start_time DESC"], max_results=20)
            candidates += [r.info.run_id for r in runs]
    except Exception as exc:  # noqa: BLE001 - a search failure only means "no concepts"
        log.warning("audit search failed (%s); serving without concepts", exc)
    try:
        tags = client.get_model_version(name, version).tags or {}
        if tags.get("audit.status") == status and tags.get("audit.run_id"):
            candidates.append(tags["audit.run_id"])
    except Exception:  # noqa: BLE001
        pass
    for run_id in dict.fromkeys(candidates):
        if dst is None:
            with tempfile.TemporaryDirectory() as tmp:
                found = _download_audit(run_id, Path(tmp))
                if found is not None:
                    found.folder = None
                    return found
        else:
            found = _download_audit(run_id, Path(dst) / run_id)
            if found is not None:
                return found
    return None


def _download_audit(run_id: str, folder: Path) -> PassingAudit | None:
    """The audit files of ``run_id`` under ``folder/audit/``; None without a readable concept table."""
    import pandas as pd

    try:
        table = pd.read_parquet(_fetch(run_id, CONCEPTS_ARTIFACT, folder))
    except Exception as exc:  # noqa: BLE001 - try the next run
        log.warning("audit run %s has no readable %s (%s)", run_id, CONCEPTS_ARTIFACT, type(exc).__name__)
        return None
    summary = None
    for artifact in (SUMMARY_ARTIFACT, OOD_ARTIFACT):
        try:
            path = _fetch(run_id, artifact, folder)
        except Exception as exc:  # noqa: BLE001 - an audit written before the file existed
            log.info("audit run %s has no %s (%s)", run_id, artifact, type(exc).__name__)
            continue
        if artifact == SUMMARY_ARTIFACT:
            try:
                summary = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                log.warning("audit run %s: %s is unreadable (%s); no verdicts", run_id, artifact, exc)
    return PassingAudit(run_id, table, summary, folder)


def _fetch(run_id: str, artifact: str, folder: Path) -> Path:
    """Download one artifact file of ``run_id`` to ``folder/<artifact>`` (its path inside the run kept)."""
    import shutil

    target = folder / artifact
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                    dst_path=str(target.parent)))
    if path.resolve() != target.resolve():
        shutil.move(str(path), target)
    return target
