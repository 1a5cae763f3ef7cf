"""compare: version references and the side-by-side comparison of two audit summaries."""
from __future__ import annotations

import pytest

from mlflow_projects import compare


def test_parse_ref_forms_and_errors():
    assert compare.parse_ref("cxr-classifier/3") == ("cxr-classifier", "3", None)
    assert compare.parse_ref("models:/cxr-classifier@champion") == ("cxr-classifier", None, "champion")
    with pytest.raises(ValueError, match="NAME/VERSION"):
        compare.parse_ref("cxr-classifier")


def test_parse_ref_takes_the_readmes_bare_versions_and_aliases():
    assert compare.parse_ref("1") == ("cxr-classifier", "1", None)
    assert compare.parse_ref("@champion", name="cxr-dwarf") == ("cxr-dwarf", None, "champion")
    with pytest.raises(ValueError, match="VERSION"):
        compare.parse_ref("abc")


@pytest.mark.slow
def test_compare_cli_as_the_readme_runs_it(tmp_path):
    """`python -m mlflow_projects.compare 1 2` in a subprocess: the side-by-side table of two audited
    versions; an unknown version is one line listing the versions, exit 2, no traceback."""
    import os
    import subprocess
    import sys

    import mlflow

    from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking
    from tests.mlflow_projects.test_promote import _fake_audit

    with tracking(tmp_path) as uri:
        v1 = register_tiny_classifier(tmp_path, seed=0)
        v2 = register_tiny_classifier(tmp_path, seed=1)
        _fake_audit(v1, tmp_path, auroc=0.6)
        _fake_audit(v2, tmp_path, auroc=0.8)
        mlflow.end_run()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    run = subprocess.run([sys.executable, "-m", "mlflow_projects.compare", v1, v2], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "auroc_mean" in run.stdout and "0.6" in run.stdout and "0.8" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "mlflow_projects.compare", v1, "9"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "9" in bad.stderr and f"{v1}, {v2}" in bad.stderr
