"""``python -m mlflow_projects.common setup``: create the tracking store and the experiments."""
from __future__ import annotations

import logging

import mlflow
from mlflow import MlflowClient

from mlflow_projects.common.cli import ArgumentParser
from mlflow_projects.common.settings import EXPERIMENTS
from mlflow_projects.common.tracking import _create_sqlite_store, _local_store, ensure_experiment, tracking_uri


def main(argv=None) -> int:
    """``python -m mlflow_projects.common setup``: create the tracking store and the entry points'
    experiments with their artifacts under ``mlartifacts/`` (``CXR_ARTIFACT_ROOT``), so that
    ``mlflow run . -e NAME --experiment-name EXPERIMENT`` keeps artifacts there. Returns 0."""
    import sys

    p = ArgumentParser(prog="python -m mlflow_projects.common",
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
