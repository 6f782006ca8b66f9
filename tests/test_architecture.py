"""The store boundary holds: only sage_server/store/ imports a database driver or writes SQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sage_server

PACKAGE = Path(sage_server.__file__).parent
STORE = PACKAGE / "store"
DRIVERS = frozenset({"sqlite3", "aiosqlite", "asyncpg", "psycopg", "psycopg_pool", "psycopg2"})
# A string that starts like an SQL statement (leading whitespace and line breaks allowed); a SELECT must name what it
# reads FROM, so a sentence starting with "Select" is prose.
SQL = re.compile(
    r"^\s*(SELECT\s(?:(?!\.\s)[^;!?])*?\bFROM\s+\w|SELECT\s+\d|INSERT\s+(OR\s+\w+\s+)?INTO\s|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s|CREATE\s+"
    r"(TABLE|INDEX|UNIQUE|VIEW|TRIGGER|VIRTUAL|TEMP|EXTENSION)|PRAGMA\s|WITH\s+\w+\s+AS\s*\()",
    re.IGNORECASE,
)


def violations(source: str) -> list[str]:
    """What in a module's source breaks the boundary: driver imports and SQL in string literals."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = [node.module or ""] if node.level == 0 else []
            found |= {(node.lineno, f"imports {name}") for name in names if name.split(".")[0] in DRIVERS}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.add((node.lineno, f"SQL {node.value.strip()[:40]!r}"))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = node.values[0].value
            if isinstance(head, str) and SQL.match(head):
                found.add((node.lineno, f"SQL {head.strip()[:40]!r}"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_the_checker_finds_drivers_and_sql() -> None:
    sample = '''
import sqlite3
from psycopg_pool import AsyncConnectionPool
import aiosqlite as db
QUERY = "select d.id from documents d"
def f(table):
    return f"DELETE FROM {table} WHERE 1"
MIGRATE = """
    create table t (x int)
"""
'''
    found = violations(sample)
    assert [v.split(":")[0] for v in found] == [
        "line 2",
        "line 3",
        "line 4",
        "line 5",
        "line 7",
        "line 8",
    ], found


def test_the_checker_lets_prose_and_other_imports_pass() -> None:
    sample = """
import json
from sage_server.store import Store
HELP = "Select the documents to update. Then delete the ones from the list you do not need."
NOTE = "update the index"
"""
    assert violations(sample) == []


def test_only_the_store_speaks_sql() -> None:
    modules = sorted(path for path in PACKAGE.rglob("*.py") if STORE not in path.parents)
    assert len(modules) > 30  # the walk found the package
    broken = {
        str(path.relative_to(PACKAGE)): found
        for path in modules
        if (found := violations(path.read_text(encoding="utf-8")))
    }
    assert broken == {}


def test_the_store_is_where_the_sql_is() -> None:
    # The checker would pass vacuously if the store had moved: it must find SQL and drivers inside it.
    inside = [violations(path.read_text(encoding="utf-8")) for path in STORE.rglob("*.py")]
    assert sum(len(found) for found in inside) > 20
