"""SAGE: a team's knowledge in SQLite, served to AI assistants over MCP; `import sage_server` to embed it.

async with sage_server.open() as kb:
    result = await kb.search("retry with backoff")
"""

from __future__ import annotations

from sage_server.config import Settings, load_settings
from sage_server.errors import Conflict, InvalidInput, NotFound, SageError, Timeout, Unavailable
from sage_server.models import (
    ContextResult,
    ContextSection,
    Document,
    DocumentIn,
    DocumentList,
    DocumentSummary,
    Health,
    History,
    ImportReport,
    Info,
    Revision,
    SearchHit,
    SearchResult,
)
from sage_server.service import KnowledgeService, Saved
from sage_server.service import open_service as open  # noqa: A004 - `sage_server.open()` is the entry point
from sage_server.version import __version__

__all__ = [
    "Conflict",
    "ContextResult",
    "ContextSection",
    "Document",
    "DocumentIn",
    "DocumentList",
    "DocumentSummary",
    "Health",
    "History",
    "ImportReport",
    "Info",
    "InvalidInput",
    "KnowledgeService",
    "NotFound",
    "Revision",
    "SageError",
    "Saved",
    "SearchHit",
    "SearchResult",
    "Settings",
    "Timeout",
    "Unavailable",
    "__version__",
    "load_settings",
    "open",
]
