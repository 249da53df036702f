"""The package's import graph, read from the source with ``ast`` (nothing is imported).

Layers depend downwards only: the core (queue, fleet, sources, jobs, util, metrics, routing)
never imports the Dagster surface, the CLI or the third-party ``dagster`` library; the Dagster
surface never imports the CLI; and no group of modules imports itself round in a circle.

Edges: ``import a.b`` and ``from a.b import c`` anywhere in a module (inside functions too), with
relative imports resolved; ``from pkg import name`` counts as importing ``pkg.name`` when that is
a module. Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "miroir_pipeline"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

#: The core layers: all the real work, usable as a plain library.
CORE = tuple(
    f"{PACKAGE}.{name}" for name in ("util", "queue", "fleet", "sources", "jobs", "metrics", "routing")
)
DAGSTER_LAYER = f"{PACKAGE}.dagster"
CLI_LAYER = f"{PACKAGE}.cli"
#: Third-party distributions of Dagster (``dagster``, ``dagster_postgres``, ``dagster_graphql``...).
DAGSTER_LIBRARIES = ("dagster", "dagster_")


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute module name."""

    source: str
    target: str
    line: int


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def _in_core(module: str) -> bool:
    return any(_in(module, layer) for layer in CORE)


def _is_dagster_library(module: str) -> bool:
    top = module.split(".")[0]
    return top == "dagster" or top.startswith(DAGSTER_LIBRARIES[1])


# -- reading the source ----------------------------------------------------------------------
def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Collects the import nodes that run, skipping ``if TYPE_CHECKING:`` bodies."""

    def __init__(self) -> None:
        self.nodes: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.nodes.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.nodes.append(node)


def _base_package(module: str, is_package: bool, level: int) -> str:
    """The package a relative import of ``level`` dots starts from."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    return ".".join(parts[: len(parts) - (level - 1)])


def _known(name: str, modules: Iterable[str]) -> str:
    """``name`` if it is a module of the package, else its longest prefix that is (or ``name``)."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return name


def imports_of(source: str, module: str, *, is_package: bool, modules: Iterable[str]) -> list[Import]:
    """The absolute targets ``module``'s code imports when it runs."""
    known = set(modules)
    collector = _ImportCollector()
    collector.visit(ast.parse(source))
    found: list[Import] = []
    for node in collector.nodes:
        if isinstance(node, ast.Import):
            found += [Import(module, _known(alias.name, known), node.lineno) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            package = _base_package(module, is_package, node.level)
            base = f"{package}.{base}" if base and package else (base or package)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if submodule in known else _known(base, known)
            found.append(Import(module, target, node.lineno))
    return found


def package_imports(root: Path = PACKAGE_DIR) -> list[Import]:
    """Every import in the package, resolved."""
    modules = package_modules(root)
    found: list[Import] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        found += imports_of(path.read_text(encoding="utf-8"), name, is_package=is_package, modules=modules)
    return found


def internal_graph(imports: Iterable[Import], modules: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (self-imports of a package's own name dropped)."""
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports:
        if imp.target in known and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


# -- cycles ----------------------------------------------------------------------------------
def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(graph: Mapping[str, Iterable[str]], members: set[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start = min(members)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {sorted(members)}")


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One concrete cycle (``a -> b -> a``) per group of modules that import each other."""
    cycles = []
    for component in strongly_connected(graph):
        members = set(component)
        if len(members) > 1 or component[0] in set(graph.get(component[0], ())):
            cycles.append(_cycle_through(graph, members))
    return cycles


# -- the rules -------------------------------------------------------------------------------
def layer_violations(imports: Iterable[Import]) -> list[str]:
    """Imports that point up the layers (or pull Dagster into the core)."""
    problems = []
    for imp in imports:
        if _in_core(imp.source) and (_in(imp.target, DAGSTER_LAYER) or _in(imp.target, CLI_LAYER)):
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} (core must not import the Dagster surface or the CLI)")
        elif _in_core(imp.source) and _is_dagster_library(imp.target):
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} (core must not import Dagster)")
        elif _in(imp.source, DAGSTER_LAYER) and _in(imp.target, CLI_LAYER):
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} (the Dagster surface must not import the CLI)")
    return problems


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return package_imports()


def test_the_package_has_no_import_cycles(imports: list[Import]) -> None:
    graph = internal_graph(imports, package_modules())
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers(imports: list[Import]) -> None:
    problems = layer_violations(imports)
    assert problems == [], "imports against the layers:\n" + "\n".join(problems)


def test_every_module_is_in_a_known_layer() -> None:
    """A new top-level module must be placed in a layer, or the rules above would not see it."""
    unplaced = [
        m
        for m in package_modules()
        if m != PACKAGE and not (_in_core(m) or _in(m, DAGSTER_LAYER) or _in(m, CLI_LAYER))
    ]
    assert unplaced == [], f"modules in no layer: {unplaced}"


# -- self-tests of the machinery --------------------------------------------------------------
def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {
        "a": {"b"},
        "b": {"c", "x"},
        "c": {"a"},
        "x": {"y"},
        "y": set(),
        "s": {"s"},
        "d": {"e"},
        "e": {"d"},
    }
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["d", "e", "d"], ["s", "s"]]
    del graph["c"]
    graph["s"] = set()
    graph["e"] = set()
    assert find_cycles(graph) == []


def test_cycle_finder_handles_a_long_chain_without_recursion() -> None:
    n = 5000
    graph = {f"m{i}": {f"m{i + 1}"} for i in range(n)}
    graph[f"m{n}"] = {"m0"}
    [cycle] = find_cycles(graph)
    assert len(cycle) == n + 2 and cycle[0] == cycle[-1] == "m0"


def test_resolution_of_relative_nested_and_type_checking_imports() -> None:
    modules = ["pkg", "pkg.core", "pkg.core.a", "pkg.core.b", "pkg.ui", "pkg.ui.view"]
    source = "\n".join(
        [
            "from typing import TYPE_CHECKING",
            "import typing",
            "from . import b",  # a submodule by name
            "from .b import thing",  # a name from a module
            "from .. import ui",  # a package by name
            "from ..ui.view import render",
            "import pkg.core.b as alias",
            "if TYPE_CHECKING:",
            "    from pkg.ui import view",
            "if typing.TYPE_CHECKING:",
            "    import dagster",
            "else:",
            "    import json",
            "def later():",
            "    from pkg.ui import view",
            "    import dagster.core",
        ]
    )
    found = imports_of(source, "pkg.core.a", is_package=False, modules=modules)
    targets = [(i.target, i.line) for i in found]
    assert targets == [
        ("typing", 1),
        ("typing", 2),
        ("pkg.core.b", 3),
        ("pkg.core.b", 4),
        ("pkg.ui", 5),
        ("pkg.ui.view", 6),
        ("pkg.core.b", 7),
        ("json", 13),
        ("pkg.ui.view", 15),
        ("dagster.core", 16),
    ]
    # In a package's __init__, one dot is the package itself.
    [own] = imports_of("from . import a", "pkg.core", is_package=True, modules=modules)
    assert own.target == "pkg.core.a"


def test_layer_rules_catch_each_kind_of_violation() -> None:
    bad = [
        Import(f"{PACKAGE}.queue.contract", f"{PACKAGE}.dagster.resources", 3),
        Import(f"{PACKAGE}.jobs.registry", f"{PACKAGE}.cli.app", 4),
        Import(f"{PACKAGE}.metrics", "dagster", 5),
        Import(f"{PACKAGE}.fleet.topology", "dagster_postgres.utils", 6),
        Import(f"{PACKAGE}.dagster.sensors", f"{PACKAGE}.cli.runtime", 7),
    ]
    fine = [
        Import(f"{PACKAGE}.cli.app", f"{PACKAGE}.dagster", 1),
        Import(f"{PACKAGE}.dagster.resources", f"{PACKAGE}.queue", 1),
        Import(f"{PACKAGE}.dagster.resources", "dagster", 1),
        Import(f"{PACKAGE}.queue.stores", f"{PACKAGE}.util.sizes", 1),
        Import(f"{PACKAGE}.queue.stores", "dagsterish", 1),
    ]
    assert len(layer_violations(bad)) == len(bad)
    assert layer_violations(fine) == []
