"""The layers and the size rules of docs/architecture.md hold in the code, checked on its syntax trees:
flows → pipeline → (models, storage), the studies above the recipe, no import cycle inside pipeline, one training
step, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "pipeline", "storage", "flows")
MAX_FUNCTION_LINES = 80


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _modules(path: Path) -> set[str]:
    """Dotted modules a module imports (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports (also inside functions)."""
    return {m.split(".")[0] for m in _modules(path)}


def _folder(path_or_module: Path | str) -> str:
    """The folder under pipeline/ a module lives in (a module directly under pipeline/ is its own)."""
    parts = (str(path_or_module.relative_to(ROOT).with_suffix("")).split("/") if isinstance(path_or_module, Path)
             else path_or_module.split("."))
    return parts[1] if len(parts) > 1 else parts[0]


def _folder_graph() -> dict[str, set[str]]:
    """pipeline/'s folders and the folders each imports."""
    graph: dict[str, set[str]] = {}
    for path in _sources("pipeline"):
        targets = {_folder(m) for m in _modules(path) if m.startswith("pipeline.")}
        graph.setdefault(_folder(path), set()).update(targets - {_folder(path)})
    return graph


@pytest.mark.parametrize("package, forbidden", [
    ("models", {"pipeline", "storage", "flows", "prefect", "fsspec", "pyarrow", "webdataset"}),
    ("storage", {"pipeline", "flows", "models", "prefect"}),
    ("pipeline", {"flows", "prefect"}),
    ("flows", {"storage", "models", "torch"}),
])
def test_imports_point_one_way(package, forbidden):
    wrong = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in _sources(package)}
    assert not {k: v for k, v in wrong.items() if v}


def test_no_import_cycle_between_the_folders_of_pipeline():
    graph = _folder_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in graph.get(start, ()))

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a, targets in graph.items() for b in targets
                    if reaches(b, a, {b}))
    assert not cycles, cycles
    assert {"data", "engine", "config", "corpus", "stages", "report", "studies"} <= set(graph)  # the check sees them


def test_data_never_imports_the_engine_and_the_recipe_never_imports_the_studies():
    wrong = {str(p.relative_to(ROOT)): sorted(m for m in _modules(p) if m.startswith("pipeline.engine"))
             for p in (ROOT / "pipeline/data").rglob("*.py")}
    assert not {k: v for k, v in wrong.items() if v}
    recipe = [p for package in ("models", "storage", "pipeline") for p in _sources(package)
              if not p.is_relative_to(ROOT / "pipeline/studies")]  # flows/ may: the CLI runs the studies
    wrong = {str(p.relative_to(ROOT)): sorted(m for m in _modules(p) if m.startswith("pipeline.studies"))
             for p in recipe}
    assert not {k: v for k, v in wrong.items() if v}
    # the studies do import the recipe (what they are about)
    assert any(m.startswith("pipeline.stages") for p in (ROOT / "pipeline/studies").rglob("*.py") for m in _modules(p))


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
    for package in PACKAGES:
        for path in _sources(package):
            rel = str(path.relative_to(ROOT))
            functions = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            long += [f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in functions
                     if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


# Where a stage added after the recipe's first four lives (docs/architecture.md, "How to add a stage"): its config, the
# recipe form's knob, its module, and its test. The studies about a stage may name it too (they are not the recipe).
STAGE_FILES = ("pipeline/config/stages.py", "pipeline/config/recipe.py", "pipeline/stages/{kind}.py",
               "tests/stages/test_{kind}.py")


@pytest.mark.parametrize("kind", ["prune", "quantize"])
def test_a_stage_added_after_the_recipe_lives_in_four_files(kind):
    from pipeline.stages.registry import stage_specs

    spec = next(s for s in stage_specs() if s.kind == kind)
    names = (spec.config.__name__, spec.run.__name__, f"pipeline.stages.{kind}")
    allowed = {f.format(kind=kind) for f in STAGE_FILES}
    sources = [p for package in PACKAGES for p in _sources(package) if not p.is_relative_to(ROOT / "pipeline/studies")]
    naming = {str(p.relative_to(ROOT)) for p in sources if any(n in p.read_text(encoding="utf-8") for n in names)}
    assert naming <= allowed, naming - allowed
    assert len(allowed) <= 4 and (ROOT / f"tests/stages/test_{kind}.py").exists()


def test_tests_are_grouped_by_layer_with_the_shared_helpers_apart():
    groups = {"unit", "stages", "flows", "studies"}
    loose = sorted(p.name for p in (ROOT / "tests").glob("*.py") if p.name not in ("__init__.py", "conftest.py"))
    assert not loose, loose
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders == groups | {"helpers"}
    assert not list((ROOT / "tests/helpers").glob("test_*.py"))
    assert all(list((ROOT / "tests" / g).glob("test_*.py")) for g in groups)
