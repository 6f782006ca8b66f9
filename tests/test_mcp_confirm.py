"""Destructive tools ask first where the client can ask its user: the 2026-07-28 input-required round trip and the
2025-11-25 elicitation, in process, over HTTP (across two instances too) and over stdio; where it cannot, they act as
before, or, when the operator requires it, are refused with MissingRequiredClientCapability (-32021, HTTP 400)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.session import ClientRequestContext
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    CallToolResult,
    ElicitRequest,
    ElicitRequestParams,
    ElicitResult,
    InputRequiredResult,
)

from sage_server.app import create_mcp_app
from sage_server.assistant import build_server
from sage_server.config import Settings
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from tests.mcp_support import error_text, payload, serving, settings_for, subprocess_env, write_knowledge

pytestmark = pytest.mark.anyio

ERAS = ["auto", "legacy"]
Action = Literal["accept", "decline", "cancel"]


class User:
    """The person behind the client: answers every question the same way, and remembers what was asked."""

    def __init__(self, action: Action = "accept", confirm: bool = True) -> None:
        self.action: Action = action
        self.confirm = confirm
        self.asked: list[str] = []

    async def __call__(self, context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        self.asked.append(params.message)
        content: dict[str, str | int | float | bool | list[str] | None] = {"confirm": self.confirm}
        return ElicitResult(action=self.action, content=content if self.action == "accept" else None)


def settings_with(tmp_path: Path, **overrides: Any) -> Settings:
    return settings_for(tmp_path, write_knowledge(tmp_path / "kb"), **overrides)


@asynccontextmanager
async def service(tmp_path: Path, **overrides: Any) -> AsyncIterator[KnowledgeService]:
    async with open_service(settings_with(tmp_path, **overrides)) as kb:
        yield kb


async def is_live(kb: KnowledgeService, doc_id: str) -> bool:
    return not (await kb.history(doc_id)).deleted


@pytest.mark.parametrize("mode", ERAS)
async def test_a_delete_asks_first_and_acts_on_yes(tmp_path: Path, mode: str) -> None:
    user = User()
    async with service(tmp_path) as kb, Client(build_server(kb), mode=mode, elicitation_callback=user) as client:
        deleted = payload(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))
        assert deleted["deleted"] is True
        assert user.asked == [
            "Delete 'Handling Secrets' (handling-secrets, revision 1) from the knowledge base? It stays in its "
            "history and can be restored."
        ]
        assert not await is_live(kb, "handling-secrets")


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize(("action", "confirm"), [("decline", False), ("cancel", False), ("accept", False)])
async def test_a_delete_the_user_does_not_confirm_changes_nothing(
    tmp_path: Path, mode: str, action: Action, confirm: bool
) -> None:
    user = User(action, confirm)
    async with service(tmp_path) as kb, Client(build_server(kb), mode=mode, elicitation_callback=user) as client:
        message = error_text(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))
        assert "not_confirmed: not deleted" in message and "nothing was changed" in message
        assert await is_live(kb, "handling-secrets") and len(user.asked) == 1


async def test_a_document_changed_while_the_question_is_out_is_not_deleted_unseen(tmp_path: Path) -> None:
    # 2025-11-25: the question is asked in the middle of the call; an edit made meanwhile makes the delete a
    # conflict, since the user confirmed deleting the revision shown.
    async with service(tmp_path) as kb:

        class Meanwhile(User):
            async def __call__(self, context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
                await kb.save(DocumentIn(id="handling-secrets", title="Handling Secrets", layer="practices", body="v2"))
                return await super().__call__(context, params)

        async with Client(build_server(kb), mode="legacy", elicitation_callback=Meanwhile()) as client:
            refused = error_text(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))
        assert "conflict" in refused and "revision 2" in refused
        assert await is_live(kb, "handling-secrets")


async def test_a_document_changed_between_rounds_is_asked_about_again(tmp_path: Path) -> None:
    # 2026-07-28: the answer comes back in a second request; the question it answered no longer matches the
    # document, so the user is asked again about what it is now.
    async with service(tmp_path) as kb:
        user = User()
        saved = False

        async def meanwhile(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
            nonlocal saved
            if not saved:
                saved = True
                await kb.save(DocumentIn(id="handling-secrets", title="Handling Secrets", layer="practices", body="v2"))
            return await user(context, params)

        async with Client(build_server(kb), elicitation_callback=meanwhile) as client:
            deleted = payload(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))
        assert deleted["revision"] == 3 and [q.split(")")[0] for q in user.asked] == [
            "Delete 'Handling Secrets' (handling-secrets, revision 1",
            "Delete 'Handling Secrets' (handling-secrets, revision 2",
        ]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_restore_asks_naming_the_revision(tmp_path: Path, mode: str) -> None:
    user = User()
    async with service(tmp_path) as kb, Client(build_server(kb), mode=mode, elicitation_callback=user) as client:
        await kb.delete("handling-secrets")
        restored = payload(await client.call_tool("sage_restore_revision", {"id": "handling-secrets", "revision": 1}))
        assert restored["revision"] == 3 and restored["deleted"] is False
        assert user.asked == [
            "Restore 'Handling Secrets' (handling-secrets, now deleted) to revision 1? The current text stays in its "
            "history."
        ]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_call_that_would_fail_is_not_asked_about(tmp_path: Path, mode: str) -> None:
    user = User()
    async with service(tmp_path) as kb, Client(build_server(kb), mode=mode, elicitation_callback=user) as client:
        unknown = error_text(await client.call_tool("sage_delete_knowledge", {"id": "handling-secretz"}))
        assert "not_found" in unknown and "handling-secrets" in unknown
        stale = {"id": "handling-secrets", "expected_revision": 7}
        assert "conflict" in error_text(await client.call_tool("sage_delete_knowledge", stale))
        missing = error_text(await client.call_tool("sage_restore_revision", {"id": "handling-secrets", "revision": 9}))
        assert "has no revision 9" in missing
        assert user.asked == []


@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_that_cannot_ask_acts_as_before(tmp_path: Path, mode: str) -> None:
    async with service(tmp_path) as kb, Client(build_server(kb), mode=mode) as client:
        assert payload(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))["deleted"]


@pytest.mark.parametrize("mode", ERAS)
async def test_never_asks_when_the_policy_says_never(tmp_path: Path, mode: str) -> None:
    user = User(action="decline")
    async with (
        service(tmp_path, mcp_confirm_destructive="never") as kb,
        Client(build_server(kb), mode=mode, elicitation_callback=user) as client,
    ):
        assert payload(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))["deleted"]
        assert user.asked == []
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert "confirm" not in (tools["sage_delete_knowledge"].description or "")


@pytest.mark.parametrize("mode", ERAS)
async def test_required_confirmation_refuses_a_client_that_cannot_ask(tmp_path: Path, mode: str) -> None:
    async with (
        service(tmp_path, mcp_confirm_destructive="require") as kb,
        Client(build_server(kb), mode=mode) as client,
    ):
        with pytest.raises(MCPError) as refused:
            await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"})
        assert refused.value.error.code == MISSING_REQUIRED_CLIENT_CAPABILITY
        assert refused.value.error.data == {"requiredCapabilities": {"elicitation": {"form": {}}}}
        assert "SAGE_MCP_CONFIRM_DESTRUCTIVE=require" in refused.value.error.message
        assert await is_live(kb, "handling-secrets")


# -- over real transports ---------------------------------------------------------------------------------

MODERN_CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {
        "name": "sage_delete_knowledge",
        "arguments": {"id": "handling-secrets"},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}
MODERN_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "sage_delete_knowledge",
}


async def test_over_http_a_missing_capability_is_a_400(tmp_path: Path) -> None:
    async with (
        service(tmp_path, mcp_confirm_destructive="require") as kb,
        serving(create_mcp_app(kb.settings, kb)) as url,
        httpx2.AsyncClient(base_url=url) as http,
    ):
        with anyio.fail_after(30):
            answer = await http.post("/mcp", json=MODERN_CALL, headers=MODERN_HEADERS)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == MISSING_REQUIRED_CLIENT_CAPABILITY == -32021


@pytest.mark.parametrize("mode", ERAS)
async def test_over_http_the_question_goes_to_the_user(tmp_path: Path, mode: str) -> None:
    user = User()
    async with service(tmp_path) as kb, serving(create_mcp_app(kb.settings, kb)) as url:
        with anyio.fail_after(30):
            async with Client(f"{url}/mcp", mode=mode, elicitation_callback=user) as client:
                assert payload(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))["deleted"]
    assert len(user.asked) == 1


async def test_the_answer_may_reach_another_instance(tmp_path: Path) -> None:
    # Two servers on one database, as behind a load balancer: the question comes from one, the answer goes to the
    # other, which opens the request state the first sealed (the key comes from the database they share).
    settings = settings_with(tmp_path)
    async with (
        open_service(settings) as first,
        open_service(settings.model_copy(update={"import_on_start": False})) as second,
        serving(create_mcp_app(settings, first)) as one,
        serving(create_mcp_app(settings, second)) as other,
    ):
        user = User()
        with anyio.fail_after(30):
            async with (
                Client(f"{one}/mcp", elicitation_callback=user) as asking,
                Client(f"{other}/mcp", elicitation_callback=user) as answering,
            ):
                arguments = {"id": "handling-secrets"}
                first_round = await asking.session.call_tool(
                    "sage_delete_knowledge", arguments, allow_input_required=True
                )
                assert isinstance(first_round, InputRequiredResult) and first_round.request_state
                assert first_round.input_requests is not None
                [(key, question)] = first_round.input_requests.items()
                assert isinstance(question, ElicitRequest)
                answered = await answering.session.call_tool(
                    "sage_delete_knowledge",
                    arguments,
                    input_responses={key: ElicitResult(action="accept", content={"confirm": True})},
                    request_state=first_round.request_state,
                    allow_input_required=True,
                )
        assert isinstance(answered, CallToolResult) and payload(answered)["deleted"] is True


@pytest.mark.parametrize("mode", ERAS)
async def test_a_caller_that_may_not_write_is_refused_unasked(tmp_path: Path, mode: str) -> None:
    user = User()
    async with service(tmp_path) as kb:
        reader = (await kb.create_key("reader", "read")).token
        async with (
            serving(create_mcp_app(kb.settings, kb)) as url,
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {reader}"}) as http,
            Client(
                streamable_http_client(f"{url}/mcp", http_client=http), mode=mode, elicitation_callback=user
            ) as client,
        ):
            refused = error_text(await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"}))
    assert "needs the write scope" in refused and user.asked == []


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ERAS)
async def test_over_stdio_the_question_goes_to_the_user(tmp_path: Path, mode: str) -> None:
    settings = settings_with(tmp_path)
    command = [sys.executable, "-m", "sage_server", "--db", str(settings.db_path), "mcp"]
    params = StdioServerParameters(
        command=command[0], args=command[1:], env=subprocess_env(settings, tmp_path), cwd=tmp_path
    )
    declining = User(action="decline")
    with (tmp_path / "stderr.log").open("w") as stderr, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=stderr), mode=mode, elicitation_callback=declining) as client:
            result = await client.call_tool("sage_delete_knowledge", {"id": "handling-secrets"})
            assert "not_confirmed" in error_text(result)
            kept = payload(await client.call_tool("sage_get_document", {"id": "handling-secrets"}))
    assert kept["revision"] == 1  # nothing was deleted, and the session went on serving
    assert len(declining.asked) == 1
