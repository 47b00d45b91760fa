"""Imports inside `mini_m3` go one way: no cycle, and no library module imports the commands `demo` / `distributed`.

The graph is read from the source (every `import` / `from ... import` of every `mini_m3/**/*.py`, parsed with `ast`),
so imports inside functions and under `if` count as much as those at the top: a lazy import hides a cycle from
Python, not from a reader. An edge goes to the module named, or to the submodule when `from pkg import name` names
one; a package's `__init__` is not counted as imported by its submodules' imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import mini_m3

PACKAGE = Path(mini_m3.__file__).resolve().parent
COMMANDS = {"mini_m3.demo", "mini_m3.distributed"}  # the demo and the FSDP2 layer of `mini-m3 train`: never imported by the library
# cli.py is the command dispatcher: it may import the commands, inside the function of each subcommand (lazily, so
# `mini-m3 --help` does not load them)
DISPATCHER = "mini_m3.cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported mini_m3 module, inside a function?) for every import statement of the file at `path`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = ".".join(base[:len(base) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module
                for a in child.names:  # `from pkg import sub` imports the submodule pkg.sub
                    out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return [(m, f) for m, f in out if m == "mini_m3" or m.startswith("mini_m3.")]


def import_graph() -> dict[str, dict[str, bool]]:
    """{module: {imported mini_m3 module: True if every import of it is inside a function}}."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph: dict[str, dict[str, bool]] = {}
    for f in files:
        edges = graph.setdefault(_module_name(f), {})
        for target, lazy in _imports(f, modules):
            edges[target] = edges.get(target, True) and lazy
    return graph


def find_cycle(graph: dict[str, dict[str, bool]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def dfs(m: str) -> list[str] | None:
        state[m] = "grey"
        stack.append(m)
        for t in sorted(graph.get(m, {})):
            if state.get(t) == "grey":
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := dfs(t)):
                return cycle
        stack.pop()
        state[m] = "black"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def test_the_walker_sees_top_level_relative_and_lazy_imports():
    """The graph holds the edges we know are there (so the two tests below cannot pass by reading nothing)."""
    g = import_graph()
    assert len(g) > 20 and "mini_m3.memory.overlap" in g
    assert g["mini_m3.evaluate"]["mini_m3.train"] is False  # `from .train import ...` at the top
    assert g["mini_m3.memory.bank"]["mini_m3.memory.retrieve"] is False  # `from .retrieve import ...`
    assert g["mini_m3.cli"]["mini_m3.demo"] is True  # inside `cmd_demo`
    assert g["mini_m3.cli"]["mini_m3"] is True  # `from . import Memory3, ...` inside a function
    assert g["mini_m3.data.pipeline"]["mini_m3.memory.overlap"] is False  # absolute `from mini_m3.memory...`


def test_no_import_cycle():
    assert find_cycle({"a": {"b": True}, "b": {"c": False}, "c": {"a": True}}) == ["a", "b", "c", "a"]
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in mini_m3: " + " -> ".join(cycle)


def test_only_the_dispatcher_imports_the_commands():
    bad = [f"{m} imports {t}" + (" (at the top)" if m == DISPATCHER else "")
           for m, edges in import_graph().items() for t, lazy in edges.items()
           if t in COMMANDS and t != m and (m != DISPATCHER or not lazy)]
    assert not bad, "library modules must not import the commands demo / distributed: " + "; ".join(bad)
