"""An import's writes and report: the store's bookkeeping goes into the pure reconciliation (reconcile.py), and the
plan it returns is written in the import's one transaction."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anyio

from sage_server import ingest, reconcile
from sage_server.config import Settings
from sage_server.ingest import Collected
from sage_server.logs import get_logger, log_event
from sage_server.models import ImportReport
from sage_server.resources import knowledge_dir
from sage_server.store import ImportCandidate, Source, Store, Writer

log = get_logger("core")


@dataclass(frozen=True)
class Applied:
    """What an import wrote: the plan, and the generation its commit brings (None when nothing changed)."""

    plan: reconcile.ImportPlan
    generation: int | None


# An import writing at least this many documents refreshes the query planner's statistics afterwards (Store.analyze).
BULK_DOCUMENTS = 200


def _stored(candidate: ImportCandidate, bundled_root: str) -> reconcile.Stored:
    return reconcile.Stored(
        id=candidate.ref.id,
        source_path=candidate.source.path,
        source_hash=candidate.source.hash,
        deleted=candidate.ref.deleted,
        removed_by_import=candidate.change == "remove",
        bundled=(candidate.source.path or "").startswith(bundled_root),
        source_stat=candidate.source.stat,
    )


def _bundled_root() -> str:
    return str(knowledge_dir().resolve()) + os.sep


async def collect(store: Store, paths: list[Path], settings: Settings) -> Collected:
    """Read the files under `paths` in a worker thread, passing over those whose size, times and inode are the ones
    stored when they were last read (a restart re-scanning an unchanged folder reads nothing). Outside the write
    transaction: `apply` checks again with the store as it is then."""
    async with store.read() as reader:
        stored = await reader.import_candidates([])
    bundled_root = _bundled_root()
    known = reconcile.skippable(_stored(candidate, bundled_root) for candidate in stored.values())
    return await anyio.to_thread.run_sync(ingest.collect, paths, settings, known)


async def apply(writer: Writer, collected: Collected, settings: Settings) -> Applied:
    """Reconcile the collected files with the store and write the outcome: changed files become new revisions,
    new ones are created, files gone from an imported folder are soft-deleted. Files passed over unread that turn
    out to matter (reconcile.unsure) are read first."""
    bundled_root = _bundled_root()
    while True:
        stored = await writer.import_candidates(reconcile.claimed_ids(collected.files))
        records = [_stored(candidate, bundled_root) for candidate in stored.values()]
        unread = {path: file.stat for path, file in collected.unread.items()}
        to_read = reconcile.unsure(collected.files, unread, records)
        if not to_read:
            break
        await anyio.to_thread.run_sync(ingest.read_unread, collected, to_read, settings)
    plan = reconcile.plan_import(
        collected.files,
        records,
        collected.folders,
        collected.seen,
        lambda path: Path(path).exists(),
        unread=collected.unread.keys(),
    )
    for parsed in plan.update:
        await writer.replace(stored[parsed.doc.id].ref, parsed.doc, _source(parsed), "update")
    await writer.insert_many([(p.doc, _source(p)) for p in plan.create])
    for gone in plan.remove:
        await writer.soft_delete(stored[gone.id].ref, "remove")
    if plan.restat:
        await writer.set_source_stats([(stored[doc_id].ref, stat) for doc_id, stat in plan.restat])
    generation: int | None = None
    if plan.create or plan.update or plan.remove:
        changed = [p.doc.id for p in plan.create + plan.update] + [gone.id for gone in plan.remove]
        generation = await writer.bump_generation(changed)
    return Applied(plan, generation)


def _source(parsed: ingest.ParsedFile) -> Source:
    return Source(parsed.path, parsed.source_hash, parsed.stat)


def audit_detail(collected: Collected, plan: reconcile.ImportPlan) -> dict[str, object]:
    """The counts an import's audit entry carries."""
    return {
        "created": len(plan.create),
        "updated": len(plan.update),
        "removed": len(plan.remove),
        "unchanged": plan.unchanged,
        "skipped": len(collected.skipped) + len(plan.skipped),
    }


def report(collected: Collected, plan: reconcile.ImportPlan, duration_ms: float) -> ImportReport:
    """The import's report, its skipped files logged one by one and its shadowed bundled documents once."""
    result = ImportReport(
        scanned=len(collected.seen),
        created=len(plan.create),
        updated=len(plan.update),
        unchanged=plan.unchanged,
        removed=len(plan.remove),
        skipped=collected.skipped + plan.skipped,
        shadowed=plan.shadowed,
        duration_ms=round(duration_ms, 1),
    )
    for skipped in result.skipped:
        log_event(log, logging.WARNING, "File skipped", operation="import", path=skipped.path, reason=skipped.reason)
    if result.shadowed:
        # Once per import, not per file: a user overriding bundled documents is a choice, not a fault.
        log_event(
            log,
            logging.INFO,
            "Bundled documents shadowed by the user's documents with the same ids",
            operation="import",
            ids=[s.id for s in result.shadowed],
        )
    return result
