"""Shared test fixtures: paths to the real-format excerpts and a tiny phantom data set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = (ROOT.parent / "shared" / "fixtures" / "real").resolve()

# Offline, quiet, deterministic defaults for every test process (and subprocesses they start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """Folder of real annotation excerpts, images and DICOM files (../shared/fixtures/real)."""
    if not REAL.is_dir():
        pytest.fail(f"real fixtures not found at {REAL}; the repository must sit beside shared/")
    return REAL


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A 48-image, 64-px phantom data set; returns the manifest path. Shared by the whole session."""
    from training.data.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom")
    return generate_phantom(out, n=48, size=64, seed=0)


_MLFLOW_LEAKS = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _no_mlflow_env_leaks():
    """``mlflow.set_experiment`` exports ``MLFLOW_EXPERIMENT_ID`` into ``os.environ``; a later test's
    ``mlflow run --experiment-name`` subprocess then fails ("Specify only one of ..."). Every test
    starts and ends without these variables."""
    for key in _MLFLOW_LEAKS:
        os.environ.pop(key, None)
    yield
    for key in _MLFLOW_LEAKS:
        os.environ.pop(key, None)
