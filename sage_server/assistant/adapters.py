"""The MCP edge: register service calls as tools, resources and prompts, translating SageError once, here."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError, UnexpectedToolError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ValidationError

from sage_server.errors import InvalidInput, NotFound, SageError, clip, invalid_input
from sage_server.logs import REQUEST, get_logger, log_event
from sage_server.metrics import Metrics
from sage_server.models import Bounded
from sage_server.text import estimate_tokens

log = get_logger("mcp")
P = ParamSpec("P")
T = TypeVar("T")
ToolFunction = Callable[P, Awaitable[BaseModel]]


MESSAGE_LIMIT = 500  # characters of an error message a model reads


def describe(exc: SageError) -> str:
    """The message a model reads for a SageError: its code, its message, and close ids it may have meant.

    An internal error's text (a database message, a path) is logged, not sent: the model gets the code and a
    generic sentence, with the request id when there is one."""
    if exc.internal:
        request_id = (REQUEST.get() or {}).get("request_id")
        log_event(
            log, logging.WARNING, "Error withheld from the client", operation="mcp", code=exc.code, detail=exc.message
        )
        return f"{exc.code}: {exc.public_message}" + (f" (request id {request_id})" if request_id else "")
    suggestions = [str(s) for s in exc.details.get("suggestions") or []]
    text = f"{exc.code}: {clip(exc.message, MESSAGE_LIMIT)}"
    if suggestions and not all(s in exc.message for s in suggestions):
        text += f" (closest: {', '.join(suggestions)})"
    return text


class SageServer(MCPServer[Any]):
    """The SDK's server, with arguments that fail a tool's input schema reported the way REST reports them: the
    argument, the range it allows and (bounded) what it got, instead of pydantic's text with documentation links."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise  # the SDK logs it and answers a generic error
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):  # the SDK's own check of the arguments
                schema = self._tool_input_schema(name)
                message = describe(invalid_input(exc.__cause__, schema))
                raise ToolError(f"Error executing tool {clip(name)}: {message}") from exc.__cause__
            if len(str(exc)) > MESSAGE_LIMIT:  # e.g. an unknown tool name, echoed whole
                raise ToolError(clip(str(exc), MESSAGE_LIMIT)) from exc
            raise


def tool(
    server: MCPServer[Any],
    metrics: Metrics,
    *,
    title: str,
    read_only: bool,
    destructive: bool = False,
    idempotent: bool = True,
) -> Callable[[ToolFunction[P]], ToolFunction[P]]:
    """Register an async function returning a pydantic model as a tool named after the function.

    Its signature is the input schema and its return type the output schema; its docstring is the description
    the model reads. A SageError, or a model rejecting the arguments, becomes a tool error the model can act on;
    anything else is left to the SDK, which logs it and answers a generic error without ending the session.
    Every call is counted in `metrics` with its outcome, and a result with the tokens it costs.
    """

    def register(fn: ToolFunction[P]) -> ToolFunction[P]:
        name = fn.__name__

        @functools.wraps(fn)
        async def call(*args: P.args, **kwargs: P.kwargs) -> CallToolResult:
            try:
                model = await fn(*args, **kwargs)
            except SageError as exc:
                metrics.tool_call(name, exc.code)
                raise ToolError(describe(exc)) from exc
            except ValidationError as exc:  # a model built from the arguments (DocumentIn, say) refused them
                metrics.tool_call(name, InvalidInput.code)
                error = invalid_input(exc)
                raise ToolError(describe(error)) from error
            except Exception:
                metrics.tool_call(name, "internal_error")
                raise  # the SDK logs it once and answers a generic tool error
            # The text block is the compact JSON that max_tokens was measured on; left to itself, the SDK would
            # send the model's indented dump, which costs more tokens than were budgeted.
            text = model.model_dump_json()
            truncated = isinstance(model, Bounded) and model.truncated
            metrics.tool_call(name, "ok", tokens=estimate_tokens(text), truncated=truncated)
            return CallToolResult(
                content=[TextContent(type="text", text=text)], structured_content=model.model_dump(mode="json")
            )

        # `call` keeps fn's signature (functools.wraps), so the SDK derives both schemas from fn; it accepts the
        # CallToolResult as is after checking its structured content against the output schema.
        server.add_tool(
            call,
            name=name,
            title=title,
            description=inspect.cleandoc(fn.__doc__ or ""),
            annotations=ToolAnnotations(
                title=title,
                read_only_hint=read_only,
                destructive_hint=None if read_only else destructive,
                idempotent_hint=idempotent,
                open_world_hint=False,
            ),
        )
        return fn

    return register


def resource_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Turn a SageError raised while reading a resource into the resource error the client should see."""

    @functools.wraps(fn)
    async def read(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (NotFound, InvalidInput) as exc:
            raise ResourceNotFoundError(describe(exc)) from exc
        except SageError as exc:
            raise ResourceError(describe(exc)) from exc

    return read


def prompt_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Turn a SageError raised while rendering a prompt into an invalid-params error naming the problem.

    The SDK would otherwise report any prompt failure as a bare internal error.
    """

    @functools.wraps(fn)
    async def render(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except SageError as exc:
            raise MCPError(code=INVALID_PARAMS, message=describe(exc)) from exc

    return render
