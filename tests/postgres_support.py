"""A PostgreSQL database of a test's own: created (UTF-8, from template0) on the server at 127.0.0.1:5432 (user
postgres, trust auth) and dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

SERVER = "postgresql://postgres@127.0.0.1:5432"


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped (with any connection still open to it) on the way out."""
    name = f"sage_test_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        await admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
        )
    try:
        yield f"{SERVER}/{name}"
    finally:
        async with await psycopg.AsyncConnection.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
