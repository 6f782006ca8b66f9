"""Reads that rank: search, context packing and close-id suggestions, run against the store within their
deadlines. The ranking itself is search.py's and context.py's; this is the order the reads happen in."""

from __future__ import annotations

import difflib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from sage_server import context as context_packing
from sage_server import search, spelling
from sage_server.errors import NotFound, Timeout
from sage_server.models import ContextResult, SearchResult
from sage_server.store import Reader, Store
from sage_server.timeouts import Deadlines

Strings = list[str]


@dataclass(frozen=True)
class Where:
    """What a ranked read runs against: the store, its ranking slots, the deadlines, and what searches learned of
    the index's words at the index's `version` (the database's identity and generation)."""

    store: Store
    # Fewer than the store's readers, so that point reads (gets, /health, a context's essentials) always find a
    # reader free while rankings hold theirs (see KnowledgeService.ranking).
    slots: anyio.Semaphore
    deadlines: Deadlines
    vocabulary: search.Vocabulary
    version: object

    @asynccontextmanager
    async def ranking(self) -> AsyncIterator[Reader]:
        """A reader to rank with: a ranking slot first, then the reader. Both are waited for inside the caller's
        deadline, so a ranking queued behind others is cut short (partial, or a Timeout) as when it queued for a
        reader."""
        async with self.slots, self.store.read() as reader:
            yield reader


async def not_found(store: Store, doc_id: str) -> NotFound:
    """A NotFound naming the closest ids, found by prefix and by the id's words."""
    candidates: set[str] = set()
    async with store.read() as reader:
        candidates |= set(await reader.ids_from(doc_id[:3], 50))
        query = search.parse_query(doc_id.replace("-", " ").replace("_", " "))
        if query.terms and store.searchable:
            rows = await reader.rank_documents(query.fts(), None, None, 20, 0)
            candidates |= {row.id for row in rows}
    suggestions = difflib.get_close_matches(doc_id, sorted(candidates), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
    return NotFound(f"no document with id {doc_id!r}{hint}", id=doc_id, suggestions=suggestions)


async def run_search(
    where: Where,
    query: str,
    layers: Strings | None,
    tags: Strings | None,
    limit: int,
    cursor: str | None,
    explain: bool,
) -> SearchResult:
    """A search's hits (see KnowledgeService.search): ranked, corrected, with snippets; partial past the deadline."""
    parsed = search.parse_query(query)
    if not parsed.terms:
        return SearchResult(query=query, hits=[], corrected_query=None)
    query_key = search.query_key("search", parsed.fts(), layers, tags)
    offset = search.decode_cursor(cursor, query_key)
    corrected: str | None = None
    ranked: list[search.Ranked] | None = None
    texts: dict[int, search.Body] = {}
    fields: dict[int, dict[str, float]] = {}
    plan: search.Plan | None = None
    with where.deadlines.partial("search", "search") as window:
        async with where.ranking() as reader:
            plan = await search.plan(reader, parsed, where.vocabulary, where.version)
            ranked = await search.rank(reader, plan, layers, tags, limit + 1, offset)
            # Words no document holds are typos or cut short: read them again once the rest has ranked (a
            # deadline here still leaves an answer).
            if offset == 0 and plan.doubtful:
                fixed = await spelling.correct(reader, plan, where.vocabulary, where.version)
                if fixed is not None:
                    plan, corrected = fixed, fixed.corrected
                    ranked = await search.rank(reader, plan, layers, tags, limit + 1, 0)
            # Past the re-scored head (deep pages), bodies for the snippets are read here.
            texts = await reader.bodies([i.row.key for i in ranked[:limit] if i.body is None])
            if explain:
                fields = await search.field_scores(reader, plan, [i.row.key for i in ranked[:limit]])
    if ranked is None:
        raise Timeout(window.reason or "search timed out", operation="search")
    hits = []
    for item in ranked[:limit]:
        item.body = item.body or texts.get(item.row.key)
        if item.body is None:
            break  # the deadline came before this deep page's rows were read: the hits before it are the answer
        snippet = search.make_snippet(item.body.text, plan.searched if plan else parsed, around=item.around)
        hit = search.to_hit(item, snippet or item.row.summary)
        if explain:
            hit.explain = search.explain_hit(item, fields.get(item.row.key, {}))
        hits.append(hit)
    more = len(ranked) > limit and not corrected
    return SearchResult(
        query=query,
        hits=hits,
        next_cursor=search.encode_cursor(offset + limit, query_key) if more else None,
        corrected_query=corrected,
        partial=window.partial,
        partial_reason=window.reason,
        terms=search.explain_terms(plan) if explain and plan else None,
    )


@dataclass(frozen=True)
class Gathered:
    """What packing a context for one task reads: the core essentials and the candidate sections, best first. It
    does not depend on the token budget, so one gathering serves every budget the task is packed at."""

    lines: Strings
    found: list[context_packing.Candidate]
    partial: bool = False
    partial_reason: str | None = None

    @property
    def nbytes(self) -> int:
        """Roughly what it holds in memory (its text), for the memo that keeps it (see cache.Memo)."""
        return sum(map(len, self.lines)) + sum(len(c.text) + len(c.title) + len(c.heading) for c in self.found)


async def gather_context(where: Where, core_layer: str, task: str, layers: Strings | None) -> Gathered:
    """The essentials and the ranked candidate sections for `task` (see KnowledgeService.context)."""
    parsed = search.parse_query(task, phrases=False)
    async with where.store.read() as reader:
        lines = await context_packing.essentials(reader, core_layer)
    found: list[context_packing.Candidate] = []
    # Past the context deadline the caller still gets the core essentials, marked partial.
    with where.deadlines.partial("context", "context") as window:
        async with where.ranking() as reader:
            plan = await search.plan(reader, parsed, where.vocabulary, where.version)
            if plan.doubtful:
                plan = await spelling.correct(reader, plan, where.vocabulary, where.version) or plan
            found = await context_packing.candidates(reader, plan, layers)
    return Gathered(lines, found, window.partial, window.reason)


def pack_context(gathered: Gathered, task: str, budget: int) -> ContextResult:
    """`gathered` packed into `budget` tokens: cheap next to gathering, which reads and ranks."""
    result = context_packing.assemble(task, budget, gathered.lines, gathered.found)
    return result.model_copy(update={"partial": gathered.partial, "partial_reason": gathered.partial_reason})
