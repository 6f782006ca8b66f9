"""The typed results every face of SAGE returns: CLI, MCP, REST and `import sage_server` alike."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)
Change = Literal["create", "update", "delete", "remove", "restore"]


def check_id(value: str) -> str:
    """Return `value` if it is a valid document id, else raise ValueError naming the rule."""
    if not _ID_RE.match(value):
        raise ValueError(
            f"invalid id {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


class DocumentIn(BaseModel):
    """A document to create or update."""

    id: str = Field(description="Stable id, e.g. 'timeout-resilience'")
    title: str = Field(min_length=1, max_length=300)
    layer: str = Field(description="One of the configured layers, e.g. 'practices'")
    body: str = Field(min_length=1, description="Markdown text")
    tags: list[str] = Field(default_factory=list)
    triggers: list[str] = Field(default_factory=list, description="Keywords that make it relevant to a task")
    summary: str = ""

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_id(value)

    @field_validator("tags", "triggers")
    @classmethod
    def _clean_list(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip() for v in value if v.strip()]
        return list(dict.fromkeys(cleaned))


class Document(BaseModel):
    """A stored document at its current revision."""

    id: str
    title: str
    layer: str
    tags: list[str]
    triggers: list[str]
    summary: str
    body: str
    source_path: str | None
    content_hash: str
    tokens: int
    revision: int
    created_at: datetime
    updated_at: datetime
    deleted: bool = False


class DocumentSummary(BaseModel):
    """A document without its body, for listings."""

    id: str
    title: str
    layer: str
    tags: list[str]
    summary: str
    tokens: int
    revision: int
    updated_at: datetime


class DocumentList(BaseModel):
    """One page of a listing; pass `next_cursor` back for the next page."""

    items: list[DocumentSummary]
    total: int
    next_cursor: str | None = None


class SearchHit(BaseModel):
    """One search result: higher `score` is better; `snippet` marks matches with **."""

    id: str
    title: str
    layer: str
    tags: list[str]
    score: float
    snippet: str
    tokens: int
    revision: int


class SearchResult(BaseModel):
    """One page of search hits."""

    query: str
    hits: list[SearchHit]
    next_cursor: str | None = None
    corrected_query: str | None = Field(None, description="Set when unknown words were replaced by close ones")


class ContextSection(BaseModel):
    """A cited piece of packed context."""

    id: str
    title: str
    layer: str
    heading: str
    revision: int
    tokens: int
    text: str


class OmittedSection(BaseModel):
    """A relevant section left out for lack of budget."""

    id: str
    heading: str
    tokens: int


class ContextResult(BaseModel):
    """What to read before doing a task, packed under a token budget."""

    task: str
    max_tokens: int
    tokens_used: int
    essentials: str = Field(description="The core layer's principles, one line each")
    sections: list[ContextSection]
    omitted: list[OmittedSection]
    text: str = Field(description="Everything above rendered as Markdown with citations")


class Revision(BaseModel):
    """One stored revision of a document."""

    id: str
    revision: int
    change: Change
    title: str
    layer: str
    content_hash: str
    tokens: int
    source_path: str | None
    created_at: datetime


class History(BaseModel):
    """All revisions of a document, newest first."""

    id: str
    deleted: bool
    revisions: list[Revision]


class SkippedFile(BaseModel):
    """A file the import did not take, and why."""

    path: str
    reason: str


class ImportReport(BaseModel):
    """What one import run did."""

    scanned: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[SkippedFile] = Field(default_factory=list)
    duration_ms: float = 0.0


class Info(BaseModel):
    """What the knowledge base holds."""

    version: str
    layers: dict[str, int]
    documents: int
    tokens: int
    generation: int
    uptime_seconds: float
    db_path: str


HealthStatus = Literal["healthy", "degraded", "unhealthy"]


class Health(BaseModel):
    """The spec's health document (INFRASTRUCTURE.md 6.3)."""

    status: HealthStatus
    version: str
    components: dict[str, HealthStatus]
