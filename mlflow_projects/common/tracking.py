"""Tracking set-up (store, experiments with artifacts under ``mlartifacts/``, runs) and the manifest checks."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from mlflow_projects.common.settings import DEFAULT_ARTIFACT_ROOT, DEFAULT_DATA, DEFAULT_TRACKING_URI

log = logging.getLogger("mlflow_projects.common")


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


