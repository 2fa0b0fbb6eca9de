"""The client's modules import downward only: no import circle, and each layer stays below the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dit_client", "common")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in the file (function-level imports count too)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod when that is a module of ours.
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_client_and_common_have_no_import_circle():
    graph = import_graph()
    assert "dit_client.remote" in graph and "dit_client.connection" in graph  # the parser found the modules
    assert find_cycle(graph) is None


# Layer -> modules it must never import (they sit above it).
ABOVE = {
    "dit_client.connection": {"dit_client.frames", "dit_client.retry", "dit_client.remote", "dit_client.stream"},
    "dit_client.frames": {"dit_client.connection", "dit_client.retry", "dit_client.remote", "dit_client.stream"},
    "dit_client.retry": {"dit_client.connection", "dit_client.frames", "dit_client.remote", "dit_client.stream"},
    "dit_client.stream": {"dit_client.remote", "dit_client.generate"},
    "dit_client.remote": {"dit_client.generate"},
}


@pytest.mark.parametrize("module", sorted(ABOVE))
def test_layers_import_downward_only(module):
    assert not import_graph()[module] & ABOVE[module]


def test_common_never_imports_a_side():
    for name, edges in import_graph().items():
        if name.startswith("common"):
            assert not {e for e in edges if e.startswith(("dit_client", "encoder_server"))}, name
