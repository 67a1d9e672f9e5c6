"""The import graph of src/outboxer has no cycles (the layers are checked by
`make lint` with import-linter; see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import outboxer


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("outboxer", cache_dir=None)
    assert len(graph.modules) > 20  # the whole package was read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


DATABASE_NAMES = {"sqlite", "postgresql", "postgres", "mysql", "mariadb"}
"""Names that only ``database/dialects/`` may branch on."""


def _names_a_database(source: str) -> list[str]:
    """Where ``source`` names a database in code (docstrings and comments aside): a
    string equal to a database's name, or an import of a database's module."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found: list[str] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and node.value.strip().lower() in DATABASE_NAMES
        ):
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            prefix = f"{node.module}." if isinstance(node, ast.ImportFrom) else ""
            for alias in node.names:
                module = prefix + alias.name
                if DATABASE_NAMES & set(module.split(".")[1:]):
                    found.append(f"line {node.lineno}: import {module}")
    return found


def test_only_the_dialects_name_a_database() -> None:
    """Every difference between databases lives in ``database/dialects/``: no other
    module compares a database's name or imports a database's module."""
    root = Path(outboxer.__file__).parent
    dialects = root / "database" / "dialects"
    offences = {
        str(path.relative_to(root)): found
        for path in sorted(root.rglob("*.py"))
        if dialects not in path.parents
        and (found := _names_a_database(path.read_text(encoding="utf-8")))
    }
    assert len(list(root.rglob("*.py"))) > 50  # the whole package was read
    assert offences == {}


def test_the_database_name_finder_finds_one() -> None:
    planted = '''"""About SQLite (a docstring may name it)."""
from outboxer.database.dialects.sqlite import READ_ONLY_OPTION
from sqlalchemy.dialects import postgresql
def f(dialect):
    """mysql"""
    return dialect.family == "sqlite" or dialect.name in ("mysql", "mariadb")
'''
    assert _names_a_database(planted) == [
        "line 2: import outboxer.database.dialects.sqlite.READ_ONLY_OPTION",
        "line 3: import sqlalchemy.dialects.postgresql",
        "line 6: 'sqlite'",
        "line 6: 'mysql'",
        "line 6: 'mariadb'",
    ]
