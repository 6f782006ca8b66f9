"""Live documents: an assistant watching knowledge://index, a layer or a document hears when it changes, whichever
face or instance made the change, in both protocol eras.

2026-07-28 clients open a `subscriptions/listen` stream naming the resources they watch (and whether they want
`resourcesListChanged`); 2025-11-25 clients call `resources/subscribe` and hear `notifications/resources/updated` on
their session. Both are watchers here, fed from the service's change feed (sage_server.changes), which reads the
database's change log, so a write on another instance is heard like a local one.

The tool and prompt lists are fixed for the life of the server, so `toolsListChanged` and `promptsListChanged` are
not offered: the spec has the acknowledgment name only the kinds a server supports, and the capabilities say the
same (see `honest_capabilities`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    SUBSCRIPTION_ID_META_KEY,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    event_to_notification,
)
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    EmptyResult,
    SubscribeRequestParams,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    UnsubscribeRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from sage_server.assistant.uris import INDEX, document_uri, is_served, layer_uri
from sage_server.changes import Change, ChangeFeed
from sage_server.logs import get_logger, log_event

log = get_logger("mcp")

MAX_WATCHERS = 1024  # listen streams and subscribed 2025-11-25 sessions, together
MAX_URIS = 1000  # resources one watcher may watch; a listen acknowledgment names the ones honored
DELIVERY_SECONDS = 1.0  # the longest a notification to one 2025-11-25 session may take before it is dropped


def changed_uris(change: Change) -> set[str]:
    """The resources a change touches (not counting `everything`): the index, each layer a changed document is in
    or left, and the document in each of those layers (a moved document is gone from the old URI)."""
    uris = {INDEX} if change.documents else set()
    for doc_id, layer in change.documents:
        uris |= {layer_uri(layer), document_uri(layer, doc_id)}
    return uris


@dataclass(eq=False)
class Watcher:
    """One listen stream or one subscribed session: what it watches and how to tell it."""

    listing: bool
    deliver: Callable[[list[ServerEvent]], Coroutine[Any, Any, None]]
    uris: set[str] = field(default_factory=set)

    def events(self, change: Change, touched: set[str]) -> list[ServerEvent]:
        """What this watcher must hear about `change` (`touched`: the URIs it changed)."""
        events: list[ServerEvent] = [ResourcesListChanged()] if self.listing and change.listing else []
        updated = self.uris if change.everything else self.uris & touched
        return events + [ResourceUpdated(uri=uri) for uri in sorted(updated)]


class LiveResources:
    """Every watcher of one MCP server, told of each change in the knowledge base.

    It listens to the service's change feed only while someone watches, so a server nobody watches costs the
    writes nothing. Bounded: MAX_WATCHERS watchers of MAX_URIS resources each; a listen stream whose client stops
    reading is ended (the client re-listens and refetches, as the spec has it: there is no replay).
    """

    def __init__(self, feed: ChangeFeed, layers: Sequence[str]) -> None:
        self.feed = feed
        self.layers = list(layers)
        self.watchers: set[Watcher] = set()
        self._stop_feed: Callable[[], None] | None = None
        self._sessions: dict[int, Watcher] = {}  # 2025-11-25 sessions by connection

    # -- watchers ------------------------------------------------------------------------------------

    def _add(self, watcher: Watcher) -> None:
        if len(self.watchers) >= MAX_WATCHERS:
            raise MCPError(INTERNAL_ERROR, f"too many subscriptions ({MAX_WATCHERS}); try again later")
        self.watchers.add(watcher)
        if self._stop_feed is None:
            self._stop_feed = self.feed.subscribe(self.publish)

    def _remove(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers and self._stop_feed is not None:
            self._stop_feed()
            self._stop_feed = None

    def served(self, uris: Sequence[str]) -> list[str]:
        """The URIs of `uris` SAGE serves (or will once their document exists), without repeats, at most MAX_URIS."""
        return list(dict.fromkeys(uri for uri in uris if is_served(uri, self.layers)))[:MAX_URIS]

    async def publish(self, change: Change) -> None:
        """Tell every watcher what `change` means to it (the change feed calls this)."""
        touched = changed_uris(change)
        async with anyio.create_task_group() as tg:
            for watcher in list(self.watchers):
                if events := watcher.events(change, touched):
                    tg.start_soon(watcher.deliver, events)

    # -- 2026-07-28: subscriptions/listen ----------------------------------------------------------

    async def listen(
        self, ctx: ServerRequestContext[Any, Any], params: SubscriptionsListenRequestParams
    ) -> SubscriptionsListenResult:
        """Serve one `subscriptions/listen` stream until the client leaves.

        What the MCP SDK 2.3's own handler does (acknowledge first, stamp every frame with the subscription id,
        end a stream whose client stopped reading), except that it acknowledges only what SAGE can deliver: the SDK
        honours every requested kind, while the spec says the acknowledgment names only the types the server
        supports. tests/test_mcp_live.py checks whether the SDK still does so.
        """
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(INVALID_REQUEST, "subscriptions/listen requires a request id")
        wanted = params.notifications
        uris = self.served(wanted.resource_subscriptions or [])
        honored = SubscriptionFilter(
            resources_list_changed=True if wanted.resources_list_changed else None, resource_subscriptions=uris or None
        )
        meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: subscription_id}
        # Room for one notification per watched resource and a list change: an `everything` change fits.
        send, receive = anyio.create_memory_object_stream[ServerEvent](MAX_URIS + 8)

        async def deliver(events: list[ServerEvent]) -> None:
            try:
                for event in events:
                    send.send_nowait(event)
            except anyio.WouldBlock:
                log_event(log, logging.WARNING, "Listen stream not read; ended", operation="mcp_listen")
                self._remove(watcher)
                send.close()
            except anyio.ClosedResourceError:
                pass  # the stream is ending

        watcher = Watcher(listing=bool(wanted.resources_list_changed), deliver=deliver, uris=set(uris))
        self._add(watcher)  # before the acknowledgment, so that a change made meanwhile is not missed
        try:
            ack = SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)
            await ctx.session.send_notification(
                SubscriptionsAcknowledgedNotification(params=ack), related_request_id=subscription_id
            )
            async with receive:
                async for event in receive:
                    await ctx.session.send_notification(
                        event_to_notification(event, meta), related_request_id=subscription_id
                    )
        finally:
            self._remove(watcher)
            send.close()
        return SubscriptionsListenResult(_meta=meta)

    # -- 2025-11-25: resources/subscribe and resources/unsubscribe ---------------------------------

    async def subscribe(self, ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        """Watch one resource for the rest of the session (2025-11-25 handshake)."""
        if not is_served(params.uri, self.layers):
            raise MCPError(INVALID_PARAMS, f"no such resource: {params.uri[:200]!r}", data={"uri": params.uri[:200]})
        # MCP SDK 2.3 hands request handlers the connection only as ServerSession._connection (its Context, which
        # would expose it, is not built yet): its exit stack is where a session's watcher is removed when it ends.
        connection = ctx.session._connection
        watcher = self._sessions.get(id(connection))
        if watcher is None:
            session = ctx.session

            async def deliver(events: list[ServerEvent]) -> None:
                with anyio.move_on_after(DELIVERY_SECONDS):
                    for event in events:
                        if isinstance(event, ResourceUpdated):  # 2025-11-25 sessions are told of updates only
                            await session.send_resource_updated(event.uri)

            watcher = Watcher(listing=False, deliver=deliver)
            self._add(watcher)
            self._sessions[id(connection)] = watcher

            def forget() -> None:
                self._sessions.pop(id(connection), None)
                self._remove(watcher)

            connection.exit_stack.callback(forget)
        if len(watcher.uris) >= MAX_URIS and params.uri not in watcher.uris:
            raise MCPError(INVALID_PARAMS, f"a session may watch at most {MAX_URIS} resources")
        watcher.uris.add(params.uri)
        return EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
        """Stop watching one resource (2025-11-25 handshake)."""
        watcher = self._sessions.get(id(ctx.session._connection))  # MCP SDK 2.3: see subscribe
        if watcher is not None:
            watcher.uris.discard(params.uri)
        return EmptyResult()


async def honest_capabilities(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Middleware: at 2026-07-28 the MCP SDK 2.3 derives every `listChanged` flag from whether
    `subscriptions/listen` is served; SAGE's tool and prompt lists never change while it runs, so say so."""
    result = await call_next(ctx)
    if ctx.method == "server/discover" and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        if isinstance(result, dict) and isinstance(capabilities := result.get("capabilities"), dict):
            for kind in ("tools", "prompts"):
                if isinstance(capabilities.get(kind), dict):
                    capabilities[kind] = {**capabilities[kind], "listChanged": False}
    return result
