"""The REST facade for scripts and probes: small, versioned, described by OpenAPI built from the same models."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_server.errors import (
    InvalidInput,
    PreconditionFailed,
    StaleRevision,
    UnsupportedMediaType,
    clip,
    invalid_input,
)
from sage_server.models import (
    ID_PATTERN,
    MAX_REVISION,
    AuditPage,
    ContextResult,
    Document,
    DocumentIn,
    DocumentList,
    Health,
    History,
    Info,
    SearchResult,
    check_id,
    check_text,
)
from sage_server.service import KnowledgeService
from sage_server.version import __version__

PARTIAL_HEADER = "X-SAGE-Partial"
W = TypeVar("W")  # what a guarded write returns


class ErrorBody(BaseModel):
    """The one error shape every endpoint returns."""

    status: int
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody


# The document rules (models.DocumentIn) said as JSON-schema patterns, so the OpenAPI document describes exactly what
# is accepted: REST takes text as sent (no control characters; a body may hold tabs and line breaks) and ids as they
# are, where an import would strip and drop blanks first.
NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f]*$"
BODY_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
LANGUAGE = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$"
Line = Annotated[str, Field(json_schema_extra={"pattern": NO_CONTROLS})]
Id = Annotated[str, Field(json_schema_extra={"pattern": ID_PATTERN})]
Language = Annotated[str, Field(pattern=LANGUAGE)]


def _line(value: str) -> str:
    return check_text(value)


def _lines(values: list[str]) -> list[str]:
    return [check_text(value) for value in values]


def _ids(values: list[str]) -> list[str]:
    return [check_id(value) for value in values]


# A tag filter names a tag, which is never empty and holds no control character.
TagFilter = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": NO_CONTROLS})]


class ListQuery(BaseModel):
    layer: str | None = Field(None, min_length=1)
    tag: list[TagFilter] = Field(default_factory=list)
    limit: int = Field(50, ge=1, le=100)
    cursor: str | None = None

    _tags = field_validator("tag")(_lines)


# At least one character Python does not take for whitespace (the service strips the rest away): ECMAScript's \s,
# which OpenAPI tools read, lacks the separators \x1c-\x1f and \x85 that str.strip() removes.
NOT_BLANK = r"[^\s\x1c-\x1f\x85]"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _text(description: str) -> Any:
    """A required text of up to 4000 characters, not all whitespace (said in the schema as a pattern)."""
    return Field(min_length=1, max_length=4000, description=description, json_schema_extra={"pattern": NOT_BLANK})


class SearchQuery(BaseModel):
    q: str = _text('Any text; "phrases" and prefix* work')
    layer: list[str] = Field(default_factory=list)
    tag: list[TagFilter] = Field(default_factory=list)
    limit: int = Field(10, ge=1, le=100)
    cursor: str | None = None
    explain: bool = Field(False, description="Say why each hit ranked where it did")

    _q = field_validator("q")(_not_blank)
    _tags = field_validator("tag")(_lines)


class ContextQuery(BaseModel):
    task: str = _text("What you are about to do, e.g. add retries to the payment client")
    max_tokens: int | None = Field(None, ge=200, le=100_000)
    layer: list[str] = Field(default_factory=list)

    _task = field_validator("task")(_not_blank)


ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$")


class AuditQuery(BaseModel):
    since: datetime | None = Field(None, description="Entries at or after this time (ISO 8601)")
    after: int = Field(0, ge=0, le=2**62, description="Entries after this entry number (next_after of a page)")
    limit: int = Field(100, ge=1, le=1000)

    @field_validator("since", mode="before")
    @classmethod
    def _iso_time(cls, value: object) -> object:
        # pydantic would also read a number as Unix time; the documented form is an ISO 8601 date-time.
        if value is not None and not (isinstance(value, str) and ISO_DATE.match(value)):
            raise ValueError("since must be an ISO 8601 date-time such as 2026-11-29T10:00:00Z")
        return value


class TranslationBody(BaseModel):
    """A title and summary in another language."""

    title: str = Field("", max_length=300, json_schema_extra={"pattern": NO_CONTROLS})
    summary: str = Field("", json_schema_extra={"pattern": NO_CONTROLS})

    _text = field_validator("title", "summary")(_line)


class DocumentBody(BaseModel):
    """A document to store under the id in the path."""

    title: str = Field(min_length=1, max_length=300, json_schema_extra={"pattern": NO_CONTROLS})
    layer: str
    body: str = Field(min_length=1, json_schema_extra={"pattern": BODY_TEXT})
    tags: list[Line] = Field(default_factory=list)
    triggers: list[Line] = Field(default_factory=list)
    summary: str = Field("", json_schema_extra={"pattern": NO_CONTROLS})
    related: list[Id] = Field(default_factory=list)
    aliases: list[Id] = Field(default_factory=list)
    translations: dict[Language, TranslationBody] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False}
    )

    _text = field_validator("title", "summary")(_line)
    _lists = field_validator("tags", "triggers")(_lines)
    _id_lists = field_validator("related", "aliases")(_ids)

    @field_validator("body")
    @classmethod
    def _body(cls, value: str) -> str:
        check_text(value.replace("\r", "\n"), body=True)  # a carriage return is a line break, stored as one
        return value


class RestoreBody(BaseModel):
    revision: int = Field(ge=1, le=MAX_REVISION, description="The revision to make current again, from the history")


class Ready(BaseModel):
    ready: bool


JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
IF_MATCH = re.compile(r'^(?:W/)?"?([0-9]{1,19})"?$')


def _query(request: Request, model: type[BaseModel]) -> Any:
    params = request.query_params
    raw: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        values = params.getlist(name)
        if values:
            raw[name] = values if get_origin(info.annotation) is list else values[-1]
    unknown = sorted(set(params) - set(model.model_fields))
    if unknown:
        raise InvalidInput(f"unknown query parameter {clip(unknown[0])!r}", field=clip(unknown[0]))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc, model.model_json_schema()) from exc


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as `model`. Only a body declared as JSON is read (415 otherwise): a cross-site form or
    text/plain post must never be taken for one."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not JSON_TYPE.match(media_type):
        raise UnsupportedMediaType(
            f"the request body must be JSON sent as Content-Type: application/json, not {clip(media_type or 'none')!r}",
            field="Content-Type",
        )
    raw = await request.body()
    try:
        data = json.loads(raw)
    except RecursionError as exc:  # nested deeper than the parser's stack allows
        raise InvalidInput("request body is nested too deeply", field="body") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and integers over Python's digit limit
        raise InvalidInput(f"request body is not valid JSON: {clip(exc, 200)}", field="body") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc, model.model_json_schema()) from exc
    except RecursionError as exc:
        raise InvalidInput("request body is nested too deeply", field="body") from exc


def _doc_id(request: Request) -> str:
    """The id in the path, checked before it reaches the service (and before it could be echoed back whole)."""
    try:
        return check_id(str(request.path_params["doc_id"]))
    except ValueError as exc:
        raise InvalidInput(str(exc), field="doc_id") from exc


def _if_match(request: Request) -> int | None:
    """The revision an If-Match header names (`"3"`, `W/"3"`, `3`); None without one or for `*`."""
    value = request.headers.get("if-match", "").strip()
    if not value or value == "*":
        return None
    match = IF_MATCH.match(value)
    if match is None:
        raise InvalidInput(f'If-Match must be a document revision, e.g. "3" (got {clip(value)!r})', field="If-Match")
    return int(match.group(1))


async def _guarded(write: Awaitable[W]) -> W:
    """A write with an If-Match precondition: a stale revision is 412 Precondition Failed (RFC 9110)."""
    try:
        return await write
    except StaleRevision as exc:
        raise PreconditionFailed(exc.message, **exc.details) from exc


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status, headers=headers)


Handler = Callable[[Request, KnowledgeService], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One REST operation: its route, handler, and what OpenAPI says about it."""

    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    public: bool = False  # no API key needed (probes)


async def health(request: Request, kb: KnowledgeService) -> Response:
    result = await kb.health()
    return _json(result, 503 if result.status == "unhealthy" else 200)


async def ready(request: Request, kb: KnowledgeService) -> Response:
    return _json(Ready(ready=kb.ready), 200 if kb.ready else 503)


async def list_documents(request: Request, kb: KnowledgeService) -> Response:
    q: ListQuery = _query(request, ListQuery)
    return _json(await kb.list(q.layer, q.tag, q.limit, q.cursor))


async def get_document(request: Request, kb: KnowledgeService) -> Response:
    doc = await kb.get(_doc_id(request))
    return _json(doc, headers={"ETag": f'"{doc.revision}"'})


async def put_document(request: Request, kb: KnowledgeService) -> Response:
    doc_id = _doc_id(request)
    expected = _if_match(request)
    body: DocumentBody = await _body(request, DocumentBody)
    try:
        doc_in = DocumentIn(id=doc_id, **body.model_dump())
    except ValidationError as exc:
        raise invalid_input(exc, DocumentIn.model_json_schema()) from exc
    saved = await _guarded(kb.save_outcome(doc_in, expected_revision=expected))
    status = 201 if saved.outcome == "created" else 200
    return _json(saved.document, status, headers={"ETag": f'"{saved.document.revision}"'})


async def delete_document(request: Request, kb: KnowledgeService) -> Response:
    doc_id = _doc_id(request)
    return _json(await _guarded(kb.delete(doc_id, expected_revision=_if_match(request))))


async def document_history(request: Request, kb: KnowledgeService) -> Response:
    return _json(await kb.history(_doc_id(request)))


async def restore_document(request: Request, kb: KnowledgeService) -> Response:
    doc_id = _doc_id(request)
    body: RestoreBody = await _body(request, RestoreBody)
    return _json(await kb.restore(doc_id, body.revision))


def _partial(result: SearchResult | ContextResult) -> dict[str, str]:
    """A deadline cut the work short: say so in a header too, for scripts that only look at headers."""
    return {PARTIAL_HEADER: result.partial_reason or "partial"} if result.partial else {}


async def search(request: Request, kb: KnowledgeService) -> Response:
    q: SearchQuery = _query(request, SearchQuery)
    result = await kb.search(q.q, q.layer, q.tag, q.limit, q.cursor, q.explain)
    return _json(result, headers=_partial(result))


async def context(request: Request, kb: KnowledgeService) -> Response:
    q: ContextQuery = _query(request, ContextQuery) if request.method == "GET" else await _body(request, ContextQuery)
    result = await kb.context(q.task, q.max_tokens, q.layer)
    return _json(result, headers=_partial(result))


async def info(request: Request, kb: KnowledgeService) -> Response:
    return _json(await kb.info())


async def audit_trail(request: Request, kb: KnowledgeService) -> Response:
    q: AuditQuery = _query(request, AuditQuery)
    return _json(await kb.audit_trail(q.since, q.after, q.limit))


ENDPOINTS = [
    Endpoint("GET", "/health", health, "Health of core, cache and knowledge (spec 6.3)", Health, public=True),
    Endpoint("GET", "/ready", ready, "503 until the first import has finished", Ready, public=True),
    Endpoint("GET", "/v1/knowledge", list_documents, "List documents by layer and tag", DocumentList, ListQuery),
    Endpoint("GET", "/v1/knowledge/{doc_id}", get_document, "Get one document (ETag: its revision)", Document),
    Endpoint(
        "PUT",
        "/v1/knowledge/{doc_id}",
        put_document,
        "Create or update (If-Match: expected revision)",
        Document,
        body=DocumentBody,
    ),
    Endpoint(
        "DELETE", "/v1/knowledge/{doc_id}", delete_document, "Soft-delete (If-Match: expected revision)", Document
    ),
    Endpoint("GET", "/v1/knowledge/{doc_id}/history", document_history, "Every revision, newest first", History),
    Endpoint(
        "POST",
        "/v1/knowledge/{doc_id}/restore",
        restore_document,
        "Make a revision current again",
        Document,
        body=RestoreBody,
    ),
    Endpoint(
        "GET", "/v1/search", search, "Full-text search (BM25, snippets, filters, cursor)", SearchResult, SearchQuery
    ),
    Endpoint(
        "GET", "/v1/context", context, "Context for a task, packed under a token budget", ContextResult, ContextQuery
    ),
    Endpoint("POST", "/v1/context", context, "Context for a long task description", ContextResult, body=ContextQuery),
    Endpoint("GET", "/v1/info", info, "What the knowledge base holds", Info),
    Endpoint("GET", "/v1/audit", audit_trail, "The audit trail, oldest first (admin keys only)", AuditPage, AuditQuery),
]


def _dispatch(path: str, endpoints: list[Endpoint], kb: KnowledgeService) -> Route:
    """One route per path, however many methods it has, so a 405 lists them all in `Allow`. SageErrors raised by a
    handler are rendered by the app's exception handler."""
    by_method = {e.method: e for e in endpoints}
    if "GET" in by_method:
        by_method.setdefault("HEAD", by_method["GET"])

    async def handle(request: Request) -> Response:
        return await by_method[request.method].handler(request, kb)

    return Route(path, handle, methods=list(by_method), name=path)


def routes(kb: KnowledgeService, auth_required: bool, probes_only: bool = False) -> list[Route]:
    """The REST routes over `kb` and /openapi.json; with `probes_only`, just /health and /ready. Authentication,
    Host and Origin checks happen before any of them, in the app's front door."""
    endpoints = [e for e in ENDPOINTS if e.public or not probes_only]
    paths: dict[str, list[Endpoint]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, []).append(endpoint)
    found = [_dispatch(path, group, kb) for path, group in paths.items()]
    if probes_only:
        return found
    spec = openapi(kb.settings.layers, auth_required)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(spec)

    return [*found, Route("/openapi.json", openapi_json, methods=["GET"])]


def _with_layers(schema: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    """`schema` with every `layer` property (or list of layers) limited to the configured layers."""
    for name, prop in schema.get("properties", {}).items():
        if name != "layer":
            continue
        for option in prop.get("anyOf") or [prop]:
            if option.get("type") == "string":
                option["enum"] = list(layers)
            elif option.get("type") == "array":
                option.setdefault("items", {})["enum"] = list(layers)
    return schema


def openapi(layers: list[str], auth_required: bool = False) -> dict[str, Any]:
    """OpenAPI 3.1 for ENDPOINTS, with schemas generated from the pydantic models (layers as an enum of the
    configured ones) and every status an operation answers."""
    ref = "#/components/schemas/{model}"
    schemas: dict[str, Any] = {}

    def schema_ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=ref)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = _with_layers(schema, layers)
        return {"$ref": ref.format(model=model.__name__)}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema_ref(ErrorResponse)}}}

    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        ok = {"description": "OK", "content": {"application/json": {"schema": schema_ref(e.response)}}}
        responses: dict[str, Any] = {"200": ok}
        if e.method == "PUT":
            responses["200"] = {**ok, "description": "Updated (or unchanged)"}
            responses["201"] = {**ok, "description": "Created"}
        if "{doc_id}" in e.path:
            responses["404"] = error("No document with that id (close ids suggested)")
        if e.method in {"PUT", "DELETE"}:
            responses["412"] = error("If-Match named a revision that is no longer current")
        if e.body is not None:
            responses["413"] = error("Body over the size limit")
            responses["415"] = error("Body not sent as application/json")
        if not e.public:
            responses["422"] = error("An argument is invalid (the message names it)")
            # Named keys may be made at any time, so these hold whether a credential is configured now or not.
            responses["401"] = error("No valid credential")
            responses["403"] = error("The key's scope does not allow this operation")
        responses["default"] = error("Error")
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": f"{e.method.lower()}_{e.handler.__name__}",
            "responses": responses,
        }
        params: list[dict[str, Any]] = []
        if "{doc_id}" in e.path:
            params.append(
                {
                    "name": "doc_id",
                    "in": "path",
                    "required": True,
                    "description": "Document id, e.g. timeout-resilience",
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                }
            )
        if e.query is not None:
            schema = _with_layers(e.query.model_json_schema(), layers)
            for name, prop in schema["properties"].items():
                param: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": name in schema.get("required", []),
                    "schema": prop,
                }
                if prop.get("type") == "array":
                    param.update(style="form", explode=True)
                params.append(param)
        if e.method in {"PUT", "DELETE"}:
            params.append(
                {
                    "name": "If-Match",
                    "in": "header",
                    "required": False,
                    "description": 'The revision you read (its ETag, e.g. "3"): the write happens only if it is still '
                    "current, else 412. Omit it (or send *) to write whatever the current revision.",
                    "schema": {"type": "string", "pattern": r'^(\*|(W/)?"?[0-9]{1,18}"?)?$'},
                }
            )
        if params:
            op["parameters"] = params
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema_ref(e.body)}}}
        if auth_required and not e.public:
            op["security"] = [{"bearer": []}, {"apiKey": []}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "SAGE knowledge server", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth_required:
        spec["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    return spec
