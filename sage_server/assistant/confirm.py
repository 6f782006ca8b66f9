"""Asking the user before a destructive tool acts: sage_delete_knowledge and sage_restore_revision.

Where the client can ask its user (it declared form elicitation), the tool asks first: at 2026-07-28 through the
input-required round trip (the call returns the question, the client retries with the answer), at 2025-11-25 with an
`elicitation/create` request in the middle of the call. Both are the MCP SDK's resolvers (`Resolve`, `Elicit`),
which carry the answer across rounds in the sealed request state. Where the client cannot ask, the policy decides
(`mcp_confirm_destructive`): `ask` acts as before, `require` refuses with MissingRequiredClientCapability (-32021,
HTTP 400), `never` never asks. A call that would fail anyway (an unknown id, a stale expected revision, a revision
that does not exist) is not asked about: it fails with its own error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.resolve import AcceptedElicitation, Elicit, ElicitationResult
from mcp.shared.exceptions import MCPError
from mcp_types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    ClientCapabilities,
    ElicitationCapability,
    FormElicitationCapability,
    MissingRequiredClientCapabilityErrorData,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from sage_server.errors import SageError
from sage_server.service import KnowledgeService

Policy = Literal["ask", "require", "never"]


class Confirmation(BaseModel):
    """The one-field form the client shows its user."""

    confirm: bool = Field(title="Go ahead", description="Yes, do it")


Answer = ElicitationResult[Confirmation]
DeleteResolver = Callable[[str, int | None, Context[Any, Any]], Awaitable[Elicit[Confirmation] | Confirmation]]
RestoreResolver = Callable[[str, int, Context[Any, Any]], Awaitable[Elicit[Confirmation] | Confirmation]]
GO_AHEAD = Confirmation(confirm=True)


class NotConfirmed(SageError):
    """The user declined (or dismissed) the question: nothing was changed."""

    status = 409
    code = "not_confirmed"
    internal = False


def approved(answer: Answer, action: str) -> None:
    """Return if the user said yes (or was not asked); raise NotConfirmed naming `action` otherwise."""
    if isinstance(answer, AcceptedElicitation) and answer.data.confirm:
        return
    declined = isinstance(answer, AcceptedElicitation) or answer.action == "decline"
    why = "the user declined" if declined else "the user dismissed the question"
    raise NotConfirmed(f"not {action}: {why}; nothing was changed")


def can_ask(ctx: Context[Any, Any]) -> bool:
    """Whether this client can put a question to its user during this call."""
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    # A bare `elicitation: {}` predates modes and means forms; url-only clients cannot show one.
    if elicitation is None or (elicitation.form is None and elicitation.url is not None):
        return False
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return True  # the input-required round trip needs no channel back to the client
    return ctx.request_context.session.can_send_request


def ask(ctx: Context[Any, Any], policy: Policy, question: str | None) -> Elicit[Confirmation] | Confirmation:
    """The resolver's answer: the question to put to the user, or the go-ahead without asking."""
    if question is None or policy == "never":
        return GO_AHEAD
    if can_ask(ctx):
        return Elicit(question, Confirmation)
    if policy == "require":
        required = ClientCapabilities(elicitation=ElicitationCapability(form=FormElicitationCapability()))
        raise MCPError(
            MISSING_REQUIRED_CLIENT_CAPABILITY,
            "this server asks the user before deleting or restoring (SAGE_MCP_CONFIRM_DESTRUCTIVE=require), and this "
            "client did not declare form elicitation, so it cannot ask",
            data=MissingRequiredClientCapabilityErrorData(required_capabilities=required).model_dump(
                by_alias=True, mode="json", exclude_none=True
            ),
        )
    return GO_AHEAD


def delete_resolver(kb: KnowledgeService, policy: Policy) -> DeleteResolver:
    """The resolver asking before sage_delete_knowledge (it takes the tool's `id` and `expected_revision`)."""

    async def confirm_delete(
        id: str, expected_revision: int | None, ctx: Context[Any, Any]
    ) -> Elicit[Confirmation] | Confirmation:
        question: str | None = None
        try:
            doc = await kb.get(id)
        except SageError:
            doc = None  # the delete will fail with its own error: nothing to ask
        if doc is not None and doc.id == id and expected_revision in (None, doc.revision):
            question = (
                f"Delete {doc.title!r} ({doc.id}, revision {doc.revision}) from the knowledge base? "
                "It stays in its history and can be restored."
            )
        return ask(ctx, policy, question)

    return confirm_delete


def restore_resolver(kb: KnowledgeService, policy: Policy) -> RestoreResolver:
    """The resolver asking before sage_restore_revision (it takes the tool's `id` and `revision`)."""

    async def confirm_restore(id: str, revision: int, ctx: Context[Any, Any]) -> Elicit[Confirmation] | Confirmation:
        question: str | None = None
        try:
            history = await kb.history(id)
        except SageError:
            history = None  # the restore will fail with its own error
        if history is not None and any(r.revision == revision for r in history.revisions):
            current = history.revisions[0]
            state = "deleted" if history.deleted else f"at revision {current.revision}"
            question = (
                f"Restore {current.title!r} ({history.id}, now {state}) to revision {revision}? "
                "The current text stays in its history."
            )
        return ask(ctx, policy, question)

    return confirm_restore
