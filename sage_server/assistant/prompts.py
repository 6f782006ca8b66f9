"""The MCP prompts: common tasks, each with the team knowledge relevant to its arguments packed in."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server import MCPServer
from pydantic import Field

from sage_server.assistant.adapters import prompt_errors
from sage_server.budget import MAX_TOKENS_CEILING
from sage_server.service import KnowledgeService

GROUNDING = (
    "Ground your work in the team knowledge below. Cite a document as sage:<id> where it applies, and say so "
    "when you depart from it. Fetch more with the sage_* tools if something is missing."
)


def register_prompts(server: MCPServer[Any], kb: KnowledgeService) -> None:
    """Add the code review, debugging, design, documentation and onboarding prompts to `server`."""
    max_tokens = min(kb.settings.context_max_tokens, MAX_TOKENS_CEILING)

    @prompt_errors
    async def brief(ask: str, subject: str, topic: str) -> str:
        # Retrieval sees the kind of task and the user's words, not the instructions (they would skew it).
        pack = await kb.context_within(f"{topic}: {subject}" if subject else topic, max_tokens)
        return "\n\n".join(part for part in (ask, subject, GROUNDING, pack.text) if part)

    @server.prompt(name="code_review", title="Review a change")
    async def code_review(
        change: Annotated[str, Field(description="The diff, or what the change does and where")],
    ) -> str:
        """Review a change against the team's review guidelines and principles, most important findings first."""
        ask = (
            "Review this change. Report correctness, security and data-loss risks first, then missing tests, "
            "then maintainability; say what you verified."
        )
        return await brief(ask, change, "code review")

    @server.prompt(name="debugging", title="Debug a problem")
    async def debugging(
        problem: Annotated[str, Field(description="The symptom: error message, failing test, or wrong behaviour")],
    ) -> str:
        """Find the root cause of a bug, with the team's debugging practices in context."""
        ask = (
            "Find the root cause of this problem before changing anything: reproduce it, form hypotheses and test "
            "them one at a time."
        )
        return await brief(ask, problem, "debugging root cause")

    @server.prompt(name="design", title="Design a change")
    async def design(
        goal: Annotated[str, Field(description="What should be built or changed, and its constraints")],
    ) -> str:
        """Propose a design with its trade-offs, with the team's design frameworks in context."""
        ask = "Propose a design for this goal: the options considered, the trade-offs, the risks, how to verify it."
        return await brief(ask, goal, "design decision architecture")

    @server.prompt(name="documentation", title="Write documentation")
    async def documentation(
        subject: Annotated[str, Field(description="What to document, and for which readers")],
    ) -> str:
        """Write or improve documentation, following the team's documentation guidelines."""
        ask = "Write documentation for this subject. Lead with what the reader needs to do; give examples that work."
        return await brief(ask, subject, "documentation writing")

    @server.prompt(name="onboarding", title="Onboard to the team's ways")
    async def onboarding(
        area: Annotated[str, Field(description="The area or role to start on, e.g. 'backend services'")] = "",
    ) -> str:
        """A newcomer's introduction: the team's principles and the practices that matter most for an area."""
        ask = (
            "Introduce me to how this team works: the principles to keep, the practices to follow, and where to "
            "read more." + (f" I am starting on: {area}." if area else "")
        )
        return await brief(ask, "", f"onboarding principles practices {area}".strip())
