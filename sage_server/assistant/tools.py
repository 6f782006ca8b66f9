"""The MCP tools: each parses its arguments, calls KnowledgeService once, and returns the service's model."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server import MCPServer
from pydantic import Field

from sage_server.assistant.adapters import tool
from sage_server.budget import DEFAULT_MAX_TOKENS, MAX_TOKENS_CEILING, MIN_MAX_TOKENS
from sage_server.models import (
    MAX_REVISION,
    ContextPack,
    DocumentIn,
    DocumentPage,
    HistoryPage,
    Info,
    KnowledgeBundle,
    ListPage,
    SearchPage,
    WriteResult,
)
from sage_server.service import MAX_LIMIT, KnowledgeService

DocId = Annotated[str, Field(min_length=1, max_length=128, description="Document id, e.g. 'timeout-resilience'")]
MaxTokens = Annotated[
    int,
    Field(
        ge=MIN_MAX_TOKENS,
        le=MAX_TOKENS_CEILING,
        description=f"Largest answer to return, in tokens ({MIN_MAX_TOKENS}-{MAX_TOKENS_CEILING}), e.g. 4000",
    ),
]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"Results per page (1-{MAX_LIMIT})")]
Cursor = Annotated[str | None, Field(description="next_cursor from the previous page; omit for the first page")]
Layers = Annotated[list[str] | None, Field(description="Only these layers, e.g. ['practices', 'frameworks']")]
Tags = Annotated[list[str] | None, Field(description="Only documents with all these tags, e.g. ['security']")]
ExpectedRevision = Annotated[
    int | None,
    Field(
        ge=0,
        le=MAX_REVISION,
        description="The revision you read (0: the id must be new); a different current one is a conflict",
    ),
]


def register_tools(server: MCPServer[Any], kb: KnowledgeService) -> None:
    """Add SAGE's tools to `server`, each calling `kb`."""

    @tool(server, kb.metrics, title="Get a layer of knowledge", read_only=True)
    async def sage_get_knowledge(
        layer: Annotated[str | None, Field(description="Layer to read, e.g. 'core' (the default)")] = None,
        task: Annotated[str | None, Field(description="Only documents relevant to this task")] = None,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    ) -> KnowledgeBundle:
        """Read whole documents of one knowledge layer: by default `core`, the team's principles, which are worth
        reading once at the start of a session.

        Use it to load a layer's guidance; use sage_get_context instead to get only what bears on a task.

        Args:
            layer: the layer to read, e.g. "core", "guidelines", "frameworks", "practices", "scenarios", "templates".
            task: optional; keep only the layer's documents relevant to it, best first, e.g. "add retries to the
                payment client".
            max_tokens: the largest answer to return, e.g. 4000 (200-20000).

        Returns `documents` (id, title, revision, text), `total` matching, and `omitted` ids that did not fit.
        When `truncated` is true, `hint` says how to get the rest (read an id with sage_get_document).
        """
        return await kb.knowledge(layer, task, max_tokens)

    @tool(server, kb.metrics, title="Search knowledge", read_only=True)
    async def sage_search(
        query: Annotated[str, Field(min_length=1, description="Words to look for, e.g. 'retry backoff'")],
        layers: Layers = None,
        tags: Tags = None,
        limit: Limit = 10,
        cursor: Cursor = None,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
        explain: Annotated[bool, Field(description="Say why each hit ranked where it did")] = False,
    ) -> SearchPage:
        """Full-text search over the knowledge base, best match first. Use it to find which documents cover a
        topic; then read one with sage_get_document.

        Args:
            query: any text, e.g. "circuit breaker" or "secret rotation"; "quotes" make a phrase, word* a prefix.
                Misspelt words are corrected (see `corrected_query`).
            layers: only these layers, e.g. ["practices"].
            tags: only documents carrying all these tags, e.g. ["security"].
            limit: hits per page, e.g. 10 (1-100).
            cursor: `next_cursor` from the previous page, to get the next one.
            max_tokens: the largest answer to return, e.g. 4000; fewer hits are returned if they do not fit.
            explain: true to get, per hit, its BM25 (whole and per field) and the parts of its score, and the
                query's terms as searched; for debugging a ranking, not for everyday use.

        Returns `hits` (id, title, layer, tags, score, snippet with **matches**, tokens, revision) and
        `next_cursor` when there are more. `truncated` says hits were held back for the budget.
        """
        return await kb.search_within(query, layers, tags, limit, cursor, max_tokens, explain)

    @tool(server, kb.metrics, title="Get context for a task", read_only=True)
    async def sage_get_context(
        task: Annotated[str, Field(min_length=1, description="What you are about to do")],
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
        layers: Layers = None,
    ) -> ContextPack:
        """The knowledge to read before doing a task, packed and cited: the core principles in one line each,
        then the best-matching sections. Call it first when starting a piece of work.

        Args:
            task: what you are about to do, in plain words, e.g. "review a pull request that adds retries to the
                HTTP client".
            max_tokens: the largest answer to return, e.g. 4000 (200-20000).
            layers: only take sections from these layers, e.g. ["practices", "frameworks"].

        Returns `text` (Markdown to read, each section cited as sage:<id>), `sources` (id, heading, revision) and
        `omitted` sections that did not fit; read one with sage_get_document(id, section=heading).
        """
        return await kb.context_within(task, max_tokens, layers)

    @tool(server, kb.metrics, title="Read a document", read_only=True)
    async def sage_get_document(
        id: DocId,
        section: Annotated[str | None, Field(description="Only this section, by heading, e.g. 'Retries'")] = None,
        offset: Annotated[int, Field(ge=0, description="Character to start from: a previous next_offset")] = 0,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    ) -> DocumentPage:
        """Read one document by id, whole or one section of it, with its revision.

        Args:
            id: the document id, e.g. "timeout-resilience" (from sage_search or sage_list).
            section: optional heading of one section to read, e.g. "Retries" (see `sections` in a previous answer).
            offset: where to start, in characters; pass `next_offset` from the previous answer to read on.
            max_tokens: the largest answer to return, e.g. 4000 (200-20000).

        Returns the document's id, title, layer, tags, summary, revision, `sections` (headings) and `text`.
        A long document comes in parts: `truncated` is true and `next_offset` is where the next part starts.
        An unknown id is an error that names the closest ids.
        """
        return await kb.read(id, section, offset, max_tokens)

    @tool(server, kb.metrics, title="List documents", read_only=True)
    async def sage_list(
        layer: Annotated[str | None, Field(description="Only this layer, e.g. 'practices'")] = None,
        tags: Tags = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    ) -> ListPage:
        """Browse documents by layer or tag: ids, titles, summaries, ordered by layer and id.

        Args:
            layer: only this layer, e.g. "frameworks".
            tags: only documents carrying all these tags, e.g. ["testing"].
            limit: items per page, e.g. 50 (1-100).
            cursor: `next_cursor` from the previous page, to get the next one.
            max_tokens: the largest answer to return, e.g. 4000.

        Returns `items` (id, title, layer, tags, summary, tokens, revision), `total`, and `next_cursor`.
        """
        return await kb.list_within(layer, tags, limit, cursor, max_tokens)

    @tool(server, kb.metrics, title="Knowledge base info", read_only=True)
    async def sage_info() -> Info:
        """What the knowledge base holds: server version, documents per layer, total documents and tokens, the
        index generation (it changes on every write) and uptime. Takes no arguments."""
        return await kb.info()

    @tool(server, kb.metrics, title="Save a document", read_only=False, destructive=False, idempotent=True)
    async def sage_save_knowledge(
        id: DocId,
        title: Annotated[str, Field(min_length=1, max_length=300, description="Title, e.g. 'Retry budgets'")],
        body: Annotated[str, Field(min_length=1, description="The whole document, as Markdown")],
        layer: Annotated[str | None, Field(description="Layer, e.g. 'practices' (the configured default)")] = None,
        tags: Annotated[list[str] | None, Field(description="Tags, e.g. ['resilience', 'http']")] = None,
        triggers: Annotated[
            list[str] | None, Field(description="Phrases that make it relevant, e.g. ['retry']")
        ] = None,
        summary: Annotated[str, Field(description="One sentence saying what it is for")] = "",
        expected_revision: ExpectedRevision = None,
    ) -> WriteResult:
        """Create a document, or replace one with a new revision (earlier revisions are kept and can be restored).
        It is searchable at once. Saving identical content stores nothing new.

        To change an existing document: read it with sage_get_document, edit the text, and save the whole
        document with `expected_revision` set to the revision you read, so that an edit made meanwhile by
        someone else is reported as a conflict instead of being overwritten.

        Args:
            id: a stable id of letters, digits, '.', '_' or '-', e.g. "retry-budgets".
            title: e.g. "Retry budgets".
            body: the complete Markdown text, e.g. "# Retry budgets\\n\\nCap retries at 10% of traffic...".
            layer: e.g. "practices"; defaults to the configured default layer.
            tags: e.g. ["resilience"]. triggers: phrases that make it relevant to a task, e.g. ["retry storm"].
            summary: one sentence, e.g. "How to stop retries from amplifying an outage".
            expected_revision: the revision you read, e.g. 3; 0 means the id must not exist yet.

        Returns the stored id, title, layer, revision, tokens and content hash (not the body).
        """
        doc = DocumentIn(
            id=id,
            title=title,
            layer=layer or kb.settings.default_layer,
            body=body,
            tags=tags or [],
            triggers=triggers or [],
            summary=summary,
        )
        return WriteResult.of(await kb.save(doc, expected_revision))

    @tool(server, kb.metrics, title="Delete a document", read_only=False, destructive=True, idempotent=True)
    async def sage_delete_knowledge(id: DocId, expected_revision: ExpectedRevision = None) -> WriteResult:
        """Delete a document from the served knowledge. The deletion is itself a revision: sage_history lists it
        and sage_restore_revision brings the document back.

        Args:
            id: the document id, e.g. "retry-budgets".
            expected_revision: the revision you read, e.g. 4; if it changed since, nothing is deleted.

        Returns the document's id, its new revision and `deleted: true`.
        """
        return WriteResult.of(await kb.delete(id, expected_revision))

    @tool(server, kb.metrics, title="Document history", read_only=True)
    async def sage_history(id: DocId, max_tokens: MaxTokens = DEFAULT_MAX_TOKENS) -> HistoryPage:
        """Every revision of a document, newest first, including deletions. Use it before
        sage_restore_revision, or to see who changed what and when.

        Args:
            id: the document id, e.g. "timeout-resilience"; deleted documents have a history too.
            max_tokens: the largest answer to return, e.g. 4000.

        Returns `revisions` (revision number, change, title, layer, content hash, tokens, source path, time)
        and `deleted` for the current state.
        """
        return await kb.history_within(id, max_tokens)

    @tool(server, kb.metrics, title="Restore a revision", read_only=False, destructive=False, idempotent=False)
    async def sage_restore_revision(
        id: DocId,
        revision: Annotated[int, Field(ge=1, le=MAX_REVISION, description="The revision to bring back, e.g. 2")],
    ) -> WriteResult:
        """Make an earlier revision of a document current again, as a new revision; also undoes a deletion.

        Args:
            id: the document id, e.g. "timeout-resilience".
            revision: the revision number to restore, from sage_history, e.g. 2.

        Returns the document's id and its new revision.
        """
        return WriteResult.of(await kb.restore(id, revision))
