"""Helpers shared by the MLflow entry points: tracking set-up, parameter parsing, registry writes.

Only glue lives here; the science is in :mod:`training` and :mod:`interpret`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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


def setup_tracking(experiment: str) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (default: SQLite in the project folder) and select
    ``experiment``, creating it with an explicit artifact location when the store is local.

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) the launcher has already created the run in the
    experiment it was given (``--experiment-name``); switching experiments would make
    ``mlflow.start_run`` refuse that run, so the run's own experiment is kept.

    Returns:
        The experiment id.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched:
        exp_id = client.get_run(launched).info.experiment_id
        log.info("under `mlflow run`: keeping run %s in experiment %s (not %r)", launched, exp_id,
                 experiment)
        return exp_id
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            root = Path(os.environ.get("CXR_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT)).resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = (root / experiment).as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ensure_data(data: str, image_size: int, seed: int, n: int, masks: bool = False) -> Path:
    """The manifest path; generates an ``n``-image phantom when the default path is missing.

    Raises:
        FileNotFoundError: a manifest other than the default does not exist (names the path).
    """
    path = Path(data)
    if path.is_file():
        return path.resolve()
    if data != DEFAULT_DATA:
        raise FileNotFoundError(f"manifest not found: {path.resolve()}")
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
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


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


def log_config(config: Any) -> None:
    """Log a resolved configuration (dataclass or mapping) as params and as ``config.json``."""
    from dataclasses import asdict, is_dataclass

    data = asdict(config) if is_dataclass(config) else dict(config)
    flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str))
            for k, v in data.items()}
    mlflow.log_params({k: ("" if v is None else v) for k, v in flat.items()})
    mlflow.log_dict(json.loads(json.dumps(data, default=str)), "config.json")
