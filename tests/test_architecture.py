"""The layout holds: no import cycles, pynetdicom internals in one folder, no training in the node.

Static checks over the source (ast, no imports), so they run in milliseconds and name the
offending module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "iods", "models")
COMPAT = "node.dimse.compat"
# pynetdicom modules that are not its API: only node.dimse.compat may import them.
PRIVATE_PYNETDICOM = ("_config", "_handlers", "dul", "transport", "dimse_messages", "dimse")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for each import of a first-party or pynetdicom module."""
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in modules or base == "pynetdicom" else base, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for target, _ in _imports(name, path, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.timeout(30)
def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 60  # the walk found the code base, not an empty folder
    assert _cycles(graph) == []


@pytest.mark.timeout(30)
def test_the_cycle_check_finds_a_cycle() -> None:
    graph = _graph()
    graph["node.storage.db"] = {*graph["node.storage.db"], "node.storage.index"}
    assert ["node.storage.db", "node.storage.index"] in _cycles(graph)


@pytest.mark.timeout(30)
def test_only_compat_imports_pynetdicom_internals() -> None:
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name == COMPAT or name.startswith(COMPAT + "."):
            continue
        for target, line in _imports(name, path, modules):
            parts = target.split(".")
            if parts[0] == "pynetdicom" and len(parts) > 1 and parts[1] in PRIVATE_PYNETDICOM:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert offenders == []


@pytest.mark.timeout(30)
def test_no_state_stuck_onto_library_objects() -> None:
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in _modules().values()
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "_modelnode_" in line]
    assert offenders == []


# Commands that run training in their own process and import it inside the command's function
# (docs/finetune.md); a module-level import there still fails.
LAZY_TRAINING_IMPORTS = {"node.cli.learning", "node.cli.federate"}


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return out


@pytest.mark.timeout(30)
def test_the_node_never_imports_the_training_code() -> None:
    graph = _graph()
    runtime = [m for m in graph if not m.startswith("models.training")]
    offenders = [f"{m} imports {d}" for m in runtime for d in graph[m] if d.startswith("models.training")
                 and m not in LAZY_TRAINING_IMPORTS]
    modules = _modules()
    offenders += [f"{m} imports {d} at module level" for m in LAZY_TRAINING_IMPORTS
                  for d in _module_level_imports(modules[m]) if d.startswith("models.training")]
    assert offenders == []


def test_models_and_iods_never_import_the_node() -> None:
    """The layers go one way: node uses models and iods; models uses iods; iods uses neither.
    (models.image_check once imported a data type from node.pipeline.selection.)"""
    graph = _graph()
    offenders = [f"{m} imports {d}" for m in graph for d in graph[m]
                 if (m.startswith("models.") and not m.startswith("models.training") and d.startswith("node."))
                 or (m.startswith("iods.") and d.startswith(("node.", "models.")))]
    assert offenders == []
