"""Imports point one way (DESIGN.md): ``training`` never imports ``interpret``, and neither library
imports mlflow or bentoml. Checked on the source with ``ast``, so an import inside a function counts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level-qualified module name) of every import in a file, nested ones included.

    ``importlib.import_module("x.y")`` with a literal name counts as an import of ``x.y``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    hits = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                hits.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return hits


def test_the_checker_sees_nested_and_dynamic_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n"
                   "def f():\n"
                   "    from interpret.vlm import VLMAdapter\n"
                   "    import mlflow.pyfunc\n"
                   "    importlib.import_module('bentoml')\n"
                   "from . import sibling\n")
    assert [m for _, m in imported_modules(src)] == ["os", "interpret.vlm", "mlflow.pyfunc", "bentoml"]


def test_training_never_imports_interpret():
    assert offending("training", ("interpret",)) == []


@pytest.mark.parametrize("package", ["training", "interpret"])
def test_libraries_never_import_mlflow_or_bentoml(package):
    assert offending(package, ("mlflow", "bentoml", "mlflow_projects", "service")) == []
