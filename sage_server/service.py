"""KnowledgeService: the one object that owns the knowledge base. Every face of SAGE is an adapter over it."""

from __future__ import annotations

import difflib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiosqlite
import anyio.to_thread

from sage_server import budget, ingest, markdown, search, store
from sage_server import context as context_packing
from sage_server.config import Settings, load_settings
from sage_server.db import Database
from sage_server.errors import Conflict, InvalidInput, NotFound, SageError, Unavailable
from sage_server.logs import get_logger, log_event
from sage_server.metrics import Metrics
from sage_server.migrate import migrate
from sage_server.models import (
    ContextPack,
    ContextResult,
    ContextSource,
    Document,
    DocumentIn,
    DocumentList,
    DocumentPage,
    Health,
    History,
    HistoryPage,
    ImportReport,
    Info,
    KnowledgeBundle,
    KnowledgeDocument,
    ListPage,
    SearchPage,
    SearchResult,
    SkippedFile,
)
from sage_server.resources import knowledge_dir, migrations_dir
from sage_server.text import estimate_tokens
from sage_server.version import __version__

log = get_logger("core")
MAX_LIMIT = 100
# Bounded reads: how many headings a document page lists, omitted ids a bundle names, packing rounds context takes.
MAX_HEADINGS_SHOWN = 50
MAX_OMITTED_SHOWN = 50
CONTEXT_FIT_ROUNDS = 4
LONGEST_CURSOR = search.encode_cursor(10**9, "0" * 12)  # for measuring a page before its real cursor is known
# The class has a method named `list`, which would shadow the builtin in its annotations.
Strings = list[str]
PathList = list[Path]
KnowledgeDocuments = list[KnowledgeDocument]
IdsAndTokens = list[tuple[str, int]]


class KnowledgeService:
    """Get, list, search, pack context, save, delete, restore and import knowledge. Open with `sage_server.open`."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.db = Database(settings.db_path)
        self.started = time.monotonic()
        self.last_import: ImportReport | None = None
        self.ready = False  # True once the configured folders have been imported

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, import_now: bool = True) -> None:
        """Open the database, migrate it, and (unless `import_now` is False) import the configured folders.

        A server passes False and runs `import_configured()` in the background, so it answers probes at once
        and reports ready when the import is done.
        """
        writer = await self.db.open_writer()
        try:
            applied = await migrate(writer, migrations_dir())
        except sqlite3.DatabaseError as exc:
            await self.db.close()
            raise Unavailable(f"cannot use database {self.settings.db_path}: {exc}") from exc
        except BaseException:
            await self.db.close()
            raise
        if applied:
            log_event(log, logging.INFO, "Database migrated", operation="migrate", applied=applied)
        await self.db.open_readers()
        if import_now:
            await self.import_configured()

    async def import_configured(self) -> None:
        """Import the bundled knowledge and SAGE_KNOWLEDGE_DIRS (if import_on_start), then mark the service ready."""
        folders = self.configured_folders()
        if self.settings.import_on_start and folders:
            self.last_import = await self.import_paths(folders)
        self.ready = True

    async def close(self) -> None:
        """Close the database cleanly."""
        await self.db.close()

    def configured_folders(self) -> PathList:
        """The bundled knowledge (unless turned off) and SAGE_KNOWLEDGE_DIRS."""
        folders = [knowledge_dir()] if self.settings.bundled_knowledge else []
        return folders + list(self.settings.knowledge_dirs)

    @contextmanager
    def _operation(self, name: str, level: int = logging.DEBUG, **context: object) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except SageError as exc:
            self.metrics.operation(name, time.perf_counter() - started, exc.code)
            log_event(
                log,
                logging.INFO,
                "Operation failed",
                operation=name,
                error=exc.code,
                detail=exc.message,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                **context,
            )
            raise
        except Exception:
            self.metrics.operation(name, time.perf_counter() - started, "internal_error")
            raise
        elapsed = time.perf_counter() - started
        self.metrics.operation(name, elapsed)
        log_event(log, level, "Operation completed", operation=name, duration_ms=round(elapsed * 1000, 3), **context)

    # -- validation ------------------------------------------------------------------------------

    def _check_layers(self, layers: Strings | None) -> Strings | None:
        for layer in layers or []:
            if layer not in self.settings.layers:
                raise InvalidInput(f"unknown layer {layer!r} (known: {', '.join(self.settings.layers)})", field="layer")
        return layers or None

    @staticmethod
    def _check_limit(limit: int) -> None:
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}, got {limit}", field="limit")

    async def _not_found(self, doc_id: str) -> NotFound:
        """A NotFound naming the closest ids, found by prefix and by the id's words."""
        candidates: set[str] = set()
        async with self.db.read() as conn:
            async with conn.execute(
                "SELECT id FROM documents WHERE deleted_at IS NULL AND id >= ? AND id < ? LIMIT 50",
                (doc_id[:3], doc_id[:3] + "\uffff"),
            ) as cursor:
                candidates |= {row[0] for row in await cursor.fetchall()}
            query = search.parse_query(doc_id.replace("-", " ").replace("_", " "))
            if query.terms:
                rows = await search.rank_documents(conn, query.fts(), None, None, 20, 0)
                candidates |= {row["id"] for row in rows}
        suggestions = difflib.get_close_matches(doc_id, sorted(candidates), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        return NotFound(f"no document with id {doc_id!r}{hint}", id=doc_id, suggestions=suggestions)

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, doc_id: str) -> Document:
        """One live document by id; NotFound (with close ids suggested) when there is none."""
        with self._operation("get", id=doc_id):
            async with self.db.read() as conn:
                row = await store.fetch_row(conn, doc_id)
            if row is None:
                raise await self._not_found(doc_id)
            if row["deleted_at"] is not None:
                raise NotFound(
                    f"document {doc_id!r} was deleted at revision {row['revision']}; restore an earlier revision "
                    "to bring it back",
                    id=doc_id,
                    deleted=True,
                    suggestions=[],
                )
            return store.to_document(row)

    async def list(
        self, layer: str | None = None, tags: Strings | None = None, limit: int = 50, cursor: str | None = None
    ) -> DocumentList:
        """Live documents ordered by layer and id, a page at a time."""
        with self._operation("list", layer=layer):
            self._check_limit(limit)
            layers = self._check_layers([layer] if layer else None)
            key = search.query_key("list", layers, tags)
            offset = search.decode_cursor(cursor, key)
            where, params = search.filter_sql(layers, tags)
            async with self.db.read() as conn:
                async with conn.execute(
                    f"SELECT {store.DOCUMENT_COLUMNS} FROM documents d WHERE d.deleted_at IS NULL{where} "
                    "ORDER BY d.layer, d.id LIMIT ? OFFSET ?",
                    [*params, limit + 1, offset],
                ) as rows:
                    page = list(await rows.fetchall())
                async with conn.execute(
                    f"SELECT count(*) FROM documents d WHERE d.deleted_at IS NULL{where}", params
                ) as rows:
                    total_row = await rows.fetchone()
            more = len(page) > limit
            return DocumentList(
                items=[store.to_summary(row) for row in page[:limit]],
                total=total_row[0] if total_row else 0,
                next_cursor=search.encode_cursor(offset + limit, key) if more else None,
            )

    async def search(
        self,
        query: str,
        layers: Strings | None = None,
        tags: Strings | None = None,
        limit: int = 10,
        cursor: str | None = None,
    ) -> SearchResult:
        """Full-text search ranked by BM25; any text is a valid query. Misspelt words are corrected."""
        with self._operation("search", query=query[:200]):
            if not query.strip():
                raise InvalidInput("query must not be empty", field="query")
            self._check_limit(limit)
            layers = self._check_layers(layers)
            parsed = search.parse_query(query)
            if not parsed.terms:
                return SearchResult(query=query, hits=[], corrected_query=None)
            query_key = search.query_key("search", parsed.fts(), layers, tags)
            offset = search.decode_cursor(cursor, query_key)
            corrected: str | None = None
            async with self.db.read() as conn:
                ranked = await search.rank(conn, parsed, layers, tags, limit + 1, offset)
                if len(ranked) <= limit and offset == 0:
                    fixed = await search.correct(conn, parsed)
                    if fixed is not None:
                        parsed, corrected = fixed, search.describe(fixed)
                        ranked = await search.rank(conn, parsed, layers, tags, limit + 1, 0)
                page = ranked[:limit]
                keys = [item.row["key"] for item in page]
                snippets = await search.snippets(conn, parsed.fts(), keys)
                bodies: dict[int, str] = {}
                if any(t.kind == "cjk" for t in parsed.terms) and page:
                    marks = ",".join("?" * len(keys))
                    async with conn.execute(f"SELECT key, body FROM documents WHERE key IN ({marks})", keys) as cur:
                        bodies = {r[0]: r[1] for r in await cur.fetchall()}
            hits = []
            for item in page:
                key = item.row["key"]
                snippet = search.cjk_snippet(bodies[key], parsed) if key in bodies else None
                hits.append(search.to_hit(item, snippet or snippets.get(key) or item.row["summary"]))
            more = len(ranked) > limit
            return SearchResult(
                query=query,
                hits=hits,
                next_cursor=search.encode_cursor(offset + limit, query_key) if more and not corrected else None,
                corrected_query=corrected,
            )

    async def context(self, task: str, max_tokens: int | None = None, layers: Strings | None = None) -> ContextResult:
        """What to read before doing `task`: core essentials, then the best sections, within `max_tokens`."""
        with self._operation("context", task=task[:200]):
            if not task.strip():
                raise InvalidInput("task must not be empty", field="task")
            budget = max_tokens or self.settings.context_max_tokens
            if not 200 <= budget <= 100_000:
                raise InvalidInput(f"max_tokens must be between 200 and 100000, got {budget}", field="max_tokens")
            layers = self._check_layers(layers)
            parsed = search.parse_query(task, phrases=False)
            async with self.db.read() as conn:
                if parsed.terms:
                    parsed = await search.correct(conn, parsed) or parsed
                return await context_packing.pack(conn, task, parsed, budget, self.settings.layers[0], layers)

    async def history(self, doc_id: str) -> History:
        """Every revision of a document (live or deleted), newest first."""
        with self._operation("history", id=doc_id):
            async with self.db.read() as conn:
                row = await store.fetch_row(conn, doc_id)
                if row is None:
                    raise await self._not_found(doc_id)
                revisions = await store.revisions(conn, row)
            return History(id=doc_id, deleted=row["deleted_at"] is not None, revisions=revisions)

    async def info(self) -> Info:
        """Counts by layer, totals, the index generation and uptime."""
        with self._operation("info"):
            async with self.db.read() as conn:
                async with conn.execute(
                    "SELECT layer, count(*), coalesce(sum(tokens), 0) FROM documents WHERE deleted_at IS NULL "
                    "GROUP BY layer"
                ) as cursor:
                    rows = await cursor.fetchall()
                generation = await store.generation(conn)
            counts = dict.fromkeys(self.settings.layers, 0) | {row[0]: row[1] for row in rows}
            return Info(
                version=__version__,
                layers=counts,
                documents=sum(row[1] for row in rows),
                tokens=sum(row[2] for row in rows),
                generation=generation,
                uptime_seconds=round(time.monotonic() - self.started, 3),
                db_path=str(self.settings.db_path),
            )

    async def health(self) -> Health:
        """The spec's health document. Knowledge is degraded when empty, unhealthy when unreadable."""
        knowledge = "healthy"
        try:
            async with self.db.read() as conn:
                async with conn.execute("SELECT count(*) FROM documents WHERE deleted_at IS NULL") as cursor:
                    row = await cursor.fetchone()
            if not row or row[0] == 0:
                knowledge = "degraded"
        except (sqlite3.Error, SageError) as exc:
            log_event(log, logging.ERROR, "Health check failed", operation="health", error=str(exc))
            knowledge = "unhealthy"
        components = {"core": "healthy", "cache": "healthy", "knowledge": knowledge}
        status = "unhealthy" if knowledge == "unhealthy" else knowledge
        return Health.model_validate({"status": status, "version": __version__, "components": components})

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, doc: DocumentIn, expected_revision: int | None = None) -> Document:
        """Create or update a document. With `expected_revision` (0: must not exist yet), a concurrent
        change is a Conflict instead of a silent overwrite. Saving identical content stores nothing."""
        with self._operation("save", logging.INFO, id=doc.id):
            self._check_layers([doc.layer])
            async with self.db.transaction() as conn:
                row = await store.fetch_row(conn, doc.id)
                current = 0 if row is None else row["revision"]
                if expected_revision is not None and expected_revision != current:
                    state = "does not exist" if row is None else f"is at revision {current}"
                    raise Conflict(
                        f"document {doc.id!r} {state}, not revision {expected_revision}; re-read it and retry",
                        id=doc.id,
                        current_revision=current,
                    )
                if row is None:
                    await store.insert(conn, doc, store.Source())
                elif row["deleted_at"] is None and row["content_hash"] == store.content_hash(doc):
                    return store.to_document(row)
                else:
                    source = store.Source(row["source_path"], row["source_hash"])
                    await store.replace(conn, row, doc, source, "update")
                await store.bump_generation(conn)
                saved = await store.fetch_row(conn, doc.id)
            assert saved is not None
            return store.to_document(saved)

    async def delete(self, doc_id: str, expected_revision: int | None = None) -> Document:
        """Soft-delete a document as a new revision; `restore` brings any revision back."""
        with self._operation("delete", logging.INFO, id=doc_id):
            async with self.db.transaction() as conn:
                row = await store.fetch_row(conn, doc_id)
                if row is None or row["deleted_at"] is not None:
                    raise await self._not_found(doc_id)
                if expected_revision is not None and expected_revision != row["revision"]:
                    raise Conflict(
                        f"document {doc_id!r} is at revision {row['revision']}, not {expected_revision}",
                        id=doc_id,
                        current_revision=row["revision"],
                    )
                await store.soft_delete(conn, row, "delete")
                await store.bump_generation(conn)
                deleted = await store.fetch_row(conn, doc_id)
            assert deleted is not None
            return store.to_document(deleted)

    async def restore(self, doc_id: str, revision: int) -> Document:
        """Make an earlier revision current again (as a new revision); also undeletes."""
        with self._operation("restore", logging.INFO, id=doc_id, revision=revision):
            async with self.db.transaction() as conn:
                row = await store.fetch_row(conn, doc_id)
                if row is None:
                    raise await self._not_found(doc_id)
                content = await store.revision_content(conn, row, revision)
                if content is None:
                    raise NotFound(
                        f"document {doc_id!r} has no revision {revision} (latest is {row['revision']})",
                        id=doc_id,
                        revision=revision,
                        suggestions=[],
                    )
                self._check_layers([content.layer])
                await store.replace(conn, row, content, store.Source(row["source_path"], row["source_hash"]), "restore")
                await store.bump_generation(conn)
                restored = await store.fetch_row(conn, doc_id)
            assert restored is not None
            return store.to_document(restored)

    async def purge(self, doc_id: str) -> None:
        """Remove a deleted document and its history for good. Live documents must be deleted first."""
        with self._operation("purge", logging.INFO, id=doc_id):
            async with self.db.transaction() as conn:
                row = await store.fetch_row(conn, doc_id)
                if row is None:
                    raise await self._not_found(doc_id)
                if row["deleted_at"] is None:
                    raise Conflict(f"document {doc_id!r} is live; delete it before purging", id=doc_id)
                await store.purge(conn, row)
                await store.bump_generation(conn)

    async def import_paths(self, paths: PathList) -> ImportReport:
        """Import Markdown files and folders in one transaction, incrementally by file hash.

        Changed files become new revisions; files gone from an imported folder are soft-deleted; bad files
        are reported in `skipped` and change nothing.
        """
        started = time.perf_counter()
        with self._operation("import", logging.INFO, paths=[str(p) for p in paths]):
            collected = await anyio.to_thread.run_sync(ingest.collect, paths, self.settings)
            report = ImportReport(scanned=len(collected.seen), skipped=collected.skipped)
            async with self.db.transaction() as conn:
                ids = json.dumps([parsed.doc.id for parsed in collected.files])
                async with conn.execute(
                    "SELECT key, id, source_path, source_hash, content_hash, revision, change, deleted_at "
                    "FROM documents WHERE source_path IS NOT NULL OR id IN (SELECT value FROM json_each(?))",
                    (ids,),
                ) as cursor:
                    existing = {row["id"]: row for row in await cursor.fetchall()}
                # An id derived from a path depends on the folder imported; a file already known keeps its id.
                known_paths = {row["source_path"]: row["id"] for row in existing.values() if row["source_path"]}
                for parsed in collected.files:
                    if parsed.id_from_path and known_paths.get(parsed.path, parsed.doc.id) != parsed.doc.id:
                        parsed = ingest.ParsedFile(
                            parsed.path,
                            parsed.doc.model_copy(update={"id": known_paths[parsed.path]}),
                            parsed.source_hash,
                            id_from_path=True,
                        )
                    await self._import_one(conn, parsed, existing.pop(parsed.doc.id, None), report)
                # What is left was not in this run: soft-delete those whose file is gone from an imported folder.
                for row in existing.values():
                    path = row["source_path"]
                    if (
                        path
                        and row["deleted_at"] is None
                        and path not in collected.seen
                        and any(path.startswith(folder + os.sep) for folder in collected.folders)
                    ):
                        await store.soft_delete(conn, row, "remove")
                        report.removed += 1
                if report.created or report.updated or report.removed:
                    await store.bump_generation(conn)
            report.duration_ms = round((time.perf_counter() - started) * 1000, 1)
        for skipped in report.skipped:
            log_event(
                log, logging.WARNING, "File skipped", operation="import", path=skipped.path, reason=skipped.reason
            )
        return report

    async def _import_one(
        self,
        conn: aiosqlite.Connection,
        parsed: ingest.ParsedFile,
        row: sqlite3.Row | None,
        report: ImportReport,
    ) -> None:
        source = store.Source(parsed.path, parsed.source_hash)
        if row is None:
            await store.insert(conn, parsed.doc, source)
            report.created += 1
            return
        owner = row["source_path"]
        if owner != parsed.path and row["deleted_at"] is None and (owner is None or Path(owner).exists()):
            where = "a document saved through the API" if owner is None else owner
            report.skipped.append(
                SkippedFile(path=parsed.path, reason=f"duplicate id {parsed.doc.id!r}: already used by {where}")
            )
            return
        revived = row["deleted_at"] is not None and row["change"] == "remove"
        if owner == parsed.path and row["source_hash"] == parsed.source_hash and not revived:
            report.unchanged += 1  # an API edit of an unchanged file is kept, and so is an API delete
            return
        await store.replace(conn, row, parsed.doc, source, "update")
        report.updated += 1

    # -- results cut to a token budget (MCP tools, REST) -------------------------------------------

    async def search_within(
        self,
        query: str,
        layers: Strings | None = None,
        tags: Strings | None = None,
        limit: int = 10,
        cursor: str | None = None,
        max_tokens: int | None = None,
    ) -> SearchPage:
        """`search`, keeping as many hits as fit `max_tokens`; `next_cursor` goes on after the last hit shown."""
        ceiling = budget.check(max_tokens)
        result = await self.search(query, layers, tags, limit, cursor)
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
        again = await self.search(query, layers, tags, keep, cursor) if keep and not result.corrected_query else None
        page = page.model_copy(update={"next_cursor": again.next_cursor if again else None})
        return budget.ensure(page, ceiling)

    async def list_within(
        self,
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

    async def history_within(self, doc_id: str, max_tokens: int | None = None) -> HistoryPage:
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
        self, doc_id: str, section: str | None = None, offset: int = 0, max_tokens: int | None = None
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
            wanted = self._heading_key(section)
            match = next((part for part in parts if self._heading_key(part.heading) == wanted), None)
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
        self, layer: str | None = None, task: str | None = None, max_tokens: int | None = None
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
            candidates = await self._layer_documents(layer)
        shape = KnowledgeBundle(layer=layer, task=task, total=len(candidates), documents=[], omitted=[])
        chosen: KnowledgeDocuments = []
        left: Strings = []
        for at, (doc_id, tokens) in enumerate(candidates):
            waiting = [*left, *(c[0] for c in candidates[at + 1 :])]
            # A document larger than what is left cannot fit: skip it without reading its body.
            if chosen and tokens > ceiling - budget.cost(self._bundle(shape, chosen, waiting, ceiling)):
                left.append(doc_id)
                continue
            doc = await self.get(doc_id)
            entry = KnowledgeDocument(
                id=doc.id, title=doc.title, revision=doc.revision, tokens=doc.tokens, text=doc.body
            )
            if budget.cost(self._bundle(shape, [*chosen, entry], waiting, ceiling)) <= ceiling:
                chosen.append(entry)
            elif chosen:
                left.append(doc_id)
            else:
                return self._opening(shape, entry, waiting, ceiling)
        return budget.ensure(self._bundle(shape, chosen, left, ceiling), ceiling)

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

    @classmethod
    def _opening(
        cls, shape: KnowledgeBundle, entry: KnowledgeDocument, omitted: Strings, ceiling: int
    ) -> KnowledgeBundle:
        """The bundle holding only the beginning of `entry`, a first document larger than the whole budget."""
        body = entry.text

        def cut(length: int) -> KnowledgeBundle:
            next_offset = length if length < len(body) else None
            part = entry.model_copy(update={"text": body[:length], "next_offset": next_offset})
            return cls._bundle(shape, [part], omitted, ceiling)

        return budget.ensure(budget.fit_text(body, cut, ceiling), ceiling)

    async def _layer_documents(self, layer: str) -> IdsAndTokens:
        """(id, tokens) of every live document of a layer, by id."""
        found: IdsAndTokens = []
        cursor: str | None = None
        while True:
            page = await self.list(layer=layer, limit=MAX_LIMIT, cursor=cursor)
            found += [(item.id, item.tokens) for item in page.items]
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor

    async def context_within(
        self, task: str, max_tokens: int | None = None, layers: Strings | None = None
    ) -> ContextPack:
        """`context` as one answer within `max_tokens`: the packed text, its sources and what was left out.

        The packer budgets the text alone, while the answer also carries the source list and JSON escapes; so the
        text is packed again, smaller, until the whole answer fits (two rounds at most in practice).
        """
        ceiling = budget.check(max_tokens)
        inner = ceiling
        for _ in range(CONTEXT_FIT_ROUNDS):
            pack = self._context_pack(await self.context(task, inner, layers), ceiling)
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


@asynccontextmanager
async def open_service(settings: Settings | None = None) -> AsyncIterator[KnowledgeService]:
    """Open the knowledge base: `async with sage_server.open() as kb: await kb.search("retry")`.

    Without settings, they are loaded the way the CLI loads them (files, .env, SAGE_* variables).
    """
    service = KnowledgeService(settings or load_settings().settings)
    await service.start()
    try:
        yield service
    finally:
        await service.close()
