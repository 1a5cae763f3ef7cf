"""Run the MLproject entry points the way the README does, in a temporary store.

``mlflow run . -e NAME --env-manager local --experiment-name EXPERIMENT -P ...`` in a subprocess, after
``python -m mlflow_projects.common setup``; the virtualenv's ``bin`` first on ``PATH`` (MLproject commands
call ``python``), the tracking store a SQLite file in the test's folder, artifacts under its
``mlartifacts/``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def project_env(tmp: Path) -> dict[str, str]:
    """The environment of a user in the project folder, with the store in ``tmp``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "CXR_ARTIFACT_ROOT": str(tmp / "mlartifacts"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return env


def setup_store(env: Mapping[str, str]) -> str:
    """``python -m mlflow_projects.common setup``; returns its output."""
    proc = subprocess.run([str(BIN / "python"), "-m", "mlflow_projects.common", "setup"], env=dict(env),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def mlflow_run(entry: str, params: Mapping[str, object], env: Mapping[str, str], experiment: str | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """``mlflow run . -e ENTRY --env-manager local [--experiment-name E] -P k=v ...``."""
    cmd = [str(BIN / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    if experiment:
        cmd += ["--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def client(env: Mapping[str, str]):
    """An ``MlflowClient`` on the test's store (also the process's tracking URI from now on)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return MlflowClient()


def artifacts_under_root(run, env: Mapping[str, str]) -> bool:
    """Whether the run's artifacts live under the store's ``mlartifacts/`` (not ``./mlruns``)."""
    return run.info.artifact_uri.startswith(Path(env["CXR_ARTIFACT_ROOT"]).resolve().as_uri())
