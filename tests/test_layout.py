"""The package's layout: its modules import each other without cycles (issue 19).

Imports under C{if TYPE_CHECKING:} are for annotations only and do not count; every other
import of one llmnode module by another does, wherever in the module it is.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import llmnode

PACKAGE = os.path.dirname(llmnode.__file__)


def modules(folder: str = PACKAGE) -> dict[str, str]:
    """llmnode's modules: dotted name -> file."""
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, os.path.dirname(folder))[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """The modules of C{known} that C{tree} imports at run time."""
    names: set[str] = set()
    for node in ast.walk(_without_type_checking(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names & known


def _without_type_checking(tree: ast.AST) -> ast.AST:
    class Strip(ast.NodeTransformer):
        def visit_If(self, node: ast.If) -> ast.AST | None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                return None
            return self.generic_visit(node)
    return Strip().visit(tree)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first walk, as the modules along it."""
    state: dict[str, str] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def walk(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return found


class ImportGraphTests(SynchronousTestCase):
    def graph(self) -> dict[str, set[str]]:
        files = modules()
        known = set(files)
        graph = {}
        for name, path in files.items():
            with open(path, encoding="utf-8") as source:
                graph[name] = imported(ast.parse(source.read()), known) - {name}
        return graph

    def test_the_package_imports_without_cycles(self):
        graph = self.graph()
        self.assertIn("llmnode.web.proxy", graph["llmnode.web.root"])  # the walk sees imports
        self.assertEqual([" -> ".join(cycle) for cycle in cycles(graph)], [])

    def test_a_cycle_is_found(self):
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(graph), [["a", "b", "c", "a"]])
