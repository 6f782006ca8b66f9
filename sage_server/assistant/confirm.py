"""Asking the user before a destructive tool acts: sage_delete_knowledge and sage_restore_revision.

Where the client can ask its user (it declared form elicitation), the tool asks first: at 2026-07-28 through the
input-required round trip (the call returns the question, the client retries with the answer), at 2025-11-25 with an
`elicitation/create` request in the middle of the call. Both are the MCP SDK's resolvers (`Resolve`, `Elicit`),
which carry the answer across rounds in the sealed request state. Where the client cannot ask, the policy decides
(`mcp_confirm_destructive`): `ask` acts as before, `require` refuses with MissingRequiredClientCapability (-32021,
HTTP 400), `never` never asks. A call that would fail anyway (a caller without the write scope, an unknown id, a stale
expected revision, a revision that does not exist) is not asked about: it fails with its own error.

Each tool resolves its `Subject` first (what the call would change, and the question about it), then the answer;
a confirmed delete applies only to the revision the user was shown. Like tools.py, this module does without
`from __future__ import annotations`: the resolvers' annotations name other resolvers made here at registration,
so they must be evaluated where they are written.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.resolve import AcceptedElicitation, Elicit, ElicitationResult, Resolve
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

from sage_server.auth import WRITE, current_caller
from sage_server.errors import SageError
from sage_server.service import KnowledgeService

Policy = Literal["ask", "require", "never"]


class Confirmation(BaseModel):
    """The one-field form the client shows its user."""

    confirm: bool = Field(title="Go ahead", description="Yes, do it")


Answer = ElicitationResult[Confirmation]
GO_AHEAD = Confirmation(confirm=True)


@dataclass(frozen=True)
class Subject:
    """What a destructive call would change: the question to ask about it (None: nothing to ask, the call goes
    ahead or fails with its own error), whether this client can be asked, and the document's revision when the
    question was put (0: there was no document to change)."""

    question: str | None = None
    asks: bool = False
    revision: int | None = None

    def expected(self, given: int | None) -> int | None:
        """The revision a confirmed write must still find: the caller's own, else the one the user was shown."""
        return given if given is not None or not self.asks else self.revision


NOTHING_TO_ASK = Subject()


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


def subject(ctx: Context[Any, Any], policy: Policy, question: str | None, revision: int) -> Subject:
    """The subject of a call whose document is at `revision` (0: none), with `question` to ask about it (None: the
    call will fail with its own error). Raises -32021 where the policy requires asking and the client cannot."""
    asks = can_ask(ctx)
    if question is not None and not asks and policy == "require":
        required = ClientCapabilities(elicitation=ElicitationCapability(form=FormElicitationCapability()))
        raise MCPError(
            MISSING_REQUIRED_CLIENT_CAPABILITY,
            "this server asks the user before deleting or restoring (SAGE_MCP_CONFIRM_DESTRUCTIVE=require), and this "
            "client did not declare form elicitation, so it cannot ask",
            data=MissingRequiredClientCapabilityErrorData(required_capabilities=required).model_dump(
                by_alias=True, mode="json", exclude_none=True
            ),
        )
    return Subject(question, asks, revision)


def asking(policy: Policy) -> bool:
    """Whether questions are asked at all for the caller of this call."""
    return policy != "never" and current_caller().principal.allows(WRITE)


def to_confirm(s: Subject) -> Elicit[Confirmation] | Confirmation:
    """The question for `s`, or the go-ahead when there is nothing to ask or nobody to ask."""
    return Elicit(s.question, Confirmation) if s.question is not None and s.asks else GO_AHEAD


def delete_resolvers(kb: KnowledgeService, policy: Policy) -> tuple[Resolve, Resolve]:
    """The resolvers of sage_delete_knowledge: its Subject (from the tool's `id` and `expected_revision`), then the
    user's Answer."""

    async def delete_subject(id: str, expected_revision: int | None, ctx: Context[Any, Any]) -> Subject:
        if not asking(policy):
            return NOTHING_TO_ASK
        try:
            doc = await kb.get(id)
        except SageError:
            return subject(ctx, policy, None, 0)  # unknown or deleted: the delete says so (and cannot hit a newcomer)
        if doc.id != id or expected_revision not in (None, doc.revision):
            return NOTHING_TO_ASK  # an alias, or a stale expected revision: the delete fails with its own error
        question = (
            f"Delete {doc.title!r} ({doc.id}, revision {doc.revision}) from the knowledge base? "
            "It stays in its history and can be restored."
        )
        return subject(ctx, policy, question, doc.revision)

    async def confirm_delete(s: Annotated[Subject, Resolve(delete_subject)]) -> Elicit[Confirmation] | Confirmation:
        return to_confirm(s)

    return Resolve(delete_subject), Resolve(confirm_delete)


def restore_resolvers(kb: KnowledgeService, policy: Policy) -> tuple[Resolve, Resolve]:
    """The resolvers of sage_restore_revision: its Subject (from the tool's `id` and `revision`), then the user's
    Answer. (The service restores over whatever revision is current, which stays in the history.)"""

    async def restore_subject(id: str, revision: int, ctx: Context[Any, Any]) -> Subject:
        if not asking(policy):
            return NOTHING_TO_ASK
        try:
            history = await kb.history(id)
        except SageError:
            return NOTHING_TO_ASK  # the restore fails with its own error
        if not any(r.revision == revision for r in history.revisions):
            return NOTHING_TO_ASK
        current = history.revisions[0]
        state = "deleted" if history.deleted else f"at revision {current.revision}"
        question = (
            f"Restore {current.title!r} ({history.id}, now {state}) to revision {revision}? "
            "The current text stays in its history."
        )
        return subject(ctx, policy, question, current.revision)

    async def confirm_restore(s: Annotated[Subject, Resolve(restore_subject)]) -> Elicit[Confirmation] | Confirmation:
        return to_confirm(s)

    return Resolve(restore_subject), Resolve(confirm_restore)
