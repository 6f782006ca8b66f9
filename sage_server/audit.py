"""The audit trail's entries: who changed what, when, from where, and how it went; authentication failures counted.

Writes record their entry in the same transaction as the change, so the trail and the knowledge base cannot
disagree; a write that fails records its failure on its own. Authentication failures arrive at request speed from
anyone, so they are counted in memory per client, reason and minute and written a few seconds later in one
transaction: a flood adds one row a minute per client and never holds the writer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio

from sage_server.auth import Caller, current_caller
from sage_server.errors import SageError
from sage_server.logs import get_logger, log_event
from sage_server.models import AuditPage
from sage_server.store import Store, Writer

log = get_logger("audit")

OK = "ok"
UNCHANGED = "unchanged"
# Distinct (client, reason, minute) counters held between flushes; past it, failures count under one client.
MAX_FAILURE_KEYS = 10_000
OVERFLOW_CLIENT = "(many clients)"


@dataclass
class Entry:
    """An audit entry being written: the operation fills in what it did as it goes."""

    operation: str
    target: str | None = None
    revision: int | None = None
    outcome: str = OK
    detail: dict[str, object] = field(default_factory=dict)

    def row(self, caller: Caller, at: datetime | None = None) -> tuple[object, ...]:
        """The row for store.insert_audit (AUDIT_COLUMNS order)."""
        when = (at or datetime.now(UTC)).isoformat(timespec="microseconds")
        detail = json.dumps(self.detail, ensure_ascii=False, default=str)
        name = caller.principal.name
        return (when, name, caller.client, self.operation, self.target, self.revision, self.outcome, 1, detail)


class AuthFailures:
    """Authentication failures counted per (minute, client, reason) until `drain` takes them."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}

    def add(self, client: str, reason: str, at: datetime | None = None) -> None:
        """Count one failure."""
        minute = (at or datetime.now(UTC)).replace(second=0, microsecond=0).isoformat(timespec="microseconds")
        key = (minute, client, reason)
        if key not in self._counts and len(self._counts) >= MAX_FAILURE_KEYS:
            key = (minute, OVERFLOW_CLIENT, reason)
        self._counts[key] = self._counts.get(key, 0) + 1

    def drain(self) -> list[tuple[str, str, str, int]]:
        """The counts so far as (minute, client, reason, count), forgetting them."""
        counts, self._counts = self._counts, {}
        return [(minute, client, reason, count) for (minute, client, reason), count in counts.items()]

    def __len__(self) -> int:
        return len(self._counts)


class AuditTrail:
    """The audit trail of one database: entries written with the changes they describe, failures on their own,
    authentication failures counted and flushed every few seconds, entries older than the retention pruned."""

    FLUSH_SECONDS = 5.0
    PRUNE_SECONDS = 3600.0

    def __init__(self, store: Store, retention_days: int) -> None:
        self.store = store
        self.retention_days = retention_days
        self.failures = AuthFailures()

    async def record(self, writer: Writer, entry: Entry) -> None:
        """Write `entry` for the current caller inside the caller's transaction."""
        await writer.insert_audit([entry.row(current_caller())])

    async def record_failure(self, entry: Entry) -> None:
        """Write the entry of a write that failed (its own transaction was rolled back) in a transaction of its own.
        Best effort: a database that cannot take it has already failed the write, which is the error to report."""
        try:
            async with self.store.transaction() as writer:
                await self.record(writer, entry)
        except SageError as exc:
            log_event(log, logging.ERROR, "Audit entry lost", operation=entry.operation, error=str(exc))

    async def flush(self) -> None:
        """Write the authentication failures counted so far."""
        counted = self.failures.drain()
        if counted:
            async with self.store.transaction() as writer:
                await writer.add_auth_failures(counted)

    async def prune(self) -> int:
        """Remove entries older than the retention; how many went."""
        cutoff = (datetime.now(UTC) - timedelta(days=self.retention_days)).isoformat(timespec="microseconds")
        async with self.store.transaction() as writer:
            return await writer.prune_audit(cutoff)

    async def run(self) -> None:
        """Flush every few seconds and prune every hour until cancelled (a last flush on the way out)."""
        pruned_at = -self.PRUNE_SECONDS
        try:
            while True:
                await anyio.sleep(self.FLUSH_SECONDS)
                try:
                    await self.flush()
                    if time.monotonic() - pruned_at >= self.PRUNE_SECONDS:
                        pruned_at = time.monotonic()
                        await self.prune()
                except SageError as exc:
                    log_event(log, logging.ERROR, "Audit flush failed", operation="audit", error=str(exc))
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.flush()
                except SageError as exc:
                    log_event(log, logging.ERROR, "Audit flush failed", operation="audit", error=str(exc))

    async def entries(self, since: datetime | None, after: int, limit: int) -> AuditPage:
        """Entries at or after `since` and after entry number `after`, oldest first, `limit` at most."""
        start = (since or datetime.min.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")
        async with self.store.read() as reader:
            rows = await reader.audit_entries(start, after, limit + 1)
        entries = rows[:limit]
        return AuditPage(entries=entries, next_after=entries[-1].seq if len(rows) > limit else None)
