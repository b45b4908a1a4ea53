"""dvc.yaml's code deps follow the imports: a stage reruns when any module it runs changes.

For each stage, the CLI command its `cmd` calls is found in cli.py; the modules that command
imports (the stage function's module, e.g. data/convert.py for `convert`) are followed transitively
over every `import mammoflow…` in each module (module level and inside functions). Each module
reached must be covered by a dep of the stage: the file itself or a folder above it.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
#: modules that cannot change a stage's results (start-up, dispatch, what the commands print);
#: their own imports are not followed (console's are for exit codes)
NEUTRAL = {
    "mammoflow",
    "mammoflow.quiet",
    "mammoflow.cli",
    "mammoflow.__main__",
    "mammoflow.console",
}


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(node: ast.AST, current: str) -> set[str]:
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            out |= {a.name for a in sub.names if a.name.startswith("mammoflow")}
        elif isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("mammoflow"):
            out.add(sub.module)
            out |= {f"{sub.module}.{a.name}" for a in sub.names}  # `from pkg import module`
    return {m for m in out if _module_file(m) is not None}


def _closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo.extend(".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1))
        path = _module_file(name)
        if path is not None and name not in NEUTRAL - {"mammoflow"}:
            todo.extend(_imports(ast.parse(path.read_text(encoding="utf-8")), name))
    return seen - NEUTRAL


def _function(module: str, name: str) -> ast.FunctionDef:
    path = _module_file(module)
    assert path is not None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{module}.{name} not found")


def _command_function(words: list[str]) -> ast.FunctionDef:
    """The Typer function behind `mammoflow <words…>` (``@app.command("x")`` / ``@sub.command``)."""
    tree = ast.parse((SRC / "mammoflow" / "cli.py").read_text(encoding="utf-8"))
    wanted = [w for w in words if not w.startswith("-") and "$" not in w]
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "command":
                name = dec.args[0].value if dec.args else node.name  # type: ignore[attr-defined]
                group = getattr(dec.func.value, "id", "app")  # type: ignore[attr-defined]
                path = [name] if group == "app" else [group.removesuffix("_app"), name]
                if wanted[: len(path)] == path:
                    return node
    raise AssertionError(f"no CLI command for {words!r}")


def _stage_modules(cmd: str) -> set[str]:
    words = cmd.split("#")[0].split()[1:]  # drop bin/mammoflow
    func = _command_function(words)
    start = _imports(func, "mammoflow.cli")
    return _closure(start)


def _stages() -> list[tuple[str, str, list[str]]]:
    out = []
    for file in ("dvc.yaml", "tuning/dvc.yaml", "audit/dvc.yaml"):
        doc = yaml.safe_load((ROOT / file).read_text(encoding="utf-8"))
        for name, stage in doc["stages"].items():
            body = stage.get("do", stage)
            base = Path(file).parent / str(body.get("wdir", "."))  # deps are relative to wdir
            deps = [os.path.normpath(base / str(d)) for d in body.get("deps", [])]
            out.append((f"{file}:{name}", body["cmd"], deps))
    return out


@pytest.mark.parametrize(("stage", "cmd", "deps"), _stages(), ids=[s[0] for s in _stages()])
def test_stage_deps_cover_its_code(stage: str, cmd: str, deps: list[str]) -> None:
    missing = []
    for module in sorted(_stage_modules(cmd)):
        path = _module_file(module)
        assert path is not None
        rel = path.relative_to(ROOT)
        if not any(rel == Path(d) or Path(d) in rel.parents for d in deps):
            missing.append(str(rel))
    assert not missing, f"{stage}: add these code deps to its dvc.yaml entry: {missing}"
