"""What each write changed, told to whoever watches the knowledge base (live MCP resources), for writes made by this
instance and by every other instance sharing the database.

Every write records the ids it changed in the database's change log, in the transaction that bumps the generation
(store.bump_generation). Whenever the service sees the generation move (its own commit, another instance's write
announced over Redis, or its poll of the database), the feed reads the log from the last generation it told its
listeners about and tells them what changed. The log is the one source for local and remote writes alike, so a
listener hears the same thing on every instance.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from sage_server import store
from sage_server.errors import SageError
from sage_server.logs import get_logger, log_event

log = get_logger("changes")

MAX_ROWS = 5000  # read at once; more is reported as `everything`, which is what so many changes amount to
LISTENER_SECONDS = 2.0  # the longest one listener may take over one change before it is skipped


@dataclass(frozen=True)
class Change:
    """What changed between two generations: documents as (id, layer) pairs, a layer being one the document is in
    or has just left; whether any document's listing entry changed (created, deleted, restored, retitled, moved);
    and `everything` when the feed cannot say exactly (more changes than it reads at once, a reader that fell too
    far behind, or a log it could not read), in which case listeners treat every resource as changed."""

    generation: int
    documents: frozenset[tuple[str, str]] = frozenset()
    listing: bool = False
    everything: bool = False

    @property
    def layers(self) -> frozenset[str]:
        """The layers whose documents changed."""
        return frozenset(layer for _, layer in self.documents)

    @classmethod
    def from_log(cls, entries: store.ChangeLog) -> Change:
        """The change the log describes (everything when it is incomplete or says so)."""
        everything = not entries.complete or any(doc_id == store.EVERYTHING for _, doc_id, _, _ in entries.rows)
        if everything:
            return cls(entries.newest, listing=True, everything=True)
        documents = frozenset((doc_id, layer) for _, doc_id, layer, _ in entries.rows if layer is not None)
        return cls(entries.newest, documents, listing=any(listed for *_, listed in entries.rows))


Listener = Callable[[Change], Awaitable[None]]
ReadLog = Callable[[int, int], Awaitable[store.ChangeLog]]


class ChangeFeed:
    """Turns generation advances into Changes for its listeners.

    `advance()` is cheap and never blocks: it only notes the newest generation seen. `run()` (a task of the service)
    reads the log and calls the listeners, one change at a time, coalescing advances that arrive meanwhile into
    one read. With no listener nothing is read. Bounded: one pending target, at most MAX_ROWS rows a read, and each
    listener gets LISTENER_SECONDS per change.
    """

    def __init__(self, read: ReadLog) -> None:
        self._read = read
        self._listeners: dict[object, Listener] = {}
        self._told = 0  # the last generation the listeners were told about
        self._target = 0  # the newest generation seen
        self._wake = anyio.Event()

    @property
    def told(self) -> int:
        """The last generation the listeners were told about."""
        return self._told

    def advance(self, generation: int) -> None:
        """The generation has reached `generation` (on this instance or another): tell the listeners what changed."""
        if generation > self._target:
            self._target = generation
            self._wake.set()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every Change from now on; returns the (idempotent) way to stop."""
        token = object()
        self._listeners[token] = listener

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    async def run(self, generation: int) -> None:
        """Serve the listeners from `generation` (the one the service opened at) until cancelled."""
        self._told = max(self._told, generation)
        self._target = max(self._target, generation)
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._told < self._target:
                if not self._listeners:  # nobody to tell: skip the read
                    self._told = self._target
                    break
                change = await self._next_change()
                self._told = max(self._told, change.generation)
                await self._tell(change)

    async def _next_change(self) -> Change:
        try:
            entries = await self._read(self._told, MAX_ROWS)
        except SageError as exc:
            # The generation moved, so something changed: say everything rather than nothing.
            log_event(log, logging.WARNING, "Change log unreadable", operation="changes", error=str(exc))
            return Change(self._target, listing=True, everything=True)
        if entries.newest < self._target:
            # A generation this instance saw committed is not in the snapshot read: nothing can be said exactly.
            return Change(self._target, listing=True, everything=True)
        return Change.from_log(entries)

    async def _tell(self, change: Change) -> None:
        for listener in list(self._listeners.values()):
            with anyio.move_on_after(LISTENER_SECONDS) as scope:
                try:
                    await listener(change)
                except Exception:  # one listener's fault must not starve the others
                    log.exception("change listener failed")
            if scope.cancelled_caught:
                log_event(log, logging.WARNING, "Change listener too slow; skipped", operation="changes")
