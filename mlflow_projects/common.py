"""Helpers shared by the MLflow entry points: tracking set-up, parameter parsing, the registry.

Only glue lives here; the science is in :mod:`training` and :mod:`interpret`. This is the ONE home of:

- model references: :func:`parse_model_uri` (``models:/name/3``, ``models:/name@alias``),
  :func:`parse_version` (a CLI's bare ``3`` or ``@alias``), :class:`ModelIdentity` and
  :func:`resolve_model_uri` (with the ``@champion`` -> ``@candidate`` fallback);
- "the audit of a version": :func:`latest_audit`, :func:`version_audit` (its ``summary.json``) and
  :func:`find_passing_audit` (its concept table, what the service serves);
- registering: :func:`register_version`.

Registry look-ups fail with :class:`RegistryError` (a ``ValueError``) whose one-line message names the
bad name, version or alias and lists the valid ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow
from mlflow import MlflowClient

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
DEFAULT_ARTIFACT_ROOT = PROJECT_ROOT / "mlartifacts"
CANDIDATE, CHAMPION = "candidate", "champion"
DEFAULT_DATA = "outputs/phantom/manifest.parquet"  # the entry points' default manifest (the phantom)
DEFAULT_GATES = Path(__file__).resolve().parent / "gates.yaml"  # the promotion policy
SCRATCH_CLIP = "cxr-tiny-vit"  # the CLIP config `--clip scratch` builds, untrained
DWARF_MIN_IMAGE_SIZE = 16  # DWARF's ViT has 8-px patches: at least a 2 x 2 grid of patch tokens


#: Experiments of the entry points (``mlflow run . -e NAME --experiment-name EXPERIMENT``).
EXPERIMENTS = {"train_classifier": "cxr-classifier", "imbalance_study": "cxr-classifier", "train_clip": "cxr-clip",
               "train_dwarf": "cxr-dwarf", "dwarf_benchmark": "cxr-dwarf-benchmark", "audit": "cxr-audit",
               "concept_benchmark": "concept_benchmark"}


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the SQLite store ``mlflow.db`` in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def artifact_root() -> Path:
    """Where runs of a local store keep their artifacts: ``CXR_ARTIFACT_ROOT``, else ``mlartifacts/``."""
    return Path(os.environ.get("CXR_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT)).expanduser().resolve()


def _local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _create_sqlite_store(uri: str) -> None:
    """Create a missing SQLite store with ``artifact_root()`` as its default artifact root, so even the
    ``Default`` experiment (where ``mlflow run`` puts runs without ``--experiment-name``) keeps its
    artifacts there instead of ``./mlruns/0``."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    if str(db) in ("", ":memory:") or db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = artifact_root()
    root.mkdir(parents=True, exist_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(uri, root.as_uri()).engine.dispose()


def ensure_experiment(client, experiment: str) -> str:
    """The id of ``experiment``, created when missing (artifacts under ``artifact_root()/experiment`` for a
    local store)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _local_store(tracking_uri()):
        root = artifact_root()
        root.mkdir(parents=True, exist_ok=True)
        location = (root / experiment).as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def setup_tracking(experiment: str) -> str:
    """Point MLflow at :func:`tracking_uri` and select ``experiment``, creating it with an explicit artifact
    location under :func:`artifact_root` when the store is local (a new SQLite store is created with that
    root as its default, so runs never land in ``./mlruns``).

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) the launcher has already created the run in the
    experiment it was given (``--experiment-name``); switching experiments would make
    ``mlflow.start_run`` refuse that run, so the run's own experiment is kept (with a warning when its
    artifacts do not go under the artifact root: create the experiments first, see :func:`main`).

    Returns:
        The experiment id.
    """
    uri = tracking_uri()
    if _local_store(uri):
        _create_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched:
        run = client.get_run(launched)
        log.info("under `mlflow run`: keeping run %s in experiment %s (not %r)", launched,
                 run.info.experiment_id, experiment)
        art = run.info.artifact_uri or ""
        if _local_store(uri) and not art.startswith(artifact_root().as_uri()) and \
                not art.startswith(str(artifact_root())):
            log.warning("this run's artifacts go to %s, not under %s: run `python -m mlflow_projects.common "
                        "setup` once before `mlflow run`, and pass --experiment-name %s", art, artifact_root(),
                        experiment)
        return run.info.experiment_id
    exp_id = ensure_experiment(client, experiment)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def start_run(experiment: str, **kwargs):
    """:func:`setup_tracking` then ``mlflow.start_run(**kwargs)`` (under ``mlflow run``: the launcher's run)."""
    setup_tracking(experiment)
    return mlflow.start_run(**kwargs)


def check_manifest(data: str | Path, default: str = DEFAULT_DATA) -> str:
    """Validate a ``--data`` value: an existing Parquet manifest file (or ``default``, generated later).

    Returns:
        The absolute path, or ``default`` itself when it does not exist yet.

    Raises:
        FileNotFoundError: the file does not exist (names the path).
        ValueError: a folder (names the manifest inside when there is one) or not a Parquet file.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        inside = path / "manifest.parquet"
        hint = f"; did you mean {inside.resolve()}?" if inside.is_file() else \
            " (give the manifest file, e.g. DIR/manifest.parquet)"
        raise ValueError(f"manifest {path.resolve()} is a folder{hint}")
    if not path.is_file():
        if str(data) == default:
            return default
        raise FileNotFoundError(f"manifest not found: {path.resolve()}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PAR1":
        raise ValueError(f"manifest {path.resolve()} is not a Parquet file; convert annotations with "
                         "`python -m training.data convert ...` or generate one with `python -m training.data phantom`")
    return str(path.resolve())


def manifest_arg(text: str) -> str:
    """argparse type of ``--data``: :func:`check_manifest` with its message as the usage error."""
    try:
        return check_manifest(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ensure_data(data: str, image_size: int, seed: int, n: int, masks: bool = False) -> Path:
    """The manifest path; generates an ``n``-image phantom when the default path is missing.

    Args:
        data: manifest path (validated with :func:`check_manifest`).
        image_size: the phantom is drawn at ``max(64, image_size)`` px.
        seed: phantom seed.
        n: phantom images.
        masks: also write the phantom's masks (DWARF's supervision).

    Raises:
        FileNotFoundError: a manifest other than the default does not exist (names the path).
        ValueError: a folder or a file that is not Parquet.
    """
    checked = check_manifest(data)
    path = Path(checked)
    if path.is_file():
        return path.resolve()
    from training.data.phantom import generate_phantom

    log.info("no manifest at %s: generating a %d-image phantom", path, n)
    return Path(generate_phantom(path.parent, n=n, size=max(64, image_size), seed=seed, masks=masks)).resolve()


# ---- argparse types: MLproject does not validate int/float parameters, so we do. -------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0.0 < value < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_at_least(minimum: int, what: str = "an integer"):
    """argparse type accepting an integer >= ``minimum``; the error names the minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}")
        return value

    return parse


def unit_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path.resolve()}")
    return path.resolve()


def choice_of(valid: Iterable[str], what: str):
    """argparse type accepting one of ``valid``; the error lists them."""
    options = sorted(valid)

    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid: {', '.join(options)}")
        return text

    return parse


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
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _param_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def log_config(config: Any, name: str = "config.json") -> None:
    """Log a resolved configuration (dataclass or mapping) as params and as the artifact ``config.json``.

    The one way every entry point logs its parameters. Under ``mlflow run`` the launcher has already
    logged the MLproject parameters as given (``reports=''``, a relative ``data``); MLflow refuses to
    change a param, so a value the launcher logged differently is logged as ``resolved.<key>`` and one it
    logged identically is not logged again. The artifact always holds the whole resolved config.
    """
    from dataclasses import asdict, is_dataclass

    data = asdict(config) if is_dataclass(config) else dict(config)
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params if run else {}
    params = {}
    for key, value in data.items():
        text = _param_text(value)
        if key not in existing:
            params[key] = text
        elif existing[key] != text:
            params[f"resolved.{key}"] = text
    if params:
        mlflow.log_params(params)
    mlflow.log_dict(json.loads(json.dumps(data, default=str)), name)


def finite_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Metric dict without NaN/inf or non-numbers (MLflow rejects them), names prefixed."""
    import math

    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not hasattr(value, "__float__"):
            continue
        value = float(value)
        if math.isfinite(value):
            out[f"{prefix}{key}"] = value
    return out


def print_table(table, title: str = "", file=None) -> None:
    """Write a results table (a DataFrame) to stdout: the final answer of a study, after the log lines
    (which go to stderr)."""
    import sys

    out = file or sys.stdout
    if title:
        out.write(f"{title}\n")
    out.write(("(no rows)" if table is None or len(table) == 0 else
               table.to_string(index=False, float_format=lambda v: f"{v:.3f}")) + "\n")
    out.flush()


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


def resolve_model_uri(uri: str, client=None) -> ModelIdentity:
    """Resolve ``models:/name@alias``, ``models:/name/version`` or any other MLflow model URI.

    ``@champion`` without a champion version falls back to ``@candidate`` with a warning (the
    identity's ``fallback`` is then True). Any other URI (``runs:/``, ``models:/m-<id>``, a folder) is
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
    fallback = False
    try:
        mv = get_version(name, alias=alias, client=client)
    except RegistryError:
        if alias != CHAMPION or FALLBACK_ALIAS not in _aliases(_registered_model(client, name)):
            raise
        mv = get_version(name, alias=FALLBACK_ALIAS, client=client)
        log.warning("no version of %s has alias 'champion'; serving @%s (version %s) instead", name,
                    FALLBACK_ALIAS, mv.version)
        alias, fallback = FALLBACK_ALIAS, True
    return ModelIdentity(name, str(mv.version), alias, f"models:/{name}/{mv.version}", uri, mv.run_id, fallback)


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


# ---- models the entry points load --------------------------------------------------------------
def load_classifier(uri: str, dst: str | Path):
    """Download a registered classifier (or read a local model folder) and rebuild it with
    :func:`training.models.load_checkpoint`.

    Args:
        uri: a pinned model URI (``models:/name/3``, ``runs:/...``) or a local model folder.
        dst: folder the artifacts are downloaded to.

    Returns:
        ``(model, meta)``: the eval-mode model and ``artifacts/meta.json`` (empty dict if absent).

    Raises:
        FileNotFoundError: the model holds no ``checkpoint.pt`` (not a cxr-classifier model).
    """
    from training.models import load_checkpoint

    src = Path(uri)
    if not src.exists():
        src = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    ckpt = src / "artifacts" / "checkpoint.pt"
    if not ckpt.is_file():
        found = sorted(src.rglob("checkpoint.pt"))
        if not found:
            raise FileNotFoundError(f"{uri} holds no artifacts/checkpoint.pt (is it a cxr-classifier model?)")
        ckpt = found[0]
    meta_path = ckpt.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return load_checkpoint(ckpt).eval(), meta


CLIP_SPECS = ("models:/NAME/VERSION", "models:/NAME@ALIAS", "an open_clip model name", "local-dir:PATH",
              "hf-hub:ORG/NAME", "a config .json or HF CLIP folder", "scratch", "scratch:<config>")


def resolve_clip(spec: str, image_size: int | None = None, require_vit: bool = False) -> tuple[Any, str]:
    """The CLIP bundle named by ``spec`` and a description of what was loaded.

    One rule for every entry point: a registered CLIP (``models:/...``) or a loadable spec
    (:func:`training.clip.load_clip`: an open_clip name, ``local-dir:``, ``hf-hub:``, a folder) is loaded
    as asked; an untrained CLIP only when asked for by name, ``scratch`` (an untrained
    ``cxr-tiny-vit``) or ``scratch:<config>``. Anything that cannot be loaded is an error, never a silent
    fallback.

    Args:
        spec: see above.
        image_size: input side an untrained (``scratch``) CLIP is built for (default: its config's).
        require_vit: refuse a CLIP whose image tower is not a ViT (DWARF cross-attends to patch tokens).

    Returns:
        ``(ClipBundle, description)``; the description is ``scratch:<config> (untrained)``, the pinned
        ``models:/name/version`` (with the alias asked for), or ``spec``.

    Raises:
        RegistryError: a ``models:/`` URI naming an unknown model, version or alias, or whose
            artifacts hold no loadable CLIP.
        ValueError: an unknown spec (lists the valid forms), or a non-ViT CLIP with ``require_vit``.
    """
    from training.clip import list_configs, load_clip

    text = str(spec).strip()
    if text == "scratch" or text.startswith("scratch:"):
        config = text.partition(":")[2].strip() or SCRATCH_CLIP
        try:
            bundle = load_clip(config, image_size=image_size)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"bad CLIP {spec!r}: {_first_line(exc)}; scratch:<config> takes an open_clip "
                             f"config name, e.g. {', '.join(list_configs())}") from None
        described = f"scratch:{config} (untrained)"
    elif text.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        from mlflow_projects.pyfunc_clip import load_registered_clip

        ident = resolve_model_uri(text)
        try:
            bundle = load_registered_clip(ident.uri)
        except (MlflowException, OSError, ValueError, KeyError) as exc:
            raise RegistryError(f"cannot load the CLIP {text} ({ident.uri}): {_first_line(exc)}") from None
        bundle.spec = text
        described = text if ident.version and text.endswith(f"/{ident.version}") else \
            f"{text} (version {ident.version})" if ident.version else text
    else:
        try:
            bundle = load_clip(text)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"cannot load CLIP {spec!r}: {str(exc).rstrip('; ')}; valid forms: "
                             f"{', '.join(CLIP_SPECS)}") from None
        described = text
    if require_vit:
        from open_clip.transformer import VisionTransformer

        visual = getattr(bundle.model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"CLIP {spec!r} has a {type(visual).__name__} image tower; DWARF needs a ViT (patch "
                             f"tokens): pass 'scratch' (an untrained {SCRATCH_CLIP}), 'scratch:<ViT config>' or a "
                             f"ViT CLIP, e.g. one registered by train_clip --model cxr-minilm-vit")
    return bundle, described


# ---- classifier training, shared by train_classifier and imbalance_study ----------------------
@dataclass
class ClassifierRunConfig:
    """The resolved configuration of one classifier training (logged as ``config.json``)."""

    data: str = DEFAULT_DATA
    arch: str = "resnet18"
    loss: str = "bce"
    epochs: int = 3
    image_size: int = 128
    batch_size: int = 32
    seed: int = 0
    task: str = "multilabel"  # "multilabel" | "binary"
    pretrained: str | None = None  # local weights file (never downloaded)
    registered_name: str = "cxr-classifier"
    lr: float = 4e-4
    weight_decay: float = 1e-6
    warmup_epochs: float = 0.5
    patience: int = 0  # early stopping on val mean AUROC; 0 = off
    augment: bool = False
    cache: bool = True  # decode images once (only without augmentation)
    device: str | None = None
    num_workers: int = 0
    phantom_n: int = 400  # images of the phantom generated when the default data is missing
    experiment: str = "cxr-classifier"


#: argparse type of a classifier's ``--image-size`` (smaller inputs leave no feature map to explain).
classifier_image_size = int_at_least(16, "an image size")


def add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    """The options every classifier entry point shares: ``--data``, ``--arch``, ``--epochs``,
    ``--image-size``, ``--batch-size``, ``--seed``, ``--task`` (defaults of :class:`ClassifierRunConfig`)."""
    from training.models import list_models
    from training.train import TASKS

    d = ClassifierRunConfig()
    p.add_argument("--data", type=manifest_arg, default=d.data,
                   help="manifest (default: the phantom, generated if missing)")
    p.add_argument("--arch", type=choice_of(list_models(), "arch"), default=d.arch)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--image-size", type=classifier_image_size, default=d.image_size)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--seed", type=nonneg_int, default=d.seed)
    p.add_argument("--task", type=choice_of(TASKS, "task"), default=d.task)


def log_table(table, folder: Path, name: str, title: str, artifact_path: str) -> None:
    """Log a results table as ``<artifact_path>/<name>.csv`` and ``.html`` (with ``title``)."""
    table.to_csv(folder / f"{name}.csv", index=False)
    (folder / f"{name}.html").write_text(f"<h2>{title}</h2>" + table.to_html(index=False, float_format="%.4f"))
    for ext in ("csv", "html"):
        mlflow.log_artifact(str(folder / f"{name}.{ext}"), artifact_path)


def table_metrics(table, prefix: str) -> dict[str, float]:
    """``{prefix}{metric}.{class}`` for the metric columns of a per-class table (finite only)."""
    from training.metrics import METRIC_COLUMNS

    return finite_metrics({f"{col}.{cls}": row[col] for cls, row in table.iterrows() for col in METRIC_COLUMNS},
                          prefix)


def plot_roc(y_true, y_prob, classes: Iterable[str], path: str | Path, title: str = "validation ROC") -> Path:
    """One ROC curve per class with both labels present; writes a PNG.

    Args:
        y_true: (N, C) labels, NaN where unknown.
        y_prob: (N, C) probabilities.
        classes: the C class names.
        path: PNG file to write.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    try:
        for j, name in enumerate(classes):
            known = ~np.isnan(y_true[:, j])
            y, p = y_true[known, j], y_prob[known, j]
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, p):.2f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)


def train_one(cfg: ClassifierRunConfig, train_ds, val_ds, test_ds, classes: Iterable[str], tmp: Path,
              log_epochs: bool = True):
    """Fit one classifier (:func:`training.train.fit`) inside the active run and log per-epoch metrics,
    validation (and test) metrics per class as CSV/HTML and the validation ROC plot.

    Returns:
        ``(TrainResult, test_table | None, test_probs | None, test_targets | None)``.
    """
    from training.metrics import classification_metrics, summarize
    from training.models import create_model
    from training.train import TrainConfig, fit, predict, task_classes

    out_classes = task_classes(list(classes), cfg.task)
    model = create_model(cfg.arch, classes=out_classes, pretrained=cfg.pretrained, image_size=cfg.image_size)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_epochs=cfg.warmup_epochs, loss=cfg.loss, task=cfg.task, seed=cfg.seed,
                       device=cfg.device, patience=cfg.patience, num_workers=cfg.num_workers,
                       checkpoint_dir=str(tmp / "ckpt"), progress=show_progress())

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if log_epochs:
            mlflow.log_metrics(finite_metrics(metrics), step=epoch)

    result = fit(model, train_ds, val_ds, tcfg, callback=on_epoch)
    mlflow.log_metrics(finite_metrics(summarize(result.val_table), "val_"))
    mlflow.log_metrics(table_metrics(result.val_table, "val_"))
    mlflow.log_metrics({"best_epoch": result.best_epoch})
    result.val_table.to_csv(tmp / "val_metrics.csv")
    (tmp / "val_metrics.html").write_text(result.val_table.to_html(float_format="%.4f"))
    mlflow.log_artifact(str(tmp / "val_metrics.csv"), "metrics")
    mlflow.log_artifact(str(tmp / "val_metrics.html"), "metrics")
    plot_roc(result.val_targets, result.val_probs, result.classes, tmp / "val_roc.png")
    mlflow.log_artifact(str(tmp / "val_roc.png"), "plots")
    test_table = test_probs = test_targets = None
    if test_ds is not None:
        test_probs, test_targets = predict(result.model, test_ds, 2 * cfg.batch_size, cfg.device, cfg.task)
        test_table = classification_metrics(test_targets, test_probs, result.thresholds, result.classes)
        mlflow.log_metrics(finite_metrics(summarize(test_table), "test_"))
        mlflow.log_metrics(table_metrics(test_table, "test_"))
        test_table.to_csv(tmp / "test_metrics.csv")
        mlflow.log_artifact(str(tmp / "test_metrics.csv"), "metrics")
    return result, test_table, test_probs, test_targets


# ---- command line --------------------------------------------------------------------------------
class _DropKnownNoise(logging.Filter):
    """Drops third-party log records that say nothing about this project's runs:

    - MLflow's note that a ``python_model`` object is pickled with CloudPickle (every pyfunc here is one,
      on purpose: the wrappers are this package's classes), and that no signature was inferred from the
      ``np.ndarray`` type hint (the CLIP pyfunc takes image arrays or texts, so it has none);
    - transformers' load report when its only rows are the BERT pooler weights the offline MiniLM
      checkpoint carries and a sentence encoder does not use (any other missing or unexpected key
      is still reported).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Passing a Python object as `python_model`"):
            return False
        if msg.startswith("Failed to infer model signature: Type hint") and "input example is not provided" in msg:
            return False  # the CLIP pyfunc has no signature on purpose: it takes image arrays or texts
        if "LOAD REPORT" in msg:
            rows = [ln for ln in msg.splitlines() if "|" in ln and not ln.lstrip().startswith(("Key", "-"))]
            keys = [ln.split("|")[0].strip() for ln in rows]
            if keys and all(k.startswith("pooler.") for k in keys) and all("UNEXPECTED" in ln for ln in rows):
                return False
        return True


_NOISE_FILTER = _DropKnownNoise()


def quiet_third_party() -> None:
    """Silence known, irrelevant third-party log records (idempotent): see :class:`_DropKnownNoise`."""
    for name in ("mlflow.pyfunc", "transformers.modeling_utils"):
        logging.getLogger(name).addFilter(_NOISE_FILTER)


def quiet_console() -> None:
    """Log lines to stderr at INFO (what every entry point prints), without third-party noise
    (:func:`quiet_third_party`); progress bars of MLflow and Hugging Face off when stderr is not a
    terminal."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not show_progress():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def show_progress() -> bool:
    """Whether progress bars belong on the console: only when stderr is a terminal (in a log file or a
    test's captured output a bar leaves lines of debris)."""
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def run_cli(main, prog: str, argv=None) -> int:
    """Run an entry point's ``main(argv)`` for the command line: a bad input (``ValueError`` naming the
    bad value, a missing file, an unknown registry reference) ends with one line ``prog: error: ...`` and
    exit status 2 instead of a traceback (``CXR_TRACEBACK=1`` shows it). Returns the exit status."""
    import sys

    try:
        status = main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if os.environ.get("CXR_TRACEBACK"):
            raise
        log.debug("%s failed", prog, exc_info=True)
        sys.stderr.write(f"{prog}: error: {str(exc).strip()}\n")
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def main(argv=None) -> int:
    """``python -m mlflow_projects.common setup``: create the tracking store and the entry points'
    experiments with their artifacts under ``mlartifacts/`` (``CXR_ARTIFACT_ROOT``), so that
    ``mlflow run . -e NAME --experiment-name EXPERIMENT`` keeps artifacts there. Returns 0."""
    import sys

    p = argparse.ArgumentParser(prog="python -m mlflow_projects.common",
                                description="Set up MLflow tracking for the entry points: the store "
                                            "(MLFLOW_TRACKING_URI, default sqlite mlflow.db) and one "
                                            "experiment per entry point, artifacts under CXR_ARTIFACT_ROOT "
                                            "(default mlartifacts/).")
    p.add_argument("command", choices=["setup"], help="setup: create the store and the experiments")
    p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    uri = tracking_uri()
    if _local_store(uri):
        _create_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    sys.stdout.write(f"tracking store: {uri}\n")
    for entry, name in sorted(EXPERIMENTS.items()):
        exp = client.get_experiment(ensure_experiment(client, name))
        sys.stdout.write(f"  mlflow run . -e {entry:<18} --experiment-name {name:<20} -> {exp.artifact_location}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
