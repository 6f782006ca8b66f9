"""Helpers for the MCP tests: an isolated knowledge folder, very large documents, and a real uvicorn server."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp.types import CallToolResult, TextContent
from starlette.types import ASGIApp

from sage_server.config import Settings, load_settings

DOCS = {
    "core/evidence.md": """---
id: verify-with-evidence
title: Verify With Evidence
layer: core
tags: [testing, honesty]
triggers: [claim done, verified]
summary: Say what you checked and how.
---
# Verify With Evidence

Run the tests and quote their output before saying something works.

## What counts as evidence

Command output, a failing test turned green, a log line.
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

Every network call needs a deadline.

## Retries

Retry idempotent calls with exponential backoff and jitter, within a retry budget.

## Circuit breakers

A circuit breaker stops calling a failing dependency and lets it recover.
""",
    "practices/review.md": """---
id: code-review-guidelines
title: Code Review Guidelines
layer: practices
tags: [review, testing]
triggers: [code review, pull request]
summary: Review correctness and security first, style last.
---
# Code Review Guidelines

Look for data loss and security holes before naming and style.

## Tests

Every behaviour change comes with a test that fails without it.
""",
    "practices/secrets.md": """---
id: handling-secrets
title: Handling Secrets
layer: practices
tags: [security]
triggers: [api key, password]
summary: Keep credentials out of code and logs.
---
# Handling Secrets

Never commit an API key; rotate a leaked one at once.
""",
}


def write_knowledge(folder: Path, docs: dict[str, str] | None = None) -> Path:
    """Write Markdown files (relative path -> text) under `folder` and return it."""
    for relative, text in (DOCS if docs is None else docs).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def settings_for(tmp_path: Path, knowledge: Path, **overrides: Any) -> Settings:
    """Settings that read nothing from this machine: a temp database and only `knowledge` imported."""
    values: dict[str, Any] = {
        "db_path": tmp_path / "sage.db",
        "cache_dir": tmp_path / "cache",
        "bundled_knowledge": False,
        "knowledge_dirs": [knowledge],
        **overrides,
    }
    return load_settings(values, environ={}, cwd=tmp_path, home=tmp_path).settings


def subprocess_env(settings: Settings, home: Path) -> dict[str, str]:
    """The SAGE_* environment that makes a `sage` subprocess use the same knowledge base as `settings`."""
    return {
        "HOME": str(home),
        "SAGE_DB_PATH": str(settings.db_path),
        "SAGE_CACHE_DIR": str(settings.cache_dir),
        "SAGE_BUNDLED_KNOWLEDGE": "false",
        "SAGE_KNOWLEDGE_DIRS": ":".join(str(p) for p in settings.knowledge_dirs),
    }


def huge_document(doc_id: str, sections: int, paragraphs: int, layer: str = "practices") -> str:
    """A Markdown document of `sections` level-2 sections, each `paragraphs` long paragraphs (~1 KB each)."""
    head = f"---\nid: {doc_id}\ntitle: Huge {doc_id}\nlayer: {layer}\ntags: [huge]\ntriggers: [retry storm]\n---\n"
    parts = [f"# Huge {doc_id}\n\nA very long document about retry storms and timeouts.\n"]
    for s in range(sections):
        parts.append(f"## Part {s}\n")
        for p in range(paragraphs):
            words = " ".join(f"word{s}x{p}x{i} filler text" for i in range(40))
            parts.append(f"Paragraph {s}.{p} on timeouts: {words}.\n")
    return head + "\n".join(parts)


def payload(result: CallToolResult) -> dict[str, Any]:
    """The structured result of a successful tool call, checked against its text block."""
    assert not result.is_error, result.content
    assert result.structured_content is not None
    text = text_of(result)
    data: dict[str, Any] = result.structured_content
    assert json.loads(text) == data
    return data


def text_of(result: CallToolResult) -> str:
    """The text of a tool result's single text block."""
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def error_text(result: CallToolResult) -> str:
    """The message of a tool error."""
    assert result.is_error
    return text_of(result)


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free localhost port; yields its base URL and stops it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        # uvicorn has no startup event to wait on; poll its flag, bounded.
        with anyio.fail_after(20):
            while not server.started:
                assert not stopped.is_set(), "uvicorn stopped during startup (see the log)"
                await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            with anyio.fail_after(10):
                await stopped.wait()
    sock.close()
