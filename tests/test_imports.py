"""The package's modules import each other one way: no import cycles, counting imports inside functions too
(a deferred import hides a cycle at start-up but still ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import diffssl_plugin

PACKAGE = Path(diffssl_plugin.__file__).resolve().parent


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return out


def imports_of(name: str, file: Path, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere in its file. Importing ``a.b.c`` runs ``a.b``'s
    ``__init__`` too, so every package on the way counts, except the top one and those holding ``name``."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..x import y` in a.b.c is a.x
                base = ".".join([*here[: len(here) - node.level + 1], base]).rstrip(".")
            targets += [base] + [f"{base}.{a.name}" for a in node.names]
    found = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                found.add(candidate)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    files = module_files()
    graph = {name: imports_of(name, f, is_package, set(files)) for name, (f, is_package) in files.items()}
    assert "diffssl_plugin.loading" in graph["diffssl_plugin.reproduce"]  # the walker sees deferred imports
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))
