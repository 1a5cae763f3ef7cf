"""Shared test fixtures: paths to the real-format excerpts and a tiny phantom data set."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = (ROOT.parent / "shared" / "fixtures" / "real").resolve()

# Offline, quiet, deterministic defaults for every test process (and subprocesses they start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# the service's per-request records go to a scratch folder, never the project's records/ (tests that read
# records pass their own CXR_RECORDS_DIR)
os.environ.setdefault("CXR_RECORDS_DIR", tempfile.mkdtemp(prefix="cxr-records-"))


def require_folder(folder: Path, what: str) -> Path:
    """``folder`` when it exists; otherwise skip the test, or fail it where ``CI=true``.

    A clone on its own (without ``shared/`` beside it) still runs every other test; CI must have the
    folder, so there a missing one is an error, not a silent skip.
    """
    if folder.is_dir():
        return folder
    message = f"{what} not found: missing folder {folder} (the repository must sit beside shared/)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(message + "; CI=true, so this fails instead of skipping")
    pytest.skip(message)


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """Folder of real annotation excerpts, images and DICOM files (../shared/fixtures/real)."""
    return require_folder(REAL, "real fixtures")


@pytest.fixture
def deterministic():
    """Seed 0 everywhere and one torch thread for the test, restored afterwards.

    For tests that train a model and assert it learnt: float sums split over another number of threads
    round differently, so without a fixed thread count the same seed learns differently on another
    machine (a test measured at 0.75 accuracy on two threads reached 0.5 on one).
    """
    from training.runtime import deterministic as block

    with block(0, threads=1):
        yield


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
