"""Structured logs: one JSON object per line on stderr, in the spec's shape (INFRASTRUCTURE.md 6.1)."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

# Set by the HTTP middleware for the length of a request: every line logged meanwhile carries its request id and
# client, so an operation (a write, say) can be traced to the request that made it.
REQUEST: ContextVar[dict[str, str] | None] = ContextVar("sage_request", default=None)


class JsonFormatter(logging.Formatter):
    """Format a record as {timestamp, level, logger, message, context}."""

    def format(self, record: logging.LogRecord) -> str:
        context: dict[str, Any] = dict(getattr(record, "context", None) or {})
        if record.exc_info and record.exc_info[0] is not None:
            context["exception"] = self.formatException(record.exc_info)
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "context": context,
        }
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every logger's records, SAGE's and libraries', through the JSON formatter to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries log their own details at INFO; keep them to warnings unless we debug.
    for noisy in ("aiosqlite", "asyncio", "httpx", "httpcore", "mcp"):
        logging.getLogger(noisy).setLevel(level if level == "DEBUG" else "WARNING")


def get_logger(name: str) -> logging.Logger:
    """A logger under the `sage.` namespace."""
    return logging.getLogger(f"sage.{name}")


def log_event(logger: logging.Logger, level: int, message: str, **context: Any) -> None:
    """Log `message` with structured `context` (operation, duration_ms, ...)."""
    if logger.isEnabledFor(level):
        # The request's id is read now, while the request runs: a handler may format the record later.
        logger.log(level, message, extra={"context": {**(REQUEST.get() or {}), **context}})
