"""KnowledgeService: the one object that owns the knowledge base. Every face of SAGE is an adapter over it."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError

from sage_server import audit, backup, importing, retrieval, search, store
from sage_server.auth import ADMIN, READ, WRITE, Principal, current_caller
from sage_server.bounded import BoundedViews
from sage_server.cache import Memo, TieredCache
from sage_server.changes import ChangeFeed
from sage_server.config import Settings, load_settings
from sage_server.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    MigrationError,
    NotFound,
    SageError,
    StaleRevision,
    Unavailable,
)
from sage_server.generation import GenerationWatcher
from sage_server.keys import KeyStore, StoredKeys
from sage_server.logs import get_logger, log_event
from sage_server.metrics import Metrics
from sage_server.models import (
    ApiKey,
    AuditPage,
    ComponentStatus,
    ContextResult,
    CreatedKey,
    Document,
    DocumentIn,
    DocumentList,
    Health,
    HealthStatus,
    History,
    ImportReport,
    Info,
    KeyList,
    SearchResult,
)
from sage_server.resources import knowledge_dir
from sage_server.store import Store, Writer
from sage_server.timeouts import Deadlines, Level
from sage_server.version import __version__

log = get_logger("core")
MAX_LIMIT = 100
GENERATION_POLL_SECONDS = 1.0
M = TypeVar("M", bound=BaseModel)
Compute = Callable[[], Awaitable[M]]
# The class has a method named `list`, which would shadow the builtin in its annotations.
Strings = list[str]
PathList = list[Path]


@dataclass(frozen=True)
class Saved:
    """What a save did: `created` the document, stored an `updated` revision, or nothing (`unchanged`)."""

    document: Document
    outcome: Literal["created", "updated", "unchanged"]


class KnowledgeService(BoundedViews):
    """Get, list, search, pack context, save, delete, restore and import knowledge. Open with `sage_server.open`."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._use(store.open_store(settings))
        self.deadlines = Deadlines.from_settings(settings)
        self.cache = TieredCache(settings, observer=self.metrics)
        # Searches and context packings ranking at once: one reader fewer than the store has, so that gets and /health
        # always find one free instead of queueing behind rankings that hold theirs (and /health reporting the
        # knowledge unhealthy when its read timed out).
        self.ranking = anyio.Semaphore(max(1, store.reader_count(settings) - 1))
        # What context tasks gathered (ranked candidate sections), by task: packed again at other budgets for free.
        self.gathered: Memo[retrieval.Gathered] = Memo(
            max_entries=settings.context_memo_entries, max_bytes=settings.context_memo_bytes, size=lambda g: g.nbytes
        )
        self.generation = 0  # of the data this instance last saw; cache keys carry it
        self.database_id = ""  # the database's identity, which cache keys carry too (set when it is opened)
        self.created_at = datetime.now(UTC)  # when the database was created (read when it is opened)
        self.backup_error: str | None = None  # a backup failure this process saw but could not record
        self.vocabulary = search.Vocabulary()  # what searches learned of the index's words, at that generation
        self.started = time.monotonic()
        self.last_import: ImportReport | None = None
        self.ready = False  # True once the configured folders have been imported
        self.fallback_reason: str | None = None  # set while serving the bundled core layer without the database
        self._watcher: GenerationWatcher | None = None
        self.changes = ChangeFeed(self._read_changes)  # what each write changed, for live MCP resources
        self._resources = AsyncExitStack()
        # The stored keys as the front door's credential source; it reads whichever database is served.
        self.key_source = StoredKeys(lambda: self.keys.load())

    def _use(self, db: Store) -> None:
        """Serve `db`: the audit trail and the keys live in it too."""
        self.store = db
        self.audit = audit.AuditTrail(db, self.settings.audit_retention_days)
        self.keys = KeyStore(db, self.audit)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, import_now: bool = True, fallback: bool = False) -> None:
        """Open the database, migrate it, start the cache tiers, and (unless `import_now` is False) import.

        A server passes `import_now=False` and runs `import_configured()` in the background, so it answers probes
        at once and reports ready when the import is done. With `fallback`, a database that cannot be opened is
        replaced by a temporary one holding the bundled core layer, served read-only and reported degraded.
        """
        try:
            await self._open_database()
        except (Unavailable, MigrationError) as exc:
            if not fallback:
                raise
            self.fallback_reason = f"{exc.message}; serving the bundled core layer read-only"
            log_event(
                log,
                logging.ERROR,
                "Database unavailable, using the embedded fallback",
                operation="start",
                error=exc.message,
            )
            folder = Path(self._resources.enter_context(tempfile.TemporaryDirectory(prefix="sage-fallback-")))
            self._use(store.sqlite_store(folder / "fallback.db"))
            await self._open_database()
        await self._resources.enter_async_context(self.cache)
        if self.settings.redis_url and self.settings.cache_redis:
            self._watcher = GenerationWatcher(self.settings, self.database_id, self._saw_generation)
            await self._resources.enter_async_context(self._watcher)
        tasks = await self._resources.enter_async_context(anyio.create_task_group())
        self._resources.callback(tasks.cancel_scope.cancel)  # runs first on close: stop the poller
        tasks.start_soon(self._poll_generation)
        tasks.start_soon(self.store.watch, self._saw_generation)  # pushed by the database where it can
        tasks.start_soon(self.changes.run, self.generation)
        tasks.start_soon(self.audit.run)
        if import_now:
            await self.import_configured()

    async def _open_database(self) -> None:
        applied = await self.store.open()
        try:
            async with self.store.read() as reader:
                self.generation = await reader.generation()
                self.database_id, self.created_at = await reader.identity()
        except BaseException:
            await self.store.close()
            raise
        if applied:
            log_event(log, logging.INFO, "Database migrated", operation="migrate", applied=applied)

    async def import_configured(self) -> None:
        """Import the bundled knowledge and SAGE_KNOWLEDGE_DIRS (if import_on_start), then mark the service ready."""
        if self.fallback_reason:
            self.last_import = await self._import([knowledge_dir() / self.settings.layers[0]], bootstrap=True)
        elif self.settings.import_on_start and self.configured_folders():
            self.last_import = await self.import_paths(self.configured_folders())
        self.ready = True

    async def close(self) -> None:
        """Stop the background work, close the cache tiers and the database cleanly."""
        try:
            await self._resources.aclose()
        finally:
            await self.store.close()

    def _saw_generation(self, generation: int) -> None:
        """Another instance wrote: keys with an older generation are no longer read."""
        self.generation = max(self.generation, generation)
        self.changes.advance(generation)

    async def _read_changes(self, after: int, limit: int) -> store.ChangeLog:
        async with self.store.read() as reader:
            return await reader.changes_after(after, limit)

    async def _poll_generation(self) -> None:
        # Instances sharing the database file without Redis learn of each other's writes here, within a second.
        while True:
            await anyio.sleep(GENERATION_POLL_SECONDS)
            try:
                async with self.store.read() as reader:
                    self._saw_generation(await reader.generation())
            except SageError as exc:
                log_event(log, logging.WARNING, "Generation poll failed", operation="poll", error=str(exc))

    async def _committed(self, generation: int) -> None:
        """After a write transaction: read with the new generation from now on, and tell the other instances."""
        self._saw_generation(generation)
        if self._watcher is not None:
            await self._watcher.publish(generation)

    async def _cached(self, operation: str, args: tuple[object, ...], model: type[M], compute: Compute[M]) -> M:
        """Read through the cache tiers; the key carries the generation, so a write makes older entries unreachable."""
        digest = hashlib.sha256(json.dumps(args, default=str).encode()).hexdigest()[:32]
        # The database's identity keeps databases sharing a cache folder or a Redis apart, and a restored database
        # (which gets a new identity) from the entries of the one it replaced; the generation keeps writes apart.
        key = f"{self.database_id}:g{self.generation}:{operation}:{digest}"
        raw = await self.cache.get(key)
        if raw is not None:
            try:
                return model.model_validate_json(raw)
            except ValidationError:
                pass  # written by another version of SAGE: recompute
        value = await compute()
        if not getattr(value, "partial", False):
            await self.cache.set(key, value.model_dump_json().encode())
        return value

    def configured_folders(self) -> PathList:
        """The bundled knowledge (unless turned off) and SAGE_KNOWLEDGE_DIRS."""
        folders = [knowledge_dir()] if self.settings.bundled_knowledge else []
        return folders + list(self.settings.knowledge_dirs)

    @contextmanager
    def _operation(
        self, name: str, deadline: Level | None = None, level: int = logging.DEBUG, **context: object
    ) -> Iterator[None]:
        """Time, count and log one operation, and hold it to its deadline level."""
        started = time.perf_counter()
        try:
            with self.deadlines.limit(deadline, name) if deadline else nullcontext():
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

    def _writable(self) -> None:
        if self.fallback_reason:
            raise Unavailable(f"read-only: {self.fallback_reason}")

    @staticmethod
    def _require(scope: str) -> None:
        """Refuse the operation unless the caller's key holds `scope` (read, write or admin): the one check for every
        face (REST, MCP tools, resources and prompts alike)."""
        principal = current_caller().principal
        if not principal.allows(scope):
            held = ", ".join(sorted(principal.scopes)) or "none"
            raise Forbidden(
                f"{principal.name!r} may not do this: it needs the {scope} scope (it holds: {held})",
                scope=scope,
                key=principal.name,
                headers={"WWW-Authenticate": f'Bearer realm="sage", error="insufficient_scope", scope="{scope}"'},
            )

    @asynccontextmanager
    async def _write(self, entry: audit.Entry, scope: str = WRITE, *, bootstrap: bool = False) -> AsyncIterator[Writer]:
        """A write transaction for a caller holding `scope`. It leaves its audit entry: in the same transaction when
        it commits, on its own (with the error's code as the outcome) when it fails. Only the `bootstrap` import of
        the embedded fallback writes to the fallback's temporary database."""
        try:
            self._require(scope)
            if not bootstrap:
                self._writable()
            async with self.store.transaction() as writer:
                yield writer
                await self.audit.record(writer, entry)
        except SageError as exc:
            entry.outcome = exc.code
            await self.audit.record_failure(entry)
            raise

    # -- validation ------------------------------------------------------------------------------

    def _check_filters(self, values: Strings | None, field: str) -> None:
        # Each tag filter is a clause of the query: thousands exhaust SQLite ("Expression tree is too large").
        if values and len(values) > self.settings.max_filters:
            cap = self.settings.max_filters
            raise InvalidInput(f"at most {cap} {field} filters are allowed, got {len(values)}", field=field)

    def _check_layers(self, layers: Strings | None) -> Strings | None:
        self._check_filters(layers, "layer")
        for layer in layers or []:
            if layer not in self.settings.layers:
                raise InvalidInput(f"unknown layer {layer!r} (known: {', '.join(self.settings.layers)})", field="layer")
        return layers or None

    @staticmethod
    def _check_limit(limit: int) -> None:
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}, got {limit}", field="limit")

    def _where(self) -> retrieval.Where:
        return retrieval.Where(
            self.store, self.ranking, self.deadlines, self.vocabulary, (self.database_id, self.generation)
        )

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, doc_id: str) -> Document:
        """One live document by id; NotFound (with close ids suggested) when there is none."""
        with self._operation("get", "read", id=doc_id):
            self._require(READ)
            return await self._cached("get", (doc_id,), Document, lambda: self._get(doc_id))

    async def _get(self, doc_id: str) -> Document:
        async with self.store.read() as reader:
            found = await reader.document(doc_id)
            if found is None or found.ref.deleted:
                # A document merged into another lives on as an alias of the one that absorbed it.
                found = await reader.document_by_alias(doc_id) or found
        if found is None:
            raise await retrieval.not_found(self.store, doc_id)
        if found.ref.deleted:
            raise NotFound(
                f"document {doc_id!r} was deleted at revision {found.ref.revision}; restore an earlier revision "
                "to bring it back",
                id=doc_id,
                deleted=True,
                suggestions=[],
            )
        return found.document

    async def list(
        self, layer: str | None = None, tags: Strings | None = None, limit: int = 50, cursor: str | None = None
    ) -> DocumentList:
        """Live documents ordered by layer and id, a page at a time."""
        with self._operation("list", "read", layer=layer):
            self._require(READ)
            self._check_limit(limit)
            self._check_filters(tags, "tag")
            layers = self._check_layers([layer] if layer else None)
            args = (layers, tags, limit, cursor)
            return await self._cached("list", args, DocumentList, lambda: self._list(layers, tags, limit, cursor))

    async def _list(self, layers: Strings | None, tags: Strings | None, limit: int, cursor: str | None) -> DocumentList:
        key = search.query_key("list", layers, tags)
        offset = search.decode_cursor(cursor, key)
        async with self.store.read() as reader:
            page = await reader.list_documents(layers, tags, limit, offset)
        return DocumentList(
            items=page.items[:limit],
            total=page.total,
            next_cursor=search.encode_cursor(offset + limit, key) if len(page.items) > limit else None,
        )

    async def search(
        self,
        query: str,
        layers: Strings | None = None,
        tags: Strings | None = None,
        limit: int = 10,
        cursor: str | None = None,
        explain: bool = False,
    ) -> SearchResult:
        """Full-text search: BM25 candidates re-scored by coverage and proximity (see search.py); any text is a
        valid query. Misspelt words are corrected. With `explain`, every hit says why it ranked where it did.

        Past the search deadline, hits already ranked come back with their summaries as snippets, marked partial;
        a search that could not rank in time is a Timeout.
        """
        with self._operation("search", query=query[:200]):
            self._require(READ)
            if not query.strip():
                raise InvalidInput("query must not be empty", field="query")
            self._check_limit(limit)
            self._check_filters(tags, "tag")
            layers = self._check_layers(layers)
            args = (query, layers, tags, limit, cursor, explain)
            return await self._cached(
                "search",
                args,
                SearchResult,
                lambda: retrieval.run_search(self._where(), query, layers, tags, limit, cursor, explain),
            )

    async def context(self, task: str, max_tokens: int | None = None, layers: Strings | None = None) -> ContextResult:
        """What to read before doing `task`: core essentials, then the best sections, within `max_tokens`."""
        with self._operation("context", task=task[:200]):
            self._require(READ)
            if not task.strip():
                raise InvalidInput("task must not be empty", field="task")
            budget = max_tokens or self.settings.context_max_tokens
            if not 200 <= budget <= 100_000:
                raise InvalidInput(f"max_tokens must be between 200 and 100000, got {budget}", field="max_tokens")
            layers = self._check_layers(layers)
            args = (task, budget, layers)
            return await self._cached(
                "context",
                args,
                ContextResult,
                lambda: self._context(task, budget, layers),
            )

    async def _context(self, task: str, budget: int, layers: Strings | None) -> ContextResult:
        """Pack `task` into `budget`, ranking its candidates only the first time: an MCP answer is packed again at
        smaller budgets until it fits (see bounded.context_within), and those rounds reuse what was gathered."""
        key = f"{self.database_id}:g{self.generation}:{json.dumps([task, layers])}"
        gathered = self.gathered.get(key)
        if gathered is None:
            gathered = await retrieval.gather_context(self._where(), self.settings.layers[0], task, layers)
            if not gathered.partial:
                self.gathered.set(key, gathered)
        return retrieval.pack_context(gathered, task, budget)

    async def history(self, doc_id: str) -> History:
        """Every revision of a document (live or deleted), newest first."""
        with self._operation("history", "read", id=doc_id):
            self._require(READ)
            async with self.store.read() as reader:
                found = await reader.document(doc_id) or await reader.document_by_alias(doc_id)
                if found is None:
                    raise await retrieval.not_found(self.store, doc_id)
                revisions = await reader.revisions(found)
            return History(id=found.ref.id, deleted=found.ref.deleted, revisions=revisions)

    async def info(self) -> Info:
        """Counts by layer, totals, the index generation and uptime."""
        with self._operation("info", "read"):
            self._require(READ)
            cached = await self._cached("info", (), Info, self._info)
            return cached.model_copy(update={"uptime_seconds": round(time.monotonic() - self.started, 3)})

    async def _info(self) -> Info:
        async with self.store.read() as reader:
            totals = await reader.layer_totals()
            generation = await reader.generation()
        return Info(
            version=__version__,
            layers=dict.fromkeys(self.settings.layers, 0) | {t.layer: t.documents for t in totals},
            documents=sum(t.documents for t in totals),
            tokens=sum(t.tokens for t in totals),
            generation=generation,
            uptime_seconds=0.0,
            db_path=self.store.location,
            backend=self.store.backend,
        )

    async def health(self) -> Health:
        """The spec's health document: knowledge is degraded when empty or on the embedded fallback, unhealthy
        when unreadable; the cache is degraded while Redis is down (its tier is skipped, nothing fails)."""
        knowledge: HealthStatus = "degraded" if self.fallback_reason else "healthy"
        try:
            with self.deadlines.limit("read", "health"):
                async with self.store.read() as reader:
                    live = await reader.has_live_documents()
            if not live:
                knowledge = "degraded"
        except SageError as exc:
            log_event(log, logging.ERROR, "Health check failed", operation="health", error=str(exc))
            knowledge = "unhealthy"
        components: dict[str, ComponentStatus] = {
            "core": "healthy",
            "cache": await self.cache.check(),  # pings Redis (at most once a second): seen without traffic
            "knowledge": knowledge,
            "backup": self._backup_health(),
        }
        worst = max(components.values(), key=["disabled", "healthy", "degraded", "unhealthy"].index)
        status: HealthStatus = "healthy" if worst == "disabled" else worst
        return Health(status=status, version=__version__, backend=self.store.backend, components=components)

    def _backup_health(self) -> ComponentStatus:
        if self.fallback_reason:
            return "disabled"  # a temporary copy of the bundled core has nothing of the user's to back up
        interval = self.settings.backup_interval_hours
        return backup.health_status(self.settings.backup_dir, interval, self.created_at, self.backup_error)

    async def scrape_metrics(self) -> bytes:
        """The Prometheus exposition, with the gauges that are read at scrape time brought up to date."""
        self.metrics.set_documents((await self.info()).layers)
        state = backup.read_state(self.settings.backup_dir)
        self.metrics.set_backup_success(state.last_success.timestamp() if state.last_success else None)
        return self.metrics.render()

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, doc: DocumentIn, expected_revision: int | None = None) -> Document:
        """Create or update a document. With `expected_revision` (0: must not exist yet), a concurrent
        change is a Conflict instead of a silent overwrite. Saving identical content stores nothing."""
        return (await self.save_outcome(doc, expected_revision)).document

    async def save_outcome(self, doc: DocumentIn, expected_revision: int | None = None) -> Saved:
        """`save`, saying what it did: created the document, stored a new revision, or nothing (identical content;
        a PUT then answers 200, not 201, whatever the revision)."""
        with self._operation("save", "complex", logging.INFO, id=doc.id, audit=True):
            self._check_layers([doc.layer])
            entry = audit.Entry("save", doc.id)
            async with self._write(entry) as writer:
                found = await writer.document(doc.id)
                current = 0 if found is None else found.ref.revision
                if expected_revision is not None and expected_revision != current:
                    state = "does not exist" if found is None else f"is at revision {current}"
                    raise StaleRevision(
                        f"document {doc.id!r} {state}, not revision {expected_revision}; re-read it and retry",
                        id=doc.id,
                        current_revision=current,
                    )
                unchanged = found is not None and found.document.content_hash == store.content_hash(doc)
                if found is not None and not found.ref.deleted and unchanged:
                    entry.revision, entry.outcome = current, audit.UNCHANGED
                    return Saved(found.document, "unchanged")
                if found is None:
                    await writer.insert_many([(doc, store.Source())])
                else:
                    await writer.replace(found.ref, doc, found.source, "update")
                generation = await writer.bump_generation([doc.id])
                saved = await writer.document(doc.id)
                assert saved is not None
                entry.revision = saved.ref.revision
            await self._committed(generation)
            return Saved(saved.document, "created" if found is None else "updated")

    async def delete(self, doc_id: str, expected_revision: int | None = None) -> Document:
        """Soft-delete a document as a new revision; `restore` brings any revision back."""
        with self._operation("delete", "complex", logging.INFO, id=doc_id, audit=True):
            entry = audit.Entry("delete", doc_id)
            async with self._write(entry) as writer:
                found = await writer.document(doc_id)
                if found is None or found.ref.deleted:
                    raise await retrieval.not_found(self.store, doc_id)
                if expected_revision is not None and expected_revision != found.ref.revision:
                    raise StaleRevision(
                        f"document {doc_id!r} is at revision {found.ref.revision}, not {expected_revision}",
                        id=doc_id,
                        current_revision=found.ref.revision,
                    )
                await writer.soft_delete(found.ref, "delete")
                generation = await writer.bump_generation([doc_id])
                deleted = await writer.document(doc_id)
                assert deleted is not None
                entry.revision = deleted.ref.revision
            await self._committed(generation)
            return deleted.document

    async def restore(self, doc_id: str, revision: int) -> Document:
        """Make an earlier revision current again (as a new revision); also undeletes."""
        with self._operation("restore", "complex", logging.INFO, id=doc_id, revision=revision, audit=True):
            entry = audit.Entry("restore", doc_id, detail={"from_revision": revision})
            async with self._write(entry) as writer:
                found = await writer.document(doc_id)
                if found is None:
                    raise await retrieval.not_found(self.store, doc_id)
                content = await writer.revision_content(found, revision)
                if content is None:
                    raise NotFound(
                        f"document {doc_id!r} has no revision {revision} (latest is {found.ref.revision})",
                        id=doc_id,
                        revision=revision,
                        suggestions=[],
                    )
                self._check_layers([content.layer])
                await writer.replace(found.ref, content, found.source, "restore")
                generation = await writer.bump_generation([doc_id])
                restored = await writer.document(doc_id)
                assert restored is not None
                entry.revision = restored.ref.revision
            await self._committed(generation)
            return restored.document

    async def purge(self, doc_id: str) -> None:
        """Remove a deleted document and its history for good (admin scope). Live documents must be deleted first."""
        with self._operation("purge", "complex", logging.INFO, id=doc_id, audit=True):
            entry = audit.Entry("purge", doc_id)
            async with self._write(entry, ADMIN) as writer:
                found = await writer.document(doc_id)
                if found is None:
                    raise await retrieval.not_found(self.store, doc_id)
                if not found.ref.deleted:
                    raise Conflict(f"document {doc_id!r} is live; delete it before purging", id=doc_id)
                entry.revision = found.ref.revision
                await writer.purge(found.ref)
                generation = await writer.bump_generation([])  # it was deleted already: nothing served changed
            await self._committed(generation)

    async def import_paths(self, paths: PathList) -> ImportReport:
        """Import Markdown files and folders in one transaction, incrementally by file hash.

        Changed files become new revisions; files gone from an imported folder are soft-deleted; bad files
        are reported in `skipped` and change nothing.
        """
        return await self._import(paths)

    async def _import(self, paths: PathList, bootstrap: bool = False) -> ImportReport:
        started = time.perf_counter()
        with self._operation("import", None, logging.INFO, paths=[str(p) for p in paths], audit=True):
            self._require(WRITE)
            entry = audit.Entry("import", ", ".join(str(p) for p in paths)[:1000])
            async with self._write(entry, bootstrap=bootstrap) as writer:
                collected, applied = await importing.run(writer, list(paths), self.settings)
                entry.detail = importing.audit_detail(collected, applied.plan)
            if applied.generation is not None:
                await self._committed(applied.generation)
            if len(applied.plan.create) + len(applied.plan.update) >= importing.BULK_DOCUMENTS:
                await self.store.analyze()
        return importing.report(collected, applied.plan, (time.perf_counter() - started) * 1000)

    # -- keys, the audit trail, and what the front door tells -------------------------------------------------------

    async def create_key(self, name: str, scope: str, expires_in_days: float | None = None) -> CreatedKey:
        """Make a named key with a scope (read, write or admin); its secret is in the answer only (admin scope)."""
        with self._operation("key_create", "complex", logging.INFO, target=name, scope=scope, audit=True):
            self._require(ADMIN)
            self._writable()
            created = await self.keys.create(name, scope, expires_in_days)
            self.key_source.forget()
            return created

    async def list_keys(self) -> KeyList:
        """Every key with its scope and state, never a secret (admin scope)."""
        with self._operation("key_list", "read"):
            self._require(ADMIN)
            return KeyList(keys=await self.keys.list_keys())

    async def revoke_key(self, name: str) -> ApiKey:
        """Revoke a key; every instance sharing the database refuses it within a second (admin scope)."""
        with self._operation("key_revoke", "complex", logging.INFO, target=name, audit=True):
            self._require(ADMIN)
            self._writable()
            revoked = await self.keys.revoke(name)
            self.key_source.forget()
            return revoked

    async def audit_trail(self, since: datetime | None = None, after: int = 0, limit: int = 100) -> AuditPage:
        """Audit entries from `since` (and after entry `after`), oldest first (admin scope)."""
        with self._operation("audit", "read"):
            self._require(ADMIN)
            if not 1 <= limit <= 1000:
                raise InvalidInput(f"limit must be between 1 and 1000, got {limit}", field="limit")
            if after < 0:
                raise InvalidInput("after must be an entry number (0 or more)", field="after")
            return await self.audit.entries(since, after, limit)

    def admitted(self, principal: Principal) -> None:
        """The front door let a request in: count it under its key's name (anonymous ones under one label)."""
        self.metrics.request_by_key(principal.name)

    def refused(self, client: str, reason: str) -> None:
        """The front door refused a request's credential: count it, and note it for the audit trail."""
        self.metrics.auth_failure(reason)
        self.audit.failures.add(client, reason)


@asynccontextmanager
async def open_service(settings: Settings | None = None, fallback: bool = False) -> AsyncIterator[KnowledgeService]:
    """Open the knowledge base: `async with sage_server.open() as kb: await kb.search("retry")`.

    Without settings, they are loaded the way the CLI loads them (files, .env, SAGE_* variables).
    """
    service = KnowledgeService(settings or load_settings().settings)
    try:
        await service.start(fallback=fallback)
    except BaseException:
        await service.close()  # what it opened before failing (an import failing at start left the database open)
        raise
    try:
        yield service
    finally:
        await service.close()
