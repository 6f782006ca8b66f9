"""The MCP resources: the index, a layer, and one document, as Markdown no larger than the token ceiling; the resource
list names every one of them, documents included, a page at a time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, ListResourcesResult, PaginatedRequestParams, Resource

from sage_server.assistant.adapters import describe, resource_errors
from sage_server.assistant.uris import DOCUMENT_TEMPLATE, INDEX, LAYER_TEMPLATE, document_uri, layer_uri
from sage_server.budget import MAX_TOKENS_CEILING
from sage_server.errors import NotFound, SageError
from sage_server.service import MAX_LIMIT, KnowledgeService

MARKDOWN = "text/markdown"


def register_resources(server: MCPServer[Any], kb: KnowledgeService) -> None:
    """Add knowledge://index, knowledge://{layer} and knowledge://{layer}/{id} to `server`."""
    layers = ", ".join(kb.settings.layers)

    @server.resource(
        INDEX,
        name="index",
        title="Knowledge index",
        description="Every layer with its documents: id, title and summary.",
        mime_type=MARKDOWN,
    )
    @resource_errors
    async def index() -> str:
        info = await kb.info()
        lines = [f"# SAGE knowledge\n\n{info.documents} documents, about {info.tokens} tokens.\n"]
        share = max(MAX_TOKENS_CEILING // max(len(info.layers), 1), 200)
        for layer, count in info.layers.items():
            page = await kb.list_within(layer, limit=MAX_LIMIT, max_tokens=share)
            lines += [f"## {layer} ({count})", ""]
            lines += [f"- `{i.id}` {i.title}" + (f": {i.summary}" if i.summary else "") for i in page.items]
            if count > len(page.items):
                lines.append(f"- … {count - len(page.items)} more: read knowledge://{layer} or call sage_list")
            if page.items:
                lines.append("")
        return "\n".join(lines)

    @server.resource(
        LAYER_TEMPLATE,
        name="layer",
        title="A knowledge layer",
        description=f"The documents of one layer ({layers}), whole, as many as fit.",
        mime_type=MARKDOWN,
    )
    @resource_errors
    async def layer_documents(layer: str) -> str:
        bundle = await kb.knowledge(layer, max_tokens=MAX_TOKENS_CEILING)
        parts = [f"# {d.title}\n_sage:{d.id}, revision {d.revision}_\n\n{d.text.strip()}" for d in bundle.documents]
        if bundle.hint:
            parts.append(f"_{bundle.hint}._")
        return "\n\n---\n\n".join(parts) + "\n"

    @server.resource(
        DOCUMENT_TEMPLATE,
        name="document",
        title="A knowledge document",
        description="One document as Markdown, e.g. knowledge://frameworks/timeout-resilience.",
        mime_type=MARKDOWN,
    )
    @resource_errors
    async def document(layer: str, id: str) -> str:
        page = await kb.read(id, max_tokens=MAX_TOKENS_CEILING)
        if page.layer != layer:
            raise NotFound(f"document {id!r} is in layer {page.layer!r}: knowledge://{page.layer}/{id}", id=id)
        note = f"\n\n---\n_{page.hint} (sage_get_document with this id and offset)._\n" if page.hint else ""
        return page.text + note


ListHandler = Callable[[ServerRequestContext[Any, Any], PaginatedRequestParams], Awaitable[ListResourcesResult]]


def resource_list(kb: KnowledgeService) -> ListHandler:
    """The `resources/list` handler: the index and every layer, then every live document (by layer and id), a page
    of at most MAX_LIMIT documents at a time; `nextCursor` leads to the next page."""

    async def list_resources(
        ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams
    ) -> ListResourcesResult:
        cursor = params.cursor
        try:
            page = await kb.list(limit=MAX_LIMIT, cursor=cursor)
        except SageError as exc:
            raise MCPError(INVALID_PARAMS if exc.status < 500 else INTERNAL_ERROR, describe(exc)) from exc
        resources: list[Resource] = []
        if cursor is None:
            resources.append(Resource(uri=INDEX, name="index", title="Knowledge index", mime_type=MARKDOWN))
            resources += [
                Resource(uri=layer_uri(layer), name=layer, title=f"The {layer} layer", mime_type=MARKDOWN)
                for layer in kb.settings.layers
            ]
        resources += [
            Resource(
                uri=document_uri(item.layer, item.id),
                name=item.id,
                title=item.title,
                description=item.summary or None,
                mime_type=MARKDOWN,
            )
            for item in page.items
        ]
        return ListResourcesResult(resources=resources, next_cursor=page.next_cursor)

    return list_resources
