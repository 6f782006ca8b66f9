"""The MCP edge: register service calls as tools, resources and prompts, translating SageError once, here."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError, UnexpectedToolError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, InputRequiredResult, TextContent, Tool, ToolAnnotations
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


def compact_schema(schema: Any) -> Any:
    """A tool's input schema as a model needs it, a third smaller than pydantic writes it: no `title` (pydantic gives
    every property and model its own name again), and an optional argument as its plain type, without the
    `anyOf [..., null]` and `default: null` that only say it may be left out (which `required` already says). The
    server still accepts an explicit null for such an argument."""
    if isinstance(schema, list):
        return [compact_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    variants = schema.get("anyOf")
    if "default" in schema and schema["default"] is None and isinstance(variants, list) and len(variants) == 2:
        kept = [variant for variant in variants if variant != {"type": "null"}]
        if len(kept) == 1 and isinstance(kept[0], dict):
            rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
            schema = {**kept[0], **rest}
    compacted: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):  # maps of names to schemas
            compacted[key] = {name: compact_schema(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "additionalProperties", "not"):
            compacted[key] = compact_schema(value)
        else:
            compacted[key] = value  # instance data (default, enum, examples...) is left as it is
    return compacted


class SageServer(MCPServer[Any]):
    """The SDK's server, with arguments that fail a tool's input schema reported the way REST reports them: the
    argument, the range it allows and (bounded) what it got, instead of pydantic's text with documentation links;
    and the tool list without the schema noise that costs every session tokens."""

    async def list_tools(self) -> list[Tool]:
        return [
            tool.model_copy(update={"input_schema": compact_schema(tool.input_schema)})
            for tool in await super().list_tools()
        ]

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
    description: str,
    read_only: bool,
    destructive: bool = False,
    idempotent: bool = True,
) -> Callable[[ToolFunction[P]], ToolFunction[P]]:
    """Register an async function returning a pydantic model as a tool named after the function.

    Its signature is the input schema (each argument described there, once); `description` is what the model reads
    about the tool. The result is the model as structured content and as compact JSON text; no output schema is
    published, since the schemas of SAGE's results would triple the size of the tool list every session pays for
    (the description says what comes back). A SageError, or a model rejecting the arguments, becomes a tool error
    the model can act on; anything else is left to the SDK, which logs it and answers a generic error without ending
    the session. Every call is counted in `metrics` with its outcome, and a result with the tokens it costs.
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

        # `call` keeps fn's signature (functools.wraps), so the SDK derives the input schema from fn; it passes the
        # CallToolResult on as it is.
        server.add_tool(
            call,
            name=name,
            title=title,
            description=description,
            # The spec gives the destructive and idempotent hints meaning only for tools that write.
            annotations=ToolAnnotations(
                read_only_hint=read_only,
                destructive_hint=None if read_only else destructive,
                idempotent_hint=None if read_only else idempotent,
                open_world_hint=False,
            ),
            structured_output=False,
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
