"""No import cycles anywhere under edge/: each module's imports, read from its source, form a DAG.

Every import counts, wherever it is written: at module level, under ``if TYPE_CHECKING:``
and inside functions.  An import moved into a function still is a dependency of that
module on the other; it only runs later.  Counting only module-level imports would let a
cycle be "fixed" by deferring one of its imports, which hides the cycle without removing
it (and turns an import-time error into one at the first call).  So a cycle is a shared
piece to move into a module of its own, or a dependency to turn around, never a deferred
import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def edge_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the ``edge`` package under ``root`` (this checkout, or a test's own tree)."""
    return {module_name(path, root): path for path in sorted((root / "edge").rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, anywhere in its source."""

    def known(target: str) -> str | None:
        # "edge.dns.render.Record" is the module edge.dns.render; "edge.dns" the package.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from edge.dns import render" imports the module edge.dns.render.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {module for module in map(known, targets) if module is not None}
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep import chain cannot hit the recursion limit.
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(_path_through(graph, sorted(component)))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def _path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside ``component``, from its first module back to it (for the failure message)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for successor in sorted(graph[node] & members):
            if successor == start:
                path = [start]
                while node != start:
                    path.append(node)
                    node = previous[node]
                return [start, *reversed(path[1:]), start]
            if successor not in previous:
                previous[successor] = node
                queue.append(successor)
    return component


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = edge_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles_under_edge() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


LOWER_LAYERS = ("edge.view", "edge.metadata", "edge.dns")
ADAPTERS = ("edge.eucalyptus", "edge.etcd")
"""Plugged in at the composition root (edge.server.adapters); the layers below never name them."""


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_no_lower_layer_imports_an_adapter(layer: str, adapter: str) -> None:
    """Every import counts here too (module level, TYPE_CHECKING, inside functions)."""
    graph = import_graph()
    assert adapter in graph, f"{adapter} is not a package under edge/ any more: update ADAPTERS"
    offenders = {module: sorted(target for target in targets if _within(target, adapter))
                 for module, targets in graph.items() if _within(module, layer)}
    assert {module: found for module, found in offenders.items() if found} == {}


def test_an_adapter_import_in_a_lower_layer_is_found(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "edge/__init__.py": "",
        "edge/etcd/__init__.py": "",
        "edge/etcd/client.py": "",
        "edge/metadata/__init__.py": "",
        "edge/metadata/service.py": "def keys():\n    from edge.etcd import client\n",
        "edge/view/__init__.py": "",
        "edge/view/sources.py": "from edge import etcd\n",
    })
    assert _within("edge.etcd.client", "edge.etcd") and not _within("edge.etcdx", "edge.etcd")
    assert graph["edge.metadata.service"] == {"edge.etcd.client"}
    assert graph["edge.view.sources"] == {"edge.etcd"}


# -- the checker itself ---------------------------------------------------------------------------

def _graph_of(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "edge/__init__.py": "",
        "edge/a.py": "from edge.b import thing\n",
        "edge/b.py": "def thing():\n    from edge import c\n",
        "edge/c.py": "from .a import other\n",
        "edge/d.py": "import edge.a\n",
    })
    assert graph["edge.b"] == {"edge.c"}
    assert graph["edge.c"] == {"edge.a"}
    assert cycles(graph) == [["edge.a", "edge.b", "edge.c", "edge.a"]]


def test_type_checking_imports_count_and_a_dag_passes(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "edge/__init__.py": "",
        "edge/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edge.high import H\n",
        "edge/high.py": "from edge.low import L\n",
    })
    assert cycles(graph) == [["edge.high", "edge.low", "edge.high"]]
    graph["edge.low"] = set()
    assert cycles(graph) == []
