"""The typed results every face of SAGE returns: CLI, MCP, REST and `import sage_server` alike."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from sage_server.errors import clip

# Letters and digits of any script, '_', '.' and '-' (see ids.py for the ids SAGE derives itself).
ID_PATTERN = r"^\w[\w.-]{0,127}$"
MAX_REVISION = 2**63 - 1  # SQLite's largest integer: a larger revision cannot name one
_ID_RE = re.compile(ID_PATTERN)
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
Change = Literal["create", "update", "delete", "remove", "restore"]
# Control characters (Unicode category Cc: C0, DEL and C1) would reach terminals and logs as they are (NUL, ESC...),
# so they are refused everywhere, except line breaks and tabs in a body. A regex, not a loop over characters: bodies
# are read whole on every import.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_id(value: str) -> str:
    """Return `value` if it is a valid document id, else raise ValueError naming the rule."""
    if not _ID_RE.match(value):
        raise ValueError(
            f"invalid id {clip(value)!r}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    return value


def check_text(value: str, *, body: bool = False) -> str:
    """Return `value` if it holds no control character (a `body` may hold tabs and line breaks), else raise
    ValueError naming the first one and where it is."""
    found = (_BODY_CONTROL if body else _CONTROL).search(value)
    if found:
        raise ValueError(f"control character U+{ord(found.group()):04X} at position {found.start()}; remove it")
    return value


class Translation(BaseModel):
    """A document's title and summary in another language (frontmatter `title_zh`, `summary_zh`)."""

    title: str = Field("", max_length=300)
    summary: str = ""

    @field_validator("title", "summary")
    @classmethod
    def _no_controls(cls, value: str) -> str:
        return check_text(value.strip())


class DocumentIn(BaseModel):
    """A document to create or update."""

    id: str = Field(description="Stable id, e.g. 'timeout-resilience'")
    title: str = Field(min_length=1, max_length=300)
    layer: str = Field(description="One of the configured layers, e.g. 'practices'")
    body: str = Field(min_length=1, description="Markdown text")
    tags: list[str] = Field(default_factory=list)
    triggers: list[str] = Field(default_factory=list, description="Keywords that make it relevant to a task")
    summary: str = ""
    related: list[str] = Field(default_factory=list, description="Ids of related documents")
    aliases: list[str] = Field(default_factory=list, description="Ids of documents merged into this one")
    translations: dict[str, Translation] = Field(
        default_factory=dict, description="Title and summary by language code, e.g. {'zh': {'title': '...'}}"
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_id(value)

    @field_validator("title", "layer", "summary")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return check_text(value)

    @field_validator("body")
    @classmethod
    def _body_text(cls, value: str) -> str:
        # Windows line endings are line breaks, not content: stored as '\n' like every other line break.
        return check_text(value.replace("\r\n", "\n").replace("\r", "\n"), body=True)

    @field_validator("tags", "triggers")
    @classmethod
    def _clean_list(cls, value: list[str]) -> list[str]:
        cleaned = [check_text(v.strip()) for v in value if v.strip()]
        return list(dict.fromkeys(cleaned))

    @field_validator("related", "aliases")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(check_id(v.strip()) for v in value if v.strip()))

    @field_validator("translations")
    @classmethod
    def _languages(cls, value: dict[str, Translation]) -> dict[str, Translation]:
        for language in value:
            if not _LANGUAGE_RE.match(language):
                raise ValueError(f"language {clip(language)!r} is not a language code such as 'zh' or 'pt-BR'")
        return value


class Document(BaseModel):
    """A stored document at its current revision."""

    id: str
    title: str
    layer: str
    tags: list[str]
    triggers: list[str]
    summary: str
    body: str
    related: list[str]
    aliases: list[str]
    translations: dict[str, Translation]
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


class ScoreExplanation(BaseModel):
    """Why a hit ranked where it did (search with explain): its score is the weighted sum of `parts`."""

    bm25: float = Field(description="FTS5's BM25 with SAGE's field weights (higher is better)")
    bm25_fields: dict[str, float] = Field(description="BM25 counting one field at a time, with that field's weight")
    parts: dict[str, float] = Field(
        description="Each part of the score, 0-1: bm25 (relative to the best candidate), "
        "coverage, proximity, meta, triggers"
    )
    weights: dict[str, float] = Field(description="What each part weighs in the score")
    matched: list[str] = Field(description="The query terms the document holds")


class QueryTermExplanation(BaseModel):
    """One query term as searched (search with explain)."""

    typed: str
    searched: str
    documents: int = Field(description="Documents holding it (estimated past 500)")
    idf: float = Field(description="Its weight: BM25's inverse document frequency")
    note: str = Field(description="'' | prefix (read as the start of longer words) | corrected | or (a typo?)")


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
    explain: ScoreExplanation | None = None


class SearchResult(BaseModel):
    """One page of search hits."""

    query: str
    hits: list[SearchHit]
    next_cursor: str | None = None
    corrected_query: str | None = Field(default=None, description="Set when unknown words were replaced by close ones")
    partial: bool = Field(default=False, description="True when a deadline cut the work short")
    partial_reason: str | None = None
    terms: list[QueryTermExplanation] | None = Field(default=None, description="The query as searched (explain)")


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
    partial: bool = Field(default=False, description="True when a deadline cut the packing short")
    partial_reason: str | None = None


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


class ShadowedFile(BaseModel):
    """A bundled document left out because a user's document has its id (the user's always wins)."""

    path: str
    id: str
    by: str = Field(description="The user's file (or 'the API') that holds the id")


class ImportReport(BaseModel):
    """What one import run did."""

    scanned: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[SkippedFile] = Field(default_factory=list)
    shadowed: list[ShadowedFile] = Field(default_factory=list)
    duration_ms: float = 0.0


class Info(BaseModel):
    """What the knowledge base holds."""

    version: str
    layers: dict[str, int]
    documents: int
    tokens: int
    generation: int
    uptime_seconds: float
    db_path: str = Field(description="Where the data is: the SQLite file, or the PostgreSQL URL without its password")
    backend: Literal["sqlite", "postgresql"] = "sqlite"


HealthStatus = Literal["healthy", "degraded", "unhealthy"]
# A component that is switched off (backups with an interval of 0) is `disabled`, which counts as healthy.
ComponentStatus = Literal["healthy", "degraded", "unhealthy", "disabled"]


class Health(BaseModel):
    """The spec's health document (INFRASTRUCTURE.md 6.3)."""

    status: HealthStatus
    version: str
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    components: dict[str, ComponentStatus]


# -- results cut to a token budget (MCP tools, REST) -------------------------------------------------------


class Bounded(BaseModel):
    """A result cut to a token budget: `truncated` says something was left out and `hint` how to get it."""

    truncated: bool = Field(
        default=False, description="True when part of the answer was left out to stay within max_tokens"
    )
    hint: str | None = Field(default=None, description="When truncated: how to read the rest")


class SearchPage(Bounded, SearchResult):
    """One page of search hits, no larger than the caller's token budget."""


class ListPage(Bounded, DocumentList):
    """One page of a listing, no larger than the caller's token budget."""


class HistoryPage(Bounded, History):
    """A document's revisions, newest first, as many as the token budget holds."""


class DocumentPage(Bounded):
    """A document, or one of its sections, from `offset` on, cut to a token budget."""

    id: str
    title: str
    layer: str
    tags: list[str]
    summary: str
    revision: int
    updated_at: datetime
    tokens: int = Field(description="Estimated tokens of the whole document")
    sections: list[str] = Field(description="Section headings; pass one as `section` to read only that part")
    section: str | None = Field(default=None, description="The section shown, or None for the whole document")
    offset: int = Field(
        default=0, description="Character offset where `text` starts (within the section, if one was asked)"
    )
    text: str
    next_offset: int | None = Field(default=None, description="Pass as `offset` to read on; None once the end is shown")


class KnowledgeDocument(BaseModel):
    """One document of a layer, whole or (when `next_offset` is set) cut short."""

    id: str
    title: str
    revision: int
    tokens: int = Field(description="Estimated tokens of the whole document")
    text: str
    next_offset: int | None = Field(
        default=None, description="Where the text was cut; read on from there by id and offset"
    )


class KnowledgeBundle(Bounded):
    """A layer's documents, best first when a task was given, as many as the token budget holds."""

    layer: str
    task: str | None
    total: int = Field(description="How many documents matched")
    documents: list[KnowledgeDocument]
    omitted: list[str] = Field(description="Ids of matching documents left out for the budget (the first 50)")


class ContextSource(BaseModel):
    """A section quoted in packed context."""

    id: str
    title: str
    heading: str
    revision: int
    tokens: int


class ContextPack(Bounded):
    """Packed, cited context for a task: `text` is ready to read; `sources` and `omitted` say what it holds."""

    task: str
    max_tokens: int
    tokens_used: int = Field(description="Estimated tokens of `text`")
    text: str = Field(description="Core principles and the best sections, as Markdown with citations")
    sources: list[ContextSource]
    omitted: list[OmittedSection] = Field(description="Relevant sections left out for the budget")
    partial: bool = Field(default=False, description="True when a deadline cut the packing short")
    partial_reason: str | None = None


class WriteResult(BaseModel):
    """What a save, delete or restore left behind (the body is not echoed back)."""

    id: str
    title: str
    layer: str
    revision: int
    tokens: int
    content_hash: str
    updated_at: datetime
    deleted: bool

    @classmethod
    def of(cls, doc: Document) -> WriteResult:
        """The write result for a stored document."""
        return cls.model_validate(doc.model_dump(include=set(cls.model_fields)))


# -- keys and the audit trail ---------------------------------------------------------------------------------------

KeyScope = Literal["read", "write", "admin"]


class ApiKey(BaseModel):
    """A named API key (never its secret): read, write or admin, until it expires or is revoked."""

    name: str
    scope: KeyScope
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        """Whether the key opens the door at `now`."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class CreatedKey(ApiKey):
    """A key just made, with its secret: shown this once, never stored."""

    token: str = Field(description="The secret to send as 'Authorization: Bearer <token>'; not shown again")


class KeyList(BaseModel):
    """Every key, oldest first."""

    keys: list[ApiKey]


class AuditEntry(BaseModel):
    """One line of the audit trail: who did what to which document, from where, and how it went."""

    seq: int
    at: datetime
    key: str = Field(description="The key's name; 'local' for the command line and stdio, 'anonymous' without one")
    client: str = Field(description="The caller's address, or 'local'")
    operation: str
    target: str | None = None
    revision: int | None = None
    outcome: str = Field(description="'ok', 'unchanged', or the error code / reason it failed with")
    count: int = Field(1, description="How many times it happened (authentication failures are counted per minute)")
    detail: dict[str, object] = Field(default_factory=dict)


class AuditPage(BaseModel):
    """Audit entries, oldest first; pass `next_after` back as `after` for the ones that follow."""

    entries: list[AuditEntry]
    next_after: int | None = None
