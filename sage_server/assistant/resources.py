"""The MCP resources: the index, a layer, and one document, as Markdown no larger than the token ceiling."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer

from sage_server.assistant.adapters import resource_errors
from sage_server.budget import MAX_TOKENS_CEILING
from sage_server.errors import NotFound
from sage_server.service import MAX_LIMIT, KnowledgeService

MARKDOWN = "text/markdown"


def register_resources(server: MCPServer[Any], kb: KnowledgeService) -> None:
    """Add knowledge://index, knowledge://{layer} and knowledge://{layer}/{id} to `server`."""

    @server.resource(
        "knowledge://index",
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
        "knowledge://{layer}",
        name="layer",
        title="A knowledge layer",
        description="The documents of one layer (core, guidelines, frameworks, practices, scenarios, templates).",
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
        "knowledge://{layer}/{id}",
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
