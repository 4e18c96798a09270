"""The layers and the size rules of docs/architecture.md hold in the code, checked on its syntax trees:
flows → pipeline → (models, storage), one training step, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "storage", "flows")
MAX_FUNCTION_LINES = 80
ARGPARSE_BUILDERS = {("flows/cli.py", "build_parser")}  # declarations of every command's flags


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("models", {"pipeline", "storage", "flows", "prefect", "fsspec", "pyarrow", "webdataset"}),
    ("storage", {"pipeline", "flows", "models", "prefect"}),
    ("pipeline", {"flows", "prefect"}),
    ("flows", {"storage", "models", "torch"}),
])
def test_imports_point_one_way(package, forbidden):
    wrong = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in _sources(package)}
    assert not {k: v for k, v in wrong.items() if v}


def test_only_storage_touches_files_and_formats():
    io_libraries = {"fsspec", "pyarrow", "webdataset"}
    for package in ("pipeline", "flows", "models"):
        wrong = {str(p.relative_to(ROOT)): sorted(_imports(p) & io_libraries) for p in _sources(package)}
        assert not {k: v for k, v in wrong.items() if v}


def test_one_training_step_for_one_process_or_many():
    sites = [(str(p.relative_to(ROOT)), n) for p in _sources("pipeline")
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ".backward(" in line]
    assert len(sites) == 1 and sites[0][0] == "pipeline/engine/trainer.py", sites


def test_no_function_is_longer_than_80_lines():
    long = []
    for package in ("pipeline", "storage", "flows"):
        for path in _sources(package):
            rel = str(path.relative_to(ROOT))
            functions = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            long += [f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in functions
                     if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES and (rel, n.name) not in ARGPARSE_BUILDERS]
    assert not long, long
