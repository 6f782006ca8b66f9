"""The SageError tree: raised in the core, translated once at each edge (CLI, MCP, REST)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

# Client-supplied text echoed in an error (an id, a bad value) is cut to this many characters.
ECHO_LIMIT = 80


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` as text, cut to `limit` characters with its full length said, so an error never echoes a huge input."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def error_document(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one JSON error shape of every HTTP answer: `{"error": {status, code, message, details}}`. The app renders
    it through middleware.error_response; the layers in front of the app (the in-flight gate, the connection
    guards) that must answer before any app runs build theirs here too."""
    return {"error": {"status": status, "code": code, "message": message, "details": details or {}}}


class SageError(Exception):
    """Base of every error SAGE raises on purpose. `status` is the HTTP status, `code` a stable name.

    `headers` go out with the HTTP answer (WWW-Authenticate, Retry-After, Allow). An error whose `internal` is true
    may carry text meant for operators only (a database message, a path): edges log it and tell the client `code`
    and a generic sentence, never the text itself.
    """

    status = 500
    code = "internal_error"
    exit_code = 1
    internal = True
    public_message = "internal error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class InvalidInput(SageError):
    """An argument or document failed validation."""

    status = 422
    code = "invalid_input"
    exit_code = 2
    internal = False


class Unauthorized(SageError):
    """The request carries no valid credential. `details['reason']` says why: missing, invalid, unsupported_scheme."""

    status = 401
    code = "unauthorized"
    internal = False


class Forbidden(SageError):
    """The request may not do this: a write from a foreign web page, say."""

    status = 403
    code = "forbidden"
    internal = False


class NotFound(SageError):
    """No document (or revision) with that id; `details['suggestions']` names close ids."""

    status = 404
    code = "not_found"
    internal = False


class MethodNotAllowed(SageError):
    """The route exists but not with this method; the `Allow` header lists the ones it has."""

    status = 405
    code = "method_not_allowed"
    internal = False


class Conflict(SageError):
    """A write lost a race or cannot apply to the document's current state."""

    status = 409
    code = "conflict"
    internal = False


class StaleRevision(Conflict):
    """The caller's expected revision is not the current one. Over MCP a conflict; over REST, where the expected
    revision is an If-Match header, a failed precondition (412)."""


class PreconditionFailed(SageError):
    """An HTTP precondition (If-Match) does not hold (RFC 9110, 412)."""

    status = 412
    code = "precondition_failed"
    internal = False


class PayloadTooLarge(SageError):
    """The request body is over the limit."""

    status = 413
    code = "payload_too_large"
    internal = False


class UnsupportedMediaType(SageError):
    """A body that must be JSON was sent as something else (415)."""

    status = 415
    code = "unsupported_media_type"
    internal = False


class MisdirectedRequest(SageError):
    """The Host header names no name this server answers to (DNS-rebinding protection, 421)."""

    status = 421
    code = "misdirected_request"
    internal = False


class RateLimited(SageError):
    """The client made too many requests; `Retry-After` says when to try again."""

    status = 429
    code = "rate_limited"
    internal = False


class Timeout(SageError):
    """An operation ran past its deadline."""

    status = 504
    code = "timeout"
    internal = False


class Unavailable(SageError):
    """A dependency (the database, a cache) cannot serve the request now."""

    status = 503
    code = "unavailable"
    public_message = "the knowledge base cannot serve this request now; try again later"


class NotSupported(SageError):
    """The store in use does not do this yet (e.g. search on PostgreSQL): the message says what does."""

    status = 501
    code = "not_supported"
    internal = False


class ConfigError(SageError):
    """A setting or config file is invalid; the program stops with exit code 2."""

    status = 500
    code = "config_error"
    exit_code = 2


class MigrationError(SageError):
    """The database schema cannot be brought to the version this code needs."""

    status = 500
    code = "migration_error"
    exit_code = 2


def _expected(schema: dict[str, Any] | None) -> str:
    """What an argument accepts, from its JSON schema (the bounds pydantic checked), e.g. 'an integer from 1 to 100'."""
    if schema is None:
        return ""
    options = schema.get("anyOf") or [schema]
    prop = next((o for o in options if o.get("type") != "null"), schema)
    kind = {"integer": "an integer", "string": "a string", "array": "a list", "boolean": "true or false"}.get(
        prop.get("type", ""), ""
    )
    low, high = prop.get("minimum"), prop.get("maximum")
    if "enum" in prop:
        return "one of " + ", ".join(clip(v, 40) for v in prop["enum"])
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} of at least {low}"
    if high is not None:
        return f"{kind} of at most {high}"
    shortest, longest = prop.get("minLength"), prop.get("maxLength")
    if longest is not None:
        return f"{kind} of {shortest or 0} to {longest} characters"
    if shortest:
        return f"{kind} of at least {shortest} characters"
    return kind


def invalid_input(exc: ValidationError, schema: dict[str, Any] | None = None, prefix: str = "") -> InvalidInput:
    """A pydantic ValidationError as one short InvalidInput: each bad field named, with what it accepts (read from
    `schema`, the JSON schema of the model or tool arguments) and a bounded echo of what it got. pydantic's own text
    (URLs, the whole input) stays out."""
    properties = (schema or {}).get("properties", {})
    problems: list[str] = []
    errors: list[dict[str, str]] = []
    for error in exc.errors(include_url=False):
        field = prefix + (".".join(str(part) for part in error["loc"]) or "value")
        top = str(error["loc"][0]) if error["loc"] else ""
        message = "required" if error["type"] == "missing" else str(error["msg"]).removeprefix("Value error, ")
        # A bound or type is said as the range allowed; a pattern or a custom check keeps its own message.
        specific = error["type"] in ("value_error", "string_pattern_mismatch", "assertion_error")
        expected = _expected(properties.get(top)) if len(error["loc"]) == 1 and not specific else ""
        if error["type"] == "missing":
            problems.append(f"{field} is required" + (f" ({expected})" if expected else ""))
        else:
            got = f" (got {clip(repr(error.get('input')), 40)})"
            problems.append(f"{field} must be {expected}{got}" if expected else f"{field}: {message}{got}")
        errors.append({"field": field, "message": clip(message, 200)})
    first = errors[0]["field"] if errors else "value"
    return InvalidInput("; ".join(problems[:3]), field=first, errors=errors[:20])
