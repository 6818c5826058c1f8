"""The DNS package has no import cycles (type-checking imports included): the service imports the
listeners and the engine, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edge" / "dns"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edge.dns"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("edge.dns")}
    return found


def test_no_import_cycle_inside_edge_dns():
    graph = {f"edge.dns.{path.stem}": imports_of(path) for path in PACKAGE.glob("*.py")}
    for start in graph:
        stack, seen = [start], set()
        while stack:
            for module in graph.get(stack.pop(), ()):
                assert module != start, f"{start} imports itself back through {module}"
                if module not in seen:
                    seen.add(module)
                    stack.append(module)
