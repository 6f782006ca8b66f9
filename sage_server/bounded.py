"""Answers cut to a token budget: the views MCP tools (and REST, where it wants them) return.

Every method keeps what fits `max_tokens`, says so when it cut (`truncated`, `hint`), and tells how to get the rest
(a cursor, an offset, a section). KnowledgeService inherits them; they only call its public reads.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Protocol

from sage_server import budget, markdown, search
from sage_server.errors import InvalidInput, NotFound
from sage_server.models import (
    ContextPack,
    ContextResult,
    ContextSource,
    DocumentPage,
    HistoryPage,
    KnowledgeBundle,
    KnowledgeDocument,
    ListPage,
    SearchPage,
)
from sage_server.text import estimate_tokens

if TYPE_CHECKING:
    from sage_server.config import Settings
    from sage_server.models import Document, DocumentList, History, SearchResult

MAX_LIMIT = 100
# Bounded reads: how many headings a document page lists, omitted ids a bundle names, packing rounds context takes.
MAX_HEADINGS_SHOWN = 50
MAX_OMITTED_SHOWN = 50
CONTEXT_FIT_ROUNDS = 4
LONGEST_CURSOR = search.encode_cursor(10**9, "0" * 12)  # for measuring a page before its real cursor is known
Strings = list[str]
KnowledgeDocuments = list[KnowledgeDocument]
IdsAndTokens = list[tuple[str, int]]


class Reads(Protocol):
    """The reads of KnowledgeService the views are built on."""

    settings: Settings

    async def get(self, doc_id: str) -> Document: ...
    async def list(
        self, layer: str | None = ..., tags: Strings | None = ..., limit: int = ..., cursor: str | None = ...
    ) -> DocumentList: ...
    async def search(
        self,
        query: str,
        layers: Strings | None = ...,
        tags: Strings | None = ...,
        limit: int = ...,
        cursor: str | None = ...,
        explain: bool = ...,
    ) -> SearchResult: ...
    async def context(self, task: str, max_tokens: int | None = ..., layers: Strings | None = ...) -> ContextResult: ...
    async def history(self, doc_id: str) -> History: ...
    def _check_layers(self, layers: Strings | None) -> Strings | None: ...


class BoundedViews:
    """The token-bounded views of KnowledgeService (a mixin: `self` is the service)."""

    async def search_within(
        self: Reads,
        query: str,
        layers: Strings | None = None,
        tags: Strings | None = None,
        limit: int = 10,
        cursor: str | None = None,
        max_tokens: int | None = None,
        explain: bool = False,
    ) -> SearchPage:
        """`search`, keeping as many hits as fit `max_tokens`; `next_cursor` goes on after the last hit shown."""
        ceiling = budget.check(max_tokens)
        result = await self.search(query, layers, tags, limit, cursor, explain)
        page = SearchPage(**dict(result))
        if budget.cost(page) <= ceiling:
            return page

        def first(count: int) -> SearchPage:
            dropped = len(result.hits) - count
            more = "narrow the query" if result.corrected_query else "pass next_cursor for them"
            hint = (
                f"{dropped} more hits of this page did not fit max_tokens={ceiling}: {more}, or filter by layer or tag"
            )
            # Measured with the longest cursor there can be: the one fetched below must fit too.
            update = {"hits": result.hits[:count], "next_cursor": LONGEST_CURSOR, "truncated": True, "hint": hint}
            return page.model_copy(update=update)

        keep = budget.largest(len(result.hits), lambda count: budget.cost(first(count)) <= ceiling)
        page = first(keep)
        # Ask again for exactly `keep` hits (the same ones, best first): its cursor starts after the last shown.
        again = (
            await self.search(query, layers, tags, keep, cursor, explain)
            if keep and not result.corrected_query
            else None
        )
        page = page.model_copy(update={"next_cursor": again.next_cursor if again else None})
        return budget.ensure(page, ceiling)

    async def list_within(
        self: Reads,
        layer: str | None = None,
        tags: Strings | None = None,
        limit: int = 50,
        cursor: str | None = None,
        max_tokens: int | None = None,
    ) -> ListPage:
        """`list`, keeping as many items as fit `max_tokens`; `next_cursor` goes on after the last item shown."""
        ceiling = budget.check(max_tokens)
        result = await self.list(layer, tags, limit, cursor)
        page = ListPage(**dict(result))
        if budget.cost(page) <= ceiling:
            return page

        def first(count: int) -> ListPage:
            dropped = len(result.items) - count
            hint = f"{dropped} more items of this page did not fit max_tokens={ceiling}: pass next_cursor for them"
            update = {"items": result.items[:count], "next_cursor": LONGEST_CURSOR, "truncated": True, "hint": hint}
            return page.model_copy(update=update)

        keep = budget.largest(len(result.items), lambda count: budget.cost(first(count)) <= ceiling)
        page = first(keep)
        again = await self.list(layer, tags, keep, cursor) if keep else None
        page = page.model_copy(update={"next_cursor": again.next_cursor if again else None})
        return budget.ensure(page, ceiling)

    async def history_within(self: Reads, doc_id: str, max_tokens: int | None = None) -> HistoryPage:
        """`history`, the newest revisions that fit `max_tokens`."""
        ceiling = budget.check(max_tokens)
        history = await self.history(doc_id)

        def newest(count: int) -> HistoryPage:
            dropped = len(history.revisions) - count
            hint = f"{dropped} older revisions did not fit max_tokens={ceiling}; any can still be restored by number"
            return HistoryPage(
                **{**dict(history), "revisions": history.revisions[:count]},
                truncated=bool(dropped),
                hint=hint if dropped else None,
            )

        keep = budget.largest(len(history.revisions), lambda count: budget.cost(newest(count)) <= ceiling)
        return budget.ensure(newest(keep), ceiling)

    async def read(
        self: Reads, doc_id: str, section: str | None = None, offset: int = 0, max_tokens: int | None = None
    ) -> DocumentPage:
        """A document, or the section under one heading, from character `offset` on, cut to `max_tokens`.

        When the text is cut, `next_offset` is where to read on, and `sections` names the headings to ask for.
        """
        ceiling = budget.check(max_tokens)
        doc = await self.get(doc_id)
        parts = [part for part in markdown.sections(doc.body) if part.heading]
        headings = [part.heading for part in parts][:MAX_HEADINGS_SHOWN]
        start, end, shown_section = 0, len(doc.body), None
        if section is not None:
            wanted = BoundedViews._heading_key(section)
            match = next((part for part in parts if BoundedViews._heading_key(part.heading) == wanted), None)
            if match is None:
                close = difflib.get_close_matches(section, [part.heading for part in parts], n=5, cutoff=0.4)
                raise NotFound(
                    f"document {doc_id!r} has no section {section!r}; its sections are: "
                    f"{', '.join(repr(h) for h in headings) or '(none)'}",
                    id=doc_id,
                    section=section,
                    suggestions=close,
                )
            start, end, shown_section = match.start, match.end, match.heading
        scope = doc.body[start:end]
        if not 0 <= offset <= len(scope):
            raise InvalidInput(f"offset must be between 0 and {len(scope)} for this text, got {offset}", field="offset")
        rest = scope[offset:]

        def page(length: int, heading_count: int) -> DocumentPage:
            cut = length < len(rest)
            also = "with the same section" if shown_section else "or ask for one section by heading"
            return DocumentPage(
                **doc.model_dump(
                    include={"id", "title", "layer", "tags", "summary", "revision", "updated_at", "tokens"}
                ),
                sections=headings[:heading_count],
                section=shown_section,
                offset=offset,
                text=rest[:length],
                next_offset=offset + length if cut else None,
                truncated=cut,
                hint=f"Cut at character {offset + length} of {len(scope)} to fit max_tokens={ceiling}: "
                f"read on from offset={offset + length}, {also}"
                if cut
                else None,
            )

        whole = page(len(rest), len(headings))
        if budget.cost(whole) <= ceiling:
            return whole
        # The list of headings may take a quarter of the budget at most; the text gets the rest.
        count = budget.largest(len(headings), lambda n: budget.cost(page(0, n)) <= ceiling // 4)
        return budget.ensure(budget.fit_text(rest, lambda length: page(length, count), ceiling), ceiling)

    @staticmethod
    def _heading_key(heading: str) -> str:
        return " ".join(heading.strip().lstrip("#").split()).casefold()

    async def knowledge(
        self: Reads, layer: str | None = None, task: str | None = None, max_tokens: int | None = None
    ) -> KnowledgeBundle:
        """A layer's documents (the first layer, core, by default), whole, as many as fit `max_tokens`.

        With a task, only the layer's documents relevant to it, best first. When even the first document is larger
        than the budget, it comes cut, with `next_offset` to read on with `read`.
        """
        ceiling = budget.check(max_tokens)
        layer = layer or self.settings.layers[0]
        self._check_layers([layer])
        if task is not None and task.strip():
            hits = (await self.search(task, [layer], limit=MAX_LIMIT)).hits
            candidates = [(hit.id, hit.tokens) for hit in hits]
        else:
            candidates = await BoundedViews._layer_documents(self, layer)
        shape = KnowledgeBundle(layer=layer, task=task, total=len(candidates), documents=[], omitted=[])
        chosen: KnowledgeDocuments = []
        left: Strings = []
        for at, (doc_id, tokens) in enumerate(candidates):
            waiting = [*left, *(c[0] for c in candidates[at + 1 :])]
            # A document larger than what is left cannot fit: skip it without reading its body.
            if chosen and tokens > ceiling - budget.cost(BoundedViews._bundle(shape, chosen, waiting, ceiling)):
                left.append(doc_id)
                continue
            doc = await self.get(doc_id)
            entry = KnowledgeDocument(
                id=doc.id, title=doc.title, revision=doc.revision, tokens=doc.tokens, text=doc.body
            )
            if budget.cost(BoundedViews._bundle(shape, [*chosen, entry], waiting, ceiling)) <= ceiling:
                chosen.append(entry)
            elif chosen:
                left.append(doc_id)
            else:
                return BoundedViews._opening(shape, entry, waiting, ceiling)
        return budget.ensure(BoundedViews._bundle(shape, chosen, left, ceiling), ceiling)

    @staticmethod
    def _bundle(
        shape: KnowledgeBundle, documents: KnowledgeDocuments, omitted: Strings, ceiling: int
    ) -> KnowledgeBundle:
        hints = [
            f"document {d.id!r} was cut at character {d.next_offset}: read on by id from that offset"
            for d in documents
            if d.next_offset is not None
        ]
        if omitted:
            hints.append(
                f"{len(omitted)} of {shape.total} documents did not fit max_tokens={ceiling}: read them by id, pass "
                f"a task to get only the relevant ones, or raise max_tokens (up to {budget.MAX_TOKENS_CEILING})"
            )
        return shape.model_copy(
            update={
                "documents": documents,
                "omitted": omitted[:MAX_OMITTED_SHOWN],
                "truncated": bool(hints),
                "hint": "; ".join(hints) or None,
            }
        )

    @staticmethod
    def _opening(shape: KnowledgeBundle, entry: KnowledgeDocument, omitted: Strings, ceiling: int) -> KnowledgeBundle:
        """The bundle holding only the beginning of `entry`, a first document larger than the whole budget."""
        body = entry.text

        def cut(length: int) -> KnowledgeBundle:
            next_offset = length if length < len(body) else None
            part = entry.model_copy(update={"text": body[:length], "next_offset": next_offset})
            return BoundedViews._bundle(shape, [part], omitted, ceiling)

        return budget.ensure(budget.fit_text(body, cut, ceiling), ceiling)

    @staticmethod
    async def _layer_documents(reads: Reads, layer: str) -> IdsAndTokens:
        """(id, tokens) of every live document of a layer, by id."""
        found: IdsAndTokens = []
        cursor: str | None = None
        while True:
            page = await reads.list(layer=layer, limit=MAX_LIMIT, cursor=cursor)
            found += [(item.id, item.tokens) for item in page.items]
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor

    async def context_within(
        self: Reads, task: str, max_tokens: int | None = None, layers: Strings | None = None
    ) -> ContextPack:
        """`context` as one answer within `max_tokens`: the packed text, its sources and what was left out.

        The packer budgets the text alone, while the answer also carries the source list and JSON escapes; so the
        text is packed again, smaller, until the whole answer fits (two rounds at most in practice).
        """
        ceiling = budget.check(max_tokens)
        inner = ceiling
        for _ in range(CONTEXT_FIT_ROUNDS):
            pack = BoundedViews._context_pack(await self.context(task, inner, layers), ceiling)
            used = budget.cost(pack)
            if used <= ceiling or inner == budget.MIN_MAX_TOKENS:
                break
            inner = max(budget.MIN_MAX_TOKENS, inner * ceiling // used - 16)

        def opening(length: int) -> ContextPack:
            if length == len(pack.text):
                return pack
            text = pack.text[:length]
            hint = "the context was cut to fit max_tokens: raise max_tokens or ask a narrower task"
            return pack.model_copy(
                update={"text": text, "tokens_used": estimate_tokens(text), "truncated": True, "hint": hint}
            )

        return budget.ensure(budget.fit_text(pack.text, opening, ceiling), ceiling)

    @staticmethod
    def _context_pack(result: ContextResult, ceiling: int) -> ContextPack:
        omitted = len(result.omitted)
        pack = ContextPack(
            task=result.task,
            max_tokens=ceiling,
            tokens_used=result.tokens_used,
            text=result.text,
            sources=[ContextSource(**s.model_dump(exclude={"text", "layer"})) for s in result.sections],
            omitted=result.omitted,
            partial=result.partial,
            partial_reason=result.partial_reason,
            truncated=bool(omitted),
            hint=f"{omitted} relevant sections did not fit: read one by its id with its heading as the section, "
            "or raise max_tokens"
            if omitted
            else None,
        )
        # The list of what was left out may take a quarter of the budget at most; the text matters more.
        keep = budget.largest(
            omitted,
            lambda n: budget.cost(pack.model_copy(update={"text": "", "omitted": result.omitted[:n]})) <= ceiling // 4,
        )
        return pack.model_copy(update={"omitted": result.omitted[:keep]})
