"""Forward-only schema migrations: numbered SQL files applied once each, checked by sha256."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from sage_server.errors import MigrationError

_TRACKING = """CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


def statements(sql: str) -> list[str]:
    """Split a script into complete statements (sqlite3 knows where triggers end)."""
    found: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                found.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(part.strip().startswith("--") for part in buffer.strip().splitlines()):
        raise ValueError(f"incomplete SQL statement at the end: {buffer.strip()[:80]!r}")
    return found


def migration_files(directory: Path) -> list[Path]:
    """The migration files in apply order (NNNN_name.sql)."""
    return sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def pending(applied: dict[str, str], directory: Path) -> list[tuple[Path, str]]:
    """The migrations in `directory` not yet applied, with their sha256, in order, given what the database
    recorded (name -> sha256). Refused: a recorded migration SAGE does not ship (a newer SAGE wrote it) and one
    whose file changed since it was applied (migrations are forward-only). Shared by both stores."""
    files = migration_files(directory)
    unknown = sorted(set(applied) - {f.name for f in files})
    if unknown:
        raise MigrationError(
            f"the database was migrated by a newer SAGE (unknown migrations: {', '.join(unknown)}); upgrade SAGE"
        )
    todo = []
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.name not in applied:
            todo.append((path, digest))
        elif applied[path.name] != digest:
            raise MigrationError(
                f"{path}: migration changed after it was applied (recorded sha256 {applied[path.name][:12]}…, "
                f"file {digest[:12]}…); migrations are forward-only: add a new numbered file instead",
                migration=path.name,
            )
    return todo


async def migrate(conn: aiosqlite.Connection, directory: Path) -> list[str]:
    """Bring the database to the newest migration; return the names applied now."""
    await conn.execute(_TRACKING)
    async with conn.execute("SELECT name, sha256 FROM schema_migrations") as cursor:
        applied = {row[0]: row[1] for row in await cursor.fetchall()}
    done: list[str] = []
    for path, digest in pending(applied, directory):
        try:
            script = statements(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise MigrationError(f"{path}: {exc}", migration=path.name) from exc
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (name, sha256, applied_at) VALUES (?, ?, ?)",
                (path.name, digest, datetime.now(UTC).isoformat()),
            )
        except sqlite3.Error as exc:
            await conn.execute("ROLLBACK")
            raise MigrationError(f"{path}: {exc}", migration=path.name) from exc
        await conn.execute("COMMIT")
        done.append(path.name)
    return done
