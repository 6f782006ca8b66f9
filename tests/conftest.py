"""Shared fixtures: settings isolated under tmp_path, a small knowledge folder, an open service."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sage_server.config import Settings, load_settings
from sage_server.service import KnowledgeService, open_service
from sage_server.store.sqlite import SqliteStore
from sage_server.store.sqlite_connections import Database
from tests.postgres_support import scratch_database
from tests.redis_support import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings that read nothing from this machine: no user config, no .env, no SAGE_* variables."""
    values: dict[str, Any] = {
        "db_path": tmp_path / "sage.db",
        "cache_dir": tmp_path / "cache",
        "bundled_knowledge": False,
    }
    values.update(overrides)
    return load_settings(values, environ={}, cwd=tmp_path, home=tmp_path).settings


def sage_env(home: Path, **settings: str) -> dict[str, str]:
    """The environment for a `sage` subprocess: this one without any SAGE_* variable, HOME at `home`, then
    `settings` (e.g. SAGE_DB_PATH=...), so nothing from the machine leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    return {**env, "HOME": str(home), **settings}


def sage_runner(cwd: Path, env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """A function running the `sage` command (as `python -m sage_server`) in `cwd` with `env`, its output captured."""

    def sage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sage_server", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )

    return sage


def write_doc(folder: Path, relative: str, text: str) -> Path:
    """Write a Markdown file under `folder`, creating parent folders."""
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


SAMPLE = {
    "core/honesty.md": """---
id: honesty
title: Honesty About Verification
layer: core
tags: [honesty, testing]
triggers: [claim done, verified]
summary: Say what you checked and what you did not.
---
# Honesty About Verification

Report only what you verified.

## Evidence

Run the tests and quote the output.
""",
    "frameworks/timeouts.md": """---
id: timeout-resilience
title: Timeout and Resilience Strategy
layer: frameworks
tags: [resilience, timeouts]
triggers: [timeout, retry, circuit breaker]
summary: Deadlines, retries with backoff and circuit breakers.
---
# Timeout and Resilience Strategy

Every call needs a deadline.

## Retries

Retry with exponential backoff and jitter, within a retry budget.

## Circuit breakers

A circuit breaker stops calling a failing dependency and lets it recover.
""",
    "practices/secrets.md": """---
id: handling-secrets
title: Handling Secrets
layer: practices
tags: [security]
triggers: [api key, password, 密钥管理]
summary: Keep credentials out of code and logs.
---
# Handling Secrets

Never commit an API key.

## Rotation

Rotate a leaked key at once.

## 中文摘要

密钥泄露后必须立即轮换密钥，并检查访问日志。
""",
    "scenarios/plain-note.md": "# Production Incident Notes\n\nStabilise first, then find the cause.\n",
}


@pytest.fixture
def knowledge(tmp_path: Path) -> Path:
    """A small knowledge folder with one document per kind of interest."""
    folder = tmp_path / "kb"
    for relative, text in SAMPLE.items():
        write_doc(folder, relative, text)
    return folder


@pytest.fixture
def settings(tmp_path: Path, knowledge: Path) -> Settings:
    return make_settings(tmp_path, knowledge_dirs=[knowledge])


BACKENDS = ["sqlite", "postgresql"]


@asynccontextmanager
async def database_for(backend: str) -> AsyncIterator[dict[str, Any]]:
    """The settings that put a knowledge base on `backend`: nothing for SQLite (the file under tmp_path), or a
    PostgreSQL database of its own, created for the test and dropped after it."""
    if backend == "sqlite":
        yield {}
        return
    async with scratch_database() as url:
        yield {"database_url": url}


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(settings) as kb:
        yield kb


def sqlite_db(kb: KnowledgeService) -> Database:
    """The SQLite connections under a service's store, for tests that reach into the file."""
    assert isinstance(kb.store, SqliteStore)
    return kb.store.db


async def assert_index_consistent(kb: KnowledgeService) -> None:
    """FTS5's own integrity check: the full-text indexes agree with the rows they index. On PostgreSQL the search
    columns are computed by the database itself on every write, so there is no separate index to drift."""
    if kb.store.backend != "sqlite":
        return
    async with sqlite_db(kb).transaction() as conn:
        # rank 1: compare the index with the rows it was built from, not only with itself.
        await conn.execute("INSERT INTO docs_fts (docs_fts, rank) VALUES ('integrity-check', 1)")


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.kill()
