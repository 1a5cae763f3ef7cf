"""The registry: registering, model references (``models:/name/3``, ``models:/name@alias``), the
``@champion`` -> ``@candidate`` fallback and the audit of a version. Look-ups fail with
:class:`RegistryError` (a ``ValueError``) whose one-line message lists the valid names, versions or aliases."""
from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
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


def find_passing_audit(name: str | None, version: str | None, client=None) -> tuple[str, Any] | None:
    """The latest passing audit of ``name``/``version`` and its concept table.

    Looks for runs tagged ``model.name``, ``model.version`` and ``audit.status = 'passed'`` (the audit
    entry point's tags), newest first, then at the version's own ``audit.run_id`` tag.

    Returns:
        ``(run_id, DataFrame layer, unit, method, concepts, scores)`` or ``None`` when no passing audit
        (or no concept table) exists.
    """
    if not name or not version:
        return None
    client = client or MlflowClient()
    candidates: list[str] = []
    try:
        exps = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        if exps:
            runs = client.search_runs(exps, filter_string=(f"tags.`model.name` = '{name}' and tags.`model.version` = "
                                                           f"'{version}' and tags.`audit.status` = 'passed'"),
                                      order_by=["attributes.start_time DESC"], max_results=20)
            candidates += [r.info.run_id for r in runs]
    except Exception as exc:  # noqa: BLE001 - a search failure only means "no concepts"
        log.warning("audit search failed (%s); serving without concepts", exc)
    try:
        tags = client.get_model_version(name, version).tags or {}
        if tags.get("audit.status") == "passed" and tags.get("audit.run_id"):
            candidates.append(tags["audit.run_id"])
    except Exception:  # noqa: BLE001
        pass
    seen = set()
    for run_id in candidates:
        if run_id in seen:
            continue
        seen.add(run_id)
        try:
            import pandas as pd

            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONCEPTS_ARTIFACT,
                                                           dst_path=tmp)
                table = pd.read_parquet(path)
            return run_id, table
        except Exception as exc:  # noqa: BLE001 - try the next run
            log.warning("audit run %s has no readable %s (%s)", run_id, CONCEPTS_ARTIFACT, type(exc).__name__)
    return None


