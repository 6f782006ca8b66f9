"""Live documents: an assistant watching the index, a layer or a document hears when it changes, whichever face or
instance changed it, in both protocol eras, through real clients: in process, over HTTP and over stdio."""

from __future__ import annotations

import dataclasses
import signal
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.session import IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent, Subscription
from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import _honored_subset
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import ResourceUpdatedNotification, SubscriptionFilter

from sage_server.app import create_app
from sage_server.assistant import build_server
from sage_server.assistant.live import MAX_URIS, LiveResources
from sage_server.config import Settings
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from tests.conftest import write_doc
from tests.mcp_support import serving, settings_for, subprocess_env, write_knowledge
from tests.test_serve import start

pytestmark = pytest.mark.anyio

SECRETS = "knowledge://practices/handling-secrets"
PRACTICES = "knowledge://practices"
INDEX = "knowledge://index"


@pytest.fixture
def mcp_settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path, write_knowledge(tmp_path / "kb"))


@pytest.fixture
async def kb(mcp_settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(mcp_settings) as service:
        yield service


def secrets(body: str = "Rotate keys.\n", title: str = "Handling Secrets", layer: str = "practices") -> DocumentIn:
    return DocumentIn(
        id="handling-secrets", title=title, layer=layer, body=body, summary="Keep credentials out of code and logs."
    )


async def heard(subscription: Subscription, count: int, seconds: float = 10) -> list[ServerEvent]:
    """The next `count` events of a listen stream (bounded: events that never come fail the test)."""
    events: list[ServerEvent] = []
    with anyio.fail_after(seconds):
        async for event in subscription:
            events.append(event)
            if len(events) == count:
                break
    return events


def updated(*uris: str) -> set[ServerEvent]:
    return {ResourceUpdated(uri=uri) for uri in uris}


# -- 2026-07-28: subscriptions/listen -------------------------------------------------------------------------


async def test_the_acknowledgment_names_only_what_sage_delivers(kb: KnowledgeService) -> None:
    async with Client(build_server(kb)) as client:
        assert client.server_capabilities.resources is not None
        assert client.server_capabilities.resources.list_changed and client.server_capabilities.resources.subscribe
        # The tool and prompt lists never change while SAGE runs: not offered, and not acknowledged.
        assert client.server_capabilities.tools is not None and not client.server_capabilities.tools.list_changed
        assert client.server_capabilities.prompts is not None and not client.server_capabilities.prompts.list_changed
        asked = [SECRETS, INDEX, PRACTICES, "knowledge://nonsense", "file:///etc/passwd", "knowledge://core/not an id"]
        async with client.listen(
            tools_list_changed=True,
            prompts_list_changed=True,
            resources_list_changed=True,
            resource_subscriptions=asked,
        ) as subscription:
            assert subscription.honored == SubscriptionFilter(
                resources_list_changed=True, resource_subscriptions=[SECRETS, INDEX, PRACTICES]
            )


def test_the_sdk_still_acknowledges_kinds_a_server_does_not_deliver() -> None:
    # SAGE serves subscriptions/listen itself (live.py) because MCP SDK 2.3's handler acknowledges every requested
    # kind, where the spec has the acknowledgment name only the types the server supports. When this fails, the SDK
    # has caught up: its ListenHandler may do, given a filter of what SAGE supports.
    honored = _honored_subset(SubscriptionFilter(tools_list_changed=True, prompts_list_changed=True))
    assert honored.tools_list_changed is True and honored.prompts_list_changed is True


async def test_a_watcher_hears_saves_deletes_and_restores_made_through_any_face(kb: KnowledgeService) -> None:
    async with (
        Client(build_server(kb)) as client,
        client.listen(resources_list_changed=True, resource_subscriptions=[SECRETS, PRACTICES, INDEX]) as subscription,
    ):
        await kb.save(secrets())  # the body changed: the document, its layer and the index, not the listing
        assert set(await heard(subscription, 3)) == updated(SECRETS, PRACTICES, INDEX)

        await kb.save(secrets(title="Secrets"))  # a new title is a new listing too
        assert set(await heard(subscription, 4)) == updated(SECRETS, PRACTICES, INDEX) | {ResourcesListChanged()}

        await kb.delete("handling-secrets")
        assert ResourceUpdated(uri=SECRETS) in await heard(subscription, 4)
        await kb.restore("handling-secrets", 1)
        assert ResourceUpdated(uri=SECRETS) in await heard(subscription, 4)

        # Through the MCP tools of another client, too.
        async with Client(build_server(kb)) as writer:
            await writer.call_tool("sage_delete_knowledge", {"id": "handling-secrets"})
        assert ResourceUpdated(uri=SECRETS) in await heard(subscription, 4)


async def test_a_document_moved_to_another_layer_is_news_at_both_addresses(kb: KnowledgeService) -> None:
    moved = "knowledge://scenarios/handling-secrets"
    async with (
        Client(build_server(kb)) as client,
        client.listen(resource_subscriptions=[SECRETS, moved, "knowledge://scenarios"]) as subscription,
    ):
        await kb.save(secrets(layer="scenarios"))
        assert set(await heard(subscription, 3)) == updated(SECRETS, moved, "knowledge://scenarios")


async def test_a_reimport_from_disk_is_heard(kb: KnowledgeService, mcp_settings: Settings) -> None:
    folder = mcp_settings.knowledge_dirs[0]
    async with (
        Client(build_server(kb)) as client,
        client.listen(resources_list_changed=True, resource_subscriptions=[SECRETS]) as subscription,
    ):
        write_doc(folder, "practices/secrets.md", "---\nid: handling-secrets\ntitle: Secrets\n---\n# Secrets\n\nNew.\n")
        write_doc(folder, "practices/fresh.md", "# Fresh\n\nA new practice.\n")
        await kb.import_paths([folder])
        assert set(await heard(subscription, 2)) == updated(SECRETS) | {ResourcesListChanged()}


async def test_a_watcher_hears_nothing_it_did_not_ask_for(kb: KnowledgeService) -> None:
    async with (
        Client(build_server(kb)) as client,
        client.listen(resource_subscriptions=["knowledge://core/verify-with-evidence"]) as subscription,
    ):
        await kb.save(secrets())  # not watched: nothing
        await kb.save(DocumentIn(id="verify-with-evidence", title="Verify", layer="core", body="Quote output.\n"))
        assert await heard(subscription, 1) == [ResourceUpdated(uri="knowledge://core/verify-with-evidence")]


async def test_a_write_on_another_instance_is_heard(mcp_settings: Settings, kb: KnowledgeService) -> None:
    other = mcp_settings.model_copy(update={"import_on_start": False})
    async with (
        Client(build_server(kb)) as client,
        client.listen(resource_subscriptions=[SECRETS]) as subscription,
        open_service(other) as elsewhere,
    ):
        await elsewhere.save(secrets())  # heard through the shared database's change log (its poll, here)
        assert await heard(subscription, 1) == [ResourceUpdated(uri=SECRETS)]


async def test_watchers_are_bounded_and_gone_with_their_stream(kb: KnowledgeService) -> None:
    server = build_server(kb)
    live = live_resources(server)
    many = [f"knowledge://practices/doc-{n}" for n in range(MAX_URIS + 50)]
    async with Client(server) as client:
        async with client.listen(resource_subscriptions=many) as subscription:
            assert subscription.honored.resource_subscriptions == many[:MAX_URIS]
            assert len(live.watchers) == 1
        with anyio.fail_after(10):  # the server ends the stream once the client has left
            while live.watchers:
                await anyio.sleep(0.01)
    assert live._stop_feed is None  # nobody watches: the change feed is not even read


def live_resources(server: Any) -> LiveResources:
    """The LiveResources behind a server's subscriptions/listen handler."""
    handler = server._lowlevel_server.get_request_handler("subscriptions/listen").handler
    assert isinstance(handler.__self__, LiveResources)
    return handler.__self__


# -- 2025-11-25: resources/subscribe --------------------------------------------------------------------------


class Notifications:
    """A message handler keeping the resource updates a 2025-11-25 session hears."""

    def __init__(self) -> None:
        self.uris: list[str] = []
        self._arrived = anyio.Event()

    async def __call__(self, message: IncomingMessage) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            self.uris.append(message.params.uri)
            self._arrived.set()

    async def wait_for(self, uri: str, seconds: float = 10) -> None:
        with anyio.fail_after(seconds):
            while uri not in self.uris:
                await self._arrived.wait()
                self._arrived = anyio.Event()


@contextmanager
def legacy_api() -> Iterator[None]:
    # resources/subscribe is the 2025-11-25 way, which the SDK client marks deprecated (2026-07-28 has listen).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "resources/(un)?subscribe is removed", MCPDeprecationWarning)
        yield


async def test_a_2025_session_subscribes_and_hears_updates(kb: KnowledgeService) -> None:
    notifications = Notifications()
    async with Client(build_server(kb), mode="legacy", message_handler=notifications) as client:
        capabilities = client.server_capabilities.resources
        assert capabilities is not None and capabilities.subscribe and not capabilities.list_changed
        with legacy_api():
            await client.subscribe_resource(SECRETS)
            await client.subscribe_resource(INDEX)
        await kb.save(secrets())
        await notifications.wait_for(SECRETS)
        await notifications.wait_for(INDEX)

        with legacy_api():
            await client.unsubscribe_resource(SECRETS)
            with pytest.raises(MCPError, match="no such resource"):
                await client.subscribe_resource("file:///etc/passwd")
        notifications.uris.clear()
        await kb.save(secrets(body="Again.\n"))
        await notifications.wait_for(INDEX)
        assert SECRETS not in notifications.uris


def test_the_sdk_still_offers_no_public_way_to_add_a_request_handler() -> None:
    # server.py registers resources/list, subscriptions/listen and resources/(un)subscribe on MCPServer's low-level
    # server (`_lowlevel_server`), because MCP SDK 2.3's MCPServer has no public way to. When this fails, it has one.
    assert not hasattr(MCPServer, "add_request_handler")


def test_the_sdk_still_hands_request_handlers_no_connection() -> None:
    # live.py reaches a 2025-11-25 session's connection (to notify it later, and to forget it when it ends) through
    # ServerSession._connection, because MCP SDK 2.3 gives request handlers no other way. When this fails, the
    # request context carries the connection: use it there instead.
    assert "connection" not in {field.name for field in dataclasses.fields(ServerRequestContext)}


# -- over real transports ---------------------------------------------------------------------------------


@asynccontextmanager
async def http_server(settings: Settings) -> AsyncIterator[tuple[str, KnowledgeService]]:
    async with open_service(settings) as service, serving(create_app(settings, service)) as url:
        yield url, service


@pytest.mark.parametrize("mode", ["auto", "legacy", "sse"])
async def test_over_http_a_watcher_hears_a_write_made_over_rest(mcp_settings: Settings, mode: str) -> None:
    notifications = Notifications()
    async with http_server(mcp_settings) as (url, _), httpx2.AsyncClient(base_url=url) as rest:
        transport = sse_client(f"{url}/sse") if mode == "sse" else f"{url}/mcp"
        era = "auto" if mode == "auto" else "legacy"
        async with Client(transport, mode=era, message_handler=notifications) as client:

            async def rest_write() -> None:
                body = {"title": "Handling Secrets", "layer": "practices", "body": "Rotate over REST.\n"}
                assert (await rest.put("/v1/knowledge/handling-secrets", json=body)).status_code == 200

            with anyio.fail_after(30):
                if era == "legacy":
                    with legacy_api():
                        await client.subscribe_resource(SECRETS)
                    await rest_write()
                    await notifications.wait_for(SECRETS)
                else:
                    async with client.listen(resource_subscriptions=[SECRETS]) as subscription:
                        await rest_write()
                        assert await heard(subscription, 1) == [ResourceUpdated(uri=SECRETS)]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_over_stdio_a_watcher_hears_a_write_made_by_another_process(
    mcp_settings: Settings, tmp_path: Path, mode: str
) -> None:
    # `sage mcp` is one instance; this test process, with the same database open, is another.
    command = [sys.executable, "-m", "sage_server", "--db", str(mcp_settings.db_path), "mcp"]
    params = StdioServerParameters(
        command=command[0], args=command[1:], env=subprocess_env(mcp_settings, tmp_path), cwd=tmp_path
    )
    notifications = Notifications()
    elsewhere = open_service(mcp_settings.model_copy(update={"import_on_start": False}))
    with (tmp_path / "stderr.log").open("w") as stderr, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=stderr), mode=mode, message_handler=notifications) as client:
            if mode == "legacy":
                with legacy_api():
                    await client.subscribe_resource(SECRETS)
                async with elsewhere as other:
                    await other.save(secrets())
                    await notifications.wait_for(SECRETS, seconds=30)
            else:
                async with client.listen(resource_subscriptions=[SECRETS, INDEX]) as subscription, elsewhere as other:
                    await other.save(secrets())
                    assert set(await heard(subscription, 2, seconds=30)) == updated(SECRETS, INDEX)


LISTEN = {
    "jsonrpc": "2.0",
    "id": "listen-1",
    "method": "subscriptions/listen",
    "params": {
        "notifications": {"resourceSubscriptions": ["knowledge://index"]},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}
LISTEN_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "subscriptions/listen",
}


@pytest.mark.e2e
async def test_a_listen_stream_does_not_hold_up_a_shutdown(tmp_path: Path) -> None:
    # A listen stream never ends by itself: at SIGTERM it ends at once, like the other event streams, and the server
    # exits without waiting out its grace period (far longer than this test waits).
    server = start(tmp_path, {"SAGE_SHUTDOWN_GRACE_SECONDS": "120"})
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            async with http.stream("POST", f"{server.mcp}/mcp", json=LISTEN, headers=LISTEN_HEADERS) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                with anyio.fail_after(30):
                    async for line in lines:
                        if "notifications/subscriptions/acknowledged" in line:
                            break
                server.process.send_signal(signal.SIGTERM)
                with anyio.fail_after(60):
                    async for _ in lines:
                        pass
            code = await anyio.to_thread.run_sync(server.process.wait, 60)
        assert code == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
