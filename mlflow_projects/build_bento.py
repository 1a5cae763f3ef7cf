"""Import a registered model into the BentoML model store and build a Bento of the service, offline.

    python -m mlflow_projects.build_bento [--model-uri models:/cxr-classifier@champion] [--no-build]

Steps: resolve the URI in the MLflow registry (``@champion`` falls back to ``@candidate`` with a
warning, as the service does); download the MLflow model into a new BentoML model (name = the
registered name) whose folder holds ``mlflow_model/`` and, when the version has a passing audit, its
``audit/concepts.parquet``, ``audit/summary.json`` (verdicts) and ``audit/ood.npz`` (OOD detector), those
the audit wrote; labels ``mlflow.name``, ``mlflow.version``, ``mlflow.alias``,
``audit.run_id`` (and metadata ``mlflow.uri``, ``mlflow.tracking_uri``). Then ``bentoml build`` of
``service:CXRExplainer`` with that one model, so the Bento serves it without a registry: the service
reads the model's tag from the Bento's own ``bento.yaml`` (:mod:`mlflow_projects.serving.startup`),
because ``bentoml serve <bento tag>`` does not apply a Bento's ``envs``; ``CXR_BENTO_MODEL=<tag>`` is
written to the envs too, for containers. Prints the model tag and the Bento tag; ``bentoml serve
<bento tag>`` (127.0.0.1) or ``bentoml containerize <bento tag>`` follow (a container listens on
0.0.0.0 only with ``BENTOML_HOST=0.0.0.0`` and then needs ``CXR_API_KEYS``).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = PROJECT_ROOT / "bentofile.yaml"


def import_model(model_uri: str):
    """Import ``model_uri`` from the MLflow registry into the BentoML model store.

    Returns:
        The BentoML ``Model`` (its tag is ``<registered name>:<generated version>``).

    Raises:
        mlflow_projects.common.RegistryError: the URI does not resolve (the message lists the valid names,
            versions or aliases).
    """
    import bentoml
    import mlflow

    from mlflow_projects.common import DEFAULT_TRACKING_URI, find_passing_audit, resolve_model_uri

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    ident = resolve_model_uri(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        audit = find_passing_audit(ident.name, ident.version, dst=tmp)
        labels = {"mlflow.name": ident.name or "", "mlflow.version": ident.version or "",
                  "mlflow.alias": ident.alias or "", "audit.run_id": audit.run_id if audit else ""}
        name = (ident.name or "cxr-model").replace("_", "-")
        with bentoml.models.create(name, labels=labels, metadata={"mlflow.uri": ident.uri,
                                                                 "mlflow.tracking_uri": mlflow.get_tracking_uri(),
                                                                 "fallback": ident.fallback}) as bento_model:
            dst = Path(bento_model.path) / "mlflow_model"
            local = mlflow.artifacts.download_artifacts(artifact_uri=ident.uri,
                                                        dst_path=str(Path(bento_model.path) / "dl"))
            shutil.move(local, dst)
            shutil.rmtree(Path(bento_model.path) / "dl", ignore_errors=True)
            if audit is not None:  # the files the service reads: concepts.parquet, summary.json, ood.npz
                shutil.copytree(audit.folder / "audit", Path(bento_model.path) / "audit")
                packed = sorted(p.name for p in (Path(bento_model.path) / "audit").iterdir())
                log.info("packed audit run %s: %s", audit.run_id, ", ".join(packed))
            else:
                log.warning("%s has no passing audit: the Bento serves it without concepts, verdicts or OOD "
                            "scores", ident.uri)
    log.info("imported %s (version %s, alias %s) as BentoML model %s", ident.name, ident.version, ident.alias,
             bento_model.tag)
    return bentoml.models.get(bento_model.tag)  # the stored copy (the context's folder was temporary)


def build_bento(model_tag: str, version: str | None = None):
    """``bentoml build`` of the service with ``model_tag`` (options from ``bentofile.yaml``)."""
    import bentoml
    import yaml

    spec = yaml.safe_load(BENTOFILE.read_text())
    from bentoml._internal.bento.build_config import BentoEnvSchema

    envs = [BentoEnvSchema(name=e["name"], value=str(e.get("value", ""))) for e in spec.get("envs", [])
            if e.get("name") != "CXR_BENTO_MODEL"]
    envs.append(BentoEnvSchema(name="CXR_BENTO_MODEL", value=str(model_tag)))
    from bentoml._internal.configuration.containers import BentoMLContainer

    Path(BentoMLContainer.bentoml_home.get(), "tmp").mkdir(parents=True, exist_ok=True)  # a fresh BENTOML_HOME
    cwd = os.getcwd()
    os.chdir(PROJECT_ROOT)  # build context; restored below
    try:
        return bentoml.bentos.build(spec["service"], name=spec.get("name"), labels=spec.get("labels"),
                                    description=spec.get("description"), include=spec.get("include"),
                                    exclude=spec.get("exclude"), envs=envs, python=spec.get("python"),
                                    docker=spec.get("docker"), models=[str(model_tag)], version=version,
                                    build_ctx=str(PROJECT_ROOT))
    finally:
        os.chdir(cwd)


def main(argv: Sequence[str] | None = None) -> int:
    from mlflow_projects.common import entry_parser

    p = entry_parser("build_bento", __doc__)
    p.add_argument("--model-uri", default=os.environ.get("CXR_MODEL_URI", "models:/cxr-classifier@champion"))
    p.add_argument("--no-build", action="store_true", help="only import the model into the BentoML store")
    p.add_argument("--version", default=None, help="Bento version (default: generated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mlflow_projects.common import RegistryError

    try:
        model = import_model(args.model_uri)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {model.tag}")
    if not args.no_build:
        bento = build_bento(str(model.tag), args.version)
        print(f"bento: {bento.tag}")
        print(f"serve it: bentoml serve {bento.tag}   |   image: bentoml containerize {bento.tag} "
              "(run it with -e BENTOML_HOST=0.0.0.0 -e CXR_API_KEYS=<key>)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
