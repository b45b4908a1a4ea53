"""The package's layering, read from the source (AST, nothing imported).

* No import cycle among ``mammoflow`` modules. Every ``import`` counts, module level and inside
  functions (a function-level import still runs the module when the function does); only
  ``if TYPE_CHECKING:`` blocks are left out (they never run). Importing ``a.b.c`` also runs
  ``a/__init__.py`` and ``a/b/__init__.py``, so those are edges too — except a module's own
  ancestors, which are already initialising when it loads. A module that names its own
  package (``from mammoflow.tracking import X`` inside ``tracking/``) depends on that
  package's ``__init__``: an edge like any other.
* Only ``mammoflow.tracking`` imports MLflow: every other module asks tracking.
* No function over 80 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
TRACKING = "mammoflow.tracking"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(src: Path = SRC) -> dict[str, tuple[str, bool]]:
    """``{module: (source text, is a package)}`` of every module under ``src/mammoflow``."""
    return {
        _module_name(p, src): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in sorted((src / "mammoflow").rglob("*.py"))
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, typing_too: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``; ``if TYPE_CHECKING:`` bodies only if asked."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child) and not typing_too:
            for sub in child.orelse:
                yield from _import_nodes(sub, typing_too)
            continue
        yield from _import_nodes(child, typing_too)


def _targets(node: ast.Import | ast.ImportFrom, module: str, package: bool) -> list[str]:
    """The dotted names an import statement loads (``from x import y``: ``x`` and ``x.y``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        parts = module.split(".")
        anchor = parts if package else parts[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: modules its import statements run}`` among ``sources`` (see module doc)."""
    graph: dict[str, set[str]] = {}
    for module, (text, package) in sources.items():
        own = set(_ancestors(module))
        edges: set[str] = set()
        for node in _import_nodes(ast.parse(text), typing_too=False):
            for target in _targets(node, module, package):
                if target in sources:
                    edges.add(target)
                edges |= {a for a in _ancestors(target) if a in sources and a not in own}
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, …, a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_through(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_through(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """A cycle inside ``component``, from its first module back to it (breadth-first)."""
    start = min(component)
    came: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w not in came:
                came[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {sorted(component)}")


def mlflow_imports(sources: Mapping[str, tuple[str, bool]]) -> list[str]:
    """``module:line import`` of every MLflow import outside ``mammoflow.tracking``."""
    out = []
    for module, (text, _) in sources.items():
        if module == TRACKING or module.startswith(TRACKING + "."):
            continue
        for node in _import_nodes(ast.parse(text), typing_too=True):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                out.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    return out


# ------------------------------------------------------------------------------ the checks


def test_no_import_cycle_among_mammoflow_modules() -> None:
    found = cycles(import_graph(_sources()))
    assert not found, "import cycles (move the shared code down a layer):\n" + "\n".join(
        " -> ".join(c) for c in found
    )


def test_only_tracking_imports_mlflow() -> None:
    found = mlflow_imports(_sources())
    assert not found, "MLflow imported outside mammoflow.tracking (ask tracking):\n" + "\n".join(
        found
    )


def test_the_checks_catch_what_they_guard() -> None:
    """The detector on a made-up package: a function-level cycle through a package's
    ``__init__``, a TYPE_CHECKING import (no edge), an mlflow import outside tracking."""
    fake = {
        "mammoflow": ("", True),
        "mammoflow.a": ("from mammoflow.b import x\n", False),
        "mammoflow.b": ("def f():\n    from mammoflow.pkg.c import y\n", False),
        "mammoflow.pkg": ("from mammoflow.pkg.d import z\n", True),
        "mammoflow.pkg.c": ("", False),
        "mammoflow.pkg.d": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mammoflow.b\n"
            "def g():\n    import mammoflow.a\n",
            False,
        ),
        "mammoflow.tracking": ("import mlflow\n", True),
        "mammoflow.e": ("def h():\n    from mlflow.exceptions import MlflowException\n", False),
    }
    graph = import_graph(fake)
    assert graph["mammoflow.b"] == {"mammoflow.pkg", "mammoflow.pkg.c"}
    assert graph["mammoflow.pkg.d"] == {"mammoflow.a"}  # not b: TYPE_CHECKING
    assert cycles(graph) == [
        ["mammoflow.a", "mammoflow.b", "mammoflow.pkg", "mammoflow.pkg.d", "mammoflow.a"]
    ]
    del fake["mammoflow.pkg.d"]
    assert cycles(import_graph(fake)) == []
    assert mlflow_imports(fake) == ["mammoflow.e:2 from mlflow.exceptions import MlflowException"]


MAX_FUNCTION_LINES = 80


def long_functions(
    sources: Mapping[str, tuple[str, bool]], limit: int = MAX_FUNCTION_LINES
) -> list[str]:
    """``module.function (N lines)`` for every function longer than ``limit`` lines
    (decorators and docstring included)."""
    out = []
    for module, (text, _) in sorted(sources.items()):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = (node.end_lineno or node.lineno) - first + 1
                if n > limit:
                    out.append(f"{module}.{node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines() -> None:
    found = long_functions(_sources())
    assert not found, "split these into functions of one step each:\n" + "\n".join(found)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions({"m": (f"def f():\n{body}\n", False)}) == ["m.f (81 lines)"]
