"""The package's import graph: no circle, and ``fastflow.model`` never imports the layers above it.

Every import counts, also those inside functions (the CLI imports its verbs lazily), because a
lazy circle is still a circle: modules that must know each other cannot be read one at a time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fastflow"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """fastflow module -> the fastflow modules it imports (package ``__init__`` re-exports excluded)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastflow"):
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names if alias.name.startswith("fastflow")]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def test_graph_is_read():
    graph = _imports()
    assert "fastflow.model.inference" in graph["fastflow.export"]
    assert "fastflow.export" in graph["fastflow.detector"]


def test_no_import_circle():
    graph = {name: deps for name, deps in _imports().items() if name != "fastflow"}  # __init__ only re-exports
    for name, deps in graph.items():
        assert "fastflow" not in deps, f"{name} imports the package root (an upward import)"
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph.get(name, ()):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path, name, dep]))
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_model_layer_imports_nothing_above_it():
    allowed = {"fastflow.errors", "fastflow.files", "fastflow.presets", "fastflow.scoring"}
    for name, deps in _imports().items():
        if name.startswith("fastflow.model"):
            above = {d for d in deps if not d.startswith("fastflow.model") and d not in allowed}
            assert not above, f"{name} imports {sorted(above)}"
