"""The MCP tools: each parses its arguments, calls KnowledgeService once, and returns the service's model.

The descriptions are filled from the settings and constants they describe (layers, limits, defaults) when the tools
are registered, and each argument is described once, in its schema. That is why this module, unlike the others, does
not use `from __future__ import annotations`: the annotations are built from the settings here, so they must be
evaluated where they are written, not looked up later by name in the module.
"""

from typing import Annotated, Any

from mcp.server import MCPServer
from pydantic import Field

from sage_server.assistant import confirm
from sage_server.assistant.adapters import tool
from sage_server.budget import DEFAULT_MAX_TOKENS, MAX_TOKENS_CEILING, MIN_MAX_TOKENS
from sage_server.errors import StaleRevision
from sage_server.ids import title_id
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
        description=f"Largest answer in tokens ({MIN_MAX_TOKENS}-{MAX_TOKENS_CEILING}); a cut answer says how to go on",
    ),
]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"Results per page (1-{MAX_LIMIT})")]
Cursor = Annotated[str | None, Field(description="next_cursor of the previous page")]
Tags = Annotated[list[str] | None, Field(description="Only documents with all these tags, e.g. ['security']")]
ExpectedRevision = Annotated[
    int | None,
    Field(ge=0, le=MAX_REVISION, description="The revision you read (0: must be new); another is a conflict"),
]


class SaveResult(WriteResult):
    """What sage_save_knowledge stored, and whether its id was derived from the title."""

    derived_id: bool = Field(False, description="True when no id was given and `id` was derived from the title")


def register_tools(server: MCPServer[Any], kb: KnowledgeService) -> None:
    """Add SAGE's tools to `server`, each calling `kb`."""
    settings = kb.settings
    layers = ", ".join(settings.layers)
    one_layer = Field(description=f"One of {layers}")
    some_layers = Field(description=f"Only these layers ({layers})")
    delete_subject, confirm_delete = confirm.delete_resolvers(kb, settings.mcp_confirm_destructive)
    _, confirm_restore = confirm.restore_resolvers(kb, settings.mcp_confirm_destructive)
    may_ask = "" if settings.mcp_confirm_destructive == "never" else " The user may be asked to confirm first."

    @tool(
        server,
        kb.metrics,
        title="Get context for a task",
        read_only=True,
        description="The knowledge to read before a task, packed and cited: the core principles in brief, then the "
        "best-matching sections. Call it first when starting work. Returns `text` (Markdown citing sage:<id>), "
        "`sources`, and `omitted` sections (read one with sage_get_document).",
    )
    async def sage_get_context(
        task: Annotated[str, Field(min_length=1, description="What you are about to do, e.g. 'add retries to X'")],
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
        layers: Annotated[list[str] | None, some_layers] = None,
    ) -> ContextPack:
        return await kb.context_within(task, max_tokens, layers)

    @tool(
        server,
        kb.metrics,
        title="Search knowledge",
        read_only=True,
        description='Full-text search, best match first; "quotes" make a phrase, word* a prefix, and misspelt '
        "words are corrected. Returns `hits` (id, title, layer, snippet, revision) and `next_cursor`; with explain, "
        "why each hit ranked where it did.",
    )
    async def sage_search(
        query: Annotated[str, Field(min_length=1, description="Words to find, e.g. 'circuit breaker'")],
        layers: Annotated[list[str] | None, some_layers] = None,
        tags: Tags = None,
        limit: Limit = 10,
        cursor: Cursor = None,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
        explain: Annotated[bool, Field(description="Say why each hit ranked where it did")] = False,
    ) -> SearchPage:
        return await kb.search_within(query, layers, tags, limit, cursor, max_tokens, explain)

    @tool(
        server,
        kb.metrics,
        title="Read a document",
        read_only=True,
        description="One document by id, whole or one section, with its revision and `sections`. A long one comes "
        "in parts: pass `next_offset` back as `offset`. An unknown id is an error naming the closest ids.",
    )
    async def sage_get_document(
        id: DocId,
        section: Annotated[str | None, Field(description="Only the section under this heading, e.g. 'Retries'")] = None,
        offset: Annotated[int, Field(ge=0, description="Character to start at: a previous next_offset")] = 0,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    ) -> DocumentPage:
        return await kb.read(id, section, offset, max_tokens)

    @tool(
        server,
        kb.metrics,
        title="Get a layer of knowledge",
        read_only=True,
        description=f"Whole documents of one layer, by default {settings.layers[0]} (the team's principles, worth "
        "reading once a session); with a task, only those relevant to it. Returns `documents` and `omitted` ids.",
    )
    async def sage_get_knowledge(
        layer: Annotated[str | None, one_layer] = None,
        task: Annotated[str | None, Field(description="Keep only documents relevant to this task")] = None,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    ) -> KnowledgeBundle:
        return await kb.knowledge(layer, task, max_tokens)

    @tool(
        server,
        kb.metrics,
        title="List documents",
        read_only=True,
        description="Browse documents by layer or tag: ids, titles, summaries. Returns `items`, `total` and "
        "`next_cursor`.",
    )
    async def sage_list(
        layer: Annotated[str | None, one_layer] = None,
        tags: Tags = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    ) -> ListPage:
        return await kb.list_within(layer, tags, limit, cursor, max_tokens)

    @tool(
        server,
        kb.metrics,
        title="Knowledge base info",
        read_only=True,
        description="Version, documents and tokens per layer, the index generation (it changes on every write), "
        "uptime.",
    )
    async def sage_info() -> Info:
        return await kb.info()

    @tool(
        server,
        kb.metrics,
        title="Save a document",
        read_only=False,
        description="Create a document, or replace it with a new revision (earlier ones are kept); searchable at "
        "once. To edit: read it, change the text, save it whole with expected_revision = the revision you read, so "
        "an edit made meanwhile is a conflict, not lost. Returns the stored id, revision and tokens.",
    )
    async def sage_save_knowledge(
        title: Annotated[str, Field(min_length=1, max_length=300, description="e.g. 'Retry budgets'")],
        body: Annotated[str, Field(min_length=1, description="The whole document, as Markdown")],
        id: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=128,
                description="Letters, digits, '.', '_', '-'. Omit to derive it from the title; a derived id "
                "already taken is refused unless expected_revision is its revision",
            ),
        ] = None,
        layer: Annotated[str | None, Field(description=f"One of {layers}; default {settings.default_layer}")] = None,
        tags: Annotated[list[str] | None, Field(description="e.g. ['resilience']")] = None,
        triggers: Annotated[
            list[str] | None, Field(description="Phrases that make it relevant, e.g. ['retry']")
        ] = None,
        summary: Annotated[str, Field(description="One sentence: what it is for")] = "",
        expected_revision: ExpectedRevision = None,
    ) -> SaveResult:
        derived = id is None
        doc = DocumentIn(
            id=title_id(title) if id is None else id,
            title=title,
            layer=layer or settings.default_layer,
            body=body,
            tags=tags or [],
            triggers=triggers or [],
            summary=summary,
        )
        try:
            # A derived id must be new unless the caller says which revision it means to replace.
            saved = await kb.save(doc, 0 if derived and expected_revision is None else expected_revision)
        except StaleRevision as exc:
            if not derived:
                raise
            current = exc.details.get("current_revision")
            raise StaleRevision(
                f"the id {doc.id!r} derived from the title is taken (revision {current}): pass expected_revision="
                f"{current} to replace that document, or give an id",
                **exc.details,
            ) from exc
        return SaveResult(**WriteResult.of(saved).model_dump(), derived_id=derived)

    @tool(
        server,
        kb.metrics,
        title="Delete a document",
        read_only=False,
        destructive=True,
        description="Delete a document from the served knowledge; the delete is a revision, so "
        f"sage_restore_revision brings it back.{may_ask}",
    )
    async def sage_delete_knowledge(
        id: DocId,
        expected_revision: ExpectedRevision = None,
        *,
        subject: Annotated[confirm.Subject, delete_subject],
        confirmed: Annotated[confirm.Answer, confirm_delete],
    ) -> WriteResult:
        confirm.approved(confirmed, "deleted")
        return WriteResult.of(await kb.delete(id, subject.expected(expected_revision)))

    @tool(
        server,
        kb.metrics,
        title="Document history",
        read_only=True,
        description="Every revision of a document, newest first, deletions included (revision, change, title, "
        "time); deleted documents have one too.",
    )
    async def sage_history(id: DocId, max_tokens: MaxTokens = DEFAULT_MAX_TOKENS) -> HistoryPage:
        return await kb.history_within(id, max_tokens)

    @tool(
        server,
        kb.metrics,
        title="Restore a revision",
        read_only=False,
        idempotent=False,
        description=f"Make an earlier revision current again, as a new revision; also undoes a delete.{may_ask}",
    )
    async def sage_restore_revision(
        id: DocId,
        revision: Annotated[int, Field(ge=1, le=MAX_REVISION, description="The revision to bring back")],
        *,
        confirmed: Annotated[confirm.Answer, confirm_restore],
    ) -> WriteResult:
        confirm.approved(confirmed, "restored")
        return WriteResult.of(await kb.restore(id, revision))
