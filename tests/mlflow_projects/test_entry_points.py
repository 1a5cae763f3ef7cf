"""Every module of mlflow_projects as a user meets it: ``python -m mlflow_projects.<name> --help`` in a
subprocess; entry points import libraries and ``mlflow_projects.common``, never each other; ``mlflow run``
keeps artifacts under ``mlartifacts/`` once ``python -m mlflow_projects.common setup`` has run."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_projects.mlflow_run import ROOT, artifacts_under_root, client, mlflow_run, project_env, setup_store

PACKAGE = ROOT / "mlflow_projects"
#: Glue modules without a command line (imported by the entry points and the service).
NO_CLI = {"pyfunc_classifier", "pyfunc_clip", "pyfunc_dwarf"}
#: Entry points of MLproject: one module each.
ENTRY_POINTS = {"train_classifier", "train_clip", "train_dwarf", "import_classifier", "audit", "promote", "demo",
                "imbalance_study", "concept_benchmark", "dwarf_benchmark"}


def modules() -> list[str]:
    """Modules of the package, and sub-packages with a command line (``__main__.py``, e.g. ``common``)."""
    files = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return sorted(files | {p.parent.name for p in PACKAGE.glob("*/__main__.py")})


def test_every_module_with_a_command_line_answers_help():
    names = [m for m in modules() if m not in NO_CLI]
    assert {"common", "train_classifier", "train_clip", "train_dwarf", "demo"} <= set(names)
    procs = {m: subprocess.Popen([sys.executable, "-m", f"mlflow_projects.{m}", "--help"], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in names}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.startswith("usage:") and "--help" in out, f"{name}: {out[:300]}"
        assert "Traceback" not in err and "Warning" not in err, f"{name} --help printed: {err[-2000:]}"


def test_modules_without_a_command_line_are_only_glue():
    for name in NO_CLI & set(modules()):
        source = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
        assert '__name__ == "__main__"' not in source, f"{name} grew a command line: test its --help"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlflow_projects."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "mlflow_projects":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlflow_projects.")}
    return out


def test_entry_points_never_import_each_other():
    found = set()
    for name in modules():
        if name in ENTRY_POINTS and (PACKAGE / f"{name}.py").is_file():
            found |= {(name, other) for other in _imports(PACKAGE / f"{name}.py") if other in ENTRY_POINTS}
    assert found == set(), "entry points import each other; share code through common.py or a library"


@pytest.mark.slow
def test_mlflow_run_artifacts_go_to_mlartifacts(tmp_path):
    """After `common setup` an `mlflow run` keeps its artifacts under mlartifacts/, with --experiment-name
    and without it (the Default experiment of a store created by setup)."""
    env = project_env(tmp_path)
    out = setup_store(env)
    assert "--experiment-name cxr-classifier" in out and (tmp_path / "mlartifacts").as_uri() in out
    manifest = tmp_path / "none.parquet"  # fails fast: the run exists, its artifacts location is what counts
    for experiment in ("cxr-clip", None):
        proc = mlflow_run("train_clip", {"data": manifest}, env, experiment)
        assert proc.returncode != 0 and "manifest not found" in proc.stderr
    c = client(env)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 2 and all(artifacts_under_root(r, env) for r in runs)
    assert {c.get_experiment(r.info.experiment_id).name for r in runs} == {"cxr-clip", "Default"}
    assert not (tmp_path / "mlruns").exists() and not (ROOT / "mlruns").exists()
