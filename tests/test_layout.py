"""The code's floors, read from its imports: no import circles, imports flow peft_methods ← jobs ←
orchestrator, ``jobs/`` and ``peft_methods/`` never import Ray, and no module uses another's
underscore names. Parsed with ``ast``, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_methods", "jobs", "orchestrator")
FORBIDDEN = {  # package -> what it must not import (DESIGN.md, "Packages and what each may import")
    "peft_methods": ("ray", "deepspeed", "sqlalchemy", "jobs", "orchestrator"),
    "jobs": ("ray", "orchestrator"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import in module ``name`` — lazy ones and those only for type
    checking included, since each still ties the two modules together — relative ones resolved."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((base, [a.name for a in node.names]))
    return found


def project_edges(name: str) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    edges = set()
    for module, names in imports(name):
        targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
        edges.update(t for t in targets if t in MODULES and t != name)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_there_are_modules_to_check():
    assert {"jobs.store.job_store", "jobs.training.recipe", "orchestrator.client", "peft_methods.lora"} <= set(MODULES)


def test_no_import_cycle_between_project_modules():
    graph = {name: project_edges(name) for name in MODULES}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_their_floor_allows(package):
    bad = [(name, module) for name in MODULES if name.split(".")[0] == package
           for module, _ in imports(name) if module.split(".")[0] in FORBIDDEN[package]]
    assert bad == []


def private_definitions(tree: ast.AST) -> set[str]:
    """Underscore names a module defines: functions, classes, methods, module and instance attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.add(t.id)
                    elif isinstance(t, ast.Attribute):
                        names.add(t.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def foreign_private_uses(name: str, defined: dict[str, set[str]]) -> list[str]:
    tree, own = TREES[name], defined[name]
    others = set().union(*(names for module, names in defined.items() if module != name)) - own
    found = []
    for module, names in imports(name):
        if module in MODULES:
            found += [f"from {module} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in others:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_underscore_names():
    defined = {name: private_definitions(tree) for name, tree in TREES.items()}
    offences = {name: uses for name in MODULES if (uses := foreign_private_uses(name, defined))}
    assert offences == {}


def test_the_private_use_check_sees_a_reach_into_another_module():
    TREES["__probe__"] = ast.parse("def f(client):\n    return client._launch()\n")
    MODULES["__probe__"] = ROOT / "probe.py"
    try:
        defined = {name: private_definitions(tree) for name, tree in TREES.items()}
        defined["orchestrator.__fake__"] = {"_launch"}
        assert foreign_private_uses("__probe__", defined) == ["line 2: client._launch"]
    finally:
        del TREES["__probe__"], MODULES["__probe__"]
