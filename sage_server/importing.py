"""An import's writes and report: the store's bookkeeping goes into the pure reconciliation (reconcile.py), and the
plan it returns is written in the import's one transaction."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from sage_server import ingest, reconcile
from sage_server.config import Settings
from sage_server.ingest import Collected
from sage_server.logs import get_logger, log_event
from sage_server.models import DocumentIn, ImportReport, SkippedFile
from sage_server.resources import knowledge_dir
from sage_server.store import ImportCandidate, Source, Writer

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
        id=candidate.id,
        source_path=candidate.source_path,
        source_hash=candidate.source_hash,
        deleted=candidate.deleted,
        removed_by_import=candidate.change == "remove",
        bundled=(candidate.source_path or "").startswith(bundled_root),
        source_stat=candidate.source_stat,
    )


def _bundled_root() -> str:
    return str(knowledge_dir().resolve()) + os.sep


class _Early:
    """New files written while the rest are still being read, so the database indexes them while Python parses the
    next ones: a file no stored document came from, whose ids (its own and the hashed form, see reconcile) no stored
    document and no file read before it holds, and without aliases (which go to the first document claiming them).
    Whether that was right is known once every file is read: `apply` keeps them when the plan creates each of them
    as it was written, and purges them otherwise, then writes the plan as usual (one transaction: nobody sees them).

    The reader keeps every file it hands over light (ingest.collect); the documents of the files not written here
    are kept in `held` for the plan, and those written are let go (read again if the plan needs one)."""

    def __init__(self, writer: Writer, stored_paths: set[str]) -> None:
        self.writer = writer
        self.stored_paths = stored_paths
        self.claimed: set[str] = set()
        self.written: list[tuple[str, str]] = []  # (path, id) of each file written
        self.held: dict[str, DocumentIn] = {}  # path -> its document as read

    async def write(self, files: list[ingest.ParsedFile]) -> None:
        taken = await self.writer.taken_ids(reconcile.claimed_ids(files))
        fresh = []
        for parsed in files:
            ids = reconcile.claimed_ids([parsed])
            free = self.claimed.isdisjoint(ids) and taken.isdisjoint(ids)
            if free and parsed.path not in self.stored_paths and not parsed.doc.aliases:
                fresh.append(parsed)
            self.claimed.update(ids)
        await self.writer.insert_many([(p.doc, _source(p)) for p in fresh])
        self.written += [(p.path, p.doc.id) for p in fresh]
        written = {id(p) for p in fresh}
        self.held |= {p.path: p.doc for p in files if id(p) not in written}


async def run(writer: Writer, paths: list[Path], settings: Settings) -> tuple[Collected, Applied]:
    """Import `paths` in the write transaction of `writer`: a worker thread reads the files (passing over those whose
    size, times and inode are the ones stored when they were last read: a restart re-scanning an unchanged folder
    reads nothing), new files are written as they come (_Early), and then the rest of the plan."""
    stored = await writer.import_candidates([])
    bundled_root = _bundled_root()
    records = [_stored(candidate, bundled_root) for candidate in stored.values()]
    known = reconcile.skippable(records)
    early = _Early(writer, {path for record in records if (path := record.source_path)})
    send, receive = anyio.create_memory_object_stream[list[ingest.ParsedFile]](2)
    collected: list[Collected] = []

    def read() -> None:
        try:

            def handed(files: list[ingest.ParsedFile]) -> None:
                anyio.from_thread.run(send.send, files)  # waits while two chunks are waiting to be written

            collected.append(ingest.collect(paths, settings, known, handed))
        finally:
            anyio.from_thread.run_sync(send.close)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(anyio.to_thread.run_sync, read)
            async with receive:
                async for files in receive:
                    await early.write(files)
    except ExceptionGroup as group:
        # One cause: the other side only stopped on it (the reader finds its stream closed when a write failed).
        causes = [exc for exc in group.exceptions if not isinstance(exc, anyio.BrokenResourceError)]
        raise (causes or list(group.exceptions))[0] from None
    # Nothing read, nothing written: the store is as read above (a re-scan of unchanged folders needs no second look).
    survey = None if collected[0].files else (stored, records)
    return collected[0], await apply(writer, collected[0], settings, early.written, survey, early.held)


async def apply(
    writer: Writer,
    collected: Collected,
    settings: Settings,
    early: list[tuple[str, str]] | None = None,
    survey: tuple[dict[str, ImportCandidate], list[reconcile.Stored]] | None = None,
    held: dict[str, DocumentIn] | None = None,
) -> Applied:
    """Reconcile the collected files with the store and write the outcome: changed files become new revisions,
    new ones are created, files gone from an imported folder are soft-deleted. Files passed over unread that turn
    out to matter (reconcile.unsure) are read first. `early`: (path, id) of the files _Early wrote, and so left out of
    the store as it was before (their ids were free then). `survey`: import_candidates([]) and its records, when
    nothing was written since and no file read (no id to look up besides the files' own). `held`: the documents of
    files collected light (path -> document as read); a light file not in it is read again."""
    early = early or []
    written = {doc_id for _, doc_id in early}
    bundled_root = _bundled_root()
    if survey is not None:  # the files were passed over on this very survey, and none was read to contest their ids
        stored, records = survey
    while survey is None:
        stored = await writer.import_candidates(reconcile.claimed_ids(collected.files))
        records = [_stored(c, bundled_root) for doc_id, c in stored.items() if doc_id not in written]
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
    creates = plan.create
    if early:
        # The plan's files are the collected ones, or copies under another id: a file is known by path and id.
        planned = {(parsed.path, parsed.doc.id) for parsed in plan.create}
        done = set(early)
        if planned >= done:
            creates = [parsed for parsed in plan.create if (parsed.path, parsed.doc.id) not in done]
        else:  # a file read later took an id one of them was written with, or another rule says otherwise
            for _, doc_id in early:
                await writer.purge(stored[doc_id].ref)
    plan.update = await _whole(plan.update, held or {}, plan, settings)
    whole = await _whole(creates, held or {}, plan, settings)
    if len(whole) < len(creates):  # changed since it was read: reported skipped instead
        moved_on = {parsed.path for parsed in creates} - {parsed.path for parsed in whole}
        plan.create = [parsed for parsed in plan.create if parsed.path not in moved_on]
    creates = whole
    for parsed in plan.update:
        await writer.replace(stored[parsed.doc.id].ref, parsed.doc, _source(parsed), "update")
    await writer.insert_many([(p.doc, _source(p)) for p in creates])
    for gone in plan.remove:
        await writer.soft_delete(stored[gone.id].ref, "remove")
    if plan.restat:
        await writer.set_source_stats([(stored[doc_id].ref, stat) for doc_id, stat in plan.restat])
    generation: int | None = None
    if plan.create or plan.update or plan.remove:
        changed = [p.doc.id for p in plan.create + plan.update] + [gone.id for gone in plan.remove]
        generation = await writer.bump_generation(changed)
    return Applied(plan, generation)


async def _whole(
    files: list[ingest.ParsedFile], held: dict[str, DocumentIn], plan: reconcile.ImportPlan, settings: Settings
) -> list[ingest.ParsedFile]:
    """`files` to write, each whole: a light one gets its document from `held` or, in the rare case it was written
    early and the plan writes it again (under another id), from its file again (off the event loop). One that
    changed since it was read is left out and reported skipped (nothing stored is touched for it)."""
    whole = [
        replace(p, doc=held[p.path].model_copy(update={"id": p.doc.id}), light=False)
        if p.light and p.path in held
        else p
        for p in files
    ]
    again = [parsed for parsed in whole if parsed.light]
    if not again:
        return whole

    def read() -> dict[str, ingest.ParsedFile]:
        found = {}
        for parsed in again:
            try:
                found[parsed.path] = ingest.read_again(parsed, settings)
            except ingest.SkipFile as exc:
                plan.skipped.append(SkippedFile(path=parsed.path, reason=str(exc)))
        return found

    found = await anyio.to_thread.run_sync(read)
    return [found.get(parsed.path, parsed) for parsed in whole if not parsed.light or parsed.path in found]


def _source(parsed: ingest.ParsedFile) -> Source:
    # Every write of a file takes its source from here: a light file, whose document is a stand-in, never gets by.
    assert not parsed.light, f"{parsed.path}: a light file reached a write"
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
