"""What the service decides once, when ``service.py`` is imported: which model it serves and whether it
may start where it is asked to bind.

**The model packaged in a Bento.** ``python -m mlflow_projects.build_bento`` packs one BentoML model
(name = the registered name; labels ``mlflow.name``, ``mlflow.version``, ``mlflow.alias``,
``audit.run_id``; folder ``mlflow_model/`` and, from the version's latest passing audit,
``audit/concepts.parquet``, ``audit/summary.json`` (verdicts) and ``audit/ood.npz`` (OOD detector), those
the audit wrote). A built Bento is laid
out as ``<bento>/bento.yaml`` (its ``models`` list names the model's tag) and ``<bento>/src/service.py``;
the model itself is under ``<bento>/models/<name>/<version>/`` once the Bento is exported or
containerised, and in the BentoML model store (``$BENTOML_HOME/models``) for a Bento in the local store.
``bentoml serve <bento tag>`` on a workstation does *not* apply the Bento's ``envs`` (only the container
entrypoint does), so the service cannot rely on ``CXR_BENTO_MODEL`` being set: it reads ``bento.yaml``
next to its own source folder and serves the model listed there (from ``<bento>/models``, else from the
store), with the identity read from the model's labels. No registry and no tracking store are touched
(so no ``mlflow.db`` appears inside the Bento). ``CXR_BENTO_MODEL=<tag>`` still chooses a model
explicitly (inside a Bento, or from the local BentoML store during development).

**Where it binds**: :func:`mlflow_projects.serving.settings.check_bind_address`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow_projects.serving.settings import ServeConfig, check_bind_address, requested_host

log = logging.getLogger(__name__)

__all__ = ["PackagedModel", "find_packaged_model", "startup_config"]

LABELS = ("name", "version", "alias")


@dataclass
class PackagedModel:
    """A BentoML model folder to serve and the MLflow identity its labels record."""

    path: Path  # holds mlflow_model/ and maybe audit/{concepts.parquet, summary.json, ood.npz}
    tag: str
    identity: dict[str, Any]  # name, version, alias, audit_run_id

    @classmethod
    def from_labels(cls, path: str | os.PathLike, tag: str, labels: Mapping[str, Any]) -> "PackagedModel":
        """Build it from BentoML model labels (``mlflow.name`` ... ``audit.run_id``; missing ones are None)."""
        ident = {k: (labels.get(f"mlflow.{k}") or None) for k in LABELS}
        ident["audit_run_id"] = labels.get("audit.run_id") or None
        return cls(Path(path), str(tag), ident)


def _split_tag(tag: str) -> tuple[str, str]:
    name, _, version = str(tag).partition(":")
    return name, version or "latest"


def _in_bento(bento_root: Path, tag: str) -> PackagedModel | None:
    """The model ``tag`` from ``<bento>/models`` (files only: BentoML's model store layout)."""
    import yaml

    name, version = _split_tag(tag)
    base = bento_root / "models" / name
    if version == "latest" and (base / "latest").is_file():
        version = (base / "latest").read_text().strip()
    spec_path = base / version / "model.yaml"
    if not spec_path.is_file():
        return None
    spec = yaml.safe_load(spec_path.read_text()) or {}
    return PackagedModel.from_labels(spec_path.parent, f"{name}:{version}", spec.get("labels") or {})


def find_packaged_model(service_dir: str | os.PathLike, environ: Mapping[str, str] | None = None) -> PackagedModel | None:
    """The model to serve from a Bento (or from the BentoML store when ``CXR_BENTO_MODEL`` names one).

    Args:
        service_dir: the folder of ``service.py`` (``<bento>/src`` inside a built Bento).
        environ: the environment (default ``os.environ``).

    Returns:
        The packaged model, or None when not in a Bento with a model and ``CXR_BENTO_MODEL`` is unset
        (the registry is used then).

    Raises:
        ValueError: ``CXR_BENTO_MODEL`` names a model that is neither in the Bento nor in the store, or
            the Bento packs several models and none is chosen.
    """
    env = os.environ if environ is None else environ
    tag = (env.get("CXR_BENTO_MODEL") or "").strip() or None
    bento_root = Path(service_dir).resolve().parent
    bento_yaml = bento_root / "bento.yaml"
    if bento_yaml.is_file():
        import yaml

        spec = yaml.safe_load(bento_yaml.read_text()) or {}
        packed = [str(m.get("tag") if isinstance(m, Mapping) else m) for m in spec.get("models") or []]
        if tag is None and len(packed) > 1:
            built = {str(e.get("name")): str(e.get("value")) for e in spec.get("envs") or [] if isinstance(e, Mapping)}
            tag = built.get("CXR_BENTO_MODEL")
            if not tag:
                raise ValueError(f"the Bento at {bento_root} packs {len(packed)} models ({packed}); choose one "
                                 "with CXR_BENTO_MODEL")
        tag = tag or (packed[0] if packed else None)
        if tag:
            found = _in_bento(bento_root, tag)
            if found is not None:
                log.info("serving the model packaged in the Bento: %s (%s)", found.tag, found.path)
                return found
    if tag is None:
        return None
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise ValueError(f"CXR_BENTO_MODEL={tag!r} is neither packaged in this Bento nor in the BentoML store; "
                         "list the store with 'bentoml models list'") from None
    return PackagedModel.from_labels(model.path, str(model.tag), model.info.labels)


def startup_config(service_dir: str | os.PathLike, argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> ServeConfig:
    """The service's settings: environment, packaged model, and the bind check.

    Args:
        service_dir: the folder of ``service.py``.
        argv: this process's command line (default ``sys.argv``), for ``bentoml serve --host``.
        environ: the environment (default ``os.environ``).

    Raises:
        mlflow_projects.serving.settings.UnsafeBindError: a non-loopback bind without API keys and without
            ``CXR_ALLOW_ANONYMOUS=1``.
        ValueError: a bad ``CXR_*`` value or an unknown ``CXR_BENTO_MODEL``.
    """
    config = ServeConfig.from_env(environ)
    check_bind_address(requested_host(argv, environ), config.api_keys, config.allow_anonymous)
    packaged = find_packaged_model(service_dir, environ)
    if packaged is not None:
        config.local_model_dir = str(packaged.path)
        config.local_identity = packaged.identity
    return config
