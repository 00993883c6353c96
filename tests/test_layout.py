"""The package's layers: a folder is a layer, and no module imports a layer above its own.

Every import counts, also those inside functions (the CLI imports its verbs lazily), because a
lazy import of a higher layer is still a dependency on it. Within a layer modules may import each
other, but never in a circle. The architecture page names every module, so it cannot drift.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fastflow"
# Bottom to top. The package root (``__init__``, ``__main__``) is the facade above them all.
LAYERS = ("core", "model", "estimator", "apps")
FACADE = {"fastflow", "fastflow.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports() -> dict[str, set[str]]:
    """fastflow module -> the fastflow modules it imports, wherever in the file the import is."""
    modules = _modules()
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


def _layer(module: str) -> int:
    """Index of the module's layer in LAYERS; the facade sits above every layer."""
    if module in FACADE:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def test_graph_is_read():
    graph = _imports()
    assert "fastflow.model.inference" in graph["fastflow.estimator.export"]
    assert "fastflow.estimator.export" in graph["fastflow.estimator.detector"]
    assert "fastflow.estimator.detector" in graph["fastflow.apps.cli"]


def test_every_module_is_in_a_layer_folder():
    stray = [name for name in _modules() if name not in FACADE and name.split(".")[1] not in LAYERS]
    assert not stray, f"modules outside the layer folders {LAYERS}: {stray}"


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{name} -> {dep}" for name, deps in _imports().items() for dep in deps if _layer(dep) > _layer(name)
    ]
    assert not upward, "upward imports: " + ", ".join(sorted(upward))


def test_no_import_circle():
    graph = {name: deps for name, deps in _imports().items() if name not in FACADE}
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


def test_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [name for name in _modules() if name.count(".") == 2 and f"`{name.split('.')[-1]}`" not in page]
    assert not missing, f"docs/architecture.md does not describe {missing}"
